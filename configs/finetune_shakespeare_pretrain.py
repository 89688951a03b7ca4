"""The base model of the PEFT study (experiments/peft): the baby character GPT of
configs/gpt_shakespeare_char.py pretrained on the FIRST 80% of the train text only
(``config.data.train_range=(0.0, 0.8)``); configs/finetune_shakespeare.py adapts it to the later
plays (the train text's last 20%) and evaluates on the validation split (the last 10% of the file).

Pretrain (laptop settings: 4x4x128, context 64, 2000 steps, a few minutes on a CPU):
    python -m research.launch --config configs/finetune_shakespeare_pretrain.py \
        --workdir workdirs/peft_base
A run of seconds (what the tests run):
    python -m research.launch --config configs/finetune_shakespeare_pretrain.py:smoke \
        --workdir /tmp/peft_base_smoke
Offline: ... --config.data.manual_dir=../shared/data/tinyshakespeare (or RESEARCH_SHAKESPEARE_DIR).
"""
from research.core.config import parse_arg, sibling_config

PRETRAIN_RANGE = (0.0, 0.8)


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, steps=0)
    gpt = sibling_config(__file__, "gpt_shakespeare_char")
    c = gpt.get_config("size=baby,smoke" if arg.smoke else "size=baby")
    c.data.train_range = PRETRAIN_RANGE
    if arg.steps:
        c.total_steps = arg.steps
        c.optim.decay_steps = arg.steps
        c.optim.warmup_steps = min(c.optim.warmup_steps, arg.steps // 10)
    return c
