"""A noise-aware Fashion-MNIST classifier log p(y | x_t, t) for classifier guidance (Dhariwal &
Nichol 2021): the U-Net's encoder half (time embedding, residual blocks 28 -> 14 -> 7, a middle
block, mean-pooled linear head; ~81k parameters) trained with cross-entropy on images noised by the
forward process at t ~ U[0, T). The schedule (cosine, T = 1000) must be the DDPM run's
(configs/ddpm_fashion_mnist.py); sample_images checks it.

Train (CPU-sized: 5000 steps of 64 images, ~10-12 min on 2 cores):
    python -m research.launch --config configs/noisy_classifier_fashion_mnist.py \
        --workdir workdirs/noisy_clf
A run of seconds (what the tests run; T = 100 as the DDPM smoke config):
    python -m research.launch --config configs/noisy_classifier_fashion_mnist.py:smoke \
        --workdir /tmp/noisy_clf_smoke
For a DDPM trained with another schedule, match it: schedule=linear (or --config.diffusion.*).
Guide a DDPM's samples toward class 7 (Sneaker) with classifier scale 5, without classifier-free
guidance (--guidance 0 samples the unconditional model):
    python -m research.sample_images --workdir workdirs/ddpm --guidance 0 --label 7 --num 16 \
        --classifier_workdir workdirs/noisy_clf --classifier_scale 5
Eval metrics: val/accuracy (t ~ U[0, T)) and val/accuracy_t0, _t250, _t500, _t750 (fixed t).
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, schedule="cosine")
    c = ml_collections.ConfigDict()
    c.task = "noisy_classify"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
        num_heads=4, groups=8, dropout=0.0, dtype="float32"))
    c.diffusion = ml_collections.ConfigDict(dict(schedule=arg.schedule, num_steps=1000))
    c.eval_noise_levels = (0.0, 0.25, 0.5, 0.75)  # fractions of T: val/accuracy_t<int(f T)>
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        manual_dir=ml_collections.config_dict.placeholder(str),  # or $RESEARCH_FASHION_MNIST_DIR
        data_dir=ml_collections.config_dict.placeholder(str),    # or $RESEARCH_DATA_DIR
    ))
    c.batch_size = 64
    c.grad_accum_steps = 1
    c.total_steps = 5000
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=2e-3, min_lr=2e-5, warmup_steps=200, decay_steps=c.total_steps,
        schedule="cosine", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0))
    c.log_every = 50
    c.eval_every = 1000
    c.eval_batch_size = 500
    c.eval_batches = 10        # 5000 test images
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)
    if arg.smoke:
        c.model.update(base_channels=4, channel_mults=(1, 2), groups=2, num_heads=1)
        c.diffusion.num_steps = 100
        c.batch_size = 8
        c.total_steps = 4
        c.optim.update(warmup_steps=1, decay_steps=4)
        c.log_every = 2
        c.eval_every = 4
        c.eval_batch_size = 8
        c.eval_batches = 2
        c.checkpoint_every = 4
    return c
