"""Tests of research.data.tokenizers.CharTokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest

from research.data.tokenizers import CharTokenizer


def test_vocabulary_is_sorted_unique_chars_as_in_nanogpt():
    text = "hello world\nHELLO!"
    tok = CharTokenizer.from_text(text)
    chars = sorted(set(text))
    assert tok.chars == tuple(chars) and tok.vocab_size == len(chars)
    stoi = {c: i for i, c in enumerate(chars)}
    np.testing.assert_array_equal(tok.encode(text), [stoi[c] for c in text])


def test_encode_decode_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_non_ascii_and_unsorted_vocabulary():
    tok = CharTokenizer(["z", "é", "a", "😀"])  # ids follow the given order
    np.testing.assert_array_equal(tok.encode("a😀zé"), [2, 3, 0, 1])
    assert tok.decode([2, 3, 0, 1]) == "a😀zé"


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as info:
        tok.encode("abXcYX")
    message = str(info.value)
    assert "'X'" in message and "'Y'" in message and "index 2" in message


def test_bad_ids_and_shapes_are_rejected():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        tok.decode([0, 3, -1])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="integer"):
        tok.decode([0.5])
    with pytest.raises(TypeError):
        tok.encode(b"abc")


def test_bad_vocabularies_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer([])


def test_json_round_trip():
    tok = CharTokenizer.from_text("To be, or not to be: that is the question.\n")
    data = json.loads(json.dumps(tok.to_json()))  # as saved with a checkpoint
    restored = CharTokenizer.from_json(data)
    assert restored == tok and restored.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(restored.encode("to be"), tok.encode("to be"))
    with pytest.raises(ValueError, match="CharTokenizer JSON"):
        CharTokenizer.from_json({"type": "bpe", "merges": []})
