"""Orbax checkpoints of the whole training state, with auto-resume and safety checks.

One ``CheckpointManager`` under ``WORKDIR/checkpoints`` holds three items per step:
``state`` (params, optimizer state, step, rng; sharded arrays), ``data`` (the data iterator's state,
JSON) and ``meta`` (the task, model config and anything the task needs to rebuild itself, e.g. the
tokenizer's vocabulary; JSON). It keeps the last ``keep`` checkpoints plus the best by ``val/loss``.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or a
full disk mid-save leaves the previous checkpoints intact; restore skips unfinished ones and, if the
newest finished one cannot be read, falls back to the one before it with a warning.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from research.core.config import ConfigError

log = logging.getLogger(__name__)
ITEMS = ("state", "data", "meta")
BEST_METRIC = "val/loss"


class CheckpointError(RuntimeError):
    pass


class _NoMissingMetricWarning(logging.Filter):
    """Checkpoints between evaluations have no val/loss by design; Orbax warns at every one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMissingMetricWarning())


def _policy(keep: int):
    cm = ocp.checkpoint_managers
    return cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        cm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True, read_only=False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
            save_interval_steps=0 if read_only else 1,
            preservation_policy=None if read_only else _policy(keep),
            # best_fn makes Orbax write the metrics with each step (the BestN policy reads them).
            best_fn=lambda m: m[BEST_METRIC], best_mode="min")
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # -- queries ----------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        best, best_val = None, None
        for step in self.all_steps():
            metrics = self.manager.metrics(step)
            if metrics and BEST_METRIC in metrics:
                if best_val is None or metrics[BEST_METRIC] < best_val:
                    best, best_val = step, metrics[BEST_METRIC]
        return best

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    # -- save / restore ---------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, meta: dict,
             metrics: dict[str, float] | None = None, force: bool = False) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restore ``(step, state, data_state)``; newest readable checkpoint if ``step`` is None."""
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        errors = []
        for s in steps:
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
                if errors:
                    log.warning("Restored step %d; newer checkpoints were unreadable: %s", s, errors)
                return s, restored["state"], dict(restored["data"])
            except Exception as e:  # noqa: BLE001 - try the previous checkpoint
                errors.append(f"step {s}: {type(e).__name__}: {str(e)[:300]}")
                log.warning("Could not restore checkpoint step %d (%s); trying an older one.", s, e)
        raise CheckpointError(
            f"No readable checkpoint in {self.directory}:\n  " + "\n  ".join(errors))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# Meta entries that must be equal to resume: the objective, the architecture, and the vocabulary
# (two tokenizers of one size map text to different ids: the embeddings would be meaningless).
COMPARED = ("task", "model", "tokenizer", "param_layout")


def _tokenizer_diff(a: Any, b: Any) -> str:
    def describe(t):
        if not isinstance(t, dict):
            return repr(t)
        size = len(t.get("chars", "")) if "chars" in t else t.get("vocab_size", "?")
        return f"{t.get('type', '?')} tokenizer ({size} symbols)"
    same = describe(a) == describe(b)
    return (f"tokenizer: checkpoint {describe(a)} vs config {describe(b)}"
            + (" with a different vocabulary" if same else ""))


def check_compatible(saved: dict, current: dict, directory: str) -> None:
    """Refuse to resume (or overwrite) a checkpoint made for another task, model or vocabulary."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key in COMPARED and saved.get(key) != current.get(key):
            a, b = saved.get(key), current.get(key)
            if key == "tokenizer":  # a vocabulary is too long to print: say what differs
                diffs.append(_tokenizer_diff(a, b))
            elif key == "param_layout":  # blocks stacked per pipeline stage, or not
                diffs.append(f"param_layout: checkpoint {a!r} vs config {b!r} (the blocks are "
                             "stored per pipeline stage: resume with the same "
                             "config.mesh.pipeline; research.sample reads either layout)")
            elif isinstance(a, dict) and isinstance(b, dict):
                diffs += [f"{key}.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}"
                          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            else:
                diffs.append(f"{key}: checkpoint {a!r} vs config {b!r}")
    if diffs:
        raise ConfigError(
            f"The workdir's checkpoints ({directory}) were made for a different model and will not "
            "be resumed or overwritten:\n  " + "\n  ".join(diffs) +
            "\nUse a new --workdir, or make the config match the checkpoint.")


def abstract_with_shardings(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)


def to_jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
