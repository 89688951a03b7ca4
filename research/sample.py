"""Sample text from a trained language model's checkpoint, decoding with a KV cache.

    python -m research.sample --workdir DIR --prompt "ROMEO:" --max_new_tokens 500 \
        --temperature 0.8 --top_k 200 [--top_p 0.9] [--greedy] [--seed 0] [--checkpoint best]
"""
from __future__ import annotations

import os
import sys
import time

import ml_collections
from absl import flags

from research.core.config import ConfigError

# Its own flag registry: importing several CLIs into one process (tests) must not collide.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (holds config.json, checkpoints/).", flag_values=FLAGS)
_PROMPT = flags.DEFINE_string("prompt", "\n", "Text to continue.", flag_values=FLAGS)
_N = flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate.", flag_values=FLAGS)
_TEMP = flags.DEFINE_float("temperature", 0.8, "Softmax temperature (> 0).", flag_values=FLAGS)
_TOPK = flags.DEFINE_integer("top_k", None, "Keep only the k most likely tokens.", flag_values=FLAGS)
_TOPP = flags.DEFINE_float("top_p", None, "Nucleus sampling: keep the smallest set with mass >= p.", flag_values=FLAGS)
_GREEDY = flags.DEFINE_bool("greedy", False, "Take the most likely token each step.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_NUM = flags.DEFINE_integer("num_samples", 1, "Independent samples to draw.", flag_values=FLAGS)
_CKPT = flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (lowest val loss) or a step.", flag_values=FLAGS)


def load_model(workdir: str, which: str = "latest"):
    """-> (task, params, step) restored from ``workdir``'s checkpoint ``which``."""
    import jax

    from research import tasks
    from research.core import checkpoint as ckpt_lib, optim, pipeline
    from research.core.mesh import make_mesh
    from research.core.train import build_state
    from research.data.tokenizers import tokenizer_from_json

    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"{config_path} not found: --workdir must be a training run's workdir.")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(__import__("json").load(f))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise ConfigError(f"No checkpoint in {ckpt.directory}; train first.")
    if which == "latest":
        step = steps[-1]
    elif which == "best":
        step = ckpt.best_step()
        if step is None:
            raise ConfigError("No checkpoint has a val/loss yet; use --checkpoint latest.")
    elif which.isdigit() and int(which) in steps:
        step = int(which)
    else:
        raise ConfigError(f"--checkpoint={which!r}: expected 'latest', 'best' or one of {steps}")
    meta = ckpt.read_meta(step)
    if "model" in meta:  # the checkpoint's own model config, whatever config.json says now
        config.model = ml_collections.ConfigDict(meta["model"])
    task = tasks.get(config.task)(config, tokenizer=tokenizer_from_json(meta["tokenizer"]))
    stages = (meta.get("param_layout") or {}).get(pipeline.STAGES_KEY)
    with config.unlocked():  # sampling runs on one device, whatever mesh the run trained on
        config.mesh = ml_collections.ConfigDict({k: 1 for k in config.mesh})
    mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
    _, _, _, abstract, shardings = build_state(task, config, mesh)
    if stages:  # trained as a pipeline: the blocks were saved stacked per stage
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())  # one device
        layers = config.model.num_layers
        abstract = {**abstract, "params": jax.eval_shape(
            lambda p: pipeline.stack_layers(p, layers, stages), abstract["params"])}
        abstract["opt_state"] = jax.eval_shape(optim.build(config, task.trainable)[0].init,
                                               abstract["params"])
        shardings = jax.tree.map(lambda _: sh, abstract)
    _, state, _ = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), step=step)
    ckpt.close()
    return task, pipeline.unstack_layers(state["params"]), step


def main(argv) -> int:
    try:
        FLAGS.unparse_flags()  # defaults again when main runs twice in one process
        FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    if not _WORKDIR.value:
        raise ConfigError("--workdir is required.")
    import jax
    import jax.numpy as jnp

    from research.generate import generate

    task, params, step = load_model(_WORKDIR.value, _CKPT.value)
    prompt = task.tokenizer.encode(_PROMPT.value)
    if len(prompt) == 0:
        raise ConfigError("--prompt must contain at least one character.")
    tokens = jnp.tile(jnp.asarray(prompt, jnp.int32)[None], (_NUM.value, 1))
    t0 = time.perf_counter()
    out = generate(task.model, params, tokens, max_new_tokens=_N.value, rng=jax.random.key(_SEED.value),
                   temperature=_TEMP.value, top_k=_TOPK.value, top_p=_TOPP.value, greedy=_GREEDY.value)
    out = jax.device_get(out)
    dt = time.perf_counter() - t0
    for i, row in enumerate(out):
        if _NUM.value > 1:
            print(f"--- sample {i} ---")
        print(task.tokenizer.decode(row))
    print(f"[checkpoint step {step}; {_N.value * _NUM.value / dt:.0f} tokens/s incl. compile]",
          file=sys.stderr)
    return 0


def run_cli(argv=None) -> int:
    try:
        return main(sys.argv if argv is None else argv)
    except (ConfigError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
