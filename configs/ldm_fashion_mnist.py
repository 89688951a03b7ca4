"""Text-conditioned latent diffusion on Fashion-MNIST: the U-Net of configs/ddpm_fashion_mnist.py
(same widths) denoises the 14x14x4 latents of a trained VQ autoencoder, with cross-attention to the
text tower's hidden states of generated captions ("a photo of a small dark sandal."). Cosine
schedule, T = 1000, epsilon prediction, the caption dropped to the empty caption 10% of the time
for classifier-free guidance. Image-to-image (SDEdit) runs in the latent space.

First train the autoencoder, then latent diffusion on its checkpoint:
    python -m research.launch --config configs/vqvae_fashion_mnist.py --workdir workdirs/vq
    python -m research.launch --config configs/ldm_fashion_mnist.py --workdir workdirs/ldm \
        --config.vq.workdir=workdirs/vq
With a trained CLIP's frozen text tower instead of a text encoder trained from scratch:
    ... --config.text.encoder=clip --config.text.clip_workdir=workdirs/clip
A run of seconds on an untrained autoencoder (what the tests run):
    python -m research.launch --config configs/ldm_fashion_mnist.py:smoke --workdir /tmp/ldm_smoke
Sample from a prompt, and image-to-image at strength 0.5:
    python -m research.sample_images --workdir workdirs/ldm --prompt "a photo of a bright bag." \
        --guidance 3 --num 16 --out bags.png
    python -m research.sample_images --workdir workdirs/ldm --init_image shoe.png --strength 0.5 \
        --label 5 --num 8
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "ldm"
    c.seed = 0
    c.vq = ml_collections.ConfigDict(dict(
        workdir=ml_collections.config_dict.placeholder(str),  # a `vq` run (its latest checkpoint)
        untrained=False,                                      # smoke only: a random autoencoder
        seed=0,
        model=ml_collections.ConfigDict(dict(channels=(32, 64), groups=8, latent_dim=4,
                                             codebook_size=256))))
    # The latent U-Net: image_size/in_channels must be the VQ latent shape (14, 14, 4).
    c.model = ml_collections.ConfigDict(dict(
        image_size=14, in_channels=4, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
        attn_resolutions=(7,), num_heads=4, groups=8, dropout=0.1, context_dim=64, dtype="float32"))
    c.text = ml_collections.ConfigDict(dict(
        encoder="trainable",                                      # or 'clip' (frozen)
        clip_workdir=ml_collections.config_dict.placeholder(str),
        clip_untrained=False,                                     # tests only: a random CLIP
        max_len=16,
        model=ml_collections.ConfigDict(dict(
            causal=True, num_layers=2, num_heads=4, embed_dim=64, mlp_ratio=2, dropout=0.0))))
    c.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_steps=1000, prediction="epsilon", p_uncond=0.1, clip_sample=False))
    c.sample = ml_collections.ConfigDict(dict(
        sampler="ddim", steps=50, eta=0.0, guidance=3.0, per_class=4))
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        manual_dir=ml_collections.config_dict.placeholder(str),
        data_dir=ml_collections.config_dict.placeholder(str),
    ))
    c.batch_size = 64
    c.grad_accum_steps = 1
    # Sized for "under an hour on a 2-core CPU" as the pixel DDPM: 3000 steps took 42 minutes here
    # sharing the cores (0.85 s/step median); experiments/diffusion/README.md has its figures.
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
        c.vq.untrained = True
        c.vq.model.update(channels=(8, 16), groups=4, codebook_size=32)
        c.model.update(base_channels=8, attn_resolutions=(7,), num_heads=2, groups=4,
                       dropout=0.0, context_dim=16)
        c.text.model.update(num_layers=1, num_heads=2, embed_dim=16)
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
