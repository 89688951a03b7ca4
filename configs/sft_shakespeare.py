"""Supervised fine-tuning on prompt/response pairs from tiny Shakespeare (the start of the alignment
chain in experiments/alignment/README.md): 32-character prompts, their true 16-character
continuations, loss on the response tokens only. The baby GPT (4x4x128, context 64).

From a pretrained character LM (recommended; the baby GPT of configs/gpt_shakespeare_char.py):
    python -m research.launch --config configs/gpt_shakespeare_char.py:size=baby --workdir workdirs/lm_baby
    python -m research.launch --config configs/sft_shakespeare.py --workdir workdirs/sft \
        --config.init_from=workdirs/lm_baby
From scratch (no init_from):
    python -m research.launch --config configs/sft_shakespeare.py --workdir workdirs/sft
A run of seconds (a 2-layer model from scratch; what the tests run):
    python -m research.launch --config configs/sft_shakespeare.py:smoke --workdir /tmp/sft_smoke
Offline, point at a local copy of input.txt:
    ... --config.data.manual_dir=../shared/data/tinyshakespeare   (or RESEARCH_SHAKESPEARE_DIR=...)
Evaluate the true preference rate of its samples (the SFT level the aligned models are compared to):
    python -m research.rlhf.evaluate --workdir workdirs/sft
Sample:
    python -m research.sample --workdir workdirs/sft --prompt "ROMEO:" --max_new_tokens 200
"""
import ml_collections

from research.core.config import parse_arg, sibling_config


def base_config(smoke: bool) -> ml_collections.ConfigDict:
    """The settings every alignment config shares (data, preference, model, loop)."""
    gpt = sibling_config(__file__, "gpt_shakespeare_char")
    c = gpt.get_config("size=baby,smoke" if smoke else "size=baby")
    del c["eval_batches"]  # these tasks evaluate on config.data.num_eval held-out examples
    c.init_from = ml_collections.config_dict.placeholder(str)  # workdir of the run to start from
    c.data.update(dict(
        prompt_len=32, response_len=16,  # characters (= tokens); prompt + response <= max_len
        num_train=4096, num_eval=256,    # examples (or pairs) from the train / validation split
    ))
    c.preference = ml_collections.ConfigDict(dict(
        kind="avoid_chars",  # 'avoid_chars' | 'avoid_words' | 'contains' (research/data/preferences.py)
        arg="e",             # a lipogram: the response avoids the letter 'e'
    ))
    c.eval_every = 100
    c.checkpoint_every = 100
    if smoke:
        c.data.update(dict(prompt_len=16, response_len=8, num_train=256, num_eval=32))
        c.eval_every = 3
        c.checkpoint_every = 3
    return c


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = base_config(arg.smoke)
    c.task = "sft"
    c.total_steps = 6 if arg.smoke else 300
    c.batch_size = 8 if arg.smoke else 32
    c.optim.update(lr=1e-3, min_lr=1e-4, warmup_steps=2 if arg.smoke else 30,
                   decay_steps=c.total_steps)
    return c
