"""Masked-LM pretraining (BERT) of ``research.models.encoder.Encoder`` on tiny Shakespeare.

Vocabulary: the character tokenizer of the text (ids ``0 .. C-1``) followed by the special tokens
``[PAD] [MASK] [CLS] [SEP]`` (ids ``C .. C+3``).

Examples (``MaskedLMSampler``), BERT's input format without next-sentence prediction: a random
stretch of ``n`` characters (``n = max_len - 3``; with probability ``short_seq_prob`` a uniform
``n`` in ``[2, max_len - 3]``, so that padding occurs as in BERT's short sequences), split at a
uniform point into two segments ``A`` and ``B``:

    [CLS] A [SEP] B [SEP] [PAD] ...      token types 0 for [CLS] A [SEP], 1 for B [SEP], 0 for pads

Masking (BERT, Devlin et al. 2019, section 3.1; Hugging Face ``DataCollatorForLanguageModeling``):
each non-special position is chosen with probability ``mask_rate`` (0.15); a chosen position's
input becomes ``[MASK]`` with probability ``mask_token_prob`` (0.8), a random character with
probability ``random_token_prob`` (0.1), and stays unchanged otherwise (0.1). [CLS], [SEP] and
[PAD] are never chosen. The loss is the cross-entropy at the chosen positions only (targets: the
original characters), averaged over them; ``masked_accuracy`` is the argmax accuracy there.

Everything about batch ``i`` (the stretches, splits and masks) is drawn from one Philox stream
keyed on ``(seed, i)``, so the data iterator's state is ``{'seed', 'step'}`` and a resumed run sees
the same masks.

Config keys read here: ``config.model`` (``TransformerConfig`` + ``EncoderConfig`` fields except
``vocab_size`` and ``pad_id``, which come from the vocabulary), ``config.data.name``
('tiny_shakespeare'), ``config.data.manual_dir``, ``config.data.data_dir``, ``config.masking``
(``mask_rate``, ``mask_token_prob``, ``random_token_prob``, ``short_seq_prob``),
``config.eval_batches``, ``config.seed``.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.core.config import ConfigError
from research.data.tokenizers import CharTokenizer
from research.models.encoder import Encoder, configs_from_dict, model_meta
from research.models.transformer import count_params, flops_per_token
from research.tasks.base import Task

SPECIALS = ("[PAD]", "[MASK]", "[CLS]", "[SEP]")
DATASETS = ("tiny_shakespeare",)
MASKING_DEFAULTS = dict(mask_rate=0.15, mask_token_prob=0.8, random_token_prob=0.1,
                        short_seq_prob=0.1)


class MLMVocab:
    """A character tokenizer plus the special tokens, appended after the characters."""

    def __init__(self, chars: CharTokenizer):
        self.chars = chars
        n = chars.vocab_size
        self.num_chars = n
        self.pad_id, self.mask_id, self.cls_id, self.sep_id = range(n, n + len(SPECIALS))
        self.vocab_size = n + len(SPECIALS)

    def encode(self, text: str) -> np.ndarray:
        """Characters only (no special tokens)."""
        return self.chars.encode(text)

    def decode(self, ids) -> str:
        """Ids -> text, special tokens written as their names."""
        ids = np.asarray(ids).reshape(-1)
        out, run = [], []
        for i in ids.tolist():
            if i < self.num_chars:
                run.append(i)
                continue
            if run:
                out.append(self.chars.decode(np.asarray(run)))
                run = []
            out.append(SPECIALS[i - self.num_chars] if i < self.vocab_size else f"[{i}?]")
        if run:
            out.append(self.chars.decode(np.asarray(run)))
        return "".join(out)

    def to_json(self) -> dict[str, Any]:
        return {**self.chars.to_json(), "specials": list(SPECIALS)}


def check_masking(m: dict) -> dict:
    """The masking settings with defaults filled in; ConfigError naming a bad one."""
    unknown = set(m) - set(MASKING_DEFAULTS)
    if unknown:
        raise ConfigError(f"Unknown config.masking keys {sorted(unknown)}; known: "
                          f"{sorted(MASKING_DEFAULTS)}")
    m = {**MASKING_DEFAULTS, **m}
    for key in MASKING_DEFAULTS:
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(f"config.masking.{key}={v!r} is invalid: expected a probability "
                              "in [0, 1].")
    if m["mask_rate"] <= 0.0:
        raise ConfigError(f"config.masking.mask_rate={m['mask_rate']!r} is invalid: expected > 0 "
                          "(BERT: 0.15), or there is nothing to predict.")
    if m["mask_token_prob"] + m["random_token_prob"] > 1.0 + 1e-9:
        raise ConfigError(f"config.masking.mask_token_prob + random_token_prob = "
                          f"{m['mask_token_prob'] + m['random_token_prob']} exceeds 1 "
                          "(BERT: 0.8 + 0.1; the rest stay unchanged).")
    return {k: float(v) for k, v in m.items()}


def mask_tokens(rng: np.random.Generator, tokens: np.ndarray, special: np.ndarray,
                vocab: MLMVocab, mask_rate=0.15, mask_token_prob=0.8,
                random_token_prob=0.1) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking rule. ``tokens`` [B, T] ids, ``special`` [B, T] True at [CLS]/[SEP]/[PAD].

    Returns ``(inputs, chosen)``: the corrupted inputs and the positions to predict (the
    targets are ``tokens``). Random replacements are characters, never special tokens."""
    shape = tokens.shape
    chosen = (rng.random(shape) < mask_rate) & ~special
    how = rng.random(shape)
    random_ids = rng.integers(0, vocab.num_chars, shape, dtype=np.int32)
    to_mask = chosen & (how < mask_token_prob)
    to_random = chosen & (how >= mask_token_prob) & (how < mask_token_prob + random_token_prob)
    inputs = np.where(to_mask, vocab.mask_id, np.where(to_random, random_ids, tokens))
    return inputs.astype(np.int32), chosen


class MaskedLMSampler:
    """Yields masked-LM batches ``{'inputs', 'token_types', 'padding', 'targets', 'weights'}``
    ([B, T]: int32, int32, bool, int32, float32) over a character id array; batch ``i`` depends
    only on ``(seed, i)``. State: ``{'seed', 'step'}`` (as ``research.data.windows.WindowSampler``)."""

    def __init__(self, tokens: np.ndarray, vocab: MLMVocab, batch_size: int, seq_len: int,
                 seed: int, masking: dict | None = None, step: int = 0):
        if seq_len < 5:
            raise ConfigError(f"config.model.max_len={seq_len} is too short for masked-LM "
                              "examples '[CLS] A [SEP] B [SEP]': expected >= 5.")
        if len(tokens) < seq_len:
            raise ValueError(f"The token array ({len(tokens)} tokens) is shorter than one example "
                             f"of max_len={seq_len}; use a shorter config.model.max_len.")
        self.tokens = np.asarray(tokens, np.int32)
        self.vocab, self.batch_size, self.seq_len = vocab, batch_size, seq_len
        self.seed, self.step = int(seed), int(step)
        self.masking = check_masking(dict(masking or {}))

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        B, T, v = self.batch_size, self.seq_len, self.vocab
        full = T - 3  # characters in an example of full length
        short = rng.random(B) < self.masking["short_seq_prob"]
        n = np.where(short, rng.integers(2, full + 1, B), full)             # characters per row
        start = rng.integers(0, len(self.tokens) - n + 1)                    # [B], < len - n + 1
        a = rng.integers(1, n)                                                # |A| in [1, n-1]
        j = np.arange(T)[None, :]
        n_, a_, start_ = n[:, None], a[:, None], start[:, None]
        # Position j holds: 0 [CLS]; 1..a A; a+1 [SEP]; a+2..n+1 B; n+2 [SEP]; > n+2 [PAD].
        text_index = start_ + np.where(j <= a_, j - 1, j - 2)
        chars = self.tokens[np.clip(text_index, 0, len(self.tokens) - 1)]
        in_a = (j >= 1) & (j <= a_)
        in_b = (j >= a_ + 2) & (j <= n_ + 1)
        tokens = np.where(in_a | in_b, chars, v.pad_id)
        tokens = np.where(j == 0, v.cls_id, tokens)
        tokens = np.where((j == a_ + 1) | (j == n_ + 2), v.sep_id, tokens).astype(np.int32)
        padding = j <= n_ + 2
        token_types = ((j >= a_ + 2) & padding).astype(np.int32)
        m = self.masking
        inputs, chosen = mask_tokens(rng, tokens, ~(in_a | in_b), v, m["mask_rate"],
                                     m["mask_token_prob"], m["random_token_prob"])
        return {"inputs": inputs, "token_types": token_types, "padding": padding,
                "targets": tokens, "weights": chosen.astype(np.float32)}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"seed": int(self.seed), "step": int(self.step)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Data iterator state has seed {state['seed']}, config has {self.seed}")
        self.step = int(state["step"])


def masked_lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Mean cross-entropy and argmax accuracy over the positions with weight 1."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    n = jnp.maximum(weights.sum(), 1.0)
    loss = (ce * weights).sum() / n
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, (correct * weights).sum() / n


class MLMTask(Task):
    name = "mlm"

    def __init__(self, config, vocab: MLMVocab | None = None,
                 splits: dict[str, np.ndarray] | None = None):
        """Loads ``config.data`` unless a ``vocab`` and character-id ``splits`` {'train',
        'validation'} are given (tests)."""
        self.config = config
        data = config.data
        if data.name not in DATASETS:
            raise ConfigError(f"config.data.name={data.name!r}: expected one of {list(DATASETS)}")
        self.masking = check_masking(dict(config.get("masking") or {}))
        if vocab is None:
            from research.data import tiny_shakespeare
            kwargs = dict(data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"))
            texts = {s: tiny_shakespeare.load_text(s, **kwargs) for s in ("train", "validation")}
            vocab = MLMVocab(CharTokenizer.from_text(texts["train"] + texts["validation"]))
            splits = {s: vocab.encode(t) for s, t in texts.items()}
        self.vocab = vocab
        self._splits = dict(splits or {})
        model = config.model.to_dict()
        for key in ("vocab_size", "pad_id"):
            if key in model:
                raise ConfigError(f"config.model.{key} is set by the task from its vocabulary; "
                                  "remove it from the config.")
        self.model_config, self.encoder_config = configs_from_dict(
            model, vocab_size=vocab.vocab_size, pad_id=vocab.pad_id)
        self.model = Encoder(self.model_config, self.encoder_config)
        self.seq_len = self.model_config.max_len
        self.tokens_per_example = self.seq_len
        self.n_params = count_params(jax.eval_shape(self.init, jax.random.key(0)))
        self.flops_per_example = flops_per_token(
            self.model_config, self.seq_len, self.n_params) * self.seq_len

    def init(self, rng):
        tokens = jnp.zeros((1, self.seq_len), jnp.int32)
        return self.model.init({"params": rng}, tokens)["params"]

    def logits(self, params, batch, rng=None, train: bool = False):
        return self.model.apply({"params": params}, batch["inputs"], batch["token_types"],
                                batch["padding"], deterministic=not train,
                                rngs={"dropout": rng} if train else None)

    def loss(self, params, batch, rng, train: bool = True):
        logits = self.logits(params, batch, rng, train)
        loss, acc = masked_lm_loss(logits, batch["targets"], batch["weights"])
        return loss, {"loss": loss, "masked_accuracy": acc}

    def sampler(self, split: str, seed: int, batch_size: int) -> MaskedLMSampler:
        if split not in self._splits:
            raise RuntimeError(f"This MLMTask has no {split!r} data.")
        return MaskedLMSampler(self._splits[split], self.vocab, batch_size, self.seq_len, seed,
                               self.masking)

    def train_data(self, seed: int, batch_size: int) -> MaskedLMSampler:
        return self.sampler("train", seed, batch_size)

    def eval_batches(self, batch_size: int) -> list:
        sampler = self.sampler("validation", self.config.seed + 1, batch_size)
        return [sampler.batch_at(i) for i in range(self.config.eval_batches)]

    def summarize_eval(self, means):
        out = dict(means)
        if "loss" in means:
            out["perplexity"] = math.exp(min(means["loss"], 50.0))
        return out

    def meta(self) -> dict:
        return {"task": self.name, "model": model_meta(self.model_config, self.encoder_config),
                "tokenizer": self.vocab.to_json(), "masking": self.masking}
