"""The TRUE preference rate and the KL to the reference of a policy's sampled continuations.

    python -m research.rlhf.evaluate --workdir workdirs/dpo [--all_checkpoints] \
        [--reference workdirs/sft] [--reward_model workdirs/reward] [--num_prompts 512] [--seed 0]

For each checkpoint (the newest, or all of them) of an sft / dpo / ppo / lm run: one continuation
(temperature 1, ``config.data.response_len`` characters) per held-out prompt (the validation split
prompts of ``config.data``, the ones PPO evaluates on), scored by the ground-truth rule of
``config.preference`` (``true_preference_rate``), by the reward model if given (``reward``), and
``kl``: the mean over samples of ``sum_t log pi(y_t) - log ref(y_t)``, a Monte Carlo estimate of
KL(pi || ref) per sequence. The reference defaults to the run's own (DPO: ``dpo.reference`` or
``init_from``; PPO: its reference; SFT: the run itself, KL 0). Appends one JSON line per checkpoint
to ``WORKDIR/alignment_eval.jsonl`` (what ``experiments/alignment/plot_frontier.py`` reads).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import ml_collections
from absl import flags

from research.core.config import ConfigError

# Its own flag registry: importing several CLIs into one process (tests) must not collide.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "The run to evaluate.", flag_values=FLAGS)
_REF = flags.DEFINE_string("reference", None, "Reference run's workdir (default: the run's own).", flag_values=FLAGS)
_RM = flags.DEFINE_string("reward_model", None, "A reward run's workdir (optional).", flag_values=FLAGS)
_ALL = flags.DEFINE_bool("all_checkpoints", False, "Evaluate every checkpoint, not only the newest.", flag_values=FLAGS)
_N = flags.DEFINE_integer("num_prompts", None, "Held-out prompts (default config.data.num_eval).", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)


def default_reference(workdir: str, meta: dict) -> str:
    if meta["task"] == "dpo":
        return meta.get("reference", {}).get("workdir") or workdir
    if meta["task"] == "ppo":
        return meta.get("sources", {}).get("reference", [workdir])[0]
    return workdir


def evaluate_run(workdir: str, reference: str | None = None, reward_model: str | None = None,
                 all_checkpoints: bool = False, num_prompts: int | None = None,
                 seed: int = 0) -> list[dict]:
    import jax

    from research.data import preferences as prefs
    from research.models.transformer import Decoder
    from research.rlhf.common import load_texts
    from research.rlhf.models import (check_task, checkpoint_steps, load_pretrained,
                                      model_config_from)
    from research.rlhf.rollout import evaluate_policy

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path} not found: --workdir must be a training run's workdir.")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ConfigError(f"No checkpoint in {workdir}/checkpoints; train first.")
    steps = steps if all_checkpoints else steps[-1:]
    first = load_pretrained(workdir, "workdir", steps[-1])
    check_task(first, "workdir", ("lm", "sft", "dpo", "ppo"))
    tok = first.tokenizer()
    model = Decoder(dataclasses.replace(model_config_from({}, first, "workdir"), dropout=0.0))
    ref = load_pretrained(reference or default_reference(workdir, first.meta), "reference")
    if ref.tokenizer() != tok:
        raise ConfigError(f"--reference={ref.workdir!r} uses another tokenizer than {workdir}.")
    rm_model = rm_params = None
    if reward_model:
        rm = load_pretrained(reward_model, "reward_model")
        check_task(rm, "reward_model", ("reward",))
        rm_model = Decoder(dataclasses.replace(model_config_from({}, rm, "reward_model"), dropout=0.0))
        rm_params = rm.params
    pref = prefs.Preference(**first.meta["preference"]) if "preference" in first.meta \
        else prefs.Preference.from_config(config)
    d = config.data
    text = load_texts(config)["validation"]
    n = num_prompts or d.get("num_eval", 512)
    ex = prefs.sft_examples(text, n, d.prompt_len, d.response_len, config.seed + 1)
    import numpy as np
    prompts = np.stack([tok.encode(p) for p, _ in ex]).astype(np.int32)
    rows = []
    for step in steps:
        pre = first if step == steps[-1] else load_pretrained(workdir, "workdir", step)
        out = evaluate_policy(model, pre.decoder_params(), prompts, jax.random.key(seed),
                              d.response_len, tok, pref, ref_params=ref.decoder_params(),
                              rm_model=rm_model, rm_params=rm_params)
        row = {"workdir": os.path.abspath(workdir), "task": first.task, "step": step,
               "reference": os.path.abspath(ref.workdir), "preference": pref.describe(), **out}
        rows.append(row)
        print(f"{first.task} step {step}: true preference rate {row['true_preference_rate']:.3f} | "
              f"KL {row['kl']:.3f} | reward {row.get('reward', float('nan')):+.3f} | "
              f"entropy {row['entropy']:.3f} | e.g. {row['examples'][:3]}", flush=True)
        with open(os.path.join(workdir, "alignment_eval.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


def main(argv) -> int:
    try:
        FLAGS.unparse_flags()  # defaults again when main runs twice in one process
        FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    if not _WORKDIR.value:
        raise ConfigError("--workdir is required.")
    evaluate_run(_WORKDIR.value, _REF.value, _RM.value, _ALL.value, _N.value, _SEED.value)
    return 0


def run_cli(argv=None) -> int:
    try:
        return main(sys.argv if argv is None else argv)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
