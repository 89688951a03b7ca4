"""Tests of the Fashion-MNIST tfds builder, prepared from the real idx files (Debian's package
``dataset-fashion-mnist``, via the ``fashion_mnist_env`` fixture).

The reference is the idx files themselves, parsed here with plain numpy + gzip (independent of the
builder and of tfds), and the dataset's published facts: 60,000/10,000 examples, 6,000/1,000 per
class, train pixel mean 72.94 (0.2860 of 255). No test touches the internet: the mirrors are pointed
at 127.0.0.1.
"""
from __future__ import annotations

import functools
import gzip
import http.server
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from research.data import fashion_mnist as fm

UNREACHABLE = ("http://127.0.0.1:9/",)  # the discard port: connection refused


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(fm, "MIRRORS", UNREACHABLE)


def _reference(directory: Path, name: str, offset: int) -> np.ndarray:
    """The idx file parsed by hand: skip the header (16 bytes for images, 8 for labels)."""
    return np.frombuffer(gzip.open(directory / name).read(), np.uint8, offset=offset)


def test_splits_equal_the_idx_files(fashion_mnist_env):
    local = Path(fashion_mnist_env["RESEARCH_FASHION_MNIST_DIR"])
    for split, n in (("train", 60_000), ("test", 10_000)):
        images, labels = fm.load(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, n // 10))
        img_file, lbl_file = fm.FILES[split]
        np.testing.assert_array_equal(images.reshape(n, -1),
                                      _reference(local, img_file, 16).reshape(n, -1))
        np.testing.assert_array_equal(labels, _reference(local, lbl_file, 8))
        assert not images.flags.writeable  # the cached arrays cannot be changed by a caller
    train_images, train_labels = fm.load("train")
    assert train_images.mean() == pytest.approx(72.94, abs=0.01)  # the published statistic
    assert train_images.mean() / 255 == pytest.approx(0.2860, abs=1e-4)
    assert fm.CLASS_NAMES[train_labels[0]] == "Ankle boot" and len(fm.CLASS_NAMES) == 10


def test_records_are_a_tfds_dataset_in_file_order(fashion_mnist_env):
    source = tfds.data_source(fm.NAME, split="test", data_dir=fashion_mnist_env[
        "RESEARCH_DATA_DIR"], download=False, builder_kwargs={"file_format": fm.FILE_FORMAT})
    images, labels = fm.load("test")
    assert len(source) == 10_000
    for i in (0, 1, 4_321, 9_999):
        np.testing.assert_array_equal(source[i]["image"], images[i])
        assert source[i]["label"] == labels[i]


@pytest.mark.parametrize("give_manual_dir", [True, False])
def test_missing_data_is_one_clear_fast_error(tmp_path, monkeypatch, give_manual_dir):
    monkeypatch.delenv(fm.MANUAL_DIR_ENV, raising=False)
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "no-debian-package"))
    empty = tmp_path / "empty"
    empty.mkdir()
    start = time.monotonic()
    with pytest.raises(fm.DataNotFoundError) as info:
        fm.load("train", data_dir=tmp_path / "tfds", manual_dir=empty if give_manual_dir else None)
    assert time.monotonic() - start < 15
    message = str(info.value)
    tried = empty if give_manual_dir else tmp_path / "tfds" / "downloads" / "manual"
    for needle in (str(tried), "train-images-idx3-ubyte.gz", "apt-get install dataset-fashion-mnist",
                   "config.data.manual_dir", fm.MANUAL_DIR_ENV, UNREACHABLE[0], fm.HOMEPAGE):
        assert needle in message, needle
    assert not (tmp_path / "tfds" / fm.NAME / "1.0.0").exists()


def test_download_false_never_uses_the_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although download=False")
    monkeypatch.setattr(fm, "_check_reachable", no_network)
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "no-debian-package"))
    monkeypatch.delenv(fm.MANUAL_DIR_ENV, raising=False)
    with pytest.raises(fm.DataNotFoundError, match="download=False"):
        fm.load("test", data_dir=tmp_path, download=False)


def test_resolve_manual_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.MANUAL_DIR_ENV, str(tmp_path / "env"))
    assert fm.resolve_manual_dir(tmp_path / "arg") == str(tmp_path / "arg")
    assert fm.resolve_manual_dir() == str(tmp_path / "env")
    monkeypatch.delenv(fm.MANUAL_DIR_ENV)
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path))
    assert fm.resolve_manual_dir() == str(tmp_path)
    monkeypatch.setattr(fm, "DEBIAN_DIR", str(tmp_path / "absent"))
    assert fm.resolve_manual_dir() is None


def test_bad_idx_files_are_named(tmp_path):
    header = np.array([fm.LABELS_MAGIC, 9_999], ">u4").tobytes()  # one label short
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(header + bytes(9_999))
    with pytest.raises(fm.CorruptDataError, match="9999 items .* expected magic 2049, 10000"):
        fm.read_idx_file(tmp_path / "t10k-labels-idx1-ubyte", magic=fm.LABELS_MAGIC,
                         count=10_000, dims=())
    header = np.array([fm.LABELS_MAGIC, 10_000], ">u4").tobytes()
    (tmp_path / "short.gz").write_bytes(gzip.compress(header + bytes(9_000)))
    with pytest.raises(fm.CorruptDataError, match="truncated"):
        fm.read_idx_file(tmp_path / "short.gz", magic=fm.LABELS_MAGIC, count=10_000, dims=())
    with pytest.raises(fm.CorruptDataError, match="label 10"):
        images = np.array([fm.IMAGES_MAGIC, 10_000, 28, 28], ">u4").tobytes() + bytes(7_840_000)
        (tmp_path / "img").write_bytes(images)
        (tmp_path / "lbl").write_bytes(header + bytes([10]) * 10_000)
        fm.read_split(tmp_path / "img", tmp_path / "lbl", "test")


def test_downloads_from_a_mirror(tmp_path, monkeypatch, fashion_mnist_env):
    """The online path (the builder's tfds download manager) against a server on 127.0.0.1 serving
    the local copy; the first mirror is unreachable, so the second is used."""
    local = fashion_mnist_env["RESEARCH_FASHION_MNIST_DIR"]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=local)
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            monkeypatch.setattr(fm, "MIRRORS", (
                UNREACHABLE[0], f"http://127.0.0.1:{server.server_port}/"))
            manager = tfds.download.DownloadManager(download_dir=tmp_path / "downloads")
            paths = fm.FashionMnistIdx(data_dir=tmp_path)._source_paths(manager)
        finally:
            server.shutdown()
    images, labels = fm.read_split(paths[fm.FILES["test"][0]], paths[fm.FILES["test"][1]], "test")
    np.testing.assert_array_equal(labels, fm.load("test")[1])
    np.testing.assert_array_equal(images, fm.load("test")[0])


def test_unknown_split_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'validation'"):
        fm.load("validation", data_dir=tmp_path)
