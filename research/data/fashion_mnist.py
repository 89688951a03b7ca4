"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) as a tfds dataset, without TensorFlow.

The builder ``fashion_mnist_idx`` (version 1.0.0; tfds's own ``fashion_mnist`` builder needs
TensorFlow to prepare) reads Zalando's four idx files and writes ``array_record`` files, read back
with ``tfds.data_source``. Each example is ``{"image": uint8 [28, 28], "label": ClassLabel(10)}``;
the examples keep the files' order (shuffling is disabled), so ``load("test")[0][i]`` is image ``i``
of ``t10k-images-idx3-ubyte``. Splits: 'train' (60,000) and 'test' (10,000).

``load(split)`` returns ``(images uint8 [N, 28, 28], labels int32 [N])``. The records are read once
(~150 us each) and kept as ``<version dir>/numpy-<split>.npz`` beside the prepared dataset, and in
memory for the process: later loads cost milliseconds. The arrays returned are read-only.

Where the idx files come from, in order:

1. a local copy, ``manual_dir``: the argument (``config.data.manual_dir``), else the environment
   variable ``RESEARCH_FASHION_MNIST_DIR``, else ``DEBIAN_DIR`` (``/usr/share/datasets/
   fashion-mnist``, where Debian's package ``dataset-fashion-mnist`` puts them) when it exists,
   else tfds's ``<data_dir>/downloads/manual``. Files may be gzipped (``*.gz``, as published) or not;
2. a download of the canonical files (``MIRRORS``: Zalando's S3 site, then the GitHub repository)
   through the tfds download manager (never when ``download=False``).

Every file's idx header is checked (magic number, count, 28 x 28) and the labels' range, instead
of tfds's registered checksums: Debian's gzip files hold the same data as the canonical ones but
their compressed bytes differ. When no source works, ``DataNotFoundError`` says where it looked and
how to get the data. Offline, each download fails within ``CONNECT_TIMEOUT_S`` seconds.

Prepared data lives in ``data_dir``: the argument, else ``RESEARCH_DATA_DIR``, else tfds's default
(``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). An exclusive ``flock`` makes racing processes
prepare once, and the leftovers of a crashed preparation are deleted (as for tiny Shakespeare).

Example::

    images, labels = load("train")          # (60000, 28, 28) uint8, (60000,) int32
    CLASS_NAMES[labels[0]]                   # 'Ankle boot'
"""
from __future__ import annotations

import gzip
import logging
import os
import threading
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from research.data.tiny_shakespeare import (
    _check_reachable, _exclusive_lock, _is_prepared, _remove_leftovers, resolve_data_dir)

NAME = "fashion_mnist_idx"
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot")
SPLITS = ("train", "test")
COUNTS = {"train": 60_000, "test": 10_000}
IMAGE_SHAPE = (28, 28)
FILES = {  # split -> (images, labels), as published (gzipped)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MIRRORS = (  # the canonical locations, tried in order
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILE_FORMAT = "array_record"
MANUAL_DIR_ENV = "RESEARCH_FASHION_MNIST_DIR"
DATA_DIR_ENV = "RESEARCH_DATA_DIR"
CONFIG_KEY = "config.data.manual_dir"
CONNECT_TIMEOUT_S = 5.0
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # idx: 0x0000 0803 (ubyte, 3 dims) / 0x0000 0801 (1 dim)

_log = logging.getLogger(__name__)
_MEMORY: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_MEMORY_LOCK = threading.Lock()


class DataNotFoundError(RuntimeError):
    """No usable Fashion-MNIST files: not in the local copy and not downloadable."""


class CorruptDataError(DataNotFoundError):
    """A file is not the Fashion-MNIST idx file it is named after (bad header, count or labels)."""


_FIX_HINT = (
    "Fix: on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (files in "
    f"{DEBIAN_DIR}); or download the four files {', '.join(f for fs in FILES.values() for f in fs)}"
    f" from {HOMEPAGE} (data/fashion/) into a directory and set {CONFIG_KEY} (or the environment "
    f"variable {MANUAL_DIR_ENV}) to it; or run with network access.")


def parse_idx(data: bytes, *, magic: int, count: int, dims: tuple[int, ...],
              source: str | os.PathLike) -> np.ndarray:
    """An uncompressed idx file -> uint8 array [count, *dims]; raises ``CorruptDataError`` unless
    the header says ``magic``, ``count`` items of shape ``dims`` and the payload has that size."""
    header_len = 4 * (2 + len(dims))
    if len(data) < header_len:
        raise CorruptDataError(f"{source} is not an idx file: {len(data)} bytes.")
    header = [int(v) for v in np.frombuffer(data, ">u4", count=2 + len(dims))]
    got_magic, got_count, got_dims = header[0], header[1], tuple(header[2:])
    want = f"magic {magic}, {count} items of shape {dims}"
    got = f"magic {got_magic}, {got_count} items of shape {got_dims}"
    if (got_magic, got_count, got_dims) != (magic, count, dims):
        raise CorruptDataError(f"{source} is not the expected Fashion-MNIST idx file: its header "
                               f"says {got}, expected {want}.")
    size = count * int(np.prod(dims, dtype=np.int64))
    if len(data) - header_len != size:
        raise CorruptDataError(f"{source} is truncated or padded: {len(data) - header_len} data "
                               f"bytes after the header, expected {size} ({want}).")
    return np.frombuffer(data, np.uint8, offset=header_len).reshape(count, *dims)


def read_idx_file(path: str | os.PathLike, *, magic: int, count: int,
                  dims: tuple[int, ...]) -> np.ndarray:
    """Reads ``path`` (gzipped or not: the gzip magic decides) with ``parse_idx``."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise CorruptDataError(f"{path} is a damaged gzip file ({e}).") from e
    return parse_idx(raw, magic=magic, count=count, dims=dims, source=path)


def read_split(images_path, labels_path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The two idx files of ``split`` -> ``(images uint8 [N, 28, 28], labels int32 [N])``."""
    n = COUNTS[split]
    images = read_idx_file(images_path, magic=IMAGES_MAGIC, count=n, dims=IMAGE_SHAPE)
    labels = read_idx_file(labels_path, magic=LABELS_MAGIC, count=n, dims=())
    if labels.max() >= len(CLASS_NAMES):
        raise CorruptDataError(f"{labels_path} holds label {labels.max()}; Fashion-MNIST labels "
                               f"are 0..{len(CLASS_NAMES) - 1}.")
    return images, labels.astype(np.int32)


def _local_file(directory: Path | None, filename: str) -> Path | None:
    """``directory/filename`` (gzipped) or its uncompressed twin, if present."""
    if directory is None:
        return None
    for name in (filename, filename.removesuffix(".gz")):
        if (directory / name).is_file():
            return directory / name
    return None


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from Zalando's idx files; one example per image, in the files' order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 [28, 28] images and labels; array_record; no TensorFlow."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Optional: put the four idx files (as published at {HOMEPAGE}) in manual_dir to prepare "
        "offline.")

    # When False, `_split_generators` never uses the network (`prepare(download=False)`).
    allow_download: bool = True

    def __init__(self, *, file_format: str | None = FILE_FORMAT, **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=("Fashion-MNIST: 70,000 28x28 grayscale images of 10 kinds of Zalando "
                         "articles; 60,000 train, 10,000 test, in the idx files' order."),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            homepage=HOMEPAGE,
            license="MIT",
            citation=("@article{xiao2017fashionmnist, author={Han Xiao and Kashif Rasul and "
                      "Roland Vollgraf}, title={Fashion-MNIST: a Novel Image Dataset for "
                      "Benchmarking Machine Learning Algorithms}, journal={arXiv:1708.07747}, "
                      "year={2017}}"),
        )

    def _source_paths(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Path]:
        """filename -> path of each idx file: from manual_dir when there, else downloaded."""
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError:  # tfds's way of saying: manual_dir unset, missing or empty
            manual_dir = None
        names = [f for pair in FILES.values() for f in pair]
        found = {f: _local_file(manual_dir, f) for f in names}
        missing = [f for f, p in found.items() if p is None]
        if not missing:
            return found
        where = (f"{', '.join(missing)} not in the local copy "
                 f"{getattr(dl_manager, '_manual_dir', None) or '(no manual_dir)'}")
        if not self.allow_download:
            raise DataNotFoundError(f"Fashion-MNIST not found: {where}, and downloading is "
                                    f"disabled (download=False). {_FIX_HINT}")
        errors = []
        for mirror in MIRRORS:
            urls = {f: mirror + f for f in missing}
            try:
                _check_reachable(mirror, timeout=CONNECT_TIMEOUT_S)
                paths = dl_manager.download(urls)
                return {**found, **{f: Path(p) for f, p in paths.items()}}
            except Exception as e:  # noqa: BLE001 - any download failure means the same here
                errors.append(f"{mirror}: {type(e).__name__}: {e}")
        raise DataNotFoundError(f"Fashion-MNIST not found: {where}, and downloading failed ("
                                f"{'; '.join(errors)}). {_FIX_HINT}")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        paths = self._source_paths(dl_manager)
        arrays = {s: read_split(paths[FILES[s][0]], paths[FILES[s][1]], s) for s in SPLITS}
        return {s: self._generate_examples(*arrays[s]) for s in SPLITS}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


def resolve_manual_dir(manual_dir: str | os.PathLike | None = None) -> str | None:
    """``manual_dir``, else ``$RESEARCH_FASHION_MNIST_DIR``, else ``DEBIAN_DIR`` if it exists,
    else None (tfds's default ``<data_dir>/downloads/manual``)."""
    chosen = manual_dir or os.environ.get(MANUAL_DIR_ENV)
    if not chosen and os.path.isdir(DEBIAN_DIR):
        chosen = DEBIAN_DIR
    return os.fspath(Path(chosen).expanduser()) if chosen else None


def _version_dir(data_dir: str) -> Path:
    return Path(data_dir) / NAME / str(FashionMnistIdx.VERSION)


def prepare(*, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None, download: bool = True) -> str:
    """Prepares the dataset in ``data_dir`` unless it is there already; returns that data_dir.

    Args:
      data_dir: the tfds data dir: the argument, else ``$RESEARCH_DATA_DIR``, else tfds's default.
      manual_dir: a directory holding the idx files; see ``resolve_manual_dir``.
      download: if False, never use the network: prepare from the local copy only.

    Raises:
      DataNotFoundError: no usable files; the message says where it looked and how to get them.
      CorruptDataError: a file is not the Fashion-MNIST file it is named after.
    """
    data_dir = resolve_data_dir(data_dir)
    version_dir = _version_dir(data_dir)
    if _is_prepared(version_dir):
        return data_dir
    with _exclusive_lock(version_dir.parent / ".prepare.lock"):
        if _is_prepared(version_dir):  # another process prepared it while we waited
            return data_dir
        _remove_leftovers(version_dir)
        builder = FashionMnistIdx(data_dir=data_dir)
        builder.allow_download = download
        config = tfds.download.DownloadConfig(
            manual_dir=resolve_manual_dir(manual_dir), try_download_gcs=False)
        try:
            builder.download_and_prepare(download_config=config, file_format=FILE_FORMAT)
        except DataNotFoundError as e:
            raise e.with_traceback(None)  # keep the message and its cause, drop tfds's frames
        except OSError:  # tfds's final rename lost a race to a process that ignores our lock
            if not _is_prepared(version_dir):
                raise
    return data_dir


def _read_records(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={"file_format": FILE_FORMAT})
    records = source.__getitems__(range(len(source)))
    images = np.stack([r["image"] for r in records]).astype(np.uint8)
    labels = np.asarray([r["label"] for r in records], np.int32)
    return images, labels


def _read_cache(path: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as f:
            images, labels = f["images"], f["labels"]
    except Exception:  # noqa: BLE001 - a missing or damaged cache is rebuilt from the records
        return None
    n = COUNTS[split]
    if images.shape != (n, *IMAGE_SHAPE) or images.dtype != np.uint8 or labels.shape != (n,):
        return None
    return images, labels.astype(np.int32)


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    except OSError as e:  # a read-only data dir still loads, only slower next time
        _log.warning("Could not write the numpy cache %s: %s", path, e)
        tmp.unlink(missing_ok=True)


def load(split: str, *, manual_dir: str | os.PathLike | None = None,
         data_dir: str | os.PathLike | None = None,
         download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """'train' (60k) | 'test' (10k) -> images uint8 [N, 28, 28], labels int32 [N] (read-only).

    Prepares the dataset first if needed (``prepare``'s arguments); the records are read with
    ``tfds.data_source`` once, then come from the numpy cache.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown Fashion-MNIST split {split!r}; expected one of {SPLITS}.")
    data_dir = prepare(data_dir=data_dir, manual_dir=manual_dir, download=download)
    key = (data_dir, split)
    with _MEMORY_LOCK:
        if key in _MEMORY:
            return _MEMORY[key]
        cache = _version_dir(data_dir) / f"numpy-{split}.npz"
        arrays = _read_cache(cache, split)
        if arrays is None:
            arrays = _read_records(data_dir, split)
            _write_cache(cache, *arrays)
        for a in arrays:
            a.setflags(write=False)
        _MEMORY[key] = arrays
        return arrays
