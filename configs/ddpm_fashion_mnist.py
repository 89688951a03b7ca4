"""Class-conditional DDPM on Fashion-MNIST: a small U-Net (28 -> 14 -> 7, self- and cross-attention
at 7x7), cosine schedule with T = 1000, epsilon prediction, the label dropped to a null class 10% of
the time for classifier-free guidance. Sample grids (a row per class, DDIM, guidance 3) are written
into the workdir at eval steps.

Train (CPU-sized: ~1.2M parameters):
    python -m research.launch --config configs/ddpm_fashion_mnist.py --workdir workdirs/ddpm
A run of seconds (what the tests run):
    python -m research.launch --config configs/ddpm_fashion_mnist.py:smoke --workdir /tmp/ddpm_smoke
Offline, point at the idx files (Debian's dataset-fashion-mnist is found by itself):
    ... --config.data.manual_dir=/usr/share/datasets/fashion-mnist
Sample a grid (DDIM 50 steps, guidance 3, class 7 = Sneaker):
    python -m research.sample_images --workdir workdirs/ddpm --sampler ddim --steps 50 \
        --guidance 3 --label 7 --num 16 --out sneakers.png
Measure (Frechet distance in a Fashion-MNIST classifier's feature space, conditional accuracy):
    python -m research.launch --config configs/cnn_fashion_mnist.py --workdir workdirs/cnn_fmnist
    python -m experiments.diffusion.measure --workdir workdirs/ddpm --classifier workdirs/cnn_fmnist \
        --per_class 10 --ddpm_per_class 10 --img2img 100 [--noisy_classifier workdirs/noisy_clf] \
        [--clip workdirs/clip_fmnist]
(figures of the full run: experiments/diffusion/README.md)
Classifier guidance (a noise-aware classifier on the same schedule) and CLIP guidance:
    python -m research.launch --config configs/noisy_classifier_fashion_mnist.py --workdir workdirs/noisy_clf
    python -m research.sample_images --workdir workdirs/ddpm --label 7 --guidance 0 \
        --classifier_workdir workdirs/noisy_clf --classifier_scale 5
    python -m research.sample_images --workdir workdirs/ddpm --label 4 \
        --clip_workdir workdirs/clip_fmnist --clip_guidance 30 --prompt "a large dark coat."
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, prediction="epsilon", schedule="cosine")
    c = ml_collections.ConfigDict()
    c.task = "ddpm"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
        num_heads=4, groups=8, dropout=0.1, context_dim=64, dtype="float32"))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule=arg.schedule, num_steps=1000, prediction=arg.prediction, p_uncond=0.1,
        clip_sample=True))
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim", steps=50, eta=0.0, guidance=3.0, per_class=4))
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        manual_dir=ml_collections.config_dict.placeholder(str),  # or $RESEARCH_FASHION_MNIST_DIR
        data_dir=ml_collections.config_dict.placeholder(str),    # or $RESEARCH_DATA_DIR
    ))
    c.batch_size = 64
    c.grad_accum_steps = 1
    # Sized for the "under an hour on a 2-core CPU": ~1.07 s/step there, 54 minutes; the
    # figures in experiments/diffusion/README.md are this schedule's. More steps (e.g. 20000 at
    # lr 2e-4) give better samples on faster machines.
    c.total_steps = 3000
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, min_lr=2e-5, warmup_steps=100, decay_steps=3000,
        schedule="cosine", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
    c.log_every = 50
    c.eval_every = 1000
    c.eval_batches = 8
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)
    if arg.smoke:
        c.model.update(base_channels=8, channel_mults=(1, 2), attn_resolutions=(14,), num_heads=2,
                       groups=4, dropout=0.0, context_dim=16)
        c.diffusion.num_steps = 100
        c.sample.update(steps=3, per_class=1)
        c.batch_size = 8
        c.total_steps = 4
        c.optim.update(warmup_steps=1, decay_steps=4)
        c.log_every = 2
        c.eval_every = 4
        c.eval_batches = 2
        c.checkpoint_every = 4
    return c
