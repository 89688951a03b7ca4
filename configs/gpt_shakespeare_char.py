"""Character-level GPT on tiny Shakespeare (nanoGPT's shakespeare-char experiment).

Train (default = nanoGPT's settings, 6x6x384, context 256; GPU-sized):
    python -m research.launch --config configs/gpt_shakespeare_char.py --workdir workdirs/gpt_char
The laptop settings (4x4x128, context 64, batch 12, 2000 steps; val loss ~1.88):
    python -m research.launch --config configs/gpt_shakespeare_char.py:size=baby --workdir workdirs/baby
A run of seconds (what the tests run):
    python -m research.launch --config configs/gpt_shakespeare_char.py:size=baby,smoke --workdir /tmp/smoke
Offline, point at a local copy of input.txt:
    ... --config.data.manual_dir=../shared/data/tinyshakespeare   (or RESEARCH_SHAKESPEARE_DIR=...)
Sample:
    python -m research.sample --workdir workdirs/baby --prompt "ROMEO:" --max_new_tokens 500 \
        --temperature 0.8 --top_k 200
"""
import ml_collections

from research.core.config import parse_arg

SIZES = {
    # nanoGPT config/train_shakespeare_char.py
    "default": dict(num_layers=6, num_heads=6, embed_dim=384, max_len=256, dropout=0.2,
                    batch_size=64, total_steps=5000, eval_batches=200),
    # nanoGPT README's CPU command: --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
    # --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20
    "baby": dict(num_layers=4, num_heads=4, embed_dim=128, max_len=64, dropout=0.0,
                 batch_size=12, total_steps=2000, eval_batches=20),
}


def get_config(arg=None):
    arg = parse_arg(arg, size="default", smoke=False)
    if arg.size not in SIZES:
        raise ValueError(f"Unknown size {arg.size!r} in --config ...:size=; known: {sorted(SIZES)}")
    s = SIZES[arg.size]
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.seed = 1337
    c.model = ml_collections.ConfigDict(dict(
        num_layers=s["num_layers"], num_heads=s["num_heads"], embed_dim=s["embed_dim"],
        max_len=s["max_len"], mlp_ratio=4, dropout=s["dropout"],
        use_bias=False,          # nanoGPT's train.py default
        tie_embeddings=True, activation="gelu",
        dtype="float32",         # compute dtype: 'bfloat16' for mixed precision (params stay fp32)
        remat="none",            # or 'nothing_saveable', 'dots_saveable', ...
    ))
    c.data = ml_collections.ConfigDict(dict(
        name="tiny_shakespeare",
        manual_dir=ml_collections.config_dict.placeholder(str),  # or $RESEARCH_SHAKESPEARE_DIR
        data_dir=ml_collections.config_dict.placeholder(str),    # or $RESEARCH_DATA_DIR
    ))
    c.batch_size = s["batch_size"]
    c.grad_accum_steps = 1
    c.total_steps = s["total_steps"]
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=s["total_steps"],
        schedule="cosine", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
    c.log_every = 10
    c.eval_every = 250
    c.eval_batches = s["eval_batches"]
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)  # None = batch_size
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.pipeline_microbatches = 4  # GPipe microbatches when mesh.pipeline > 1 (research/core/pipeline.py)
    c.peak_flops = ml_collections.config_dict.placeholder(float)  # None = detect
    if arg.smoke:
        c.model.update(num_layers=2, num_heads=2, embed_dim=32, max_len=32)
        c.batch_size = 8
        c.total_steps = 6
        c.optim.update(warmup_steps=2, decay_steps=6)
        c.log_every = 2
        c.eval_every = 3
        c.eval_batches = 2
        c.checkpoint_every = 3
    return c
