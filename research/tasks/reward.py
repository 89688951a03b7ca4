"""Reward model: the decoder's trunk with a scalar head, trained with the Bradley-Terry loss
``-log sigmoid(r(chosen) - r(rejected))`` on preference pairs; evaluated by its pairwise accuracy
(the fraction of held-out pairs where ``r(chosen) > r(rejected)``).

The score of a sequence is the head on the final hidden state of its last response token.
Params: ``{'trunk': decoder params, 'head': ScalarHead params}``.

Config: as ``research.tasks.sft`` (``config.init_from``: the SFT run whose decoder initialises the
trunk; None: a fresh trunk), plus ``config.data.pairs_file`` (None: pairs generated from tiny
Shakespeare by ``config.preference``; else your own JSON-lines pairs). Bad pairs are dropped and
counted (printed, and in the checkpoint metadata under ``data_report``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from research.data import preferences as prefs
from research.models.transformer import count_params, flops_per_token
from research.rlhf import losses
from research.rlhf.common import lengths, load_texts, model_meta, model_setup
from research.rlhf.models import boxed_like, init_head, reward_scores
from research.tasks.base import Task


def preference_pairs(config, texts, tokenizer, max_len: int, name: str):
    """``(train arrays, eval arrays, report)`` of encoded pairs; bad pairs dropped and counted."""
    c = config.data
    p, r = c.prompt_len, c.response_len
    pref = prefs.Preference.from_config(config)
    if c.get("pairs_file"):
        pairs = prefs.load_pairs_jsonl(c.pairs_file)
        n_eval = max(1, min(c.num_eval, len(pairs) // 5))
        raw_train, raw_eval = pairs[n_eval:], pairs[:n_eval]
    else:
        raw_train = prefs.make_pairs(texts["train"], c.num_train, p, r, pref, config.seed)
        raw_eval = prefs.make_pairs(texts["validation"], c.num_eval, p, r, pref, config.seed + 1)
    train, report = prefs.validate_pairs(raw_train, tokenizer, max_len)
    evals, eval_report = prefs.validate_pairs(raw_eval, tokenizer, max_len)
    print(f"[{name}] preference pairs ({pref.describe()}): train {prefs.format_report(report)}; "
          f"eval {prefs.format_report(eval_report)}", flush=True)
    return (prefs.encode_pairs(tokenizer, train, max_len), prefs.encode_pairs(tokenizer, evals, max_len),
            {"train": report, "eval": eval_report})


def both(batch):
    """Chosen and rejected stacked into one batch of 2B sequences (one forward pass)."""
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    return tokens, mask


class RewardTask(Task):
    name = "reward"

    def __init__(self, config):
        self.config = config
        self.texts = load_texts(config) if not config.data.get("pairs_file") else None
        self.setup = model_setup(config, self.texts)
        self.tokenizer, self.model = self.setup.tokenizer, self.setup.model
        self.model_config = self.setup.model_config
        self.seq_len = self.model_config.max_len
        lengths(config, self.model_config)
        self.train_arrays, self.eval_arrays, self.data_report = preference_pairs(
            config, self.texts, self.tokenizer, self.seq_len, self.name)
        n = count_params(jax.eval_shape(self._fresh_init, jax.random.key(0)))
        self.tokens_per_example = 2 * self.seq_len
        self.flops_per_example = 2 * flops_per_token(self.model_config, self.seq_len, n) * self.seq_len

    def _fresh_init(self, rng):
        r1, r2 = jax.random.split(rng)
        trunk = self.model.init({"params": r1}, jnp.zeros((1, self.seq_len), jnp.int32))["params"]
        return {"trunk": trunk, "head": init_head(r2, self.model_config.embed_dim)}

    def init(self, rng):
        params = self._fresh_init(rng)
        pre = self.setup.pretrained
        if pre is not None:
            params["trunk"] = boxed_like(params["trunk"], pre.decoder_params())
        return params

    def loss(self, params, batch, rng, train: bool = True):
        tokens, mask = both(batch)
        scores = reward_scores(self.model, params, tokens, mask, deterministic=not train,
                               rngs={"dropout": rng} if train else None)
        rc, rr = jnp.split(scores, 2)
        loss = losses.bradley_terry_loss(rc, rr).mean()
        return loss, {"loss": loss, "accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
                      "margin": jnp.mean(rc - rr), "reward_chosen": rc.mean(),
                      "reward_rejected": rr.mean()}

    def train_data(self, seed: int, batch_size: int):
        return prefs.ArraySampler(self.train_arrays, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        return prefs.fixed_batches(self.eval_arrays, batch_size)

    def meta(self) -> dict:
        return model_meta(self.name, self.setup, data_report=self.data_report,
                          preference=vars(prefs.Preference.from_config(self.config)))
