"""Steady-state train-step benchmark of the GPT on tiny Shakespeare (the launcher's own step).

    python experiments/bench/train_step.py --size baby --steps 30 --repeats 3
    python experiments/bench/train_step.py --size default --steps 20
    python experiments/bench/train_step.py --size baby --xla_flags="--xla_cpu_use_onednn=true"

Prints compile time, the median ms/step over ``--steps`` timed steps (after ``--warmup`` steps, each
step synchronised), tokens/s and MFU against the peak FLOP/s it states. ``--torch`` also times the
same model and settings in PyTorch (nanoGPT's architecture and AdamW, eager, CPU) in the same run,
for a ratio measured under the same machine load.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench_jax(size: str, steps: int, overrides: list[str], warmup: int = 5, pipelined: bool = False) -> dict:
    sys.path.insert(0, REPO)
    from research.core.runtime import tune_host_allocator
    if os.environ.get("RESEARCH_DEFAULT_MALLOC") != "1":
        tune_host_allocator()  # as the launcher does
    import jax

    from configs.gpt_shakespeare_char import get_config
    from research.core import metrics, sharding, train
    from research.core.mesh import make_mesh
    from research.tasks.lm import LMTask

    config = get_config(f"size={size}")
    with config.unlocked():
        for item in overrides:
            key, value = item.split("=", 1)
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = type(node[leaf])(value) if node[leaf] is not None else value
    task = LMTask(config)
    mesh = make_mesh(config.mesh)
    tx, schedule, init_fn, _, state_sh = train.build_state(task, config, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = jax.jit(train.make_train_step(task, tx, schedule, config.grad_accum_steps),
                      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                      donate_argnums=0)
    state = init_fn(jax.random.key(0))
    data = task.train_data(0, config.batch_size)
    t0 = time.perf_counter()
    state, m = step_fn(state, sharding.put_batch(next(data), batch_sh))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = step_fn(state, sharding.put_batch(next(data), batch_sh))
    jax.block_until_ready(m)
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step_fn(state, sharding.put_batch(next(data), batch_sh))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps
    # Pipelined: no sync per step (what the loop does on accelerators), total time / steps.
    pipelined_s = float("nan")
    if pipelined:
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step_fn(state, sharding.put_batch(next(data), batch_sh))
        jax.block_until_ready(m)
        pipelined_s = (time.perf_counter() - t) / steps
    med = statistics.median(times)
    flops = task.flops_per_example * config.batch_size
    peak = metrics.peak_flops(config.get("peak_flops"))
    return dict(impl="jax", compile_s=compile_s, page_faults_per_step=faults, ms_step=1e3 * med, ms_step_pipelined=1e3 * pipelined_s,
                tokens_s=task.tokens_per_example * config.batch_size / med,
                mfu=flops / med / peak if peak else float("nan"), peak_tflops=peak / 1e12,
                gflop_step=flops / 1e9)


def bench_torch(size: str, steps: int, warmup: int = 5) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_gpt import TorchGPT

    sys.path.insert(0, REPO)
    from configs.gpt_shakespeare_char import get_config
    c = get_config(f"size={size}")
    m = c.model
    torch.manual_seed(0)
    model = TorchGPT(65, m.num_layers, m.num_heads, m.embed_dim, m.max_len, m.dropout)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    data = torch.randint(0, 65, (100_000,))

    def step():
        ix = torch.randint(len(data) - m.max_len - 1, (c.batch_size,))
        x = torch.stack([data[i:i + m.max_len] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + m.max_len] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return dict(impl="torch", ms_step=1e3 * med, threads=torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="baby", choices=["baby", "default"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per implementation")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps after the compiling one")
    ap.add_argument("--pipelined", action="store_true",
                    help="also time steps dispatched without a sync in between")
    ap.add_argument("--xla_flags", default=None, help="XLA_FLAGS for the JAX runs (default: as set)")
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
    ap.add_argument("--override", action="append", default=[], help="config override key=value")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = bench_jax(args.size, args.steps, args.override, args.warmup, args.pipelined) \
            if args.worker == "jax" else bench_torch(args.size, args.steps, args.warmup)
        print(repr(fn))
        return
    env = dict(os.environ)
    if args.xla_flags is not None:
        env["XLA_FLAGS"] = args.xla_flags
    print(f"size={args.size} steps={args.steps} repeats={args.repeats} "
          f"XLA_FLAGS={env.get('XLA_FLAGS', '')!r} overrides={args.override}")
    impls = ["jax"] + (["torch"] if args.torch else [])
    results = {k: [] for k in impls}
    for r in range(args.repeats):
        for impl in impls:  # interleaved, so both see the same machine load
            cmd = [sys.executable, __file__, "--worker", impl, "--size", args.size,
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cmd += [f"--override={o}" for o in args.override] + ["--pipelined"] * args.pipelined
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            res = eval(out.strip().splitlines()[-1], {"nan": float("nan")})  # noqa: S307 - our repr
            results[impl].append(res)
            print(f"  run {r} {impl}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    jax_ms = statistics.median(x["ms_step"] for x in results["jax"])
    j0 = results["jax"][0]
    print(f"JAX  median ms/step {jax_ms:.1f} (pipelined "
          f"{statistics.median(x['ms_step_pipelined'] for x in results['jax']):.1f}); "
          f"tokens/s {statistics.median(x['tokens_s'] for x in results['jax']):.0f}; "
          f"MFU {100 * statistics.median(x['mfu'] for x in results['jax']):.1f}% of an assumed "
          f"{j0['peak_tflops'] * 1e3:.0f} GFLOP/s peak ({j0['gflop_step']:.2f} GFLOP/step); "
          f"compile {statistics.median(x['compile_s'] for x in results['jax']):.1f} s")
    if args.torch:
        t_ms = statistics.median(x["ms_step"] for x in results["torch"])
        print(f"PyTorch median ms/step {t_ms:.1f}; JAX speed-up {t_ms / jax_ms:.2f}x")


if __name__ == "__main__":
    main()
