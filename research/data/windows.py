"""Random-window batches over a token array, from a seeded sampler whose state is two integers.

The batch for step ``i`` depends only on ``(seed, i)`` (a Philox stream keyed on both), so saving
``{'seed', 'step'}`` with a checkpoint restores the exact data order, whatever the number of
processes: every process builds the same global batch and feeds its own rows.
"""
from __future__ import annotations

import numpy as np


class WindowSampler:
    """Yields ``{'inputs': [B, T], 'targets': [B, T]}`` int32 windows (targets shifted by one)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int = 0):
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"The token array ({len(tokens)} tokens) is shorter than a window of seq_len + 1 ="
                f" {seq_len + 1}; use a shorter config.model.max_len or more data.")
        self.tokens = np.asarray(tokens, np.int32)
        self.batch_size, self.seq_len, self.seed, self.step = batch_size, seq_len, seed, step
        self._offsets = np.arange(seq_len + 1)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        windows = self.tokens[starts[:, None] + self._offsets]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"seed": int(self.seed), "step": int(self.step)}

    def set_state(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"Data iterator state has seed {state['seed']}, config has {self.seed}")
        self.step = int(state["step"])
