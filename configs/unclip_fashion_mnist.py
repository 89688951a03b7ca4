"""DALL-E 2 (unCLIP) on Fashion-MNIST: a diffusion prior (a 2-layer causal transformer predicting
x0) maps the frozen CLIP text embedding of a generated caption to a CLIP image embedding, and a
pixel U-Net decoder (the widths of configs/ddpm_fashion_mnist.py) is conditioned on that image
embedding, dropped to zeros 10% of the time for classifier-free guidance. Both train together.

First train CLIP, then unCLIP on its checkpoint:
    python -m research.launch --config configs/clip_fashion_mnist.py --workdir workdirs/clip
    python -m research.launch --config configs/unclip_fashion_mnist.py --workdir workdirs/unclip \
        --config.clip.workdir=workdirs/clip
A run of seconds on an untrained CLIP (what the tests run):
    python -m research.launch --config configs/unclip_fashion_mnist.py:smoke --workdir /tmp/unclip_smoke
Sample a prompt:
    python -m research.sample_images --workdir workdirs/unclip --prompt "a photo of a sneaker." \
        --guidance 3 --num 16
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "unclip"
    c.seed = 0
    c.clip = ml_collections.ConfigDict(dict(
        workdir=ml_collections.config_dict.placeholder(str), untrained=False, seed=0))
    c.prior = ml_collections.ConfigDict(dict(width=128, num_layers=2, num_heads=4, mlp_ratio=2,
                                             dropout=0.0))
    c.prior_diffusion = ml_collections.ConfigDict(dict(schedule="cosine", num_steps=1000,
                                                       sample_steps=50))
    c.model = ml_collections.ConfigDict(dict(
        base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
        num_heads=4, groups=8, dropout=0.1, context_dim=64, dtype="float32"))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_steps=1000, prediction="epsilon", p_uncond=0.1, clip_sample=True))
    c.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=50, eta=0.0, guidance=3.0,
                                              per_class=4))
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        manual_dir=ml_collections.config_dict.placeholder(str),
        data_dir=ml_collections.config_dict.placeholder(str),
    ))
    c.batch_size = 64
    c.grad_accum_steps = 1
    # Sized for a 2-core CPU: 1500 steps took 28 minutes here (1.14 s/step); the figures in
    # experiments/diffusion/README.md are this schedule's (it was 20000 steps at lr 2e-4, ~6 h).
    c.total_steps = 1500
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, min_lr=2e-5, warmup_steps=100, decay_steps=1500,
        schedule="cosine", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
    c.log_every = 50
    c.eval_every = 750
    c.eval_batches = 8
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)
    if arg.smoke:
        c.clip.untrained = True
        c.prior.update(width=16, num_layers=1, num_heads=2)
        c.prior_diffusion.update(num_steps=100, sample_steps=3)
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
