"""End to end: pretrain the smoke base, then QLoRA-fine-tune it with the launcher
(configs/finetune_shakespeare.py); the clear errors of a missing or wrong base checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest

from research.core.config import ConfigError
from tests.e2e import launch

PRETRAIN = "configs/finetune_shakespeare_pretrain.py:smoke"
FINETUNE = "configs/finetune_shakespeare.py:method=qlora,rank=2,smoke"


def test_pretrain_then_qlora_finetune(tmp_path, shakespeare_env):
    from research.tasks.finetune import FinetuneTask
    from configs.finetune_shakespeare import get_config

    base, ft = tmp_path / "base", tmp_path / "ft"
    r = launch(base, config=PRETRAIN)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(ft, f"--config.finetune.base_workdir={base}", config=FINETUNE)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["step"] == 4 and np.isfinite(summary["val/loss"])
    config = get_config("method=lora,smoke")
    config.finetune.base_workdir = str(ft)        # a fine-tuning run, not a pretraining one
    with pytest.raises(ConfigError, match="made by task 'finetune'.*needs an 'lm' pretraining run"):
        FinetuneTask(config)
    config.finetune.base_workdir = str(tmp_path / "none")
    with pytest.raises(ConfigError, match="holds no checkpoints"):
        FinetuneTask(config)
