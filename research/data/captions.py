"""Captions for Fashion-MNIST generated from the label, and the word-level tokenizer that reads them.

A caption is a template filled with an object phrase: ``"a photo of {obj}."`` with ``obj`` =
article + optional attributes + class name, e.g. ``"a photo of a small dark sandal."``. The
attributes are colour-free and measured on the image itself (so a caption says something about
*this* image, not only its class):

- size: the fraction of non-zero pixels (``small`` < 0.35 <= ``medium-sized`` < 0.6 <= ``large``);
- tone: the mean intensity of the non-zero pixels (``dark`` < 125 <= ``mid-tone`` < 175 <=
  ``bright``), thresholds near the training set's tertiles.

Templates are split in two disjoint sets: ``TRAIN_TEMPLATES`` fill the training captions;
``HELD_OUT_TEMPLATES`` (different wording, several words never seen in training) are used only to
build the zero-shot classifier (prompt ensembling), so zero-shot accuracy measures transfer to new
phrasings, not recall of the training captions.

``CaptionTokenizer`` is word-level. Its vocabulary is built deterministically from the *training*
templates, the class names and the attribute words only (sorted), plus ``[PAD]`` (0), ``[EOS]``
(1) and ``[UNK]`` (2): words that occur only in the held-out templates read as ``[UNK]``, as an
unseen word would. ``encode`` lower-cases, splits words and punctuation, appends ``[EOS]`` and pads
to ``max_len``; the text tower pools at the ``[EOS]`` position.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

# Caption names of the ten Fashion-MNIST classes, in label order (the dataset's CLASS_NAMES are
# "T-shirt/top", "Trouser", ..., "Ankle boot").
CLASS_PHRASES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
    "ankle boot")

SIZE_WORDS = ("small", "medium-sized", "large")
TONE_WORDS = ("dark", "mid-tone", "bright")
SIZE_THRESHOLDS = (0.35, 0.6)      # fraction of non-zero pixels
TONE_THRESHOLDS = (125.0, 175.0)   # mean intensity of the non-zero pixels (0..255)

TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of {obj}.",
    "{obj}.",
    "a picture of {obj}.",
    "an image of {obj}.",
    "{obj} on a black background.",
    "a grayscale photo of {obj}.",
    "a product photo of {obj}.",
    "this is {obj}.",
    "a low resolution photo of {obj}.",
    "{obj}, centred in the frame.",
    "a catalogue image of {obj}.",
    "a tiny image of {obj}.",
    "a scan of {obj}.",
    "here we see {obj}.",
    "an item of clothing: {obj}.",
    "a shop picture showing {obj}.",
)
HELD_OUT_TEMPLATES: tuple[str, ...] = (
    "a blurry photo of {obj}.",
    "a close-up photo of {obj}.",
    "{obj} for sale.",
    "there is {obj} in the picture.",
    "a cropped image of {obj}.",
    "a rendering of {obj}.",
    "the picture shows {obj}.",
    "a pixelated photo of {obj}.",
)

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
SPECIALS = (PAD, EOS, UNK)
_WORD_RE = re.compile(r"[a-z0-9][a-z0-9\-/']*|[.,:;!?]")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def object_phrase(class_phrase: str, adjectives: Sequence[str] = ()) -> str:
    """``'a small dark sandal'``, ``'an ankle boot'``: article + adjectives + class phrase."""
    words = [*adjectives, class_phrase]
    return f"{article(words[0])} {' '.join(words)}"


def fill(template: str, class_phrase: str, adjectives: Sequence[str] = ()) -> str:
    return template.format(obj=object_phrase(class_phrase, adjectives))


def image_attributes(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W(, 1)] -> (size index [N], tone index [N]) into SIZE_WORDS/TONE_WORDS."""
    x = np.asarray(images).reshape(len(images), -1).astype(np.float32)
    fg = x > 0
    area = fg.mean(axis=1)
    tone = (x * fg).sum(axis=1) / np.maximum(fg.sum(axis=1), 1)
    return (np.digitize(area, SIZE_THRESHOLDS).astype(np.int32),
            np.digitize(tone, TONE_THRESHOLDS).astype(np.int32))


def random_captions(labels: np.ndarray, size_idx: np.ndarray, tone_idx: np.ndarray,
                    rng: np.random.Generator, templates: Sequence[str] = TRAIN_TEMPLATES,
                    class_phrases: Sequence[str] = CLASS_PHRASES) -> list[str]:
    """One caption per example: a random template, and with probability 1/2 each the size and the
    tone attribute of that image (in random order)."""
    n = len(labels)
    t = rng.integers(0, len(templates), n)
    use_size = rng.random(n) < 0.5
    use_tone = rng.random(n) < 0.5
    swap = rng.random(n) < 0.5
    out = []
    for i in range(n):
        adj = ([SIZE_WORDS[size_idx[i]]] if use_size[i] else []) + \
              ([TONE_WORDS[tone_idx[i]]] if use_tone[i] else [])
        if swap[i]:
            adj.reverse()
        out.append(fill(templates[t[i]], class_phrases[int(labels[i])], adj))
    return out


def check_class_names(names: Sequence[str]) -> tuple[str, ...]:
    """A zero-shot class list: non-empty strings, no duplicates (after stripping and
    lower-casing); ValueError naming the problem otherwise."""
    names = tuple(names)
    if not names:
        raise ValueError("The zero-shot class list is empty; give at least two class names.")
    bad = [i for i, n in enumerate(names) if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"Zero-shot class names at positions {bad} are empty (or not strings): "
                         f"{names!r}; every class needs a non-empty name.")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        key = n.strip().lower()
        if key in seen:
            raise ValueError(f"Zero-shot class name {n!r} (position {i}) duplicates position "
                             f"{seen[key]}; class names must be distinct.")
        seen[key] = i
    return names


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


class CaptionTokenizer:
    """Word-level tokenizer: ``[PAD]``=0, ``[EOS]``=1, ``[UNK]``=2, then the sorted vocabulary."""

    def __init__(self, vocab: Sequence[str], max_len: int = 16):
        vocab = tuple(vocab)
        if vocab[:3] != SPECIALS:
            raise ValueError(f"CaptionTokenizer vocabulary must start with {SPECIALS}; got "
                             f"{vocab[:3]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("CaptionTokenizer vocabulary has duplicate entries.")
        if max_len < 2:
            raise ValueError(f"CaptionTokenizer max_len={max_len}: needs room for a word and [EOS].")
        self.vocab = vocab
        self.max_len = int(max_len)
        self._ids = {w: i for i, w in enumerate(vocab)}

    pad_id, eos_id, unk_id = 0, 1, 2

    @classmethod
    def build(cls, templates: Sequence[str] = TRAIN_TEMPLATES,
              class_phrases: Sequence[str] = CLASS_PHRASES, max_len: int = 16) -> "CaptionTokenizer":
        """The vocabulary of the given templates, class phrases, articles and attribute words
        (sorted, so the same inputs always give the same ids)."""
        found: set[str] = {"a", "an", *SIZE_WORDS, *TONE_WORDS}
        for t in templates:
            found.update(words(t.replace("{obj}", " ")))
        for c in class_phrases:
            found.update(words(c))
        return cls(SPECIALS + tuple(sorted(found)), max_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 ids [max_len]: words (unknown -> [UNK]), [EOS], [PAD]...; a caption
        longer than ``max_len - 1`` words is an error (raise max_len)."""
        ids = [self._ids.get(w, self.unk_id) for w in words(text)]
        if len(ids) > self.max_len - 1:
            raise ValueError(f"Caption {text!r} has {len(ids)} words; the tokenizer's max_len="
                             f"{self.max_len} holds {self.max_len - 1} plus [EOS]. Raise max_len.")
        out = np.zeros((self.max_len,), np.int32)
        out[:len(ids)] = ids
        out[len(ids)] = self.eos_id
        return out

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if texts else \
            np.zeros((0, self.max_len), np.int32)

    def decode(self, ids: Any) -> str:
        """Ids -> the words up to [EOS], joined by spaces (``[UNK]`` kept)."""
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(self.vocab[i])
        return " ".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"type": "caption_words", "vocab": list(self.vocab), "max_len": self.max_len}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CaptionTokenizer":
        if not isinstance(data, dict) or data.get("type") != "caption_words":
            raise ValueError(f"Not a CaptionTokenizer JSON: {str(data)[:200]}")
        return cls(data["vocab"], data["max_len"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CaptionTokenizer) and (self.vocab, self.max_len) == (
            other.vocab, other.max_len)

    def __hash__(self) -> int:
        return hash((self.vocab, self.max_len))


def word_dropout(tokens: np.ndarray, rate: float, rng: np.random.Generator,
                 keep: np.ndarray | None = None) -> np.ndarray:
    """Replace each word token (not [PAD]/[EOS], nor ids in ``keep``) by [UNK] with probability
    ``rate``: the text tower learns to read past unknown words (the held-out templates' new words
    are [UNK])."""
    if rate <= 0:
        return tokens
    drop = (tokens > CaptionTokenizer.unk_id) & (rng.random(tokens.shape) < rate)
    if keep is not None:
        drop &= ~np.isin(tokens, keep)
    return np.where(drop, CaptionTokenizer.unk_id, tokens).astype(np.int32)
