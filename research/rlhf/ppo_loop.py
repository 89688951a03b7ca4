"""The PPO training loop: rollouts with the current policy between rounds of minibatch updates.

Per iteration ``i`` (``config.total_steps`` of them):
1. prompts ``task.prompts_at(i)``; continuations sampled with the KV-cached sampler under
   ``fold_in(key(seed), i)``;
2. ``task.experience``: old log-probs, values, reference log-probs, reward-model scores, per-token
   rewards with the KL penalty, GAE advantages and returns (one jitted program);
3. ``config.ppo.epochs`` passes over the rollout batch in shuffled minibatches of
   ``config.batch_size``, each one step of ``research.core.train.make_train_step`` on the task's
   PPO loss (the optimizer's step counts these updates);
4. logs (``metrics.jsonl``, TensorBoard, ``ppo.png``): ``rollout/reward``, ``rollout/kl``,
   ``rollout/true_preference_rate``, ``rollout/entropy``, ``train/clip_fraction``,
   ``train/value_error``, ...; every ``eval_every`` iterations the held-out prompts give
   ``val/true_preference_rate``, ``val/kl``, ``val/reward``; checkpoints every
   ``checkpoint_every`` iterations (step = iteration), at the end and on SIGTERM / Ctrl-C.
Running the same command again resumes from the newest checkpoint and continues exactly.
"""
from __future__ import annotations

import json
import os
import resource
import time

import jax
import numpy as np

from research.core import checkpoint as ckpt_lib
from research.core import metrics as metrics_lib
from research.core import sharding
from research.core.config import validate_train_config
from research.core.mesh import make_mesh
from research.core.train import NonFiniteLossError, _StopFlag, build_state, make_train_step
from research.rlhf.rollout import evaluate_policy


def run(config, task, workdir: str) -> dict:
    validate_train_config(config)
    mesh = make_mesh(config.mesh)
    sharding.check_batch(config.batch_size, mesh, "config.batch_size (the PPO minibatch)")
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    tx, schedule, init_fn, abstract, state_sh = build_state(task, config, mesh)
    meta = ckpt_lib.to_jsonable(task.meta())
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    batch_sh = sharding.batch_sharding(mesh)
    latest = ckpt.latest_step()
    if latest is not None:
        ckpt_lib.check_compatible(ckpt.read_meta(latest), meta, ckpt.directory)
        it0, state, data_state = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, state_sh))
        it0 = int(data_state.get("iteration", it0))
        if is_main:
            print(f"Resumed from {ckpt.directory} at iteration {it0}.", flush=True)
    else:
        state, it0 = init_fn(jax.random.key(config.seed)), 0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    if is_main:
        print(f"Parameters: {n_params:,} (policy + value head); PPO: {config.total_steps} "
              f"iterations of {config.ppo.rollout_batch} rollouts, {config.ppo.epochs} epochs of "
              f"minibatches of {config.batch_size}.", flush=True)

    update = jax.jit(make_train_step(task, tx, schedule, 1), in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, None), donate_argnums=0)
    writer = metrics_lib.Writer(workdir)
    rng0 = jax.random.key(config.seed)
    n_mb = config.ppo.rollout_batch // config.batch_size
    last: dict = {}

    def evaluate(params) -> dict:
        out = evaluate_policy(task.model, params["policy"], task.eval_prompts,
                              jax.random.key(config.seed + 2), task.response_len, task.tokenizer,
                              task.preference, ref_params=task.ref_params, rm_model=task.rm_model,
                              rm_params=task.rm_params)
        if is_main:
            with open(os.path.join(workdir, "samples.txt"), "a") as f:
                f.write(f"--- iteration {it} ---\n" + "\n".join(repr(t) for t in out["examples"]) + "\n")
        return {f"val/{k}": v for k, v in out.items() if isinstance(v, float)}

    it = it0
    t_start = time.perf_counter()
    with _StopFlag() as stop:
        while it < config.total_steps:
            t0 = time.perf_counter()
            prompts = task.prompts_at(it)
            tokens, mask = task.rollout(state["params"], prompts, jax.random.fold_in(rng0, it))
            p = task.prompt_len
            texts = [task.tokenizer.decode(row[p:]) for row in np.asarray(tokens)]
            true = np.array([task.preference.score(t) for t in texts], np.float32)
            batch, stats = task.experience(state["params"], task.ref_params, task.rm_params,
                                           tokens, mask, true)
            t_roll = time.perf_counter() - t0
            batch = jax.device_get(batch)
            ms = []
            for epoch in range(config.ppo.epochs):
                perm = np.random.Generator(np.random.Philox(key=[config.seed, it * 1000 + epoch]))
                order = perm.permutation(config.ppo.rollout_batch)
                for j in range(n_mb):
                    idx = order[j * config.batch_size:(j + 1) * config.batch_size]
                    mb = sharding.put_batch({k: v[idx] for k, v in batch.items()}, batch_sh)
                    state, m = update(state, mb)
                    ms.append(m)
            ms = jax.device_get(ms)
            it += 1
            if not all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in ms):
                raise NonFiniteLossError(
                    f"Non-finite PPO loss or gradient at iteration {it}; lower config.optim.lr or "
                    "config.ppo.kl_coef, or resume from the last checkpoint with other settings.")
            last = {f"train/{k}": float(np.mean([m[k] for m in ms])) for k in ms[0]}
            last.update({f"rollout/{k}": float(v) for k, v in jax.device_get(stats).items()})
            last["rollout/true_preference_rate"] = float(true.mean())
            last["perf/rollout_s"] = t_roll
            last["perf/iteration_s"] = time.perf_counter() - t0
            stopping = stop.signal is not None
            is_eval = it % config.eval_every == 0 or it == config.total_steps
            if is_eval:
                last.update(evaluate(state["params"]))
            writer.write(it, last)
            if is_main and (it % config.log_every == 0 or is_eval or stopping):
                line = (f"iter {it:>5}/{config.total_steps} | reward {last['rollout/reward']:+.3f} | "
                        f"true pref {last['rollout/true_preference_rate']:.3f} | "
                        f"KL {last['rollout/kl']:.3f} | entropy {last['rollout/entropy']:.3f} | "
                        f"clip {last['train/clip_fraction']:.3f} | "
                        f"value err {last['train/value_error']:.4f} | {last['perf/iteration_s']:.1f} s/iter")
                if is_eval:
                    line += (f" | val true pref {last['val/true_preference_rate']:.3f} "
                             f"KL {last.get('val/kl', float('nan')):.3f}")
                print(line, flush=True)
            if is_eval and is_main:
                plot(workdir)
            if it % config.checkpoint_every == 0 or it == config.total_steps or stopping:
                ckpt.save(it, state, {"iteration": it}, meta, force=stopping)
            if stopping:
                if is_main:
                    print(f"Stopped by signal {stop.signal} at iteration {it}; checkpoint saved. "
                          "Run the same command to resume.", flush=True)
                break
    ckpt.close()
    writer.close()
    summary = {"step": it, "wall_s": time.perf_counter() - t_start, **last,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if is_main:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def plot(workdir: str, filename: str = "ppo.png") -> str | None:
    """Reward, true preference rate and KL against the iteration, from ``metrics.jsonl``."""
    rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("rollout/reward", "val/reward"), ("rollout/true_preference_rate",
                                               "val/true_preference_rate"), ("rollout/kl", "val/kl")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, pair in zip(axes, keys):
        for key, style in zip(pair, ("-", "o-")):
            pts = sorted({r["step"]: r[key] for r in rows if key in r}.items())
            if pts:
                ax.plot(*zip(*pts), style, label=key, markersize=3)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = os.path.join(workdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
