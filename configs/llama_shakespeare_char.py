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
from research.core.config import parse_arg, sibling_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    gpt = sibling_config(__file__, "gpt_shakespeare_char")
    c = gpt.get_config("size=baby,smoke" if arg.smoke else "size=baby")
    c.model.update(dict(
        mlp="swiglu", mlp_hidden=384,  # 3 E: with GQA's smaller key/value projections, a layer
                                       # has exactly the GPT layer's 12 E^2 + 2 E parameters
        norm="rmsnorm", norm_eps=1e-5,
        positions="rope", rope_theta=10000.0,
        num_kv_heads=2,
        tie_embeddings=False,
    ))
    if arg.smoke:
        c.model.update(dict(mlp_hidden=96, num_kv_heads=1))
    return c
