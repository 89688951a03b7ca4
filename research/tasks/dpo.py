"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023).

The policy starts from the SFT run in ``config.init_from``; the frozen reference is the run in
``config.dpo.reference`` (None: the same ``init_from`` checkpoint). The reference's log-probs of
every pair are computed ONCE when the task is built (a jitted pass over the data) and travel in the
batches as ``ref_chosen`` / ``ref_rejected``, so the reference's parameters never enter the train
step, the optimizer or the checkpoints.

``config.dpo``: ``beta`` (the KL strength), ``loss`` ('sigmoid' = DPO, 'ipo'), ``length_normalize``
(mean instead of sum of response log-probs; the usual choice with IPO), ``label_smoothing``
(conservative DPO). Metrics: ``loss``, ``reward_accuracy`` (implicit reward of chosen > rejected),
``reward_margin``, ``reward_chosen`` / ``reward_rejected`` (``beta * (log pi - log ref)``) and
``logp_chosen`` / ``logp_rejected`` of the policy.

Pairs and bad-pair handling are the reward model's (``research.tasks.reward.preference_pairs``).
The true preference rate and the KL to the reference of sampled continuations come from
``python -m research.rlhf.evaluate --workdir W`` (see experiments/alignment/README.md).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.data import preferences as prefs
from research.models.transformer import Decoder, count_params, flops_per_token
from research.rlhf import losses
from research.rlhf.common import lengths, load_texts, model_meta, model_setup
from research.rlhf.models import boxed_like, load_pretrained, model_config_from
from research.tasks.base import Task
from research.tasks.reward import both, preference_pairs

POLICY_SOURCES = ("lm", "sft", "dpo", "ppo")


def pair_logps(model, params, tokens, mask, deterministic=True, rngs=None):
    """Per-token response log-probs ``[N, T]`` (entry t: token t given the tokens before it) and
    the response masks ``[N, T]``."""
    logits = model.apply({"params": params}, tokens[:, :-1], deterministic=deterministic, rngs=rngs)
    return losses.shifted_token_logps(logits, tokens), mask


class DPOTask(Task):
    name = "dpo"

    def __init__(self, config, tokenizer=None):
        """``tokenizer`` given (``research.sample``): the policy model only."""
        self.config = config
        d = config.dpo
        if not d.beta > 0:
            raise ConfigError(f"config.dpo.beta={d.beta!r} must be > 0.")
        if d.loss not in losses.DPO_KINDS:
            raise ConfigError(f"config.dpo.loss={d.loss!r}: expected one of {list(losses.DPO_KINDS)}")
        self.sampling_only = tokenizer is not None
        if not self.sampling_only and not config.get("init_from"):
            raise ConfigError("config.init_from is not set: DPO starts from an SFT run's workdir "
                              "(e.g. --config.init_from=workdirs/sft).")
        self.texts = None if self.sampling_only or config.data.get("pairs_file") else load_texts(config)
        self.setup = model_setup(config, self.texts, allowed=POLICY_SOURCES, tokenizer=tokenizer)
        self.tokenizer, self.model = self.setup.tokenizer, self.setup.model
        self.model_config = self.setup.model_config
        self.seq_len = self.model_config.max_len
        n = count_params(jax.eval_shape(self._fresh_init, jax.random.key(0)))
        self.tokens_per_example = 2 * self.seq_len
        self.flops_per_example = 2 * flops_per_token(self.model_config, self.seq_len, n) * self.seq_len
        if self.sampling_only:
            return
        lengths(config, self.model_config)
        train, evals, self.data_report = preference_pairs(
            config, self.texts, self.tokenizer, self.seq_len, self.name)
        ref_dir = d.get("reference") or config.init_from
        ref = load_pretrained(ref_dir, "dpo.reference")
        ref_cfg = model_config_from(config.model, ref, "dpo.reference")
        if ref.tokenizer() != self.tokenizer:
            raise ConfigError(f"config.dpo.reference={ref_dir!r} uses another tokenizer than the policy.")
        self.reference = {"workdir": ref.workdir, "step": ref.step}
        ref_model = Decoder(dataclasses.replace(ref_cfg, dropout=0.0))
        ref_params = ref.decoder_params()
        self.train_arrays = self._with_reference(train, ref_model, ref_params)
        self.eval_arrays = self._with_reference(evals, ref_model, ref_params)

    def _with_reference(self, arrays, ref_model, ref_params, chunk: int = 256):
        """Adds the reference's per-token log-probs of chosen and rejected (float32 [N, T])."""
        fn = jax.jit(lambda p, t, m: pair_logps(ref_model, p, t, m)[0])
        out = dict(arrays)
        for side in ("chosen", "rejected"):
            parts = []
            for i in range(0, len(arrays[side]), chunk):
                parts.append(np.asarray(fn(ref_params, arrays[side][i:i + chunk],
                                           arrays[side + "_mask"][i:i + chunk])))
            out[f"ref_{side}"] = np.concatenate(parts).astype(np.float32)
        return out

    def _fresh_init(self, rng):
        return self.model.init({"params": rng}, jnp.zeros((1, self.seq_len), jnp.int32))["params"]

    def init(self, rng):
        boxed = self._fresh_init(rng)
        pre = self.setup.pretrained
        return boxed if pre is None else boxed_like(boxed, pre.decoder_params())

    def loss(self, params, batch, rng, train: bool = True):
        d = self.config.dpo
        tokens, mask = both(batch)
        logp, mask = pair_logps(self.model, params, tokens, mask, deterministic=not train,
                                rngs={"dropout": rng} if train else None)
        norm = bool(d.get("length_normalize", False))
        pi_c, pi_r = jnp.split(losses.sequence_logps(logp, mask, norm), 2)
        ref_c = losses.sequence_logps(batch["ref_chosen"], batch["chosen_mask"], norm)
        ref_r = losses.sequence_logps(batch["ref_rejected"], batch["rejected_mask"], norm)
        per_pair, rc, rr = losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, d.beta, d.loss,
                                           d.get("label_smoothing", 0.0))
        loss = per_pair.mean()
        return loss, {"loss": loss, "reward_accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
                      "reward_margin": jnp.mean(rc - rr), "reward_chosen": rc.mean(),
                      "reward_rejected": rr.mean(), "logp_chosen": pi_c.mean(),
                      "logp_rejected": pi_r.mean()}

    def train_data(self, seed: int, batch_size: int):
        return prefs.ArraySampler(self.train_arrays, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        return prefs.fixed_batches(self.eval_arrays, batch_size)

    def meta(self) -> dict:
        extra = {}
        if not self.sampling_only:
            extra = {"data_report": self.data_report, "reference": self.reference,
                     "init_from": {"workdir": self.setup.pretrained.workdir,
                                   "step": self.setup.pretrained.step}}
        return model_meta(self.name, self.setup,
                          preference=vars(prefs.Preference.from_config(self.config)), **extra)
