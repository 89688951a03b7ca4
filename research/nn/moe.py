"""Mixture of experts: a token-routed MLP (Switch Transformer top-1, GShard top-2).

``MoeMlp`` replaces a transformer block's MLP by ``num_experts`` expert MLPs and a linear router.
Each sequence is one routing group (GShard's groups): every expert takes at most
``capacity = ceil(capacity_factor * top_k * T / num_experts)`` of its T tokens; assignments past
that are dropped (the token's residual stream passes through unchanged for that choice) and
counted. Because a group never spans devices, routing is the same however the batch is sharded.

Routing (``top_k``):
- 1 (Switch): each token goes to argmax p(x); its output is scaled by that probability.
- 2 (GShard): the best and second-best experts; the two gates are renormalised to sum to 1.
  All first choices are placed before any second choice, so second choices are dropped first.

Auxiliary losses, sown into the ``moe`` collection (``apply_with_moe_losses`` collects them):
- load balancing (Switch eq. 4): ``aux_loss_coef * X * sum_i f_i P_i`` with ``f_i`` the fraction
  of tokens whose first choice is expert i and ``P_i`` the mean router probability of expert i,
  over all tokens of the batch;
- router z-loss (ST-MoE eq. 5): ``z_loss_coef * mean(logsumexp(router logits)^2)``.

Expert parallelism: the expert kernels [X, E, H] / [X, H, E] carry the logical axis ``expert``
(mesh axis ``expert``); the dispatched tokens [B, X, C, E] are constrained to experts over
``expert`` and the batch over the other data axes, which XLA implements as an all-to-all.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.sharding import constrain
from research.nn.layers import ACTIVATIONS, logical, normal_init

ROUTINGS = (1, 2)


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert per group: ``ceil(capacity_factor * top_k * group_size / num_experts)``."""
    return max(1, int(math.ceil(capacity_factor * top_k * group_size / num_experts)))


def route(logits: jax.Array, top_k: int, cap: int):
    """Router logits [G, S, X] (G groups of S tokens) -> ``(dispatch, combine, stats)``:
    dispatch [G, S, X, C] is 1 where token s fills slot c of expert x, combine the same with the
    gate value; ``stats``: ``probs`` [G, S, X], ``first`` [G, S, X] (one-hot first choices before
    capacity), ``kept`` [G, S, k] (whether each choice found a slot)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    num_experts = probs.shape[-1]
    remaining = probs
    masks, gates = [], []
    for _ in range(top_k):
        choice = jnp.argmax(remaining, axis=-1)
        mask = jax.nn.one_hot(choice, num_experts, dtype=jnp.float32)      # [G, S, X]
        masks.append(mask)
        gates.append(jnp.sum(probs * mask, axis=-1))                       # [G, S]
        remaining = jnp.where(mask > 0, -jnp.inf, remaining)
    if top_k > 1:
        total = sum(gates)
        gates = [g / jnp.maximum(total, 1e-9) for g in gates]
    dispatch = jnp.zeros(probs.shape + (cap,), jnp.float32)
    combine = jnp.zeros_like(dispatch)
    filled = jnp.zeros(probs.shape[:1] + probs.shape[2:], jnp.float32)    # [G, X] used slots
    kept = []
    for mask, gate in zip(masks, gates):
        # Slot of each token in its chosen expert: tokens earlier in the group come first.
        position = (jnp.cumsum(mask, axis=1) - 1.0 + filled[:, None, :]) * mask  # [G, S, X]
        fits = mask * (position < cap)
        slot = jax.nn.one_hot(jnp.sum(position * fits, axis=-1).astype(jnp.int32), cap)
        d = fits[..., None] * slot[:, :, None, :]                           # [G, S, X, C]
        dispatch = dispatch + d
        combine = combine + d * gate[:, :, None, None]
        filled = filled + jnp.sum(mask, axis=1)
        kept.append(jnp.sum(fits, axis=-1))
    return dispatch, combine, {"probs": probs, "first": masks[0], "kept": jnp.stack(kept, -1)}


def load_balancing_loss(probs: jax.Array, first: jax.Array) -> jax.Array:
    """Switch Transformer eq. 4 without alpha: ``X * sum_i f_i P_i`` over all tokens
    (``probs``/``first`` [..., X]). 1 for a uniform router, X when all tokens pick one expert."""
    num_experts = probs.shape[-1]
    f = jnp.mean(first.reshape(-1, num_experts), axis=0)
    p = jnp.mean(probs.reshape(-1, num_experts), axis=0)
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE eq. 5 without its coefficient: ``mean(logsumexp(logits)^2)``."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


class MoeMlp(nn.Module):
    """A mixture of ``num_experts`` GELU (or ``activation``) MLPs; input and output [B, T, E]."""

    num_experts: int
    hidden_dim: int
    top_k: int = 1
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    activation: str = "gelu"
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, e = x.shape
        nx = self.num_experts
        cap = capacity(t, nx, self.top_k, self.capacity_factor)
        # The router in float32 (Switch's "selective precision").
        router = self.param("router", logical(normal_init(self.init_std), ("embed", None)),
                            (e, nx), jnp.float32)
        logits = jnp.einsum("bte,ex->btx", x.astype(jnp.float32), router)
        dispatch, combine, stats = route(logits, self.top_k, cap)
        self.sow("moe", "aux_loss", self.aux_loss_coef * load_balancing_loss(
            stats["probs"], stats["first"]))
        self.sow("moe", "z_loss", self.z_loss_coef * router_z_loss(logits))
        self.sow("moe", "dropped_fraction", 1.0 - jnp.mean(stats["kept"]))

        w_in = self.param("w_in", logical(normal_init(self.init_std), ("expert", "embed", "mlp")),
                          (nx, e, self.hidden_dim), jnp.float32)
        w_out = self.param("w_out", logical(normal_init(self.out_init_std),
                                            ("expert", "mlp", "embed")),
                           (nx, self.hidden_dim, e), jnp.float32)
        dt = self.dtype
        # Tokens to their experts' slots: [B, X, C, E], experts split over the `expert` axis.
        expert_in = jnp.einsum("btxc,bte->bxce", dispatch.astype(dt), x.astype(dt))
        expert_in = constrain(expert_in, ("act_expert_group", "act_expert", None, "act_embed"),
                              "moe expert inputs")
        h = ACTIVATIONS[self.activation](
            jnp.einsum("bxce,xeh->bxch", expert_in, w_in.astype(dt)))
        h = constrain(h, ("act_expert_group", "act_expert", None, "act_mlp"), "moe expert hidden")
        out = jnp.einsum("bxch,xhe->bxce", h, w_out.astype(dt))
        out = constrain(out, ("act_expert_group", "act_expert", None, "act_embed"),
                        "moe expert outputs")
        # And back to the tokens, weighted by their gates (dropped assignments contribute 0).
        y = jnp.einsum("btxc,bxce->bte", combine.astype(dt), out)
        return constrain(y, ("act_batch", "act_length", "act_embed"), "moe output")


def moe_losses(collection: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sown ``moe`` collection -> (weighted aux + z loss summed over layers, metrics averaged
    over layers: ``moe_aux_loss``, ``moe_z_loss``, ``moe_dropped_fraction``)."""
    sums: dict[str, list] = {}
    for path, v in jax.tree_util.tree_flatten_with_path(collection)[0]:
        key = next(str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
        sums.setdefault(key, []).append(v)
    if not sums:
        return jnp.zeros((), jnp.float32), {}
    total = sum(sums.get("aux_loss", [])) + sum(sums.get("z_loss", []))
    metrics = {f"moe_{k}": sum(v) / len(v) for k, v in sums.items()}
    return total, metrics


def apply_with_moe_losses(model: nn.Module, variables: dict, *args, **kwargs):
    """``model.apply`` that also returns the MoE auxiliary loss (0 for a dense model) and the MoE
    metrics: ``(output, aux_loss, metrics)``."""
    out, state = model.apply(variables, *args, mutable=["moe"], **kwargs)
    aux, metrics = moe_losses(state.get("moe", {}))
    return out, aux, metrics
