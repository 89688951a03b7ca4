"""Latent vs pixel diffusion sampling speed at equal U-Net width (issue 7 target: >= 2x).

Times DDIM sampling (``--steps``, classifier-free guidance 3, so each step runs the U-Net on 2N
inputs) of ``--num`` images, after a warm-up call that compiles, best of ``--repeats``:
- pixel: the ``ddpm`` task of configs/ddpm_fashion_mnist.py (28x28x1; levels 28/14/7);
- latent: the ``ldm`` task of configs/ldm_fashion_mnist.py (14x14x4 latents; levels 14/7, the same
  widths 32/64, attention at 7x7), including the text tower and the VQ decoder pass;
- pixel_same_unet: a pixel U-Net with the latent one's exact levels (channel_mults (1, 2),
  attention at the lowest level), so only the input resolution differs.
Weights are untrained (the time does not depend on them); ``--vq`` uses a trained VQ checkpoint.

    nice -n 10 python -m experiments.diffusion.latent_speed --num 64 --steps 50 [--vq workdirs/vq]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np


def time_sampling(task, params, labels, steps: int, repeats: int) -> float:
    def run(k):
        return task.sample(params, labels, jax.random.key(k), sampler="ddim", steps=steps,
                           guidance_scale=3.0)
    run(0)  # compile
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        run(r + 1)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vq", default=None, help="a vq run's workdir (default: untrained VQ)")
    args = ap.parse_args(argv)
    from configs import ddpm_fashion_mnist, ldm_fashion_mnist
    from research.tasks.ddpm import DDPMTask
    from research.tasks.ldm import LDMTask

    labels = np.arange(args.num) % 10
    out = {}
    lcfg = ldm_fashion_mnist.get_config()
    if args.vq:
        lcfg.vq.workdir = args.vq
    else:
        lcfg.vq.untrained = True
    ldm = LDMTask(lcfg, load_data=False)
    lparams = ldm.init(jax.random.key(0))
    out["latent_s"] = time_sampling(ldm, lparams, labels, args.steps, args.repeats)
    out["latent_unet_params"] = sum(int(x.size) for x in jax.tree.leaves(lparams["unet"]))
    pcfg = ddpm_fashion_mnist.get_config()
    ddpm = DDPMTask(pcfg, load_data=False)
    out["pixel_s"] = time_sampling(ddpm, ddpm.init(jax.random.key(0)), labels, args.steps,
                                   args.repeats)
    out["pixel_unet_params"] = ddpm.n_params
    pcfg.model.update(channel_mults=(1, 2), attn_resolutions=(14,))
    same = DDPMTask(pcfg, load_data=False)
    out["pixel_same_unet_s"] = time_sampling(same, same.init(jax.random.key(0)), labels,
                                             args.steps, args.repeats)
    out["pixel_same_unet_params"] = same.n_params
    out["speedup_vs_pixel"] = out["pixel_s"] / out["latent_s"]
    out["speedup_vs_pixel_same_unet"] = out["pixel_same_unet_s"] / out["latent_s"]
    out.update(num=args.num, steps=args.steps, vq=args.vq or "untrained")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
