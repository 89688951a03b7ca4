"""The models alignment needs around the ``Decoder``: a scalar head (reward model, value head),
one-pass logits + hidden states, and loading the parameters of another run's checkpoint.

Parameter trees (plain nested dicts):
- a policy (SFT, DPO): the ``Decoder``'s params;
- a reward model: ``{'trunk': decoder params, 'head': {'kernel': [E, 1], 'bias': [1]}}``;
- PPO's policy with its value head: ``{'policy': decoder params, 'value_head': head params}``.
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.core.config import ConfigError
from research.models.transformer import Decoder, TransformerConfig

# Model settings that may differ between a checkpoint and the run that starts from it.
RUNTIME_KEYS = ("dropout", "dtype", "remat")


class ScalarHead(nn.Module):
    """Hidden states ``[..., E]`` -> float32 scalars ``[...]`` (a linear layer to one output)."""

    init_std: float = 0.02

    @nn.compact
    def __call__(self, x):
        kernel_init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                   ("embed", None))
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, (None,))
        out = nn.Dense(1, kernel_init=kernel_init, bias_init=bias_init, name="proj")(
            x.astype(jnp.float32))
        return out[..., 0]


HEAD = ScalarHead()


def init_head(rng, embed_dim: int):
    return HEAD.init(rng, jnp.zeros((1, embed_dim), jnp.float32))["params"]


def apply_head(head_params, hidden):
    return HEAD.apply({"params": head_params}, hidden)


def logits_and_hidden(model: Decoder, params, tokens, deterministic: bool = True, rngs=None):
    """One trunk pass -> ``(logits [B, T, V] float32, hidden [B, T, E])``."""
    hidden = model.apply({"params": params}, tokens, deterministic=deterministic, rngs=rngs,
                         method="hidden")
    logits = model.apply({"params": params}, hidden, method="head")
    return logits, hidden


def reward_scores(model: Decoder, params, tokens, mask, deterministic: bool = True, rngs=None):
    """A reward model's score of each sequence: the head on the hidden state of the last
    response token (``mask [B, T]`` marks the response) -> ``[B]``."""
    from research.rlhf.losses import last_index

    hidden = model.apply({"params": params["trunk"]}, tokens, deterministic=deterministic,
                         rngs=rngs, method="hidden")
    last = last_index(mask)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return apply_head(params["head"], h)


# -- pretrained checkpoints -----------------------------------------------------------------------
@dataclasses.dataclass
class Pretrained:
    workdir: str
    step: int
    task: str
    meta: dict
    params: dict  # the checkpoint's whole parameter tree

    @property
    def model(self) -> dict:
        return self.meta["model"]

    def tokenizer(self):
        from research.data.tokenizers import tokenizer_from_json
        return tokenizer_from_json(self.meta["tokenizer"])

    def decoder_params(self) -> dict:
        """The decoder inside: the params of an lm/sft/dpo run, a PPO policy, a reward trunk."""
        if self.task == "ppo":
            return self.params["policy"]
        if self.task == "reward":
            return self.params["trunk"]
        return self.params


def checkpoint_steps(workdir: str) -> list[int]:
    """The finished checkpoints' steps of the run in ``workdir`` (ascending)."""
    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(ckdir):
        return []
    return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit())


def load_pretrained(workdir: str | None, key: str, step: int | None = None) -> Pretrained:
    """The newest (or ``step``) checkpoint of the training run in ``workdir`` (config key ``key``
    names it in errors). Only the parameters are returned (optimizer state is dropped)."""
    import numpy as np
    import orbax.checkpoint as ocp

    from research.core import checkpoint as ckpt_lib

    if not workdir:
        raise ConfigError(f"config.{key} is not set: give the workdir of the run to start from.")
    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"config.{key}={workdir!r}: no checkpoint in {ckdir}; train that run "
                          "first (or fix the path).")
    ckpt = ckpt_lib.Checkpointer(ckdir, read_only=True)
    try:
        if step is not None and step not in steps:
            raise ConfigError(f"config.{key}={workdir!r}: no checkpoint of step {step}; have {steps}.")
        step = steps[-1] if step is None else step
        meta = ckpt.read_meta(step)
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    for field in ("task", "model", "tokenizer"):
        if field not in meta:
            raise ConfigError(f"config.{key}={workdir!r}: the checkpoint's metadata has no "
                              f"{field!r}; it is not a language-model run.")
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored["state"]["params"])
    return Pretrained(workdir, step, meta["task"], meta, params)


def check_task(pre: Pretrained, key: str, allowed: tuple[str, ...]) -> None:
    if pre.task not in allowed:
        raise ConfigError(f"config.{key}={pre.workdir!r} is a {pre.task!r} run; expected one of "
                          f"{list(allowed)}.")


def model_config_from(config_model, pre: Pretrained, key: str) -> TransformerConfig:
    """The checkpoint's model, with the runtime settings (dropout, dtype, remat) of the config.
    Any other ``config.model`` value that differs from the checkpoint is an error naming it."""
    saved = dict(pre.model)
    given = config_model.to_dict() if hasattr(config_model, "to_dict") else dict(config_model or {})
    diffs = [f"config.model.{k}={v!r} but the checkpoint has {saved.get(k)!r}"
             for k, v in sorted(given.items())
             if k not in RUNTIME_KEYS and k in saved and saved[k] != v]
    unknown = [k for k in given if k not in saved]
    if unknown:
        diffs.append(f"config.model keys {unknown} are not in the checkpoint's model")
    if diffs:
        raise ConfigError(f"The model of config.{key}={pre.workdir!r} does not match the config:\n  "
                          + "\n  ".join(diffs) + "\nRemove these config.model values or make them "
                          "match the checkpoint (its config.json).")
    runtime = {k: given[k] for k in RUNTIME_KEYS if k in given}
    return TransformerConfig.from_dict({**saved, **runtime})


def boxed_like(boxed, values):
    """The values of ``values`` in the logical-axis boxes of ``boxed`` (an ``init`` result), so a
    loaded tree keeps its sharding annotations. The two trees must have the same structure."""
    def put(box, v):
        if isinstance(box, nn.meta.AxisMetadata):
            if box.unbox().shape != v.shape:
                raise ConfigError(f"A loaded parameter has shape {v.shape}, the model expects "
                                  f"{box.unbox().shape}.")
            return box.replace_boxed(v)
        return v
    return jax.tree.map(put, boxed, values,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
