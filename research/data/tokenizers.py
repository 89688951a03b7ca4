"""Tokenizers that turn text into int32 id arrays and back; their vocabularies save as JSON.

``CharTokenizer`` is nanoGPT's character tokenizer: ``chars = sorted(set(text))`` and a character's
id is its index in ``chars``. Encoding and decoding are vectorised with numpy over Unicode code
points (tens of milliseconds for the 1.1M characters of tiny Shakespeare).
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
