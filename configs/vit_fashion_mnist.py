"""Supervised ViT on Fashion-MNIST (the issue's baseline: >= 90% test accuracy on a 2-core CPU).

Train (4 pre-LN blocks, width 96, 3 heads, MLP 4x wide, 4x4 patches = 49 tokens + a class token;
455,050 params; 8000 steps ~40 min on an idle 2-core CPU; 90.3% test accuracy, see
experiments/clip/README.md):
    python -m research.launch --config configs/vit_fashion_mnist.py --workdir workdirs/vit_fmnist
A run of seconds (what the tests run):
    python -m research.launch --config configs/vit_fashion_mnist.py:smoke --workdir /tmp/vit_smoke
Mean pooling instead of the class token, or the small CNN instead of the ViT:
    ... --config.model.pool=mean
    python -m research.launch --config configs/cnn_fashion_mnist.py --workdir workdirs/cnn_fmnist
Data: Debian's dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) is found by
itself; elsewhere the files are downloaded, or point at a local copy of the four idx .gz files:
    ... --config.data.manual_dir=DIR   (or RESEARCH_FASHION_MNIST_DIR=DIR)
The workdir gets metrics.jsonl, loss.png and accuracy.png (test accuracy on all 10k images).
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        name="vit",
        image_size=28, patch_size=4, channels=1, num_classes=10, pool="cls",
        num_layers=4, num_heads=3, embed_dim=96, mlp_ratio=4, dropout=0.0,
        use_bias=True, activation="gelu", norm_position="pre",
        dtype="float32", remat="none",
    ))
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        manual_dir=ml_collections.config_dict.placeholder(str),  # or $RESEARCH_FASHION_MNIST_DIR
        data_dir=ml_collections.config_dict.placeholder(str),    # or $RESEARCH_DATA_DIR
        download=True,
        crop_pad=0,        # random translations by up to this many pixels (0 = off; 2 cost
                           # 1.7 points at 5000 steps: this budget underfits, see the README)
        flip=True,         # random horizontal flips
    ))
    c.label_smoothing = 0.0
    c.batch_size = 128
    c.grad_accum_steps = 1
    c.total_steps = 8000   # ~17 epochs of 60k images: 90.3% (experiments/clip/README.md)
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=2e-3, min_lr=1e-5, warmup_steps=200, decay_steps=c.total_steps,
        schedule="cosine", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, grad_clip=1.0))
    c.log_every = 50
    c.eval_every = 500
    c.eval_batch_size = 500    # the 10k test images in 20 batches
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)  # None = detect
    if arg.smoke:
        c.model.update(num_layers=1, num_heads=2, embed_dim=16, patch_size=7)
        c.batch_size = 16
        c.total_steps = 6
        c.optim.update(warmup_steps=2, decay_steps=6)
        c.log_every = 2
        c.eval_every = 3
        c.eval_batch_size = 2000
        c.checkpoint_every = 3
    return c
