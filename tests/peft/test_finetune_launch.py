"""End to end: QLoRA-fine-tune a pretrained base with the launcher (configs/finetune_shakespeare.py),
export its adapter-only file and load it onto the base checkpoint; the clear errors of a missing or
wrong base checkpoint. The base is the session's shared smoke run of the lm task
(``tests.e2e.smoke_run``: configs/finetune_shakespeare_pretrain.py is that config with
``data.train_range``, checked below without a second launch)."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from tests.e2e import launch, smoke_run

FINETUNE = "configs/finetune_shakespeare.py:method=qlora,rank=2,smoke"


def test_pretrain_config_holds_out_the_later_plays():
    from configs.finetune_shakespeare_pretrain import PRETRAIN_RANGE, get_config
    from research.tasks.lm import slice_text
    assert get_config("smoke").data.train_range == PRETRAIN_RANGE == (0.0, 0.8)
    assert get_config("smoke").task == "lm"
    text = "".join(chr(65 + i % 26) for i in range(1000))
    assert slice_text(text, (0.0, 0.8)) + slice_text(text, (0.8, 1.0)) == text
    assert len(slice_text(text, (0.8, 1.0))) == 200 and slice_text(text, None) == text
    with pytest.raises(ConfigError, match="train_range"):
        slice_text(text, (0.8, 0.2))


def test_qlora_finetune_export_adapters_onto_the_base(tmp_path_factory, tmp_path, shakespeare_env):
    from configs.finetune_shakespeare import get_config
    from research.peft import lora
    from research.tasks.finetune import FinetuneTask, export_adapters, load_base

    base = smoke_run(tmp_path_factory)[0]
    ft = tmp_path / "ft"
    r = launch(ft, f"--config.finetune.base_workdir={base}", config=FINETUNE)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((ft / "summary.json").read_text())
    assert summary["step"] == 4 and np.isfinite(summary["val/loss"])

    # The adapter-only file: small, fits the base checkpoint, trained (B moved from 0).
    out = tmp_path / "adapters.npz"
    size = export_adapters(str(ft), str(out))
    _, _, base_params = load_base(str(base))
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(base_params))
    assert size < base_bytes / 20, (size, base_bytes)
    ad, cfg = lora.load(str(out), base_params)
    assert cfg.rank == 2 and sorted(lora.by_layer(ad)) == sorted(
        f"layer_{i}/attn/{k}" for i in range(2) for k in ("query", "value"))
    assert all(np.abs(np.asarray(a["lora_b"])).max() > 0 for a in lora.by_layer(ad).values())

    # Loaded onto the (NF4) base, merged into the kernels, the plain model gives the fine-tuned
    # model's logits: merge = zero extra latency at inference.
    config = get_config("method=qlora,rank=2,smoke")
    config.finetune.base_workdir = str(base)
    task = FinetuneTask(config)
    params = nn.meta.unbox(task.init(jax.random.key(0)))
    params["lora"] = ad
    tokens = jnp.asarray(task.eval_batches(2)[0]["inputs"])
    tuned = task.logits(params, tokens)
    merged = lora.merge(task.base_params(params), ad, cfg)
    np.testing.assert_allclose(task.model.apply({"params": merged}, tokens), tuned,
                               atol=1e-4, rtol=1e-4)

    config.finetune.base_workdir = str(ft)        # a fine-tuning run, not a pretraining one
    with pytest.raises(ConfigError, match="made by task 'finetune'.*needs an 'lm' pretraining run"):
        FinetuneTask(config)
    config.finetune.base_workdir = str(tmp_path / "none")
    with pytest.raises(ConfigError, match="holds no checkpoints"):
        FinetuneTask(config)
