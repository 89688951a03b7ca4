"""End to end through ``python -m research.sample`` on the smoke run's workdir: the printed text,
determinism of greedy decoding and of seeds, nucleus sampling, ``--checkpoint best``, and one
clear error for a workdir that cannot be sampled from."""
from __future__ import annotations

import re
import shutil

import pytest

from tests.e2e import assert_clean_error, finished_steps, metrics_rows, sample, smoke_run

PROMPT = "ROMEO:"
N = 100
BASE = ("--prompt", PROMPT, "--max_new_tokens", str(N), "--temperature", "0.8", "--top_k", "200")
GREEDY = ("--prompt", PROMPT, "--max_new_tokens", str(N), "--greedy")


@pytest.fixture(scope="module")
def workdir(shakespeare_env, tmp_path_factory):
    return smoke_run(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def vocab(shakespeare_env) -> set[str]:
    from research.data.tiny_shakespeare import load_all_text
    return set(load_all_text())


def text_of(proc) -> str:
    """The one sample printed: stdout is the text and a newline; the stats go to stderr."""
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.endswith("\n")
    return proc.stdout[:-1]


def check_sample(text: str, vocab: set[str]) -> None:
    assert text.startswith(PROMPT), text
    assert len(text) == len(PROMPT) + N, (len(text), text)
    assert set(text) <= vocab


def test_sample_continues_the_prompt(workdir, vocab):
    proc = sample(workdir, *BASE)
    check_sample(text_of(proc), vocab)
    steps = re.findall(r"\[checkpoint step (\d+); \d+ tokens/s", proc.stderr)
    assert steps == ["6"], proc.stderr  # the latest checkpoint by default


def test_same_seed_same_text_other_seed_other_text(workdir, vocab):
    a = text_of(sample(workdir, *BASE, "--seed", "3"))
    b = text_of(sample(workdir, *BASE, "--seed", "3"))
    c = text_of(sample(workdir, *BASE, "--seed", "4"))
    for t in (a, b, c):
        check_sample(t, vocab)
    assert a == b
    assert a != c


def test_greedy_is_deterministic_and_equals_top_k_1(workdir, vocab):
    a = text_of(sample(workdir, *GREEDY))
    b = text_of(sample(workdir, *GREEDY, "--seed", "9"))  # the seed cannot matter
    check_sample(a, vocab)
    assert a == b
    # Sampling among the single most likely token is greedy decoding.
    assert text_of(sample(workdir, *GREEDY[:-1], "--top_k", "1", "--seed", "5")) == a


def test_top_p(workdir, vocab):
    check_sample(text_of(sample(workdir, *BASE, "--top_p", "0.9")), vocab)


def test_checkpoint_best(workdir, vocab):
    val = {r["step"]: r["val/loss"] for r in metrics_rows(workdir) if "val/loss" in r}
    kept = [s for s in finished_steps(workdir) if s in val]
    best = min(kept, key=val.get)
    proc = sample(workdir, *BASE, "--checkpoint", "best")
    check_sample(text_of(proc), vocab)
    assert re.findall(r"\[checkpoint step (\d+);", proc.stderr) == [str(best)], proc.stderr


def test_workdir_without_checkpoints_gives_one_clear_error(workdir, tmp_path):
    empty = tmp_path / "not_trained"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty / "config.json")
    proc = sample(empty, *BASE)
    assert proc.returncode == 2
    assert_clean_error(proc, "Error:", "No checkpoint in", str(empty / "checkpoints"),
                       "train first")
    assert proc.stdout == ""
