"""Optimizer from config: AdamW with warm-up + cosine schedule, clipping, decay masks, frozen masks.

``config.optim``: ``name`` ('adamw' | 'adam' | 'sgd'), ``lr``, ``min_lr``, ``warmup_steps``,
``decay_steps`` (None = total_steps), ``schedule`` ('cosine' | 'constant' | 'linear'), ``b1``,
``b2``, ``eps``, ``weight_decay`` (applied to parameters with ndim >= 2 only, as nanoGPT and GPT-2
do: no decay on biases and norm scales), ``grad_clip`` (global norm; None or 0 = off).

A task's ``trainable(params)`` mask (True = train) freezes the rest: frozen leaves get
``optax.set_to_zero`` and so no optimizer state at all (``optax.multi_transform``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from research.core.config import ConfigError


def schedule_from_config(config) -> optax.Schedule:
    o = config.optim
    decay_steps = o.get("decay_steps") or config.total_steps
    kind = o.get("schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
            decay_steps=max(decay_steps, o.warmup_steps + 1), end_value=o.get("min_lr", 0.0))
    if kind == "linear":
        return optax.join_schedules([
            optax.linear_schedule(0.0, o.lr, o.warmup_steps),
            optax.linear_schedule(o.lr, o.get("min_lr", 0.0), max(decay_steps - o.warmup_steps, 1)),
        ], [o.warmup_steps])
    if kind == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, o.warmup_steps), optax.constant_schedule(o.lr)],
            [o.warmup_steps])
    raise ConfigError(f"config.optim.schedule={kind!r}: expected 'cosine', 'linear' or 'constant'")


def decay_mask(params) -> Any:
    """True for matrices (ndim >= 2). Blocks stacked for the pipeline ([S, L/S, ...] under
    ``pipeline_stages``) are judged by their per-layer shape."""
    def mask(path, p):
        stacked = any(getattr(k, "key", None) == "pipeline_stages" for k in path)
        return p.ndim - (2 if stacked else 0) >= 2
    return jax.tree_util.tree_map_with_path(mask, params)


def build(config, trainable: Callable[[Any], Any] | None = None):
    """Returns ``(tx, schedule)``."""
    o = config.optim
    schedule = schedule_from_config(config)
    name = o.get("name", "adamw")
    if name == "adamw":
        core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8),
                           weight_decay=o.weight_decay, mask=decay_mask)
    elif name == "adam":
        core = optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8))
    elif name == "sgd":
        core = optax.sgd(schedule, momentum=o.get("momentum", None))
    else:
        raise ConfigError(f"config.optim.name={name!r}: expected 'adamw', 'adam' or 'sgd'")
    parts = [core]
    if o.get("grad_clip"):
        parts.insert(0, optax.clip_by_global_norm(o.grad_clip))
    tx = optax.chain(*parts)
    if trainable is not None:
        tx = optax.multi_transform(
            {"train": tx, "freeze": optax.set_to_zero()},
            lambda params: jax.tree.map(lambda t: "train" if t else "freeze", trainable(params)))
    return tx, schedule
