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
