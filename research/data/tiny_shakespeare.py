"""Tiny Shakespeare (Karpathy's char-rnn ``input.txt``) as a tfds dataset, without TensorFlow.

The builder ``tiny_shakespeare_chars`` (version 1.0.0) writes ``array_record`` files that are read
back with ``tfds.data_source``; neither step imports TensorFlow. Each split is ONE example with a
single ``text`` feature of type ``tfds.features.Text``: the whole split as a string. ``Text`` encodes
and decodes without TensorFlow in tfds 4.9.10 (it is stored as a bytes feature); reading it back
through ``tfds.data_source`` yields UTF-8 ``bytes``, which ``load_text`` decodes to ``str``.

Splits follow nanoGPT's ``shakespeare_char``: with ``n = len(text)``, ``train = text[:int(n*0.9)]``
(1,003,854 characters) and ``validation = text[int(n*0.9):]`` (111,540 characters).

Where the source text comes from, in order:

1. ``<manual_dir>/input.txt``, ``manual_dir`` being the argument (``config.data.manual_dir``), else
   the environment variable ``RESEARCH_SHAKESPEARE_DIR``, else tfds's ``<data_dir>/downloads/manual``;
2. a download of ``URL`` through the tfds download manager (never when ``download=False``).

Either way the bytes must have sha256 ``SHA256``, or ``ChecksumMismatchError`` is raised. When
neither source works, ``DataNotFoundError`` says how to fix it. Offline the download fails within
``CONNECT_TIMEOUT_S`` seconds: one plain TCP connect is tried first, because tfds's downloader
retries an unreachable host for minutes.

Prepared data lives in ``data_dir``: the argument, else ``RESEARCH_DATA_DIR``, else tfds's default
(``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). tfds prepares into ``incomplete.XXXXXX_1.0.0`` and
renames it to ``1.0.0`` when done; ``prepare`` adds an exclusive ``flock`` so that racing processes
prepare once, and deletes what a crashed preparation left behind.

Example::

    text = load_all_text(manual_dir="/work/shared/data/tinyshakespeare")  # the whole file
    train, val = load_text("train"), load_text("validation")
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds

NAME = "tiny_shakespeare_chars"
CANONICAL_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")
URL = CANONICAL_URL  # what gets downloaded; tests point it at an unreachable address
FILENAME = "input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SPLITS = ("train", "validation")
TRAIN_FRACTION = 0.9
FILE_FORMAT = "array_record"
MANUAL_DIR_ENV = "RESEARCH_SHAKESPEARE_DIR"
DATA_DIR_ENV = "RESEARCH_DATA_DIR"
CONFIG_KEY = "config.data.manual_dir"
CONNECT_TIMEOUT_S = 5.0

_log = logging.getLogger(__name__)


class DataNotFoundError(RuntimeError):
    """No usable source text: not in ``manual_dir`` and not downloadable."""


class ChecksumMismatchError(DataNotFoundError):
    """The source text's sha256 is not ``SHA256``: a wrong or corrupted ``input.txt``."""


def split_text(text: str) -> dict[str, str]:
    """nanoGPT's split: the first 90% of the characters are 'train', the rest 'validation'."""
    cut = int(len(text) * TRAIN_FRACTION)
    return {"train": text[:cut], "validation": text[cut:]}


_FIX_HINT = (f"Fix: save {CANONICAL_URL} as '{FILENAME}' in a directory and set {CONFIG_KEY} "
             f"(or the environment variable {MANUAL_DIR_ENV}) to that directory, "
             "or run with network access.")


def _check_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raises OSError quickly unless ``url``'s host (or its HTTP(S) proxy) accepts a connection."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    if not host:
        raise OSError(f"no host in URL {url!r}")
    with socket.create_connection((host, port), timeout=timeout):
        pass


def _verify_sha256(data: bytes, source: str | os.PathLike) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != SHA256:
        raise ChecksumMismatchError(
            f"{source} is not the tiny Shakespeare text: its sha256 is {actual} ({len(data)} "
            f"bytes), expected {SHA256} (1115394 bytes, the canonical file {CANONICAL_URL}).")


class TinyShakespeareChars(tfds.core.GeneratorBasedBuilder):
    """Tiny Shakespeare raw text with nanoGPT's 90/10 character split; one example per split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Whole-split text in one example; array_record; no TensorFlow."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Optional: save {CANONICAL_URL} as '{FILENAME}' in manual_dir to prepare offline.")

    # When False, `_split_generators` never uses the network (`prepare(download=False)`).
    allow_download: bool = True

    def __init__(self, *, file_format: str | None = FILE_FORMAT, **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=("40,000 lines of Shakespeare (char-rnn). Each split is one example whose "
                         "'text' is the split's whole text; train = the first 90% of characters."),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://github.com/karpathy/char-rnn",
            citation=("@misc{karpathy2015charrnn, author={Andrej Karpathy}, title={char-rnn}, "
                      "year={2015}, howpublished={\\url{https://github.com/karpathy/char-rnn}}}"),
        )

    def _source_path(self, dl_manager: tfds.download.DownloadManager) -> Path:
        """``<manual_dir>/input.txt`` if present, else the downloaded file, else raises."""
        try:
            manual_dir = Path(dl_manager.manual_dir)
        except AssertionError:  # tfds's way of saying: manual_dir unset, missing or empty
            manual_dir = None
        if manual_dir is not None and (manual_dir / FILENAME).is_file():
            return manual_dir / FILENAME
        where = f"no '{FILENAME}' in manual_dir {getattr(dl_manager, '_manual_dir', None)}"
        url = URL  # read at call time, so that it can be patched
        if not self.allow_download:
            raise DataNotFoundError(f"Tiny Shakespeare text not found: {where}, and downloading "
                                    f"is disabled (download=False). {_FIX_HINT}")
        try:
            _check_reachable(url)
            return Path(dl_manager.download(url))
        except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
            raise DataNotFoundError(
                f"Tiny Shakespeare text not found: {where}, and downloading {url} failed "
                f"({type(e).__name__}: {e}). {_FIX_HINT}") from e

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        path = self._source_path(dl_manager)
        data = path.read_bytes()
        _verify_sha256(data, path)
        splits = split_text(data.decode("utf-8"))
        return {name: self._generate_examples(text) for name, text in splits.items()}

    def _generate_examples(self, text: str):
        yield 0, {"text": text}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """``data_dir``, else ``$RESEARCH_DATA_DIR``, else tfds's default data dir."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or tfds.core.constants.DATA_DIR
    return os.fspath(Path(chosen).expanduser())


def resolve_manual_dir(manual_dir: str | os.PathLike | None = None) -> str | None:
    """``manual_dir``, else ``$RESEARCH_SHAKESPEARE_DIR``, else None (tfds's default)."""
    chosen = manual_dir or os.environ.get(MANUAL_DIR_ENV)
    return os.fspath(Path(chosen).expanduser()) if chosen else None


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path``; the OS releases it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_prepared(version_dir: Path) -> bool:
    return (version_dir / "dataset_info.json").is_file()


def _remove_leftovers(version_dir: Path) -> None:
    """Deletes a crashed preparation's temp dirs, and a version dir without dataset_info.json."""
    prefix = tfds.core.constants.INCOMPLETE_PREFIX
    for stale in version_dir.parent.glob(f"{prefix}*_{version_dir.name}"):
        _log.warning("Removing the leftover of an interrupted preparation: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if version_dir.exists() and not _is_prepared(version_dir):
        _log.warning("Removing an incomplete dataset dir (no dataset_info.json): %s", version_dir)
        shutil.rmtree(version_dir)


def prepare(*, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None, download: bool = True) -> str:
    """Prepares the dataset in ``data_dir`` unless it is there already; returns that data_dir.

    Args:
      data_dir: the tfds data dir; see ``resolve_data_dir``.
      manual_dir: a directory holding ``input.txt``; see ``resolve_manual_dir``.
      download: if False, never use the network: prepare from ``manual_dir`` only.

    Raises:
      DataNotFoundError: no usable source text; the message says how to provide it.
      ChecksumMismatchError: the source text has the wrong sha256.
    """
    data_dir = resolve_data_dir(data_dir)
    version_dir = Path(data_dir) / NAME / str(TinyShakespeareChars.VERSION)
    if _is_prepared(version_dir):
        return data_dir
    with _exclusive_lock(version_dir.parent / ".prepare.lock"):
        if _is_prepared(version_dir):  # another process prepared it while we waited
            return data_dir
        _remove_leftovers(version_dir)
        builder = TinyShakespeareChars(data_dir=data_dir)
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


def load_text(split: str, *, data_dir: str | os.PathLike | None = None,
              manual_dir: str | os.PathLike | None = None, download: bool = True) -> str:
    """Returns the text of ``split`` ('train' or 'validation'), preparing the dataset if needed.

    The arguments are ``prepare``'s; the text is read back with ``tfds.data_source``.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown tiny Shakespeare split {split!r}; expected one of {SPLITS}.")
    data_dir = prepare(data_dir=data_dir, manual_dir=manual_dir, download=download)
    source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                              builder_kwargs={"file_format": FILE_FORMAT})
    text = source[0]["text"]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def load_all_text(*, data_dir: str | os.PathLike | None = None,
                  manual_dir: str | os.PathLike | None = None, download: bool = True) -> str:
    """Train + validation text, i.e. the whole file (to build the character vocabulary from)."""
    kwargs = dict(data_dir=data_dir, manual_dir=manual_dir, download=download)
    return "".join(load_text(split, **kwargs) for split in SPLITS)
