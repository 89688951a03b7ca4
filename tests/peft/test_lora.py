"""LoRA / rsLoRA / DoRA as transforms (research.peft.lora) on the project's decoder."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.peft import lora
from tests.peft.helpers import lm_loss, nbytes, tiny, train_steps

QV = (r"attn/(query|value)/kernel$",)
ALL = (r"attn/(query|key|value|out)/kernel$", r"mlp/\w+/kernel$")


def setup(cfg: lora.LoraConfig, randomize_b=False):
    model, boxed, tokens = tiny()
    params = nn.meta.unbox(boxed)
    fwd = lambda p: model.apply({"params": p}, tokens)  # noqa: E731
    targets = lora.find_targets(fwd, params, cfg.rules)
    ad = lora.init(jax.random.key(3), targets, cfg, params=params)
    if randomize_b:  # a trained-looking adapter (B = 0 at init)
        ad = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.3
            if lora.path_str(p).endswith("lora_b") else x, ad)
    return model, params, tokens, fwd, targets, ad


def test_targets_layouts():
    _, _, _, _, targets, ad = setup(lora.LoraConfig(rules=ALL, rank=2))
    assert targets["layer_0/attn/query"] == lora.Target((16, 2, 8), 1)
    assert targets["layer_0/attn/out"] == lora.Target((2, 8, 16), 2)   # DenseGeneral axis=(-2,-1)
    assert targets["layer_1/mlp/fc_in"] == lora.Target((16, 64), 1)
    assert ad["layer_0"]["attn"]["out"]["lora_a"].shape == (2, 8, 2)
    assert ad["layer_0"]["attn"]["out"]["lora_b"].shape == (2, 16)


@pytest.mark.parametrize("kw", [dict(), dict(rslora=True, dropout=0.5)])
def test_step0_equals_base_exactly(kw):
    cfg = lora.LoraConfig(rules=ALL, rank=4, **kw)
    _, params, _, fwd, _, ad = setup(cfg)
    base = fwd(params)
    out = lora.apply(fwd, ad, cfg, rng=jax.random.key(9))(params)   # dropout on, B = 0
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


@pytest.mark.parametrize("kw", [dict(), dict(rslora=True), dict(dora=True)])
def test_merged_equals_unmerged(kw):
    cfg = lora.LoraConfig(rules=ALL, rank=3, alpha=8.0, **kw)
    _, params, _, fwd, _, ad = setup(cfg, randomize_b=True)
    if cfg.dora:  # a learned magnitude that differs from the column norms
        ad = jax.tree_util.tree_map_with_path(
            lambda p, x: x * 1.3 if lora.path_str(p).endswith("magnitude") else x, ad)
    unmerged = lora.apply(fwd, ad, cfg)(params)
    merged = fwd(lora.merge(params, ad, cfg))
    assert float(jnp.max(jnp.abs(unmerged - fwd(params)))) > 1e-2   # the adapters do something
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=1e-5)
    if not cfg.dora:
        back = lora.unmerge(lora.merge(params, ad, cfg), ad, cfg)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), back, params)


def test_dora_step0_equals_base():
    cfg = lora.LoraConfig(rules=QV, rank=2, dora=True)
    _, params, _, fwd, _, ad = setup(cfg)
    np.testing.assert_allclose(np.asarray(lora.apply(fwd, ad, cfg)(params)),
                               np.asarray(fwd(params)), atol=1e-6)


def test_gradients_match_hand_written_reference():
    """Reference: for y = x W + b + s (x A) B and L = sum(y * g), dL/dA = s x^T (g B^T) and
    dL/dB = s (x A)^T g (the chain rule written by hand)."""
    dense = nn.Dense(5)
    x = jax.random.normal(jax.random.key(0), (7, 6))
    g = jax.random.normal(jax.random.key(1), (7, 5))
    params = dense.init(jax.random.key(2), x)["params"]
    cfg = lora.LoraConfig(rules=(r"^kernel$",), rank=3, alpha=6.0)
    fwd = lambda p: dense.apply({"params": p}, x)  # noqa: E731
    targets = {"": lora.Target((6, 5), 1)}
    a = jax.random.normal(jax.random.key(3), (6, 3))
    b = jax.random.normal(jax.random.key(4), (3, 5))
    assert lora.find_targets(fwd, params, cfg.rules) == targets
    ad = {"lora_a": a, "lora_b": b}   # the root module's adapters (module path '')
    loss = lambda ad: jnp.sum(lora.apply(fwd, ad, cfg)(params) * g)  # noqa: E731
    grads = jax.grad(loss)(ad)
    s = cfg.scale
    np.testing.assert_allclose(grads["lora_a"], s * x.T @ (g @ b.T), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["lora_b"], s * (x @ a).T @ g, rtol=1e-5, atol=1e-5)


def test_adapter_dropout_is_inverted_dropout_on_the_adapter_input_only():
    """Reference (hand-written): with one-hot inputs x = I, row i of the output is
    x_i W + b + s * m_i / (1 - p) * A_i B with m_i in {0, 1}: the base path never drops."""
    dense = nn.Dense(5)
    x = jnp.eye(6)
    params = dense.init(jax.random.key(2), x)["params"]
    cfg = lora.LoraConfig(rules=(r"^kernel$",), rank=3, alpha=6.0, dropout=0.5)
    ad = {"lora_a": jax.random.normal(jax.random.key(3), (6, 3)),
          "lora_b": jax.random.normal(jax.random.key(4), (3, 5))}
    fwd = lambda p: dense.apply({"params": p}, x)  # noqa: E731
    base = np.asarray(fwd(params))
    full = cfg.scale / (1 - cfg.dropout) * np.asarray(ad["lora_a"] @ ad["lora_b"])
    np.testing.assert_allclose(lora.apply(fwd, ad, cfg)(params), base + full * (1 - cfg.dropout),
                               rtol=1e-5, atol=1e-5)                     # rng=None: no dropout
    kept = []
    for k in range(4):
        d = np.asarray(lora.apply(fwd, ad, cfg, rng=jax.random.key(k))(params)) - base
        for i in range(6):
            on = np.allclose(d[i], full[i], rtol=1e-4, atol=1e-5)
            assert on or np.allclose(d[i], 0.0, atol=1e-6), (k, i)
            kept.append(on)
    assert 0.2 < np.mean(kept) < 0.8


def test_train_step_changes_only_adapters_and_base_has_no_optimizer_state():
    cfg = lora.LoraConfig(rules=QV, rank=2, dropout=0.1)
    _, params, tokens, fwd, _, ad = setup(cfg)
    model = tiny()[0]
    state = {"base": params, "lora": ad}

    def loss(p):
        run = lambda base: model.apply({"params": base}, tokens)  # noqa: E731
        return lm_loss(lora.apply(run, p["lora"], cfg, jax.random.key(5))(p["base"]), tokens)

    new, opt_state = train_steps(loss, state, n=2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 new["base"], params)                     # bitwise unchanged
    for name, leaf in lora.by_layer(new["lora"]).items():
        for k in ("lora_a", "lora_b"):
            assert not np.array_equal(leaf[k], lora.by_layer(ad)[name][k]), (name, k)
    # Adam's two moments for the adapters only (plus scalar counts): no state for the base.
    assert nbytes(opt_state) <= 2 * nbytes(ad) + 64


def test_bad_rules_list_paths():
    with pytest.raises(ConfigError, match=r"match no parameter[\s\S]*layer_0/attn/query/kernel"):
        setup(lora.LoraConfig(rules=(r"attention/q_proj",)))
    with pytest.raises(ConfigError, match="not kernels of nn.Dense"):
        setup(lora.LoraConfig(rules=(r"pos_embed",)))


def test_rank_larger_than_kernel():
    with pytest.raises(ConfigError, match=r"rank=17 exceeds .*layer_0/attn/query/kernel"):
        setup(lora.LoraConfig(rules=QV, rank=17))


def test_adapter_checkpoint_round_trip_and_wrong_base(tmp_path):
    cfg = lora.LoraConfig(rules=QV, rank=2, alpha=4.0, rslora=True)
    _, params, _, fwd, _, ad = setup(cfg, randomize_b=True)
    path = os.path.join(tmp_path, "adapters.npz")
    size = lora.save(path, ad, cfg)
    assert size < nbytes(params) / 5
    ad2, cfg2 = lora.load(path, params)
    assert cfg2 == cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ad2, ad)
    np.testing.assert_array_equal(lora.apply(fwd, ad2, cfg2)(params), lora.apply(fwd, ad, cfg)(params))
    other = jax.tree.map(lambda x: x, params)
    other["layer_1"]["attn"]["value"]["kernel"] = jnp.zeros((16, 4, 4))
    with pytest.raises(ConfigError, match=r"layer_1/attn/value/kernel of shape \(16, 4, 4\)"):
        lora.load(path, other)


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import PartitionSpec as P
    from research.peft import lora
    from tests.peft.helpers import tiny
    assert jax.device_count() == 8
    model, boxed, tokens = tiny()
    params = nn.meta.unbox(boxed)
    cfg = lora.LoraConfig(rules=(r"attn/(query|out)/kernel$", r"mlp/fc_in/kernel$"), rank=2)
    fwd = lambda p: model.apply({"params": p}, tokens)
    names = {lora.path_str(p).rpartition("/")[0]: x.names for p, x in
             jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
             if lora.path_str(p).endswith("kernel")}
    ad = lora.init(jax.random.key(0), lora.find_targets(fwd, params, cfg.rules), cfg, kernel_names=names)
    ad = jax.tree.map(lambda x: x.replace_boxed(x.value + 0.1), ad,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("heads", "tensor"), ("mlp", "tensor"), ("embed", None), ("kv", None), ("vocab", None)]
    tree = {"base": boxed, "lora": ad}
    sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, rules)
    a = sh["lora"]["layer_0"]["attn"]
    assert a["query"]["lora_b"].spec == P(None, "tensor", None), a["query"]["lora_b"].spec
    assert a["out"]["lora_a"].spec == P("tensor", None, None), a["out"]["lora_a"].spec
    assert sh["lora"]["layer_0"]["mlp"]["fc_in"]["lora_b"].spec == P(None, "tensor")
    assert sh["base"]["layer_0"]["attn"]["query"]["kernel"].spec == P(None, "tensor", None)
    values = jax.device_put(nn.meta.unbox(tree), sh)
    f = jax.jit(lambda t: lora.apply(lambda p: model.apply({"params": p}, tokens), t["lora"], cfg)(t["base"]))
    out = f(values)
    ref = lora.apply(fwd, nn.meta.unbox(ad), cfg)(params)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    g = jax.jit(jax.grad(lambda t: f(t).sum()))(values)
    g_ref = jax.grad(lambda t: f(t).sum())(nn.meta.unbox(tree))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), g["lora"], g_ref["lora"])
    print("OK")
""")


def test_adapters_shard_like_their_kernels_on_8_devices():
    """In a subprocess: XLA's device count is fixed per process."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", SHARDED], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
