"""Reward model on generated preference pairs (research/data/preferences.py): the SFT model's trunk
with a scalar head, Bradley-Terry loss; val/accuracy is the pairwise accuracy on held-out pairs
(prompts from the validation split). Default rule: the 16-character continuation avoids 'e'.

After the SFT run (configs/sft_shakespeare.py):
    python -m research.launch --config configs/reward_shakespeare.py --workdir workdirs/reward \
        --config.init_from=workdirs/sft
A run of seconds (from the SFT smoke run; what the tests run):
    python -m research.launch --config configs/reward_shakespeare.py:smoke --workdir /tmp/rm_smoke \
        --config.init_from=/tmp/sft_smoke
Another rule: --config.preference.kind=contains --config.preference.arg=love
Your own pairs (JSON lines {"prompt", "chosen", "rejected"}): --config.data.pairs_file=pairs.jsonl
"""
import ml_collections

from research.core.config import parse_arg, sibling_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = sibling_config(__file__, "sft_shakespeare").base_config(arg.smoke)
    c.task = "reward"
    c.data.pairs_file = ml_collections.config_dict.placeholder(str)
    c.total_steps = 6 if arg.smoke else 100  # val accuracy is 1.0 by step 100
    c.batch_size = 8 if arg.smoke else 32
    c.optim.update(lr=3e-4, min_lr=3e-5, warmup_steps=2 if arg.smoke else 10,
                   decay_steps=c.total_steps, weight_decay=0.0)
    c.eval_every = 3 if arg.smoke else 50
    c.checkpoint_every = 3 if arg.smoke else 50
    return c
