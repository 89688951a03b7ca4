"""Instruction and preference data the project generates from tiny Shakespeare, with a ground truth.

No download and no human labels: prompts are ``prompt_len``-character windows cut from tiny
Shakespeare; a *preference rule* (``Preference``) decides which continuations are better, and the
same rule scores any text, so every experiment can report the TRUE preference rate of the text a
model samples, not only a learned reward.

- SFT examples: a prompt and its true continuation (``response_len`` characters).
- Preference pairs: a prompt, a ``chosen`` continuation that satisfies the rule and a ``rejected``
  one that does not, both drawn from Shakespeare segments that start at a word boundary.

The rules (``config.preference.kind`` / ``config.preference.arg``):
- ``avoid_chars``: the response contains none of the characters of ``arg`` (case-insensitive);
  the default ``arg='e'`` is a lipogram: 16 characters of Shakespeare avoid 'e' about 19% of the
  time, so the SFT model's rate is low and an aligned model's rate can rise far above it.
- ``avoid_words``: none of the comma-separated words in ``arg`` occurs as a whole word.
- ``contains``: the substring ``arg`` occurs (case-insensitive).

Bad pairs (chosen == rejected, an empty response, prompt + response longer than the model's
context, characters outside the vocabulary) are dropped and counted by ``validate_pairs``; the
tasks print the counts and store them in the checkpoint metadata, and refuse a data set with no
usable pair, naming the reasons. ``load_pairs_jsonl`` reads your own pairs
(``{"prompt": ..., "chosen": ..., "rejected": ...}`` per line) through the same checks.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from typing import Iterable

import numpy as np

from research.core.config import ConfigError

KINDS = ("avoid_chars", "avoid_words", "contains")


@dataclasses.dataclass(frozen=True)
class Preference:
    """A programmatic preference: ``score(text)`` is 1.0 if ``text`` satisfies it, else 0.0."""

    kind: str = "avoid_chars"
    arg: str = "e"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"config.preference.kind={self.kind!r}: expected one of {list(KINDS)}")
        if not self.arg:
            raise ConfigError("config.preference.arg is empty: give the characters to avoid, the "
                              "words to avoid (comma-separated) or the substring to contain.")

    def score(self, text: str) -> float:
        low = text.lower()
        if self.kind == "avoid_chars":
            return float(not any(c in low for c in self.arg.lower()))
        if self.kind == "avoid_words":
            words = {w.strip().lower() for w in self.arg.split(",") if w.strip()}
            return float(not words & set(re.findall(r"[a-z']+", low)))
        return float(self.arg.lower() in low)

    def rate(self, texts: Iterable[str]) -> float:
        """The true preference rate: the fraction of ``texts`` that satisfy the rule."""
        scores = [self.score(t) for t in texts]
        return float(np.mean(scores)) if scores else float("nan")

    def describe(self) -> str:
        return {"avoid_chars": f"avoids the characters {self.arg!r}",
                "avoid_words": f"avoids the words {self.arg!r}",
                "contains": f"contains {self.arg!r}"}[self.kind]

    @classmethod
    def from_config(cls, config) -> "Preference":
        p = config.get("preference") or {}
        return cls(kind=p.get("kind", "avoid_chars"), arg=p.get("arg", "e"))


# -- generation -----------------------------------------------------------------------------------
def prompt_starts(text: str, n: int, prompt_len: int, response_len: int, seed: int) -> np.ndarray:
    """``n`` random prompt start offsets (seeded) such that prompt + continuation fit in ``text``."""
    hi = len(text) - prompt_len - response_len
    if hi <= 0:
        raise ValueError(f"The text ({len(text)} chars) is shorter than prompt_len + response_len.")
    return np.random.default_rng(seed).integers(0, hi, size=n)


def sft_examples(text: str, n: int, prompt_len: int, response_len: int,
                 seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, true continuation) pairs cut from ``text``."""
    starts = prompt_starts(text, n, prompt_len, response_len, seed)
    return [(text[s:s + prompt_len], text[s + prompt_len:s + prompt_len + response_len])
            for s in starts]


def make_pairs(text: str, n: int, prompt_len: int, response_len: int, preference: Preference,
               seed: int, pool: int = 20000) -> list[tuple[str, str, str]]:
    """``n`` (prompt, chosen, rejected) triples: the chosen continuation satisfies ``preference``,
    the rejected one does not; both are ``response_len``-character segments of ``text`` starting
    after a space or newline (drawn from a pool of ``pool`` segments)."""
    rng = np.random.default_rng(seed + 7919)
    bounds = np.flatnonzero(np.isin(np.frombuffer(text[:-response_len].encode("utf-32-le"), "<u4"),
                                    [ord(" "), ord("\n")])) + 1
    cand = rng.choice(bounds, size=min(pool, len(bounds)), replace=False)
    segs = [text[s:s + response_len] for s in cand]
    good = [s for s in segs if preference.score(s) == 1.0]
    bad = [s for s in segs if preference.score(s) == 0.0]
    if not good or not bad:
        raise ConfigError(
            f"The preference rule ({preference.describe()}) is met by {len(good)} and missed by "
            f"{len(bad)} of {len(segs)} text segments of {response_len} chars: no pairs can be made."
            " Pick a rule that some but not all segments satisfy (config.preference).")
    prompts = [p for p, _ in sft_examples(text, n, prompt_len, response_len, seed)]
    gi = rng.integers(0, len(good), n)
    bi = rng.integers(0, len(bad), n)
    return [(p, good[g], bad[b]) for p, g, b in zip(prompts, gi, bi)]


def load_pairs_jsonl(path: str) -> list[tuple[str, str, str]]:
    """Your own preference pairs: one ``{"prompt", "chosen", "rejected"}`` JSON object per line."""
    out = []
    try:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                d = json.loads(line)
                missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(d.get(k), str)]
                if missing:
                    raise ConfigError(f"{path}:{i}: missing string field(s) {missing}; each line "
                                      'must be {"prompt": ..., "chosen": ..., "rejected": ...}.')
                out.append((d["prompt"], d["chosen"], d["rejected"]))
    except FileNotFoundError:
        raise ConfigError(f"config.data.pairs_file={path!r}: no such file.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config.data.pairs_file={path!r}: not JSON lines ({e}).") from None
    return out


# -- validation and encoding ----------------------------------------------------------------------
def _known(tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text)
        return True
    except ValueError:
        return False


def validate_pairs(pairs, tokenizer, max_len: int):
    """Drop bad pairs -> ``(kept pairs, report)``. ``report`` counts ``total``, ``kept`` and each
    reason: ``identical`` (chosen == rejected), ``empty_response``, ``empty_prompt``,
    ``too_long`` (prompt + longer response > ``max_len`` tokens), ``unknown_chars``.
    Raises ConfigError naming the reasons if no pair is left."""
    reasons: Counter = Counter()
    kept = []
    for prompt, chosen, rejected in pairs:
        if not prompt:
            reasons["empty_prompt"] += 1
        elif not chosen or not rejected:
            reasons["empty_response"] += 1
        elif chosen == rejected:
            reasons["identical"] += 1
        elif not all(_known(tokenizer, t) for t in (prompt, chosen, rejected)):
            reasons["unknown_chars"] += 1
        elif len(tokenizer.encode(prompt)) + max(len(tokenizer.encode(chosen)),
                                                 len(tokenizer.encode(rejected))) > max_len:
            reasons["too_long"] += 1
        else:
            kept.append((prompt, chosen, rejected))
    report = {"total": len(pairs), "kept": len(kept), **dict(reasons)}
    if not kept:
        raise ConfigError(f"No usable preference pair among {len(pairs)}: {dict(reasons)} "
                          f"(too_long: prompt + response over the context of {max_len} tokens). "
                          "Fix the data or raise config.model.max_len.")
    return kept, report


def format_report(report: dict) -> str:
    dropped = {k: v for k, v in report.items() if k not in ("total", "kept")}
    return (f"kept {report['kept']} of {report['total']} pairs"
            + (f" (dropped: {', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})"
               if dropped else ""))


def encode_example(tokenizer, prompt: str, response: str, max_len: int):
    """-> ``tokens [max_len]`` int32 (prompt, response, then 0-padding) and ``mask [max_len]``
    float32, 1 at the positions of the response tokens (the targets the loss counts)."""
    p, r = tokenizer.encode(prompt), tokenizer.encode(response)
    n = len(p) + len(r)
    if n > max_len:
        raise ValueError(f"prompt + response = {n} tokens exceed the context of {max_len}.")
    tokens = np.zeros(max_len, np.int32)
    mask = np.zeros(max_len, np.float32)
    tokens[:len(p)] = p
    tokens[len(p):n] = r
    mask[len(p):n] = 1.0
    return tokens, mask


def encode_sft(tokenizer, examples, max_len: int) -> dict[str, np.ndarray]:
    toks, masks = zip(*(encode_example(tokenizer, p, r, max_len) for p, r in examples))
    return {"tokens": np.stack(toks), "mask": np.stack(masks)}


def encode_pairs(tokenizer, pairs, max_len: int) -> dict[str, np.ndarray]:
    c = [encode_example(tokenizer, p, ch, max_len) for p, ch, _ in pairs]
    r = [encode_example(tokenizer, p, rj, max_len) for p, _, rj in pairs]
    return {"chosen": np.stack([t for t, _ in c]), "chosen_mask": np.stack([m for _, m in c]),
            "rejected": np.stack([t for t, _ in r]), "rejected_mask": np.stack([m for _, m in r])}


# -- batching -------------------------------------------------------------------------------------
class ArraySampler:
    """Batches of rows drawn from a dict of equal-length arrays. The rows of step ``i`` depend only
    on ``(seed, i)`` (a Philox stream), so ``{'seed', 'step'}`` restores the exact data order."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, step: int = 0):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        if self.n < batch_size:
            raise ConfigError(f"{self.n} examples are fewer than one batch of {batch_size}; "
                              "lower config.batch_size or make more data (config.data.num_train).")
        self.batch_size, self.seed, self.step = batch_size, seed, step

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        idx = rng.choice(self.n, self.batch_size, replace=False)
        return {k: v[idx] for k, v in self.arrays.items()}

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"seed": int(self.seed), "step": int(self.step)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Data iterator state has seed {state['seed']}, config has {self.seed}")
        self.step = int(state["step"])


def fixed_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Consecutive full batches of ``arrays`` (evaluation)."""
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch_size] for k, v in arrays.items()}
            for i in range(0, n - batch_size + 1, batch_size)]
