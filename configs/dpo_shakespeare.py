"""DPO (or IPO) from the SFT model on generated preference pairs (research/data/preferences.py);
the frozen reference is the SFT checkpoint (its log-probs of every pair computed once). Logs the
implicit-reward accuracy and margins; research.rlhf.evaluate measures the true preference rate of
sampled continuations and their KL to the reference.

After the SFT run (configs/sft_shakespeare.py):
    python -m research.launch --config configs/dpo_shakespeare.py --workdir workdirs/dpo \
        --config.init_from=workdirs/sft
    python -m research.rlhf.evaluate --workdir workdirs/dpo --all_checkpoints
IPO, or length-normalised DPO:
    ... --config.dpo.loss=ipo --config.dpo.length_normalize=True
    ... --config.dpo.length_normalize=True
A run of seconds (from the SFT smoke run; what the tests run):
    python -m research.launch --config configs/dpo_shakespeare.py:smoke --workdir /tmp/dpo_smoke \
        --config.init_from=/tmp/sft_smoke
"""
import ml_collections

from research.core.config import parse_arg, sibling_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = sibling_config(__file__, "sft_shakespeare").base_config(arg.smoke)
    c.task = "dpo"
    c.data.pairs_file = ml_collections.config_dict.placeholder(str)
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,
        loss="sigmoid",          # 'sigmoid' (DPO) | 'ipo'
        length_normalize=False,  # mean instead of sum of the response log-probs
        label_smoothing=0.0,     # conservative DPO
        reference=ml_collections.config_dict.placeholder(str),  # None = config.init_from
    ))
    c.total_steps = 6 if arg.smoke else 120
    c.batch_size = 8 if arg.smoke else 32
    c.optim.update(lr=1e-4, min_lr=1e-5, warmup_steps=2 if arg.smoke else 10,
                   decay_steps=c.total_steps, weight_decay=0.0)
    c.eval_every = 3 if arg.smoke else 40
    c.checkpoint_every = 3 if arg.smoke else 20
    c.keep_checkpoints = 10  # evaluate.py --all_checkpoints traces preference rate vs KL
    return c
