"""End to end through ``python -m research.launch``: a smoke training run and its workdir, and
config / data mistakes stopping at once with one clear message and no traceback."""
from __future__ import annotations

import json
import math
import shutil

import pytest
from PIL import Image

from research.data.tiny_shakespeare import CANONICAL_URL
from tests.e2e import (MESH_RE, PROGRESS_RE, SMOKE, assert_clean_error, finished_steps, launch,
                       metrics_rows, sample, smoke_run, subprocess_env)


@pytest.fixture(scope="module")
def smoke(shakespeare_env, tmp_path_factory):
    return smoke_run(tmp_path_factory)


def test_smoke_run_exits_cleanly_and_prints_progress(smoke):
    _, proc = smoke
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr, proc.stderr
    progress = PROGRESS_RE.findall(proc.stdout)
    steps = [(int(s), int(t)) for s, t, _ in progress]
    assert steps == [(2, 6), (3, 6), (4, 6), (6, 6)], proc.stdout
    for word in ("ms/step", "tok/s", "MFU", "ETA"):
        assert word in proc.stdout
    assert [int(d) for d in MESH_RE.findall(proc.stdout)] == [1]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the launcher's last line
    assert summary["step"] == 6 and math.isfinite(summary["train/loss"])


def test_smoke_workdir_has_config_metrics_tensorboard_plot_and_checkpoints(smoke):
    workdir, _ = smoke
    config = json.loads((workdir / "config.json").read_text())
    assert config["total_steps"] == 6 and config["model"]["num_layers"] == 2
    assert json.loads((workdir / "summary.json").read_text())["step"] == 6

    rows = metrics_rows(workdir)
    assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log_every=2, eval_every=3, last step
    for r in rows:
        assert math.isfinite(r["train/loss"]) and 0 < r["train/loss"] < 10
    evals = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert r["val/perplexity"] == pytest.approx(math.exp(r["val/loss"]), rel=1e-12)
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]  # it learns, even in 6 steps

    events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"train/loss", b"val/loss", b"val/perplexity"):
        assert tag in data

    png = workdir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100

    assert finished_steps(workdir) == [3, 6]  # keep_checkpoints=2, the final step among them


# (extra args, config, message start, fragments the message must name)
CONFIG_ERRORS = {
    "unknown_key": (["--config.model.num_layerz=2"], SMOKE, "Config error:",
                    ["model.num_layerz", "model.num_layers"]),
    "bad_type": (["--config.total_steps=abc"], SMOKE, "Config error:",
                 ["--config.total_steps=abc"]),
    "dropout_out_of_range": (["--config.model.dropout=1.5"], SMOKE, "Config error:",
                             ["config.model.dropout=1.5", "[0, 1)"]),
    "batch_not_multiple_of_accum": (["--config.batch_size=7", "--config.grad_accum_steps=2"],
                                    SMOKE, "Config error:",
                                    ["config.batch_size=7", "config.grad_accum_steps=2"]),
    "unknown_size": ([], "configs/gpt_shakespeare_char.py:size=huge", "Config error:",
                     ["size", "'huge'", "baby", "default"]),
    "unknown_config_arg": (["--config.seed=1"], "configs/gpt_shakespeare_char.py:sise=baby",
                           "Config error:", ["'sise'", "Did you mean 'size'"]),
    "missing_config_file": ([], "configs/no_such_config.py", "Config error:",
                            ["configs/no_such_config.py"]),
    "bpe_vocab_below_bytes": (["--config.data.vocab_size=100"], "configs/gpt_shakespeare_bpe.py:smoke",
                              "Config error:", ["config.data.vocab_size=100", ">= 256"]),
}


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_config_mistakes_stop_with_one_clear_message(name, shakespeare_env, tmp_path):
    args, config, prefix, fragments = CONFIG_ERRORS[name]
    proc = launch(tmp_path / "workdir", *args, config=config)
    assert proc.returncode == 2
    assert_clean_error(proc, prefix, *fragments)
    assert finished_steps(tmp_path / "workdir") == []


def test_missing_data_offline_names_the_fix(shakespeare_env, tmp_path):
    empty = tmp_path / "no_text_here"
    empty.mkdir()
    # Offline: every HTTP(S) connection goes to a closed port on this machine.
    proxy = "http://127.0.0.1:9"
    env = subprocess_env(RESEARCH_SHAKESPEARE_DIR=str(empty),
                         RESEARCH_DATA_DIR=str(tmp_path / "fresh_tfds"),
                         HTTPS_PROXY=proxy, https_proxy=proxy, HTTP_PROXY=proxy, http_proxy=proxy,
                         NO_PROXY="", no_proxy="")
    proc = launch(tmp_path / "workdir", env=env)
    assert proc.returncode == 1
    message = assert_clean_error(proc, "DataNotFoundError:", "config.data.manual_dir",
                                 CANONICAL_URL, str(empty), "RESEARCH_SHAKESPEARE_DIR")
    assert message.count("\n") == 0, message


def test_workdir_of_another_model_is_refused_and_left_untouched(smoke, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(smoke[0], workdir)
    before = {p.relative_to(workdir): p.read_bytes()
              for p in sorted(workdir.rglob("*")) if p.is_file()}
    proc = launch(workdir, "--config.model.num_layers=3")
    assert proc.returncode == 2
    assert_clean_error(proc, "Config error:", "different model",
                       "model.num_layers: checkpoint 2 vs config 3", "new --workdir")
    after = {p.relative_to(workdir): p.read_bytes()
             for p in sorted(workdir.rglob("*")) if p.is_file()}
    # Checkpoints, config.json (what research.sample builds the model from) and metrics untouched.
    changed = sorted(str(k) for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert changed == [], changed


def test_bpe_smoke_run_reports_bits_per_char_and_samples(shakespeare_env, tmp_path):
    workdir = tmp_path / "bpe"
    proc = launch(workdir, config="configs/gpt_shakespeare_bpe.py:smoke")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    evals = [r for r in metrics_rows(workdir) if "val/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:  # ~0.53 BPE tokens per character of the validation text
        ratio = r["val/bits_per_char"] * math.log(2) / r["val/loss"]
        assert 0.45 < ratio < 0.6, ratio
    out = sample(workdir, "--prompt", "ROMEO:", "--max_new_tokens", "8", "--greedy")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.startswith("ROMEO:")
