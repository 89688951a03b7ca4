"""A tiny decoder and a one-step trainer shared by the PEFT tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from research.core import optim
from research.models.transformer import Decoder, TransformerConfig

CFG = TransformerConfig(vocab_size=13, num_layers=2, num_heads=2, embed_dim=16, max_len=16,
                        use_bias=True)


def tiny():
    model = Decoder(CFG)
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, CFG.vocab_size)
    boxed = model.init({"params": jax.random.key(0)}, tokens)["params"]
    return model, boxed, tokens


def optim_config(lr=1e-2, steps=10):
    c = ml_collections.ConfigDict()
    c.total_steps = steps
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, min_lr=0.0, warmup_steps=0, decay_steps=steps, schedule="constant",
        b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
    return c


def frozen_base_mask(params):
    """The FinetuneTask's mask: everything outside 'base' trains."""
    from research.peft.lora import path_str
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p).split("/")[0] != "base",
                                            params)


def train_steps(loss_fn, params, n=2, mask=frozen_base_mask):
    """``n`` steps of the project's optimizer (research.core.optim) with the trainable mask;
    returns (params, opt_state)."""
    tx, _ = optim.build(optim_config(), mask)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(n):
        params, state = step(params, state)
    return params, state


def lm_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


__all__ = ["CFG", "tiny", "train_steps", "lm_loss", "nbytes", "jnp"]
