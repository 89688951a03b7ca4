"""Character-level LLaMA-style decoder on tiny Shakespeare: the GPT of
configs/gpt_shakespeare_char.py at its laptop size (``:size=baby``: 4 layers, 4 heads, width 128,
context 64) with LLaMA's choices: RMSNorm, SwiGLU MLP (hidden 384 = 3 x 128), rotary positions,
2 key/value heads (grouped-query attention), untied output head, no biases. Parameters: 804,224
(the baby GPT: 804,096). Same data, optimizer and schedule as the baby GPT, so the two runs
compare directly.

Train (laptop settings, 2000 steps):
    python -m research.launch --config configs/llama_shakespeare_char.py \
        --workdir workdirs/llama_baby
A run of seconds:
    python -m research.launch --config configs/llama_shakespeare_char.py:smoke --workdir /tmp/smoke
Offline, point at a local copy of input.txt:
    ... --config.data.manual_dir=../shared/data/tinyshakespeare   (or RESEARCH_SHAKESPEARE_DIR=...)
Sample:
    python -m research.sample --workdir workdirs/llama_baby --prompt "ROMEO:" --max_new_tokens 500 \
        --temperature 0.8 --top_k 200
Variants: --config.model.positions=alibi (ALiBi biases, no position parameters),
--config.model.num_kv_heads=1 (multi-query), --config.model.num_kv_heads=4 (plain multi-head).
"""
import ml_collections

from research.core.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = ml_collections.ConfigDict()
    c.task = "lm"
    c.seed = 1337
    c.model = ml_collections.ConfigDict(dict(
        num_layers=4, num_heads=4, embed_dim=128, max_len=64,
        mlp="swiglu", mlp_hidden=384,  # 3 E: with GQA's smaller key/value projections, a layer
                                       # has exactly the GPT layer's 12 E^2 + 2 E parameters
        norm="rmsnorm", norm_eps=1e-5,
        positions="rope", rope_theta=10000.0,
        num_kv_heads=2,
        dropout=0.0,
        use_bias=False,
        tie_embeddings=False,
        dtype="float32",         # compute dtype: 'bfloat16' for mixed precision (params stay fp32)
        remat="none",            # or 'nothing_saveable', 'dots_saveable', ...
    ))
    c.data = ml_collections.ConfigDict(dict(
        name="tiny_shakespeare",
        manual_dir=ml_collections.config_dict.placeholder(str),  # or $RESEARCH_SHAKESPEARE_DIR
        data_dir=ml_collections.config_dict.placeholder(str),    # or $RESEARCH_DATA_DIR
    ))
    c.batch_size = 12
    c.grad_accum_steps = 1
    c.total_steps = 2000
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000,
        schedule="cosine", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
    c.log_every = 10
    c.eval_every = 250
    c.eval_batches = 20
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)  # None = batch_size
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)  # None = detect
    if arg.smoke:
        c.model.update(num_layers=2, num_heads=2, embed_dim=32, max_len=32, mlp_hidden=96,
                       num_kv_heads=1)
        c.batch_size = 8
        c.total_steps = 6
        c.optim.update(warmup_steps=2, decay_steps=6)
        c.log_every = 2
        c.eval_every = 3
        c.eval_batches = 2
        c.checkpoint_every = 3
    return c
