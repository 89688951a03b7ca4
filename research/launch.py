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
import sys

from absl import flags, logging as absl_logging
from ml_collections import config_flags

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
        raise ConfigError(str(e).replace("flag --", "--")) from None


def check_override_keys(argv: list[str]) -> None:
    """Name an unknown ``--config.KEY`` and its close matches before ml_collections' traceback."""
    overrides = [a[2:].split("=")[0] for a in argv if a.startswith("--config.")]
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if not overrides or path is None:
        return
    try:
        config = config_flags.ConfigFileFlagParser(name="config").parse(path)
    except Exception as e:  # noqa: BLE001 - a broken config file is a user error too
        raise ConfigError(f"Could not load --config={path}: {type(e).__name__}: {e}") from None
    known = set(all_keys(config))
    for key in overrides:
        key = key[len("config."):]
        if key not in known:
            raise unknown_override_error(config, key)


def main(argv: list[str]) -> int:
    parse_flags(argv)
    if _CONFIG.value is None or not _WORKDIR.value:
        raise ConfigError("Both --config=configs/X.py[:arg] and --workdir=DIR are required.")
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
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    task = tasks.get(config.task)(config)
    summary = train.run(config, task, workdir)
    if jax.process_index() == 0:
        print(json.dumps(summary), flush=True)
    return 0


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
        from research.data.tiny_shakespeare import DataNotFoundError
        if isinstance(e, (CheckpointError, NonFiniteLossError, DataNotFoundError)):
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(run_cli())
