"""CLIP on Fashion-MNIST with generated captions; zero-shot with held-out prompt templates.

Train (ViT image tower 4 x 96 with a 4x MLP, 4x4 patches; causal text transformer 2 x 64 over word
tokens; joint space 64; InfoNCE with a learnable temperature; 535,745 params; 4000 steps take
~48 min on a 2-core CPU: zero-shot 88.5%, linear probe 88.6%, see experiments/clip/README.md):
    python -m research.launch --config configs/clip_fashion_mnist.py --workdir workdirs/clip_fmnist
A run of seconds (what the tests run):
    python -m research.launch --config configs/clip_fashion_mnist.py:smoke --workdir /tmp/clip_smoke
SigLIP's sigmoid loss instead of InfoNCE:
    python -m research.launch --config configs/clip_fashion_mnist.py:loss=siglip --workdir workdirs/siglip
LiT: lock the image tower of a trained ViT (a classify run's workdir, or a clip run's) and train
only the text tower and the projections:
    python -m research.launch --config configs/vit_fashion_mnist.py --workdir workdirs/vit_fmnist
    python -m research.launch --config configs/clip_fashion_mnist.py:lit=workdirs/vit_fmnist \
        --workdir workdirs/lit_fmnist
Full evaluation of a run's checkpoint (zero-shot on the 10k test images, retrieval recall@1/5,
linear probe; writes similarity.png and accuracy.png into the workdir):
    python -m research.tasks.clip --workdir workdirs/clip_fmnist
Data: Debian's dataset-fashion-mnist package is found by itself; elsewhere the files are
downloaded, or point at a local copy: --config.data.manual_dir=DIR (or RESEARCH_FASHION_MNIST_DIR).
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, loss="infonce", lit="")
    c = ml_collections.ConfigDict()
    c.task = "clip"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        embed_dim=64,
        loss=arg.loss,                       # 'infonce' | 'siglip'
        lit=arg.lit or ml_collections.config_dict.placeholder(str),  # a ViT run's workdir
        image=ml_collections.ConfigDict(dict(
            image_size=28, patch_size=4, channels=1, pool="cls", patch_bias=True,
            embed_norm=False, num_layers=4, num_heads=3, embed_dim=96, mlp_ratio=4,
            dropout=0.0, use_bias=True, activation="gelu", norm_position="pre",
            dtype="float32", remat="none")),
        text=ml_collections.ConfigDict(dict(
            causal=True,                     # OpenAI CLIP: causal mask, pooled at [EOS]
            max_len=16, num_layers=2, num_heads=4, embed_dim=64, mlp_ratio=2, dropout=0.0,
            use_bias=True, activation="gelu", norm_position="pre", dtype="float32",
            remat="none")),
    ))
    c.data = ml_collections.ConfigDict(dict(
        name="fashion_mnist",
        manual_dir=ml_collections.config_dict.placeholder(str),
        data_dir=ml_collections.config_dict.placeholder(str),
        download=True,
        flip=True,
        crop_pad=0,
        word_dropout=0.1,     # non-class words -> [UNK] (held-out templates' new words are [UNK])
    ))
    c.zero_shot = ml_collections.ConfigDict(dict(
        classes=ml_collections.config_dict.placeholder(tuple),  # None = the ten class names
        probe_examples=10000,        # training images the linear probe is fitted on
        retrieval_examples=1000,     # test pairs of the retrieval evaluation
    ))
    c.batch_size = 256
    c.grad_accum_steps = 1
    c.total_steps = 4000     # ~17 epochs
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=2e-3, min_lr=1e-5, warmup_steps=200, decay_steps=c.total_steps,
        schedule="cosine", b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05, grad_clip=1.0))
    c.log_every = 50
    c.eval_every = 500
    c.eval_batch_size = 500  # the 10k test images in 20 batches
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)
    if arg.smoke:
        c.model.image.update(num_layers=1, num_heads=2, embed_dim=16, patch_size=7)
        c.model.text.update(num_layers=1, num_heads=2, embed_dim=16)
        c.model.embed_dim = 16
        c.zero_shot.update(probe_examples=500, retrieval_examples=100)
        c.batch_size = 16
        c.total_steps = 6
        c.optim.update(warmup_steps=2, decay_steps=6)
        c.log_every = 2
        c.eval_every = 3
        c.eval_batch_size = 2000
        c.checkpoint_every = 3
    return c
