"""Mixture-of-experts GPT on tiny Shakespeare vs the dense baby GPT at equal active parameters.

The baby GPT of configs/gpt_shakespeare_char.py (4 layers, 4 heads, width 128, context 64, MLP
hidden 512) with every block's MLP replaced by ``experts`` expert MLPs (research/nn/moe.py):
- ``top_k=1`` (Switch): each expert has the dense MLP's hidden size 512, so a token meets exactly
  the dense model's parameters (plus a 128 x experts router): equal active parameters, ``experts``
  times the MLP parameters in total;
- ``top_k=2`` (GShard): expert hidden 256, two experts per token: again equal active parameters.
Capacity factor 1.25 (tokens past an expert's capacity are dropped and counted:
``train/moe_dropped_fraction``), load-balancing loss 0.01 (``train/moe_aux_loss``), router z-loss
1e-3. ``train/loss`` and ``val/loss`` are the cross-entropy alone, comparable with the dense run.
Experts are split over the ``expert`` mesh axis (all devices by default; experts must divide).

Train (laptop settings, 2000 steps) and its dense baseline:
    python -m research.launch --config configs/moe_shakespeare_char.py --workdir workdirs/moe_baby
    python -m research.launch --config configs/gpt_shakespeare_char.py:size=baby --workdir workdirs/baby
Top-2 routing: --config configs/moe_shakespeare_char.py:top_k=2
A run of seconds:
    python -m research.launch --config configs/moe_shakespeare_char.py:smoke --workdir /tmp/moe_smoke
Expert parallelism on 8 simulated CPU devices (4 experts x 2 data replicas):
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m research.launch \
        --config configs/moe_shakespeare_char.py:smoke --config.mesh.expert=4 \
        --config.mesh.data=2 --workdir /tmp/moe_ep
"""
from research.core.config import ConfigError, parse_arg, sibling_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, experts=8, top_k=1, capacity_factor=1.25)
    if arg.top_k not in (1, 2):
        raise ConfigError(f"configs/moe_shakespeare_char.py:top_k={arg.top_k}: expected 1 or 2")
    gpt = sibling_config(__file__, "gpt_shakespeare_char")
    c = gpt.get_config("size=baby,smoke" if arg.smoke else "size=baby")
    experts = 4 if arg.smoke else arg.experts
    dense_hidden = c.model.mlp_ratio * c.model.embed_dim
    c.model.update(dict(
        moe_experts=experts, moe_top_k=arg.top_k, moe_capacity_factor=arg.capacity_factor,
        moe_aux_loss=0.01, moe_z_loss=1e-3, moe_every=1,
        mlp_hidden=dense_hidden // arg.top_k))  # equal active parameters to the dense MLP
    c.mesh.update(dict(data=1, expert=-1))
    return c
