"""A VQ autoencoder on Fashion-MNIST: 28x28 images -> 14x14 latents of dimension 4, a codebook of
256 codes with EMA updates (decay 0.99) and dead-code restarts, commitment weight 0.25. Its
checkpoint is the autoencoder of latent diffusion (configs/ldm_fashion_mnist.py). Each eval prints
the test reconstruction MSE, the fraction of codes used and the code perplexity, and writes
recon_<step>.png (test images above their reconstructions).

Train:
    python -m research.launch --config configs/vqvae_fashion_mnist.py --workdir workdirs/vq
A run of seconds (what the tests run):
    python -m research.launch --config configs/vqvae_fashion_mnist.py:smoke --workdir /tmp/vq_smoke
Offline, point at the idx files (Debian's dataset-fashion-mnist is found by itself):
    ... --config.data.manual_dir=/usr/share/datasets/fashion-mnist
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "vq"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        channels=(32, 64), num_res_blocks=1, groups=8, latent_dim=4, codebook_size=256,
        beta=0.25, decay=0.99, eps=1e-5, dead_threshold=1.0))
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        manual_dir=ml_collections.config_dict.placeholder(str),  # or $RESEARCH_FASHION_MNIST_DIR
        data_dir=ml_collections.config_dict.placeholder(str),    # or $RESEARCH_DATA_DIR
    ))
    c.batch_size = 64
    c.grad_accum_steps = 1
    c.total_steps = 3000
    c.optim = ml_collections.ConfigDict(dict(
        name="adam", lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=3000,
        schedule="cosine", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0))
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 16
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)
    if arg.smoke:
        c.model.update(channels=(8, 16), groups=4, codebook_size=32)
        c.batch_size = 8
        c.total_steps = 4
        c.optim.update(warmup_steps=1, decay_steps=4)
        c.log_every = 2
        c.eval_every = 4
        c.eval_batches = 2
        c.checkpoint_every = 4
    return c
