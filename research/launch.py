"""The single launcher for every experiment, on CPU, GPU or TPU, one host or many.

    python -m research.launch --config configs/gpt_shakespeare_char.py[:size=baby,smoke] \
        --workdir DIR [--config.total_steps=300 ...]

Multi-host: pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on each host
(or ``--multihost`` where JAX detects the cluster itself: TPU pods, SLURM, Open MPI).
Running the same command again with the same workdir resumes from the newest checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import sys

from absl import flags, logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as _config_flags_impl

from research.core.config import ConfigError, all_keys, unknown_override_error

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a get_config(arg) file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_COORD = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_AUTO = flags.DEFINE_bool("multihost", False, "Multi-host with cluster auto-detection.")


def parse_flags(argv: list[str]) -> None:
    """Parse flags; unknown ``--config.KEY`` overrides and bad values give one clear error."""
    check_override_keys(argv)
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(_without_traceback(str(e)).replace("flag --", "--")) from None


def _without_traceback(message: str) -> str:
    """ml_collections puts the config file's whole traceback into its error message (``Error
    whilst parsing config file: Traceback ...``); keep only the final exception's message."""
    head, sep, tb = message.rpartition("Traceback (most recent call last):")
    if not sep:
        return message
    lines = tb.splitlines()
    start = next((i for i, line in enumerate(lines[1:], 1) if line and not line[0].isspace()),
                 len(lines))
    text = "\n".join(lines[start:]).strip()
    text = re.sub(r"^[\w.]*(Error|Exception|Exit): ", "", text)  # 'pkg.ConfigError: msg' -> msg
    head = head.split("Error whilst parsing config file:")[0].rstrip()
    return f"{head} {text}" if head else text


def check_override_keys(argv: list[str]) -> None:
    """Name an unknown ``--config.KEY`` and its close matches before ml_collections' traceback."""
    overrides = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is not None and not os.path.isfile(path.split(":", 1)[0]):
        raise ConfigError(f"--config={path}: no such file {path.split(':', 1)[0]!r}.")
    if not overrides or path is None:
        return
    try:
        config = _config_flags_impl.ConfigFileFlagParser(name="config").parse(path)
    except Exception as e:  # noqa: BLE001 - a broken config file is a user error too
        raise ConfigError(f"--config={path}: {_without_traceback(str(e))}") from None
    known = set(all_keys(config))
    for key in overrides:
        key = key[len("config."):]
        if key not in known:
            raise unknown_override_error(config, key)


def main(argv: list[str]) -> int:
    parse_flags(argv)
    if _CONFIG.value is None or not _WORKDIR.value:
        raise ConfigError("Both --config=configs/X.py[:arg] and --workdir=DIR are required.")
    from research.core.runtime import tune_host_allocator
    tune_host_allocator()
    import jax  # after flags, so XLA_FLAGS set by the user are honoured

    from research.core.mesh import maybe_initialize_distributed
    maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value, _AUTO.value)

    from research import tasks
    from research.core import train

    config = _CONFIG.value
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        print(config, flush=True)
        config_path = os.path.join(workdir, "config.json")
        if not _has_checkpoints(workdir) or not os.path.exists(config_path):
            _write_config(workdir, config)  # else only once train.run accepted them (below)
    task = tasks.get(config.task)(config)
    # A task that needs its own loop names it (PPO: rollouts between rounds of updates).
    loop = getattr(task, "train_loop", None) or train.run
    summary = loop(config, task, workdir)
    if jax.process_index() == 0:
        _write_config(workdir, config)
        print(json.dumps(summary), flush=True)
    return 0


def _has_checkpoints(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a finished checkpoint (a directory named by a step).
    Its config.json then describes those checkpoints' model: a run that train.run refuses (another
    model) must not overwrite it, or ``research.sample`` would build the wrong model."""
    ckdir = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckdir) and any(name.isdigit() for name in os.listdir(ckdir))


def _write_config(workdir: str, config) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))


def run_cli(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        return main(argv)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - data and checkpoint errors are user-facing too
        from research.core.checkpoint import CheckpointError
        from research.core.train import NonFiniteLossError
        from research.data.fashion_mnist import DataNotFoundError as FashionMnistNotFoundError
        from research.data.tiny_shakespeare import DataNotFoundError
        if isinstance(e, (CheckpointError, NonFiniteLossError, DataNotFoundError,
                          FashionMnistNotFoundError)):
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(run_cli())
