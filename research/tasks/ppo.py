"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022): the SFT policy with a value head samples
continuations of prompts, a reward model scores them, a per-token KL penalty to the frozen
reference is subtracted, GAE turns the rewards into advantages, and several epochs of minibatch
updates follow the clipped surrogate + value loss.

Why a loop of its own: PPO does not fit "one batch -> one gradient step". This task names
``research.rlhf.ppo_loop.run`` as its ``train_loop`` (the launcher uses it instead of
``research.core.train.run``); that loop reuses the core pieces (sharded state from
``train.build_state``, the optimizer from config, the jitted update step of
``train.make_train_step`` with this task's ``loss``, Orbax checkpoints with auto-resume, the
metrics writer). ``total_steps`` counts PPO iterations (one rollout batch each); the checkpoint's
step is the iteration, and a resumed run redraws exactly the same prompts and samples.

Params: ``{'policy': decoder params, 'value_head': ScalarHead params}`` (the value head shares the
policy's trunk). Config ``config.ppo``: ``reward_model`` (a reward run's workdir), ``reference``
(None = ``config.init_from``), ``rollout_batch``, ``epochs``, ``clip``, ``value_clip``,
``vf_coef``, ``kl_coef``, ``kl_kind``, ``gamma``, ``lam``, ``temperature``, ``whiten_advantages``,
``score`` ('reward_model' or 'ground_truth': the programmatic rule as the reward, an oracle
ablation). ``config.batch_size`` is the minibatch size.
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
from research.rlhf.models import (boxed_like, check_task, init_head, load_pretrained,
                                  model_config_from, reward_scores)
from research.rlhf.rollout import policy_stats, sample_responses
from research.tasks.base import Task
from research.tasks.dpo import POLICY_SOURCES

SCORES = ("reward_model", "ground_truth")


class PPOTask(Task):
    name = "ppo"

    def __init__(self, config):
        from research.rlhf import ppo_loop

        self.config = config
        p = config.ppo
        if p.score not in SCORES:
            raise ConfigError(f"config.ppo.score={p.score!r}: expected one of {list(SCORES)}")
        if p.kl_kind not in losses.KL_KINDS:
            raise ConfigError(f"config.ppo.kl_kind={p.kl_kind!r}: expected one of {list(losses.KL_KINDS)}")
        if p.rollout_batch % config.batch_size:
            raise ConfigError(f"config.ppo.rollout_batch={p.rollout_batch} must be a multiple of "
                              f"config.batch_size={config.batch_size} (the minibatch size).")
        if not config.get("init_from"):
            raise ConfigError("config.init_from is not set: PPO starts from an SFT run's workdir "
                              "(e.g. --config.init_from=workdirs/sft).")
        self.train_loop = ppo_loop.run
        self.texts = load_texts(config)
        self.setup = model_setup(config, self.texts, allowed=POLICY_SOURCES)
        self.tokenizer, self.model = self.setup.tokenizer, self.setup.model
        self.model_config = self.setup.model_config
        self.prompt_len, self.response_len = lengths(config, self.model_config)
        self.seq_len = self.prompt_len + self.response_len
        self.preference = prefs.Preference.from_config(config)

        ref = load_pretrained(p.get("reference") or config.init_from, "ppo.reference")
        model_config_from(config.model, ref, "ppo.reference")  # same architecture as the policy
        self._check_tokenizer(ref, "ppo.reference")
        self.ref_params = ref.decoder_params()
        self.sources = {"init_from": [self.setup.pretrained.workdir, self.setup.pretrained.step],
                        "reference": [ref.workdir, ref.step]}
        self.rm_model = self.rm_params = None
        if p.score == "reward_model":
            rm = load_pretrained(p.get("reward_model"), "ppo.reward_model")
            check_task(rm, "ppo.reward_model", ("reward",))
            self._check_tokenizer(rm, "ppo.reward_model")
            self.rm_model = Decoder(dataclasses.replace(
                model_config_from({}, rm, "ppo.reward_model"), dropout=0.0))
            self.rm_params = rm.params
            self.sources["reward_model"] = [rm.workdir, rm.step]

        self.train_prompts = self._prompts("train", config.data.num_train, config.seed)
        self.eval_prompts = self._prompts("validation", config.data.num_eval, config.seed + 1)
        n = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self.tokens_per_example = self.seq_len
        self.flops_per_example = flops_per_token(self.model_config, self.seq_len, n) * self.seq_len
        self.experience = jax.jit(self._experience)

    def _check_tokenizer(self, pre, key):
        if pre.tokenizer() != self.tokenizer:
            raise ConfigError(f"config.{key}={pre.workdir!r} uses another tokenizer than the policy.")

    def _prompts(self, split, n, seed) -> np.ndarray:
        ex = prefs.sft_examples(self.texts[split], n, self.prompt_len, self.response_len, seed)
        return np.stack([self.tokenizer.encode(p) for p, _ in ex]).astype(np.int32)

    def prompts_at(self, iteration: int) -> np.ndarray:
        """The rollout prompts of PPO iteration ``iteration`` (a function of seed and iteration)."""
        rng = np.random.Generator(np.random.Philox(key=[self.config.seed, iteration]))
        return self.train_prompts[rng.choice(len(self.train_prompts), self.config.ppo.rollout_batch,
                                             replace=False)]

    # -- model ------------------------------------------------------------------------------------
    def init(self, rng):
        r1, r2 = jax.random.split(rng)
        boxed = self.model.init({"params": r1}, jnp.zeros((1, self.model_config.max_len), jnp.int32))
        policy = boxed_like(boxed["params"], self.setup.pretrained.decoder_params())
        return {"policy": policy, "value_head": init_head(r2, self.model_config.embed_dim)}

    def rollout(self, params, prompts, rng):
        """Sample continuations of ``prompts`` with the current policy -> ``(tokens, mask)``."""
        return sample_responses(self.model, params["policy"], prompts, rng, self.response_len,
                                self.config.ppo.temperature)

    def _experience(self, params, ref_params, rm_params, tokens, mask, true_scores):
        """Everything PPO needs from one rollout batch (no gradients): old log-probs and values,
        the reference's log-probs, scores, per-token rewards, advantages and returns."""
        p = self.config.ppo
        own = policy_stats(self.model, params["policy"], tokens, params["value_head"], p.temperature)
        ref = policy_stats(self.model, ref_params, tokens, None, p.temperature)["logp"]
        if self.rm_model is not None:
            score = reward_scores(self.rm_model, rm_params, tokens, mask)
        else:
            score = true_scores
        rewards, kl = losses.rlhf_rewards(score, own["logp"], ref, mask, p.kl_coef, p.kl_kind)
        values = own["values"] * mask
        adv, returns = losses.gae(rewards, values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            adv = losses.whiten(adv, mask) * mask
        batch = {"tokens": tokens, "mask": mask, "old_logp": own["logp"], "old_values": values,
                 "advantages": adv, "returns": returns}
        seq_kl = losses.masked_sum(losses.kl_penalty(own["logp"], ref, "k1"), mask, axis=1)
        stats = {"reward": score.mean(), "kl": seq_kl.mean(), "kl_penalty": kl.sum(1).mean(),
                 "non_score_reward": (-p.kl_coef * kl).sum(1).mean(),
                 "entropy": losses.masked_mean(own["entropy"], mask),
                 "returns": losses.masked_mean(returns, mask)}
        return batch, stats

    def loss(self, params, batch, rng, train: bool = True):
        """PPO's loss on a minibatch of experience: clipped surrogate + vf_coef * value loss.
        The policy runs without dropout (ratios of 1 at the first epoch, as PPO assumes)."""
        p = self.config.ppo
        own = policy_stats(self.model, params["policy"], batch["tokens"], params["value_head"],
                           p.temperature)
        mask = batch["mask"]
        pg, clipfrac, approx_kl = losses.ppo_policy_loss(own["logp"], batch["old_logp"],
                                                         batch["advantages"], mask, p.clip)
        vf, vf_clipfrac = losses.value_loss(own["values"], batch["old_values"], batch["returns"],
                                            mask, p.get("value_clip"))
        loss = pg + p.vf_coef * vf
        value_error = losses.masked_mean(jnp.square(own["values"] - batch["returns"]), mask)
        return loss, {"loss": loss, "policy_loss": pg, "value_loss": vf, "clip_fraction": clipfrac,
                      "value_clip_fraction": vf_clipfrac, "approx_kl": approx_kl,
                      "value_error": value_error,
                      "entropy": losses.masked_mean(own["entropy"], mask)}

    def train_data(self, seed: int, batch_size: int):
        raise NotImplementedError("PPO's data are rollouts of the current policy: see ppo_loop.run.")

    def meta(self) -> dict:
        return model_meta(self.name, self.setup, sources=self.sources,
                          preference=vars(self.preference))
