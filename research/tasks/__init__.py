"""Objectives. ``get(name)`` returns the task class registered under ``config.task``."""
from __future__ import annotations

import importlib

from research.core.config import ConfigError

_REGISTRY = {
    "lm": "research.tasks.lm:LMTask",
    "mlm": "research.tasks.mlm:MLMTask",
    "seq2seq": "research.tasks.seq2seq:Seq2SeqTask",
    "classify": "research.tasks.classify:ClassifyTask",
    "clip": "research.tasks.clip:ClipTask",
    "finetune": "research.tasks.finetune:FinetuneTask",
    "sft": "research.tasks.sft:SFTTask",
    "reward": "research.tasks.reward:RewardTask",
    "dpo": "research.tasks.dpo:DPOTask",
    "ppo": "research.tasks.ppo:PPOTask",
    "ddpm": "research.tasks.ddpm:DDPMTask",
    "vq": "research.tasks.vq:VQTask",
    "ldm": "research.tasks.ldm:LDMTask",
    "unclip": "research.tasks.unclip:UnclipTask",
    "noisy_classify": "research.tasks.noisy_classify:NoisyClassifyTask",
}


def get(name: str):
    if name not in _REGISTRY:
        raise ConfigError(f"config.task={name!r} is not a known task; known: {sorted(_REGISTRY)}")
    module, _, cls = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)
