"""The task interface the generic loop (``research.core.train``) relies on. Keep it small.

A task owns its model, its data and its objective:
- ``init(rng)``: parameters, with logical axis names (Flax ``LogicallyPartitioned`` boxes);
- ``loss(params, batch, rng, train)``: ``(scalar, metrics dict)``, pure and jittable;
- ``train_data(seed, batch_size)``: an iterator of global numpy batches with
  ``get_state()``/``set_state()`` so its position is checkpointed;
- ``eval_batches(batch_size)``: a fixed list of evaluation batches;
- ``summarize_eval(means)``: adds derived metrics (e.g. perplexity) to averaged eval metrics;
- optionally ``evaluate(params, step, workdir)``: the task's own measures at every eval step
  (accuracy, zero-shot, sample grids written into ``workdir``; None on processes other than 0),
  merged into the eval metrics;
- ``meta()``: JSON saved with every checkpoint (task, model config, tokenizer...); the ``task`` and
  ``model`` entries must match to resume;
- ``trainable(params)``: True where a parameter trains (default: everything);
- ``tokens_per_example`` and ``flops_per_example`` for throughput and MFU.
"""
from __future__ import annotations

from typing import Any


class Task:
    name = "task"
    tokens_per_example: int = 1
    flops_per_example: float = 0.0

    def init(self, rng) -> Any:
        raise NotImplementedError

    def loss(self, params, batch, rng, train: bool = True):
        raise NotImplementedError

    def train_data(self, seed: int, batch_size: int):
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> list:
        return []

    def summarize_eval(self, means: dict[str, float]) -> dict[str, float]:
        return means

    def meta(self) -> dict:
        return {"task": self.name}

    trainable = None  # or a callable params -> bool tree
