"""Next-token language modelling on a character- (or token-) level corpus.

Config keys read here: ``config.model`` (``TransformerConfig`` fields except ``vocab_size``, which
comes from the tokenizer), ``config.data.name`` ('tiny_shakespeare'), ``config.data.manual_dir``,
``config.data.data_dir``, ``config.eval_batches``, ``config.eval_batch_size`` (None = batch_size).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.core.config import ConfigError
from research.data.tokenizers import CharTokenizer
from research.data.windows import WindowSampler
from research.models.transformer import Decoder, TransformerConfig, count_params, flops_per_token
from research.tasks.base import Task

DATASETS = ("tiny_shakespeare",)


class LMTask(Task):
    name = "lm"

    def __init__(self, config, tokenizer: CharTokenizer | None = None,
                 splits: dict[str, np.ndarray] | None = None):
        """Loads ``config.data`` unless a ``tokenizer`` is given (then the task can sample but
        not train, unless token ``splits`` {'train', 'validation'} are given too)."""
        self.config = config
        data = config.data
        if data.name not in DATASETS:
            raise ConfigError(f"config.data.name={data.name!r}: expected one of {list(DATASETS)}")
        self._splits: dict[str, np.ndarray] = dict(splits or {})
        if tokenizer is None:
            from research.data import tiny_shakespeare
            kwargs = dict(data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"))
            texts = {s: tiny_shakespeare.load_text(s, **kwargs) for s in ("train", "validation")}
            tokenizer = CharTokenizer.from_text(texts["train"] + texts["validation"])
            self._splits = {s: tokenizer.encode(t) for s, t in texts.items()}
        self.tokenizer = tokenizer
        self.model_config = TransformerConfig.from_dict(
            config.model.to_dict(), vocab_size=tokenizer.vocab_size)
        self.model = Decoder(self.model_config)
        self.seq_len = self.model_config.max_len
        self.tokens_per_example = self.seq_len
        n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self.n_params = n_params
        self.flops_per_example = flops_per_token(self.model_config, self.seq_len, n_params) * self.seq_len

    def init(self, rng):
        tokens = jnp.zeros((1, self.seq_len), jnp.int32)
        return self.model.init({"params": rng}, tokens)["params"]

    def loss(self, params, batch, rng, train: bool = True):
        logits = self.model.apply({"params": params}, batch["inputs"], deterministic=not train,
                                  rngs={"dropout": rng} if train else None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return loss, {"loss": loss}

    def train_data(self, seed: int, batch_size: int) -> WindowSampler:
        return WindowSampler(self._split("train"), batch_size, self.seq_len, seed)

    def eval_batches(self, batch_size: int) -> list:
        sampler = WindowSampler(self._split("validation"), batch_size, self.seq_len,
                                seed=self.config.seed + 1)
        return [sampler.batch_at(i) for i in range(self.config.eval_batches)]

    def summarize_eval(self, means):
        out = dict(means)
        if "loss" in means:
            out["perplexity"] = math.exp(min(means["loss"], 50.0))
        return out

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "tokenizer": self.tokenizer.to_json()}

    def _split(self, split: str) -> np.ndarray:
        if split not in self._splits:
            raise RuntimeError("This LMTask was built from a saved tokenizer without data; "
                               "it can sample but not train or evaluate.")
        return self._splits[split]
