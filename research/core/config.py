"""Config helpers: ``parse_arg`` for ``get_config(arg)`` files and validation with clear errors.

Config files follow big_vision: ``get_config(arg)`` where ``arg`` is the string after the colon in
``--config configs/x.py:size=baby,smoke``. ``parse_arg(arg, size='default', smoke=False)`` turns it
into a ConfigDict, typed by the defaults; a bare word (``smoke``) sets a bool to True.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable

import ml_collections


class ConfigError(ValueError):
    """A user's config mistake; the message names the key and the fix."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(dict(defaults))
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ConfigError(
                f"Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}"
                + _did_you_mean(key, defaults))
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"Config argument {key!r} needs a value: {key}=...")
            out[key] = True
            continue
        out[key] = _coerce(key, value, default)
    return out


def sibling_config(config_file: str, name: str):
    """The config module ``name``.py beside ``config_file`` (a config that extends another one),
    loaded by path so it works whatever the working directory."""
    import importlib.util
    from pathlib import Path

    path = Path(config_file).resolve().with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _coerce(key: str, value: str, default: Any) -> Any:
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"Config argument {key}={value!r}: expected true/false.")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(value)
        except ValueError:
            raise ConfigError(
                f"Config argument {key}={value!r}: expected {type(default).__name__}.") from None
    return value


def _did_you_mean(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=3, cutoff=0.6)
    return f". Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        keys.append(path)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, path + "."))
    return keys


def unknown_override_error(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    return ConfigError(
        f"Unknown config key {key!r}" + _did_you_mean(key, all_keys(config)))


def require(config: ml_collections.ConfigDict, key: str, check: Callable[[Any], bool],
            expected: str) -> None:
    """Raise ConfigError unless ``check(config[key])`` holds; ``key`` is dotted."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, ml_collections.ConfigDict) or part not in value:
            raise ConfigError(f"Missing config key {key!r}: expected {expected}.")
        value = value[part]
    try:
        ok = check(value)
    except Exception:  # noqa: BLE001 - a failing check means a bad value
        ok = False
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is invalid: expected {expected}.")


def validate_train_config(config: ml_collections.ConfigDict) -> None:
    """Checks of the keys the generic loop reads; tasks validate their own keys."""
    pos_int = lambda v: isinstance(v, int) and v > 0  # noqa: E731
    require(config, "task", lambda v: isinstance(v, str) and v, "a task name, e.g. 'lm'")
    require(config, "seed", lambda v: isinstance(v, int), "an integer")
    for key in ("total_steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
                "checkpoint_every", "keep_checkpoints"):
        require(config, key, pos_int, "a positive integer")
    require(config, "batch_size", lambda v: v % config.grad_accum_steps == 0,
            f"a multiple of config.grad_accum_steps={config.grad_accum_steps}")
    require(config, "optim.lr", lambda v: v > 0, "a positive learning rate")
    require(config, "optim.warmup_steps", lambda v: 0 <= v <= config.total_steps,
            "between 0 and config.total_steps")
    require(config, "optim.grad_clip", lambda v: v is None or v >= 0, "None or >= 0")
    require(config, "optim.min_lr", lambda v: 0 <= v <= config.optim.lr,
            "between 0 and config.optim.lr")
    if config.get("eval_batch_size") is not None:
        require(config, "eval_batch_size", pos_int, "None (= batch_size) or a positive integer")
