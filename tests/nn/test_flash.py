"""Blockwise (FlashAttention-style) attention against the naive reference
``research.nn.attention.dot_product_attention`` (softmax(q k^T / sqrt(d)) v over a full [T, S]
mask): outputs and gradients to 1e-5 in float32, for causal, padding and GQA cases and block
sizes that do not divide the lengths; and a whole GPT's loss and gradients with either path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.models.transformer import Decoder, TransformerConfig
from research.nn.attention import causal_mask, dot_product_attention
from research.nn.flash import attention


def inputs(b, t, s, h, kh, d, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return f(b, t, h, d), f(b, s, kh, d), f(b, s, kh, d), f(b, t, h, d)


@pytest.mark.parametrize("t,s,h,kh,causal,pad,bq,bk", [
    (32, 32, 4, 4, True, False, 8, 8),      # causal, blocks divide
    (37, 37, 4, 2, True, True, 8, 16),      # causal + padding + GQA, ragged blocks
    (20, 45, 4, 1, False, True, 16, 8),     # cross-attention shape, padding, MQA
    (20, 45, 4, 2, True, False, 7, 9),      # causal with S > T (queries at the end)
])
def test_blockwise_equals_naive(t, s, h, kh, causal, pad, bq, bk):
    q, k, v, w = inputs(2, t, s, h, kh, 16)
    mask = None
    full = causal_mask(t, s, s - t) if causal else jnp.ones((t, s), bool)
    if pad:
        mask = jnp.asarray(np.arange(s)[None, :] < np.array([s, s - 5])[:, None])[:, None, None, :]
        full = full & mask
    naive = lambda q, k, v: dot_product_attention(q, k, v, full)  # noqa: E731
    flash = lambda q, k, v: attention(q, k, v, mask, causal=causal, block_q=bq, block_k=bk)  # noqa
    np.testing.assert_allclose(flash(q, k, v), naive(q, k, v), atol=1e-5, rtol=1e-5)
    grads = [jax.grad(lambda *a, f=f: (f(*a) * w).sum(), (0, 1, 2))(q, k, v) for f in (naive, flash)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_gpt_with_blockwise_attention_equals_xla():
    base = dict(vocab_size=11, num_layers=2, num_heads=4, embed_dim=32, max_len=24, num_kv_heads=2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 11, (2, 24)), jnp.int32)
    models = [Decoder(TransformerConfig(**base, attention_impl=i)) for i in ("xla", "blockwise")]
    params = models[0].init(jax.random.key(0), tokens)["params"]

    def loss(p, model):
        return jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 0].mean()

    (l0, g0), (l1, g1) = [jax.value_and_grad(loss)(params, m) for m in models]
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5), g0, g1)


def test_gpu_kernels_refuse_the_cpu_clearly():
    q, k, v, _ = inputs(1, 8, 8, 2, 2, 8)
    for impl in ("cudnn", "pallas"):
        with pytest.raises(ConfigError, match=f"attention_impl='{impl}' needs a GPU"):
            attention(q, k, v, causal=True, impl=impl)
    with pytest.raises(ConfigError, match="attention_impl"):
        TransformerConfig(vocab_size=5, attention_impl="flash")
