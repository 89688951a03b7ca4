"""Next-token language modelling on a character- (or token-) level corpus.

Config keys read here: ``config.model`` (``TransformerConfig`` fields except ``vocab_size``, which
comes from the tokenizer), ``config.data.name`` ('tiny_shakespeare'), ``config.data.manual_dir``,
``config.data.data_dir``, ``config.data.tokenizer`` ('char', the default when the key is absent, or
'bpe': a byte-level BPE trained on the train split), ``config.data.vocab_size`` (for 'bpe', e.g.
512), ``config.eval_batches``, ``config.eval_batch_size`` (None = batch_size),
``config.data.train_range`` (optional (start, end) fractions of the train text to train on; see
``slice_text``).

Every eval reports ``val/bits_per_char`` besides ``val/loss`` (nats per token) and
``val/perplexity``: ``loss * tokens_per_char / ln 2``, where ``tokens_per_char`` is measured once on
the validation text (``len(encode(val_text)) / len(val_text)``; exactly 1 for the char tokenizer),
so that models on different vocabularies compare.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.core.config import ConfigError
from research.data.tokenizers import BpeTokenizer, CharTokenizer
from research.data.windows import WindowSampler
from research.models.transformer import Decoder, TransformerConfig, count_params, flops_per_token
from research.nn.moe import apply_with_moe_losses
from research.tasks.base import Task

DATASETS = ("tiny_shakespeare",)
TOKENIZERS = ("char", "bpe")


class LMTask(Task):
    name = "lm"

    def __init__(self, config, tokenizer: CharTokenizer | BpeTokenizer | None = None,
                 splits: dict[str, np.ndarray] | None = None,
                 tokens_per_char: float | None = None):
        """Loads ``config.data`` unless a ``tokenizer`` is given (then the task can sample but
        not train, unless token ``splits`` {'train', 'validation'} are given too).

        ``tokens_per_char`` of the validation text (for ``val/bits_per_char``) is measured when the
        data is loaded here; with a given tokenizer it is 1 for a ``CharTokenizer`` and otherwise
        this argument (None: no ``bits_per_char`` metric)."""
        self.config = config
        data = config.data
        if data.name not in DATASETS:
            raise ConfigError(f"config.data.name={data.name!r}: expected one of {list(DATASETS)}")
        kind = data.get("tokenizer", "char")
        if kind not in TOKENIZERS:
            raise ConfigError(f"config.data.tokenizer={kind!r}: expected one of {list(TOKENIZERS)}")
        self._splits: dict[str, np.ndarray] = dict(splits or {})
        if tokenizer is None:
            from research.data import tiny_shakespeare
            kwargs = dict(data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"))
            texts = {s: tiny_shakespeare.load_text(s, **kwargs) for s in ("train", "validation")}
            full_text = texts["train"] + texts["validation"]
            texts["train"] = slice_text(texts["train"], data.get("train_range"))
            if kind == "char":
                tokenizer = CharTokenizer.from_text(full_text)
            else:
                vocab_size = data.get("vocab_size")
                if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 256:
                    raise ConfigError(f"config.data.vocab_size={vocab_size!r}: config.data.tokenizer"
                                      "='bpe' needs an int >= 256 (the byte alphabet), e.g. 512")
                tokenizer = BpeTokenizer.train(texts["train"], vocab_size)  # train split only
            self._splits = {s: tokenizer.encode(t) for s, t in texts.items()}
            tokens_per_char = measure_tokens_per_char(tokenizer, texts["validation"],
                                                      self._splits["validation"])
        elif tokens_per_char is None and isinstance(tokenizer, CharTokenizer):
            tokens_per_char = 1.0
        self.tokenizer = tokenizer
        self.tokens_per_char = tokens_per_char
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
        kwargs = dict(deterministic=not train, rngs={"dropout": rng} if train else None)
        if self.model_config.moe_experts:  # + the MoE load-balancing and router z-losses
            logits, aux, moe_metrics = apply_with_moe_losses(
                self.model, {"params": params}, batch["inputs"], **kwargs)
        else:
            logits = self.model.apply({"params": params}, batch["inputs"], **kwargs)
            aux, moe_metrics = 0.0, {}
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return loss + aux, {"loss": loss, **moe_metrics}

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
            if self.tokens_per_char is not None:
                out["bits_per_char"] = bits_per_char(means["loss"], self.tokens_per_char)
        return out

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "tokenizer": self.tokenizer.to_json()}

    def _split(self, split: str) -> np.ndarray:
        if split not in self._splits:
            raise RuntimeError("This LMTask was built from a saved tokenizer without data; "
                               "it can sample but not train or evaluate.")
        return self._splits[split]


def slice_text(text: str, train_range) -> str:
    """``config.data.train_range = (start, end)``: the train text's characters
    ``[int(start * n), int(end * n))`` (fractions of its length n; None = all of it), e.g.
    ``(0.0, 0.8)`` to pretrain on the first plays and hold the later ones out for fine-tuning."""
    if train_range is None:
        return text
    try:
        start, end = (float(v) for v in train_range)
        ok = 0.0 <= start < end <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"config.data.train_range={train_range!r}: expected None or (start, end) "
                          "fractions with 0 <= start < end <= 1, e.g. (0.0, 0.8)")
    n = len(text)
    return text[int(start * n):int(end * n)]


def bits_per_char(loss_nats_per_token: float, tokens_per_char: float) -> float:
    """Mean loss in nats per token -> bits per character: ``loss * tokens_per_char / ln 2``."""
    return loss_nats_per_token * tokens_per_char / math.log(2)


def measure_tokens_per_char(tokenizer, text: str, ids: np.ndarray | None = None) -> float:
    """``len(tokenizer.encode(text)) / len(text)`` (``ids``: that encoding, if already made)."""
    if not text:
        raise ValueError("Cannot measure tokens per character on an empty text.")
    n = len(tokenizer.encode(text) if ids is None else ids)
    return n / len(text)
