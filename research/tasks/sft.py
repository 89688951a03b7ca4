"""Supervised fine-tuning: prompt/response pairs, next-token loss on the response tokens only.

Data (``research.data.preferences``): ``config.data.num_train`` prompts of ``prompt_len``
characters cut from tiny Shakespeare's train split, each with its true ``response_len``-character
continuation; ``num_eval`` more from the validation split. Batches are padded to the model's
context: ``{'tokens': [B, max_len], 'mask': [B, max_len]}`` with ``mask`` 1 on the response tokens.
The loss is the cross-entropy of the tokens where ``mask`` is 1, averaged over those tokens.

``config.init_from``: a workdir of a language-model run (task 'lm', or another sft run) whose
newest checkpoint initialises the model; its architecture and tokenizer are used (``config.model``
may only change dropout/dtype/remat; another value is an error naming it). None: a fresh model of
``config.model`` with tiny Shakespeare's character vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from research.data import preferences as prefs
from research.models.transformer import count_params, flops_per_token
from research.rlhf.common import lengths, load_texts, model_meta, model_setup
from research.rlhf.models import boxed_like
from research.tasks.base import Task


class SFTTask(Task):
    name = "sft"

    def __init__(self, config, tokenizer=None):
        """``tokenizer`` given (``research.sample``): the model only, no data, no init_from."""
        self.config = config
        self.texts = None if tokenizer is not None else load_texts(config)
        self.setup = model_setup(config, self.texts, tokenizer=tokenizer)
        self.tokenizer, self.model = self.setup.tokenizer, self.setup.model
        self.model_config = self.setup.model_config
        self.seq_len = self.model_config.max_len
        n = count_params(jax.eval_shape(self._fresh_init, jax.random.key(0)))
        self.tokens_per_example = self.seq_len
        self.flops_per_example = flops_per_token(self.model_config, self.seq_len, n) * self.seq_len
        self.preference = prefs.Preference.from_config(config)
        if self.texts is not None:
            self._build_data()

    # -- data -------------------------------------------------------------------------------------
    def _build_data(self):
        c = self.config.data
        p, r = lengths(self.config, self.model_config)
        train = prefs.sft_examples(self.texts["train"], c.num_train, p, r, self.config.seed)
        val = prefs.sft_examples(self.texts["validation"], c.num_eval, p, r, self.config.seed + 1)
        self.train_arrays = prefs.encode_sft(self.tokenizer, train, self.seq_len)
        self.eval_arrays = prefs.encode_sft(self.tokenizer, val, self.seq_len)

    def train_data(self, seed: int, batch_size: int):
        return prefs.ArraySampler(self.train_arrays, batch_size, seed)

    def eval_batches(self, batch_size: int) -> list:
        return prefs.fixed_batches(self.eval_arrays, batch_size)

    # -- model ------------------------------------------------------------------------------------
    def _fresh_init(self, rng):
        return self.model.init({"params": rng}, jnp.zeros((1, self.seq_len), jnp.int32))["params"]

    def init(self, rng):
        boxed = self._fresh_init(rng)
        pre = self.setup.pretrained
        return boxed if pre is None else boxed_like(boxed, pre.decoder_params())

    def loss(self, params, batch, rng, train: bool = True):
        tokens, mask = batch["tokens"], batch["mask"]
        logits = self.model.apply({"params": params}, tokens[:, :-1], deterministic=not train,
                                  rngs={"dropout": rng} if train else None)
        return response_loss(logits, tokens[:, 1:], mask[:, 1:])

    def meta(self) -> dict:
        extra = {}
        if self.setup.pretrained is not None:
            extra["init_from"] = {"workdir": self.setup.pretrained.workdir,
                                  "step": self.setup.pretrained.step}
        return model_meta(self.name, self.setup, preference=vars(self.preference), **extra)


def response_loss(logits, targets, mask):
    """Cross-entropy of ``targets`` under ``logits`` averaged over the positions where ``mask`` is
    1 (the response tokens): prompt and padding positions contribute nothing."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    n = jnp.maximum(mask.sum(), 1.0)
    loss = jnp.sum(ce * mask) / n
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * mask) / n
    return loss, {"loss": loss, "accuracy": acc}
