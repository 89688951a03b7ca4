"""A VQ autoencoder on Fashion-MNIST (task ``vq``): reconstruction + commitment loss, EMA codebook.

Config keys read here:
- ``config.model``: ``VQConfig`` fields (``research.models.vqvae``);
- ``config.data``: ``name`` ('fashion_mnist'), ``manual_dir``, ``data_dir``;
- ``config.eval_batches``: test-set batches of the evaluation.

The loss is ``mean |x - decoder(ST(z_q))|^2 + beta mean |z_e - sg(z_q)|^2``. The codebook gets no
gradient (frozen for the optimizer): it is updated by EMA after each optimizer step, and codes whose
EMA count falls below ``dead_threshold`` are restarted from the batch's encoder outputs. That needs
a step the generic loop has no hook for, so this task brings its own ``train_loop`` (same
checkpoints, metrics.jsonl, progress lines and resume as ``research.core.train``; no gradient
accumulation).

Eval metrics (over all ``eval_batches`` test batches together): ``val/recon_mse`` (in [-1, 1]
pixel units), ``val/loss``, ``val/usage`` (fraction of the K codes used at least once),
``val/perplexity`` (exp of the code distribution's entropy; K = uniform use), ``val/dead_codes``.
Each eval writes ``recon_<step>.png`` (test images above their reconstructions) into the workdir.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.diffusion import data as data_lib
from research.models import vqvae as vq
from research.tasks.base import Task

IMAGE_SHAPE = (28, 28, 1)


class VQTask(Task):
    name = "vq"

    def __init__(self, config, load_data: bool = True):
        self.config = config
        try:
            self.model_config = vq.VQConfig.from_dict(config.model.to_dict(),
                                                      in_channels=IMAGE_SHAPE[-1])
            self.latent_shape = self.model_config.latent_shape(IMAGE_SHAPE[0])
        except ValueError as e:
            raise ConfigError(f"config.model: {e}") from None
        self.model = vq.VQVAE(self.model_config)
        self._splits = {}
        if load_data:
            self._splits = {s: data_lib.load_split(config.data, s) for s in ("train", "test")}
        self.tokens_per_example = 1

    # -- the Task interface -----------------------------------------------------------------------
    def init(self, rng):
        return self.model.init(rng, jnp.zeros((1, *IMAGE_SHAPE)))["params"]

    def trainable(self, params):
        return {k: jax.tree.map(lambda _: k != "quantizer", v) for k, v in params.items()}

    def forward(self, params, images):
        return self.model.apply({"params": params}, images)

    def loss(self, params, batch, rng, train: bool = True):
        loss, (metrics, _) = self._loss(params, batch)
        return loss, metrics

    def _loss(self, params, batch):
        out = self.forward(params, batch["images"])
        recon = jnp.mean(jnp.square(out["recon"] - batch["images"]))
        loss = recon + self.model_config.beta * out["commitment"]
        counts, sums = vq.code_stats(out["z_e"], out["indices"], self.model_config.codebook_size)
        metrics = {"loss": loss, "recon_mse": recon, "commitment": out["commitment"],
                   "perplexity": vq.perplexity(counts), "usage": jnp.mean(counts > 0)}
        return loss, (metrics, (counts, sums, out["z_e"]))

    def update_codebook(self, params, stats, rng):
        """EMA update then dead-code restart of ``params['quantizer']``."""
        counts, sums, z_e = stats
        c = self.model_config
        q = vq.ema_update(params["quantizer"], counts, sums, c.decay, c.eps)
        q, restarted = vq.restart_dead_codes(q, z_e, rng, c.dead_threshold)
        return {**params, "quantizer": q}, restarted

    def train_data(self, seed: int, batch_size: int):
        images, labels = self._split("train")
        return data_lib.ImageBatches(images, labels, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        images, labels = self._split("test")
        return data_lib.eval_batches(images, labels, batch_size, self.config.eval_batches)

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "latent_shape": list(self.latent_shape)}

    def _split(self, split: str):
        if split not in self._splits:
            raise RuntimeError("This VQTask was built without data (load_data=False).")
        return self._splits[split]

    # -- evaluation over several batches ----------------------------------------------------------
    def evaluate_batches(self, params, batches, eval_fn=None) -> dict[str, float]:
        eval_fn = eval_fn or jax.jit(lambda p, b: self._loss(p, b))
        total, sums = np.zeros(self.model_config.codebook_size), {}
        for b in batches:
            _, (m, (counts, _, _)) = eval_fn(params, b)
            total += np.asarray(counts)
            for k in ("loss", "recon_mse", "commitment"):
                sums[k] = sums.get(k, 0.0) + float(m[k])
        out = {f"val/{k}": v / max(len(batches), 1) for k, v in sums.items()}
        out["val/usage"] = float((total > 0).mean())
        out["val/perplexity"] = float(vq.perplexity(jnp.asarray(total)))
        out["val/dead_codes"] = float((np.asarray(params["quantizer"]["ema_count"])
                                       < self.model_config.dead_threshold).sum())
        return out

    def train_loop(self, config, task, workdir: str):
        return train_loop(config, self, workdir)


def train_loop(config, task: VQTask, workdir: str) -> dict:
    """The generic loop's duties (resume, checkpoints, logs, evals, summary) with a step that
    applies the codebook's EMA update and dead-code restarts after the optimizer update."""
    from research.core import checkpoint as ckpt_lib
    from research.core import metrics as metrics_lib
    from research.core.config import validate_train_config
    from research.core.mesh import make_mesh
    from research.core.train import build_state

    validate_train_config(config)
    if config.grad_accum_steps != 1:
        raise ConfigError(f"config.grad_accum_steps={config.grad_accum_steps}: the vq task's loop "
                          "takes no gradient accumulation (the EMA codebook update needs the whole "
                          "batch); use 1.")
    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    tx, schedule, init_fn, abstract, state_sh = build_state(task, config, mesh)
    meta = ckpt_lib.to_jsonable(task.meta())
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    data = task.train_data(config.seed, config.batch_size)
    latest = ckpt.latest_step()
    if latest is not None:
        ckpt_lib.check_compatible(ckpt.read_meta(latest), meta, ckpt.directory)
        step, state, data_state = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, state_sh))
        data.set_state(data_state)
        print(f"Resumed from {ckpt.directory} at step {step}.", flush=True)
    else:
        state, step = init_fn(jax.random.key(config.seed)), 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    print(f"Parameters: {n_params:,}; latent {task.latent_shape}, codebook "
          f"{task.model_config.codebook_size} x {task.model_config.latent_dim}", flush=True)

    @jax.jit
    def train_step(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        (_, (metrics, stats)), grads = jax.value_and_grad(task._loss, has_aux=True)(
            state["params"], batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(jnp.add, state["params"], updates)
        params, restarted = task.update_codebook(params, stats, rng)
        metrics = {**metrics, "restarted": restarted, "lr": schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                "rng": state["rng"]}, metrics

    eval_fn = jax.jit(task._loss)
    eval_batches = task.eval_batches(config.get("eval_batch_size") or config.batch_size)
    writer = metrics_lib.Writer(workdir)
    progress = metrics_lib.Progress(config.total_steps, step)
    pending, last, compile_time = [], {}, None
    while step < config.total_steps:
        t0 = time.perf_counter()
        state, m = train_step(state, next(data))
        m["loss"].block_until_ready()
        step += 1
        pending.append(m)
        if compile_time is None:
            compile_time = time.perf_counter() - t0
            progress.interval(step)
            print(f"Compiled the train step in {compile_time:.1f} s.", flush=True)
        is_eval = step % config.eval_every == 0 or step == config.total_steps
        if step % config.log_every == 0 or is_eval:
            fetched = jax.device_get(pending)
            pending.clear()
            if not all(np.isfinite(f["loss"]) for f in fetched):
                raise ConfigError(f"Non-finite loss at step {step}; lower config.optim.lr.")
            dt, n = progress.interval(step)
            sec = dt / max(n, 1)
            last = {f"train/{k}": float(np.mean([f[k] for f in fetched])) for k in fetched[-1]}
            last["perf/ms_per_step"] = 1e3 * sec
            line = progress.line(step, last["train/loss"], sec, config.batch_size, 0.0, None)
            if is_eval:
                last.update(task.evaluate_batches(state["params"], eval_batches, eval_fn))
                line += (f" | val recon {last['val/recon_mse']:.4f} | usage "
                         f"{last['val/usage']:.0%} | ppl {last['val/perplexity']:.1f}")
                write_recon_grid(task, state["params"], eval_batches, workdir, step)
                progress.interval(step)
            writer.write(step, last)
            print(line, flush=True)
            if is_eval:
                metrics_lib.plot_losses(workdir)
        if step % config.checkpoint_every == 0 or step == config.total_steps:
            metrics = {"val/loss": last["val/loss"]} if is_eval and "val/loss" in last else None
            ckpt.save(step, state, data.get_state(), meta, metrics=metrics)
    ckpt.close()
    writer.close()
    summary = {"step": step, "compile_time_s": compile_time, **last,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def write_recon_grid(task, params, batches, workdir, step, n: int = 8) -> str | None:
    if not batches:
        return None
    x = batches[0]["images"][:n]
    recon = np.asarray(task.forward(params, jnp.asarray(x))["recon"])
    return data_lib.save_grid(np.concatenate([x, recon]), os.path.join(workdir, f"recon_{step}.png"),
                              rows=2)


def load_vq(workdir: str, step: int | None = None):
    """(VQConfig, params, meta) of a ``vq`` run's checkpoint (the latest unless ``step``)."""
    import orbax.checkpoint as ocp

    from research.core import checkpoint as ckpt_lib

    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise ConfigError(f"No VQ checkpoint in {ckdir}: train one first (python -m research.launch "
                          "--config configs/vqvae_fashion_mnist.py --workdir DIR) and point "
                          "config.vq.workdir at DIR.")
    step = steps[-1] if step is None else step
    ckpt = ckpt_lib.Checkpointer(ckdir, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    if meta.get("task") != "vq":
        raise ConfigError(f"{workdir} is a {meta.get('task')!r} run, not a 'vq' run.")
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored["state"]["params"])
    return vq.VQConfig.from_dict(meta["model"]), nn.meta.unbox(params), meta
