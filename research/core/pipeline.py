"""Pipeline parallelism (GPipe) over the ``pipeline`` mesh axis with ``jax.shard_map`` + ``ppermute``.

The decoder's L blocks are split into S = ``mesh.shape['pipeline']`` stages of L / S consecutive
blocks; the batch into M = ``config.pipeline_microbatches`` microbatches. In M + S - 1 ticks every
stage runs its blocks on the activation it holds and passes the result to the next stage with a
``ppermute``: stage 0 takes microbatch t at tick t, the last stage emits microbatch t - S + 1.
The backward pass is the transpose JAX derives (reverse ppermutes, the same schedule backwards):
GPipe's all-forward-then-all-backward. The embedding, final norm and head run outside the
pipeline (under the usual GSPMD shardings); the other mesh axes (data, fsdp, ...) stay automatic
inside the ``shard_map``.

Idle share of each stage (the bubble): ``(S - 1) / (M + S - 1)``, printed when the step is built.

Parameters: the wrapped task's ``init`` moves the blocks ``layer_0 .. layer_{L-1}`` into one
``pipeline_stages`` subtree whose leaves are [S, L/S, ...] with the logical axes ``stage`` (mapped
to the ``pipeline`` mesh axis by every preset) and ``stage_layer``: each device holds the blocks of
its own stage only, and their optimizer state (1/S of the block parameters; the preset's other
axes, e.g. FSDP's ``embed``, still apply inside a stage). The checkpoint meta records
``param_layout``; ``unstack_layers`` gives back the per-layer tree (``research.sample`` does).

Limitations (checked, each a ``ConfigError``): the ``lm`` task's decoder without MoE and without
dropout; L and the per-device batch rows divide by S and M.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from research.core import sharding
from research.core.config import ConfigError

AXIS = "pipeline"
STAGES_KEY = "pipeline_stages"


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def stack_layers(params: dict, num_layers: int, stages: int) -> dict:
    """``layer_0 .. layer_{L-1}`` -> ``pipeline_stages`` with leaves [S, L/S, ...]; logically
    partitioned leaves get the leading axes ``("stage", "stage_layer")``."""
    per = num_layers // stages
    layers = [params[f"layer_{i}"] for i in range(num_layers)]

    def stack(*ls):
        if _is_box(ls[0]):
            v = jnp.stack([b.value for b in ls])
            return ls[0].replace(value=v.reshape(stages, per, *v.shape[1:]),
                                 names=("stage", "stage_layer") + tuple(ls[0].names))
        v = jnp.stack(ls)
        return v.reshape(stages, per, *v.shape[1:])

    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    out[STAGES_KEY] = jax.tree.map(stack, *layers, is_leaf=_is_box)
    return out


def unstack_layers(params: dict) -> dict:
    """The inverse of ``stack_layers`` on plain arrays: the per-layer tree of the unpipelined model."""
    if STAGES_KEY not in params:
        return params
    stacked = params[STAGES_KEY]
    s, per = jax.tree.leaves(stacked)[0].shape[:2]
    out = {k: v for k, v in params.items() if k != STAGES_KEY}
    for i in range(s * per):
        out[f"layer_{i}"] = jax.tree.map(lambda p, i=i: p[i // per, i % per], stacked)
    return out


def bubble_fraction(stages: int, microbatches: int) -> float:
    """GPipe's idle fraction per stage: (S - 1) / (M + S - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


def gpipe(stage_fn, stage_params, xs: jax.Array, mesh, axis: str = AXIS) -> jax.Array:
    """Run ``stage_fn(params_of_one_stage, x) -> x`` as a GPipe pipeline.

    ``stage_params``: a pytree whose leaves have a leading stage dimension S (split over ``axis``);
    ``xs`` [M, ...]: the microbatches. Returns the last stage's outputs [M, ...], equal to applying
    the S stages in order to each microbatch."""
    stages = mesh.shape[axis]
    num_micro = xs.shape[0]
    perm = [(i, (i + 1) % stages) for i in range(stages)]

    def per_stage(params, xs):
        params = jax.tree.map(lambda p: p[0], params)
        stage = jax.lax.axis_index(axis)
        state = jnp.zeros_like(xs[0])
        outputs = jnp.zeros_like(xs)
        for tick in range(num_micro + stages - 1):
            if tick < num_micro:
                state = jnp.where(stage == 0, xs[tick], state)
            out = stage_fn(params, state)
            done = tick - (stages - 1)
            if done >= 0:
                outputs = outputs.at[done].set(jnp.where(stage == stages - 1, out, outputs[done]))
            state = jax.lax.ppermute(out, axis, perm)
        # Only the last stage holds the outputs: share them with every stage.
        return jax.lax.psum(jnp.where(stage == stages - 1, outputs, jnp.zeros_like(outputs)), axis)

    return jax.shard_map(per_stage, mesh=mesh, in_specs=(P(axis), P()), out_specs=P(),
                         axis_names={axis})(stage_params, xs)


class PipelinedLM:
    """An ``LMTask`` whose ``loss`` runs the decoder blocks as a GPipe pipeline (``init``, data
    and everything else are the task's own)."""

    def __init__(self, task, mesh, microbatches: int):
        cfg = getattr(task, "model_config", None)
        stages = mesh.shape[AXIS]
        if cfg is None or getattr(task, "name", None) != "lm":
            raise ConfigError(f"config.mesh.pipeline={stages}: pipeline parallelism supports the "
                              f"'lm' task's decoder only (got task {getattr(task, 'name', task)!r}).")
        if cfg.moe_experts or cfg.dropout:
            raise ConfigError(f"config.mesh.pipeline={stages} needs config.model.moe_experts=0 and "
                              f"config.model.dropout=0 (got {cfg.moe_experts}, {cfg.dropout}).")
        if cfg.num_layers % stages:
            raise ConfigError(f"config.model.num_layers={cfg.num_layers} does not divide over "
                              f"config.mesh.pipeline={stages} stages; use a multiple of {stages}.")
        if microbatches < 1:
            raise ConfigError(f"config.pipeline_microbatches={microbatches}: expected >= 1.")
        self.task, self.mesh, self.microbatches, self.stages = task, mesh, microbatches, stages

    def __getattr__(self, name):
        return getattr(self.task, name)

    def init(self, rng):
        return stack_layers(self.task.init(rng), self.task.model_config.num_layers, self.stages)

    def meta(self) -> dict:
        return {**self.task.meta(), "param_layout": {STAGES_KEY: self.stages}}

    def describe(self) -> str:
        return (f"Pipeline: {self.stages} stages x {self.layers_per_stage} blocks, "
                f"{self.microbatches} microbatches (GPipe), bubble fraction "
                f"{bubble_fraction(self.stages, self.microbatches):.3f}")

    @property
    def layers_per_stage(self) -> int:
        return self.task.model_config.num_layers // self.stages

    def loss(self, params, batch, rng, train: bool = True):
        from research.models.transformer import Block
        cfg, model = self.task.model_config, self.task.model
        inputs, targets = batch["inputs"], batch["targets"]
        b, t = inputs.shape
        m = self.microbatches
        if b % m:
            raise ConfigError(f"Batch of {b} rows does not split into config.pipeline_microbatches="
                              f"{m}; use a divisor of the batch size.")

        def embed(mdl, tokens):
            x = mdl.token_embed(tokens)
            if cfg.positions == "learned":
                x = x + mdl.pos_embed[jnp.arange(t)].astype(cfg.compute_dtype)
            return x

        def head(mdl, x):
            if cfg.norm_position == "pre":
                x = mdl.final_norm(x)
            return mdl.head(x)

        x = model.apply({"params": params}, inputs, method=embed)
        # Microbatch j holds rows j, j + M, ...: each data-parallel device keeps its own rows.
        xs = x.reshape(b // m, m, t, -1).swapaxes(0, 1)
        per = self.layers_per_stage
        block = Block(cfg)

        def stage_fn(stage_params, h):
            with sharding.no_activation_constraints():
                for i in range(per):
                    h, _ = block.apply({"params": jax.tree.map(lambda p: p[i], stage_params)}, h)
            return h

        ys = gpipe(stage_fn, params[STAGES_KEY], xs, self.mesh)
        y = ys.swapaxes(0, 1).reshape(b, t, -1)
        logits = model.apply({"params": params}, y, method=head)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, {"loss": loss}


def maybe_pipeline(task, config, mesh):
    """The task itself, or with ``config.mesh.pipeline`` > 1 its GPipe-pipelined version (the
    bubble fraction is printed when it is wrapped)."""
    if mesh.shape[AXIS] == 1 or isinstance(task, PipelinedLM):
        return task
    wrapped = PipelinedLM(task, mesh, int(config.get("pipeline_microbatches", 4)))
    if jax.process_index() == 0:
        print(wrapped.describe(), flush=True)
    return wrapped
