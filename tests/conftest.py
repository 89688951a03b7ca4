"""Shared fixtures. The tests read the real tiny Shakespeare file from ``../shared/data`` (beside
the repository, as on the project's machines and in CI); a user elsewhere points
``RESEARCH_SHAKESPEARE_DIR`` at a folder holding ``input.txt``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE_DIR = Path(os.environ.get("RESEARCH_SHAKESPEARE_DIR",
                                      REPO.parent / "shared" / "data" / "tinyshakespeare"))


@pytest.fixture(scope="session")
def shakespeare_env(tmp_path_factory):
    """Environment for runs that read tiny Shakespeare: the local copy and a prepared tfds dir."""
    if not (SHAKESPEARE_DIR / "input.txt").exists():
        pytest.fail(f"{SHAKESPEARE_DIR / 'input.txt'} is missing: set RESEARCH_SHAKESPEARE_DIR "
                    "to a folder holding tiny Shakespeare's input.txt.")
    data_dir = tmp_path_factory.mktemp("tfds")
    env = {"RESEARCH_SHAKESPEARE_DIR": str(SHAKESPEARE_DIR), "RESEARCH_DATA_DIR": str(data_dir)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


FASHION_MNIST_DIR = Path(os.environ.get("RESEARCH_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="session")
def fashion_mnist_env(tmp_path_factory):
    """Environment for runs that read Fashion-MNIST: the local idx files (Debian's package
    ``dataset-fashion-mnist``, or ``RESEARCH_FASHION_MNIST_DIR``) and a tfds dir where the dataset
    is prepared and its numpy cache written once per session (so launched subprocesses only read)."""
    from research.data import fashion_mnist

    names = [f for pair in fashion_mnist.FILES.values() for f in pair]
    missing = [n for n in names if not (FASHION_MNIST_DIR / n).exists()
               and not (FASHION_MNIST_DIR / n.removesuffix(".gz")).exists()]
    if missing:
        pytest.fail(f"Fashion-MNIST files {missing} are missing from {FASHION_MNIST_DIR}: run "
                    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
                    "RESEARCH_FASHION_MNIST_DIR to a folder holding the four idx .gz files.")
    data_dir = tmp_path_factory.mktemp("tfds_fashion_mnist")
    env = {"RESEARCH_FASHION_MNIST_DIR": str(FASHION_MNIST_DIR), "RESEARCH_DATA_DIR": str(data_dir)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for split in fashion_mnist.SPLITS:
        fashion_mnist.load(split, data_dir=str(data_dir), download=False)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
