"""Objectives. ``get(name)`` returns the task class registered under ``config.task``."""
from __future__ import annotations

import importlib

from research.core.config import ConfigError

_REGISTRY = {
    "lm": "research.tasks.lm:LMTask",
}


def get(name: str):
    if name not in _REGISTRY:
        raise ConfigError(f"config.task={name!r} is not a known task; known: {sorted(_REGISTRY)}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)
