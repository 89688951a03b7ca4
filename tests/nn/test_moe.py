"""Mixture-of-experts routing and losses on hand examples (research/nn/moe.py).

References: the Switch Transformer paper (Fedus et al. 2021) eq. 4 for the load-balancing loss,
computed by hand below; ST-MoE (Zoph et al. 2022) eq. 5 for the router z-loss; the GShard top-2
dispatch rule (first choices fill the experts before any second choice) worked out by hand."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.models.transformer import TransformerConfig
from research.nn.moe import MoeMlp, capacity, load_balancing_loss, moe_losses, route, router_z_loss

# One group of 4 tokens, 3 experts; router probabilities chosen by hand.
PROBS = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.1, 0.8, 0.1]])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]


def slots(dispatch):
    """[S, X, C] one-hot -> {(token, expert): slot}."""
    return {(s, x): c for s, x, c in zip(*np.nonzero(np.asarray(dispatch)))}


def test_switch_load_balancing_loss_hand_example():
    # f = first-choice fractions (3/4, 1/4, 0); P = mean probabilities (0.475, 0.35, 0.175).
    # Switch eq. 4 (alpha = 1): N * sum_i f_i P_i = 3 * (0.75 * 0.475 + 0.25 * 0.35) = 1.33125.
    _, _, st = route(LOGITS, 1, 4)
    assert float(load_balancing_loss(st["probs"], st["first"])) == pytest.approx(1.33125, rel=1e-6)
    # Uniform routing gives the minimum, 1; all tokens on one confident expert gives N.
    uniform = jnp.full((1, 6, 3), 1 / 3)
    assert float(load_balancing_loss(uniform, jax.nn.one_hot(jnp.arange(6) % 3, 3)[None])) == \
        pytest.approx(1.0)
    onehot = jax.nn.one_hot(jnp.zeros(6, int), 3)[None]
    assert float(load_balancing_loss(onehot, onehot)) == pytest.approx(3.0)


def test_router_z_loss_is_mean_squared_logsumexp():
    logits = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    want = np.mean([np.log(np.exp([1, 2, 3]).sum()) ** 2, np.log(3.0) ** 2])
    assert float(router_z_loss(logits)) == pytest.approx(want, rel=1e-6)


def test_top1_capacity_drops_the_latest_tokens():
    assert capacity(4, 3, 1, 1.5) == 2          # ceil(1.5 * 4 / 3)
    dispatch, combine, st = route(LOGITS, 1, 2)
    # Tokens 0, 1, 2 choose expert 0 (2 slots): token 2 is dropped; token 3 -> expert 1.
    assert slots(dispatch[0]) == {(0, 0): 0, (1, 0): 1, (3, 1): 0}
    np.testing.assert_array_equal(st["kept"][0, :, 0], [1, 1, 0, 1])
    # Switch: the output is scaled by the (unnormalised) router probability.
    np.testing.assert_allclose(np.asarray(combine[0]).sum((1, 2)), [0.7, 0.6, 0.0, 0.8], rtol=1e-6)


def test_top2_first_choices_fill_before_second_choices():
    dispatch, combine, st = route(LOGITS, 2, 2)
    # First choices: 0->e0, 1->e0, 2->e0 (dropped: e0 full), 3->e1 (slot 0).
    # Second choices after all first ones: 0->e1 slot 1, 1->e1 (full, dropped),
    # 2->e2 slot 0, 3->e0 (tie with e2 broken by index; e0 full, dropped).
    assert slots(dispatch[0]) == {(0, 0): 0, (1, 0): 1, (3, 1): 0, (0, 1): 1, (2, 2): 0}
    np.testing.assert_array_equal(st["kept"][0], [[1, 1], [1, 0], [0, 1], [1, 0]])
    # Gates renormalised over the two choices: token 0 -> 0.7/0.9 and 0.2/0.9.
    np.testing.assert_allclose(combine[0, 0, 0, 0], 0.7 / 0.9, rtol=1e-6)
    np.testing.assert_allclose(combine[0, 0, 1, 1], 0.2 / 0.9, rtol=1e-6)
    np.testing.assert_allclose(combine[0, 2, 2, 0], 0.4 / 0.9, rtol=1e-6)


def test_moe_mlp_equals_per_token_expert_loop_and_reports_losses():
    """With room for every token the layer equals running each token through its chosen expert
    (a direct numpy loop) times its gate; the sown losses and dropped fraction are reported."""
    layer = MoeMlp(num_experts=4, hidden_dim=16, top_k=2, capacity_factor=2.0,
                   aux_loss_coef=0.5, z_loss_coef=0.25)
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = layer.init(jax.random.key(1), x)["params"]
    y, state = layer.apply({"params": params}, x, mutable=["moe"])
    p = jax.tree.map(np.asarray, params)
    p = {k: getattr(v, "value", v) for k, v in p.items()}
    xs = np.asarray(x, np.float64).reshape(-1, 8)
    logits = xs @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros_like(xs)
    for i, (tok, pr) in enumerate(zip(xs, probs)):
        top = np.argsort(-pr)[:2]
        for e in top:
            h = np.asarray(jax.nn.gelu(jnp.asarray(tok @ p["w_in"][e]), approximate=False))
            want[i] += pr[e] / pr[top].sum() * (h @ p["w_out"][e])
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 8), want, atol=1e-5)
    aux, metrics = moe_losses(state["moe"])
    first = np.eye(4)[probs.argmax(-1)]
    lb = 4 * np.sum(first.mean(0) * probs.mean(0))
    z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(float(aux), 0.5 * lb + 0.25 * z, rtol=1e-5)
    assert float(metrics["moe_dropped_fraction"]) == 0.0


def test_moe_config_errors():
    with pytest.raises(ConfigError, match="moe_top_k"):
        TransformerConfig(vocab_size=10, num_heads=2, embed_dim=8, moe_experts=4, moe_top_k=3)
    with pytest.raises(ConfigError, match="moe_experts"):
        TransformerConfig(vocab_size=10, num_heads=2, embed_dim=8, moe_experts=4, mlp="swiglu")
