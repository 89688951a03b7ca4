"""The generic training loop: config + task -> sharded, checkpointed, logged training.

1. ``jax.eval_shape(init)`` gives the state's shapes and logical axes; the rules table turns them
   into ``NamedSharding``s and ``jax.jit(init, out_shardings=...)`` materialises it sharded.
2. The workdir's newest checkpoint (if any) is checked against the config and restored: params,
   optimizer state, step, rng and the data iterator's position, so a resumed run equals an
   uninterrupted one bit for bit.
3. ``jax.jit(train_step, donate_argnums=0)``; the host only touches device values at log steps.
   Non-finite losses raise naming the step. SIGTERM / Ctrl-C save a checkpoint and stop.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.core import checkpoint as ckpt_lib
from research.core import metrics as metrics_lib
from research.core import optim, sharding
from research.core.config import validate_train_config
from research.core.mesh import make_mesh
from research.core.pipeline import maybe_pipeline

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    pass


def make_train_step(task, tx, schedule, accum: int, grad_sharding=None):
    """``(state, batch) -> (state, metrics)``; with ``accum`` > 1 the batch is split into ``accum``
    microbatches whose gradients are averaged (equal to the full batch's gradient).
    ``grad_sharding``: shardings the gradients are constrained to (ZeRO-2: reduce-scattered to the
    optimizer state's layout), or None."""

    def grads_of(params, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, rng, True)
        if grad_sharding is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_sharding)
        return grads, metrics

    def step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        if accum == 1:
            grads, metrics = grads_of(state["params"], batch, rng)
        else:
            # Row i of microbatch j is row i * accum + j: every device keeps its share of each
            # microbatch, so no data moves between devices.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                j, mb = xs
                g, m = grads_of(state["params"], mb, jax.random.fold_in(rng, j))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = jax.eval_shape(grads_of, state["params"], jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
            (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(jnp.add, state["params"], updates)
        metrics = {**metrics, "grad_norm": optax_global_norm(grads), "lr": schedule(state["step"])}
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "rng": state["rng"]}
        return new_state, metrics

    return step


def optax_global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def agreed_stop(stop: "_StopFlag", step: int, every: int) -> bool:
    """Whether all processes stop after ``step``. One process alone stops at once; several agree
    (an all-gather of their flags, every ``every`` steps) so that none is left waiting in the
    next step's collectives for a process that already stopped."""
    if jax.process_count() == 1:
        return stop.signal is not None
    if step % every:
        return False
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(stop.signal or 0))))


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves and stops at the end of the current step.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_state(task, config, mesh):
    """Returns ``(tx, schedule, init_fn, abstract_state, state_shardings)``."""
    task = maybe_pipeline(task, config, mesh)  # stage-stacked blocks when config.mesh.pipeline > 1
    tx, schedule = optim.build(config, task.trainable)
    preset = sharding.preset_from_config(config.sharding)

    def init_boxed(rng):
        init_rng, train_rng = jax.random.split(rng)
        params = task.init(init_rng)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(params), "rng": train_rng}

    boxed = jax.eval_shape(init_boxed, jax.random.key(config.seed))
    specs = nn.get_partition_spec(boxed)
    shardings = sharding.state_shardings(specs, mesh, preset)
    abstract = nn.meta.unbox(boxed)
    sharding.check_divisible(abstract["params"], shardings["params"], specs["params"])
    sharding.check_divisible(abstract, shardings, specs)
    init_fn = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=shardings)
    return tx, schedule, init_fn, abstract, shardings


def jit_train_step(task, config, mesh, tx, schedule, state_sh):
    """The jitted, donated train step under the preset's activation rules (and, for ZeRO-2, with
    the gradients constrained to the optimizer state's layout)."""
    preset = sharding.preset_from_config(config.sharding)
    task = maybe_pipeline(task, config, mesh)  # GPipe when config.mesh.pipeline > 1
    abstract_specs = nn.get_partition_spec(jax.eval_shape(task.init, jax.random.key(0)))
    grad_sh = sharding.grad_shardings(abstract_specs, mesh, preset)
    step = make_train_step(task, tx, schedule, config.grad_accum_steps, grad_sh)
    return jax.jit(sharding.with_activation_context(step, mesh, preset.params),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, None), donate_argnums=0)


def run(config, task, workdir: str) -> dict[str, Any]:
    """Train ``task`` as ``config`` says; returns the last logged and eval metrics."""
    validate_train_config(config)
    mesh = make_mesh(config.mesh)
    sharding.check_batch(config.batch_size // config.grad_accum_steps, mesh,
                         "config.batch_size / config.grad_accum_steps")
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    task = maybe_pipeline(task, config, mesh)  # GPipe when config.mesh.pipeline > 1

    tx, schedule, init_fn, abstract, state_sh = build_state(task, config, mesh)
    meta = ckpt_lib.to_jsonable(task.meta())
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    data = task.train_data(config.seed, config.batch_size)
    batch_sh = sharding.batch_sharding(mesh)

    latest = ckpt.latest_step()
    if latest is not None:
        ckpt_lib.check_compatible(ckpt.read_meta(latest), meta, ckpt.directory)
        step0, state, data_state = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, state_sh))
        data.set_state(data_state)
        if is_main:
            print(f"Resumed from {ckpt.directory} at step {step0}.", flush=True)
    else:
        state = init_fn(jax.random.key(config.seed))
        step0 = 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    if is_main:
        print(f"Parameters: {n_params:,}; mesh {dict(mesh.shape)}; devices "
              f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)

    train_step = jit_train_step(task, config, mesh, tx, schedule, state_sh)
    eval_step = jax.jit(sharding.with_activation_context(
        lambda p, b: task.loss(p, b, jax.random.key(0), False)[1], mesh,
        sharding.rules_from_config(config.sharding)), in_shardings=(state_sh["params"], batch_sh))
    eval_bs = config.get("eval_batch_size") or config.batch_size
    eval_batches = None

    def evaluate(params) -> dict[str, float]:
        nonlocal eval_batches
        if eval_batches is None:
            sharding.check_batch(eval_bs, mesh, "config.eval_batch_size")
            eval_batches = [sharding.put_batch(b, batch_sh) for b in task.eval_batches(eval_bs)]
        if not eval_batches:
            return {}
        sums = None
        for b in eval_batches:
            m = eval_step(params, b)
            sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
        means = {k: float(v) / len(eval_batches) for k, v in jax.device_get(sums).items()}
        return {f"val/{k}": v for k, v in task.summarize_eval(means).items()}

    writer = metrics_lib.Writer(workdir)
    peak = metrics_lib.peak_flops(config.get("peak_flops"))
    flops_per_step = task.flops_per_example * config.batch_size
    tokens_per_step = task.tokens_per_example * config.batch_size
    progress = metrics_lib.Progress(config.total_steps, step0)
    pending: list[tuple[int, dict]] = []
    last: dict[str, Any] = {}
    last_eval: dict[str, float] = {}
    compile_time = None

    def flush_pending() -> dict[str, float]:
        """Fetch the metrics of the steps since the last flush; raise on a non-finite loss."""
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            if not np.isfinite(m["loss"]) or not np.isfinite(m["grad_norm"]):
                raise NonFiniteLossError(
                    f"Non-finite loss or gradient at step {s} (loss={m['loss']}, grad_norm="
                    f"{m['grad_norm']}); lower config.optim.lr, enable config.optim.grad_clip, or "
                    "resume from the last checkpoint with different settings.")
        out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]} if fetched else {}
        pending.clear()
        return out

    def save(step: int, metrics=None, force=False):
        ckpt.save(step, state, data.get_state(), meta, metrics=metrics, force=force)

    # On CPU the host and the "device" share the cores: letting the next step's dispatch and
    # batch preparation overlap a running step made it slower (45 vs 38 ms/step for the baby GPT,
    # experiments/bench). Accelerators keep the usual asynchronous pipelining.
    sync_each_step = jax.default_backend() == "cpu"
    step = step0
    with _StopFlag() as stop:
        while step < config.total_steps:
            batch = next(data)
            if compile_time is None:
                sharding.check_batch_arrays(batch, mesh)
            batch = sharding.put_batch(batch, batch_sh)
            t0 = time.perf_counter()
            state, step_metrics = train_step(state, batch)
            if sync_each_step:
                step_metrics["loss"].block_until_ready()
            step += 1
            stopping = agreed_stop(stop, step, config.log_every)
            pending.append((step, step_metrics))
            if compile_time is None:
                jax.block_until_ready(step_metrics)
                compile_time = time.perf_counter() - t0
                progress.interval(step)  # restart the clock after compilation
                if is_main:
                    print(f"Compiled the train step in {compile_time:.1f} s.", flush=True)
            is_eval = step % config.eval_every == 0 or step == config.total_steps
            if step % config.log_every == 0 or is_eval or stopping:
                train_metrics = flush_pending()
                dt, n = progress.interval(step)
                sec = dt / max(n, 1)
                last = {f"train/{k}": v for k, v in train_metrics.items()}
                last.update({"perf/ms_per_step": 1e3 * sec, "perf/tokens_per_sec": tokens_per_step / sec})
                if peak:
                    last["perf/mfu"] = flops_per_step / sec / peak
                if is_eval:
                    last_eval = evaluate(state["params"])
                    if hasattr(task, "evaluate"):  # the task's own measures: accuracy, grids, ...
                        last_eval.update(task.evaluate(state["params"], step,
                                                       workdir if is_main else None))
                    last.update(last_eval)
                writer.write(step, last)
                if is_main:
                    line = progress.line(step, last.get("train/loss", float("nan")), sec,
                                         tokens_per_step, flops_per_step, peak)
                    if last_eval and is_eval:
                        line += f" | val {last_eval.get('val/loss', float('nan')):.4f}"
                    print(line, flush=True)
                if is_eval and is_main:
                    metrics_lib.plot_losses(workdir)
            if step % config.checkpoint_every == 0 or step == config.total_steps or stopping:
                if pending:
                    flush_pending()
                metrics = {"val/loss": last_eval["val/loss"]} if is_eval and "val/loss" in last_eval else None
                save(step, metrics, force=stopping)
            if is_eval or step % config.checkpoint_every == 0:
                progress.interval(step)  # keep eval and checkpoint time out of ms/step
            if stopping:
                if is_main:
                    print(f"Stopped by signal {stop.signal or '(on another process)'} at step {step}; "
                          "checkpoint saved. Run "
                          "the same command to resume.", flush=True)
                break
    ckpt.close()
    writer.close()
    summary = {"step": step, "compile_time_s": compile_time, **last,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary
