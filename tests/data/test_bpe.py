"""Tests of the byte-level BPE tokenizer, ``val/bits_per_char`` and a smoke run of the BPE config."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from configs.gpt_shakespeare_bpe import get_config as bpe_config
from research.data.tiny_shakespeare import FILENAME, split_text
from research.data.tokenizers import BpeTokenizer, CharTokenizer, tokenizer_from_json
from research.tasks.lm import LMTask, bits_per_char, measure_tokens_per_char
from tests.core.helpers import synthetic_task

VOCAB = 512


@pytest.fixture(scope="module")
def texts(shakespeare_env) -> dict[str, str]:
    """The whole text and nanoGPT's train / validation split of it."""
    text = (Path(shakespeare_env["RESEARCH_SHAKESPEARE_DIR"]) / FILENAME).read_text("utf-8")
    return {"all": text, **split_text(text)}


@pytest.fixture(scope="module")
def bpe(texts) -> BpeTokenizer:
    return BpeTokenizer.train(texts["train"], VOCAB)


def test_bpe_round_trips_the_whole_text(bpe, texts):
    assert bpe.vocab_size == VOCAB
    ids = bpe.encode(texts["all"])
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert 0 <= ids.min() and ids.max() < VOCAB
    assert len(ids) < len(texts["all"]) / 1.5  # it does merge: ~1.94 characters per token
    assert bpe.decode(ids) == texts["all"]
    assert bpe.decode(ids.tolist()) == texts["all"]
    # Bytes never seen in training still round-trip (byte-level alphabet).
    odd = "Ünïcödé — 日本語 ☃\t\r\n"
    assert bpe.decode(bpe.encode(odd)) == odd
    assert bpe.encode("").shape == (0,) and bpe.decode([]) == ""


def test_bpe_decode_rejects_bad_ids(bpe):
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([0, VOCAB])
    with pytest.raises(ValueError, match="1-D"):
        bpe.decode(np.zeros((2, 2), np.int32))


def test_bpe_training_is_deterministic(bpe, texts):
    again = BpeTokenizer.train(texts["train"], VOCAB)
    assert again.to_json() == bpe.to_json() and again == bpe
    np.testing.assert_array_equal(again.encode(texts["validation"]), bpe.encode(texts["validation"]))
    other = BpeTokenizer.train(texts["train"], VOCAB + 8)
    assert other.vocab_size == VOCAB + 8 and other != bpe


def test_to_json_round_trip_and_dispatch(bpe):
    data = json.loads(json.dumps(bpe.to_json()))  # as saved in checkpoint meta
    assert data["type"] == "bpe" and isinstance(data["tokenizer"], str)
    restored = BpeTokenizer.from_json(data)
    assert restored == bpe and restored.to_json() == bpe.to_json()
    text = "ROMEO:\nWhat light through yonder window breaks?"
    np.testing.assert_array_equal(restored.encode(text), bpe.encode(text))

    assert isinstance(tokenizer_from_json(data), BpeTokenizer) and tokenizer_from_json(data) == bpe
    char = CharTokenizer.from_text("abc")
    assert tokenizer_from_json(char.to_json()) == char
    with pytest.raises(ValueError, match="Unknown tokenizer type 'wordpiece'"):
        tokenizer_from_json({"type": "wordpiece"})
    with pytest.raises(ValueError, match="Not a BpeTokenizer JSON"):
        BpeTokenizer.from_json({"type": "char", "chars": ["a"]})


def test_bits_per_char_of_char_tokenizer_is_loss_over_ln2():
    _, task = synthetic_task()
    assert task.tokens_per_char == 1.0
    out = task.summarize_eval({"loss": 1.5})
    assert out["loss"] == 1.5 and out["perplexity"] == pytest.approx(math.exp(1.5))
    assert out["bits_per_char"] == pytest.approx(1.5 / math.log(2), rel=1e-12)


def test_bits_per_char_of_bpe_scales_by_tokens_per_char():
    # 2 merges on "abab...": 'a'+'b' -> 'ab', 'ab'+'ab' -> 'abab'; "abababab" is then 2 tokens.
    tok = BpeTokenizer.train("abababab " * 20, 258)
    assert tok.decode(tok.encode("abababab")) == "abababab"
    assert len(tok.encode("abababab")) == 2
    tpc = measure_tokens_per_char(tok, "abababab")
    assert tpc == 0.25
    config = bpe_config("smoke")
    task = LMTask(config, tokenizer=tok, tokens_per_char=tpc)
    out = task.summarize_eval({"loss": 2.0})
    assert out["bits_per_char"] == pytest.approx(2.0 * 0.25 / math.log(2), rel=1e-12)
    assert bits_per_char(2.0, 0.25) == pytest.approx(0.5 / math.log(2), rel=1e-12)
    # Without a measured ratio a BPE task reports no bits_per_char (it cannot know it).
    assert "bits_per_char" not in LMTask(config, tokenizer=tok).summarize_eval({"loss": 2.0})


def test_bpe_smoke_run_reports_bits_per_char_and_sample_restores_tokenizer(
        bpe, texts, tmp_path):
    from research.core.train import run
    from research.sample import load_model

    config = bpe_config("smoke")
    task = LMTask(config)
    assert task.tokenizer == bpe and task.model_config.vocab_size == VOCAB  # train split only
    val = texts["validation"]
    assert task.tokens_per_char == len(bpe.encode(val)) / len(val)
    assert 0.45 < task.tokens_per_char < 0.6

    workdir = str(tmp_path / "workdir")
    summary = run(config, task, workdir)
    (tmp_path / "workdir" / "config.json").write_text(config.to_json_best_effort())  # as launch does
    assert summary["step"] == config.total_steps
    assert summary["val/bits_per_char"] == pytest.approx(
        summary["val/loss"] * task.tokens_per_char / math.log(2), rel=1e-9)

    restored, params, step = load_model(workdir)
    assert step == config.total_steps
    assert isinstance(restored.tokenizer, BpeTokenizer) and restored.tokenizer == bpe
    assert restored.model_config == task.model_config
