"""Tests of the tiny Shakespeare tfds builder: prepared from the local copy in ``../shared``.

No test touches the internet: ``URL`` is pointed at a closed port on 127.0.0.1 for every test.
"""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from research.data import tiny_shakespeare as ts
from research.data.tokenizers import CharTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_DIR = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare"
UNREACHABLE_URL = "http://127.0.0.1:9/input.txt"  # the discard port: connection refused


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch):
    monkeypatch.delenv(ts.MANUAL_DIR_ENV, raising=False)
    monkeypatch.delenv(ts.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(ts, "URL", UNREACHABLE_URL)


@pytest.fixture(scope="module")
def local_dir() -> Path:
    if not (LOCAL_DIR / "input.txt").is_file():
        pytest.fail(f"{LOCAL_DIR / 'input.txt'} is missing: these tests need the shared/ folder "
                    "beside the repository, as on the project's machines and in CI.")
    return LOCAL_DIR


@pytest.fixture(scope="module")
def file_text(local_dir) -> str:
    return (local_dir / "input.txt").read_text(encoding="utf-8")


def _version_dir(data_dir: Path) -> Path:
    return data_dir / ts.NAME / str(ts.TinyShakespeareChars.VERSION)


def _leftovers(data_dir: Path) -> list[Path]:
    return sorted((data_dir / ts.NAME).glob("incomplete.*"))


def test_local_copy_is_the_canonical_file(local_dir):
    assert hashlib.sha256((local_dir / "input.txt").read_bytes()).hexdigest() == ts.SHA256


def test_splits_match_nanogpt(tmp_path, local_dir, file_text):
    train = ts.load_text("train", data_dir=tmp_path, manual_dir=local_dir)
    val = ts.load_text("validation", data_dir=tmp_path, manual_dir=local_dir)
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert train + val == file_text
    n = len(file_text)
    assert train == file_text[:int(n * 0.9)] and val == file_text[int(n * 0.9):]
    assert (train + val).encode("utf-8") == (local_dir / "input.txt").read_bytes()
    assert sorted(p.name for p in _version_dir(tmp_path).glob("*.array_record*")) == [
        f"{ts.NAME}-train.array_record-00000-of-00001",
        f"{ts.NAME}-validation.array_record-00000-of-00001"]


def test_all_text_vocabulary_and_round_trip(tmp_path, local_dir, file_text):
    text = ts.load_all_text(data_dir=tmp_path, manual_dir=local_dir)
    assert text == file_text
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    ids = tok.encode(text)
    assert ids.shape == (len(text),) and ids.max() == 64
    assert tok.decode(ids) == text


def test_prepared_data_is_reused_without_a_source(tmp_path, local_dir):
    ts.prepare(data_dir=tmp_path, manual_dir=local_dir)
    info = _version_dir(tmp_path) / "dataset_info.json"
    mtime = info.stat().st_mtime_ns
    assert len(ts.load_text("validation", data_dir=tmp_path, download=False)) == 111_540
    assert info.stat().st_mtime_ns == mtime  # not prepared again
    assert not _leftovers(tmp_path)


def test_env_vars_give_manual_dir_and_data_dir(tmp_path, local_dir, monkeypatch):
    monkeypatch.setenv(ts.MANUAL_DIR_ENV, str(local_dir))
    monkeypatch.setenv(ts.DATA_DIR_ENV, str(tmp_path / "tfds"))
    assert len(ts.load_text("validation", download=False)) == 111_540
    assert (_version_dir(tmp_path / "tfds") / "dataset_info.json").is_file()


@pytest.mark.parametrize("give_manual_dir", [True, False])
def test_missing_data_is_one_clear_fast_error(tmp_path, give_manual_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.monotonic()
    with pytest.raises(ts.DataNotFoundError) as info:
        ts.load_text("train", data_dir=tmp_path / "tfds",
                     manual_dir=empty if give_manual_dir else None)
    assert time.monotonic() - start < 10
    message = str(info.value)
    tried = empty if give_manual_dir else tmp_path / "tfds" / "downloads" / "manual"
    for needle in ("config.data.manual_dir", "RESEARCH_SHAKESPEARE_DIR", "input.txt",
                   ts.CANONICAL_URL, UNREACHABLE_URL, str(tried)):
        assert needle in message
    assert isinstance(info.value.__cause__, OSError)  # the download error, kept as the cause
    assert not _version_dir(tmp_path / "tfds").exists() and not _leftovers(tmp_path / "tfds")


def test_downloads_through_tfds_when_online(tmp_path, local_dir, monkeypatch):
    """The online path, against a server on 127.0.0.1 that serves the local copy."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(local_dir))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            monkeypatch.setattr(ts, "URL", f"http://127.0.0.1:{server.server_port}/input.txt")
            val = ts.load_text("validation", data_dir=tmp_path)  # no manual_dir
        finally:
            server.shutdown()
    assert len(val) == 111_540
    assert list((tmp_path / "downloads").rglob("*input*.txt"))  # tfds's download cache


def test_download_false_never_uses_the_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although download=False")
    monkeypatch.setattr(ts, "_check_reachable", no_network)
    with pytest.raises(ts.DataNotFoundError, match="download=False"):
        ts.load_text("train", data_dir=tmp_path, download=False)


def test_checksum_mismatch_raises(tmp_path, local_dir):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    data = bytearray((local_dir / "input.txt").read_bytes())
    data[100] ^= 1  # one flipped bit
    (bad_dir / "input.txt").write_bytes(bytes(data))
    with pytest.raises(ts.ChecksumMismatchError, match=ts.SHA256) as info:
        ts.load_text("train", data_dir=tmp_path / "tfds", manual_dir=bad_dir)
    assert hashlib.sha256(bytes(data)).hexdigest() in str(info.value)
    assert not _version_dir(tmp_path / "tfds").exists() and not _leftovers(tmp_path / "tfds")


def test_unknown_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'test'"):
        ts.load_text("test", data_dir=tmp_path)


def test_half_prepared_dirs_are_replaced(tmp_path, local_dir):
    stale = tmp_path / ts.NAME / "incomplete.AB12CD_1.0.0"
    stale.mkdir(parents=True)
    (stale / f"{ts.NAME}-train.array_record-00000-of-00001").write_bytes(b"half")
    _version_dir(tmp_path).mkdir()  # a version dir without dataset_info.json
    (_version_dir(tmp_path) / "junk").write_bytes(b"junk")
    assert len(ts.load_text("validation", data_dir=tmp_path, manual_dir=local_dir)) == 111_540
    assert not _leftovers(tmp_path) and not (_version_dir(tmp_path) / "junk").exists()


# A child process that prepares (``race``) or dies mid-preparation (``hang``, killed by the test).
_CHILD = textwrap.dedent("""
    import hashlib, os, sys, time
    from pathlib import Path
    from research.data import tiny_shakespeare as ts
    mode, data_dir, manual_dir, sync = sys.argv[1:]
    if mode == "hang":
        def _hang(self, text):
            Path(sync).touch()
            time.sleep(600)
            yield 0, {"text": text}
        ts.TinyShakespeareChars._generate_examples = _hang
    else:
        Path(f"{sync}.{os.getpid()}").touch()
        while not Path(sync).exists():
            time.sleep(0.005)
    text = ts.load_all_text(data_dir=data_dir, manual_dir=manual_dir, download=False)
    print("SHA", hashlib.sha256(text.encode()).hexdigest())
""")


def _child(mode: str, data_dir: Path, local_dir: Path, sync: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(data_dir), str(local_dir),
                             str(sync)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_recovers_after_a_process_is_killed_mid_preparation(tmp_path, local_dir):
    sync = tmp_path / "writing"
    child = _child("hang", tmp_path / "tfds", local_dir, sync)
    try:
        _wait_for(lambda: sync.exists() or child.poll() is not None, "the child to start writing")
        assert child.poll() is None, child.communicate()[0]
        assert _leftovers(tmp_path / "tfds")  # tfds's temp dir, as a crash leaves it
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert len(ts.load_text("train", data_dir=tmp_path / "tfds", manual_dir=local_dir)) == 1_003_854
    assert not _leftovers(tmp_path / "tfds")


def test_racing_processes_prepare_once(tmp_path, local_dir):
    sync, n = tmp_path / "go", 2
    children = [_child("race", tmp_path / "tfds", local_dir, sync) for _ in range(n)]
    try:
        _wait_for(lambda: len(list(tmp_path.glob("go.*"))) == n
                  or any(c.poll() is not None for c in children), "the children to start")
        sync.touch()
        outputs = [c.communicate(timeout=60)[0] for c in children]
    finally:
        for c in children:
            c.kill()
    for c, out in zip(children, outputs):
        assert c.returncode == 0, out
        assert f"SHA {ts.SHA256}" in out
    assert sum("prepared to" in out for out in outputs) == 1, outputs  # tfds's "prepared" line
    assert not _leftovers(tmp_path / "tfds")
