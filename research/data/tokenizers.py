"""Tokenizers that turn text into int32 id arrays and back; their vocabularies save as JSON.

``CharTokenizer`` is nanoGPT's character tokenizer: ``chars = sorted(set(text))`` and a character's
id is its index in ``chars``. Encoding and decoding are vectorised with numpy over Unicode code
points (tens of milliseconds for the 1.1M characters of tiny Shakespeare).

``BpeTokenizer`` is a byte-level BPE (GPT-2 style) backed by the Hugging Face ``tokenizers``
library, trained on a text with ``BpeTokenizer.train(text, vocab_size)``: the 256 byte symbols plus
``vocab_size - 256`` merges. Training is deterministic (same text and size, same vocabulary) and any
string round-trips, ``decode(encode(t)) == t``.

``tokenizer_from_json(d)`` restores either kind from its ``to_json()`` dict (``d["type"]`` is
'char' or 'bpe'), e.g. the tokenizer saved in a checkpoint's metadata.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

_MAX_SHOWN = 20  # unknown characters named in an error message


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index; ``vocab_size = len(chars)``."""

    def __init__(self, chars: Iterable[str]):
        chars = tuple(chars)
        bad = [c for c in chars if not (isinstance(c, str) and len(c) == 1)]
        if bad:
            raise ValueError(f"CharTokenizer vocabulary entries must be single characters; got "
                             f"{bad[:_MAX_SHOWN]!r}")
        if len(set(chars)) != len(chars):
            dups = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"CharTokenizer vocabulary has duplicate characters: {dups!r}")
        if not chars:
            raise ValueError("CharTokenizer vocabulary is empty.")
        self.chars: tuple[str, ...] = chars
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # by id
        self._order = np.argsort(self._codepoints).astype(np.int32)  # ids by code point
        self._sorted = self._codepoints[self._order]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text``: its distinct characters, sorted (as nanoGPT does)."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 ids of shape ``[len(text)]``; ValueError naming unknown characters."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode takes a str, got {type(text).__name__}")
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        pos = np.minimum(np.searchsorted(self._sorted, cps), len(self._sorted) - 1)
        known = self._sorted[pos] == cps
        if not known.all():
            first = int(np.argmin(known))
            unknown = sorted({chr(c) for c in cps[~known]})
            shown = ", ".join(repr(c) for c in unknown[:_MAX_SHOWN])
            more = f" and {len(unknown) - _MAX_SHOWN} more" if len(unknown) > _MAX_SHOWN else ""
            raise ValueError(
                f"Cannot encode {len(unknown)} character(s) not in the vocabulary of "
                f"{self.vocab_size}: {shown}{more} (first at index {first} of the text).")
        return self._order[pos]

    def decode(self, ids: Any) -> str:
        """A 1-D sequence of ids (list, numpy or jax array) -> text; ValueError for bad ids."""
        ids = np.asarray(ids)
        if ids.ndim > 1:
            raise ValueError(f"CharTokenizer.decode takes a 1-D sequence of ids; got shape "
                             f"{ids.shape}. Decode rows one at a time.")
        ids = ids.reshape(-1)
        if ids.size == 0:
            return ""
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"CharTokenizer.decode takes integer ids; got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"Ids out of range [0, {self.vocab_size}): "
                             f"{sorted(set(ids[bad].tolist()))[:_MAX_SHOWN]}")
        return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``from_json`` turns back into an equal tokenizer."""
        return {"type": "char", "chars": list(self.chars)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CharTokenizer:
        """Inverse of ``to_json`` (e.g. the tokenizer saved with a checkpoint's metadata)."""
        if not isinstance(data, dict) or data.get("type") != "char" or "chars" not in data:
            raise ValueError(f"Not a CharTokenizer JSON (want {{'type': 'char', 'chars': [...]}}):"
                             f" {str(data)[:200]}")
        return cls(data["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, chars={''.join(self.chars)!r})"


class BpeTokenizer:
    """Byte-level BPE over a ``tokenizers.Tokenizer``; the same interface as ``CharTokenizer``."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BpeTokenizer:
        """Trains a byte-level BPE of ``vocab_size`` tokens (>= 256, the byte alphabet) on ``text``."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"BpeTokenizer vocab_size must be an int >= 256 (the byte alphabet); "
                             f"got {vocab_size!r}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator([text], trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 ids of shape ``[num_tokens]``."""
        if not isinstance(text, str):
            raise TypeError(f"BpeTokenizer.encode takes a str, got {type(text).__name__}")
        if not text:
            return np.zeros((0,), np.int32)
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Any) -> str:
        """A 1-D sequence of ids (list, numpy or jax array) -> text; ValueError for bad ids."""
        ids = np.asarray(ids)
        if ids.ndim > 1:
            raise ValueError(f"BpeTokenizer.decode takes a 1-D sequence of ids; got shape "
                             f"{ids.shape}. Decode rows one at a time.")
        ids = ids.reshape(-1)
        if ids.size == 0:
            return ""
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"BpeTokenizer.decode takes integer ids; got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"Ids out of range [0, {self.vocab_size}): "
                             f"{sorted(set(ids[bad].tolist()))[:_MAX_SHOWN]}")
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``{"type": "bpe", "tokenizer": <tokenizers' JSON string>}``."""
        return {"type": "bpe", "tokenizer": self._tok.to_str()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BpeTokenizer:
        """Inverse of ``to_json``."""
        if (not isinstance(data, dict) or data.get("type") != "bpe"
                or not isinstance(data.get("tokenizer"), str)):
            raise ValueError(f"Not a BpeTokenizer JSON (want {{'type': 'bpe', 'tokenizer': "
                             f"'<json>'}}): {str(data)[:200]}")
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(data["tokenizer"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BpeTokenizer) and self._tok.to_str() == other._tok.to_str()

    def __hash__(self) -> int:
        return hash(self._tok.to_str())

    def __repr__(self) -> str:
        return f"BpeTokenizer(vocab_size={self.vocab_size})"


TOKENIZERS = {"char": CharTokenizer, "bpe": BpeTokenizer}


def tokenizer_from_json(data: dict[str, Any]) -> CharTokenizer | BpeTokenizer:
    """Restores a tokenizer from its ``to_json()`` dict, by ``data["type"]`` ('char' | 'bpe')."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in TOKENIZERS:
        raise ValueError(f"Unknown tokenizer type {kind!r}; expected one of {sorted(TOKENIZERS)}.")
    return TOKENIZERS[kind].from_json(data)
