"""Fine-tuning a pretrained language model with a method from config: full fine-tuning, LoRA,
QLoRA (NF4 base + LoRA), prompt tuning or prefix tuning (``research.peft``, ``research.quant``).

Config keys read here (besides the loop's):
- ``config.finetune.base_workdir``: the workdir of a pretraining run of the ``lm`` task (its
  newest checkpoint, or ``config.finetune.base_step``); the model config and tokenizer come from
  that checkpoint's metadata. A missing, unreadable or mismatched checkpoint is a ConfigError.
- ``config.finetune.method``: 'full' | 'lora' | 'qlora' | 'prompt' | 'prefix'.
- ``config.finetune.seq_len``: the window length of the data, the same for every method
  (None = ``max_len - peft.num_virtual``, so that prompt/prefix tokens fit the context).
- ``config.peft``: ``rank``, ``alpha``, ``dropout``, ``rules`` (regexes over parameter paths),
  ``rslora``, ``dora``, ``num_virtual``, ``prompt_init`` ('text' | 'random'), ``prompt_text``,
  ``prefix_hidden``, ``prefix_embed_dim``; ``config.quant``: ``blocksize``, ``double_quant``,
  ``rules`` (the kernels stored as NF4 under 'qlora').
- ``config.data``: as the ``lm`` task; ``train_range`` selects the fine-tuning text (e.g. the
  train text's last 20%, plays the base never saw); evaluation is on the validation split.

Parameters: 'full' trains the base tree itself; the other methods train
``{'base': frozen base, 'lora' | 'prompt' | 'prefix': trainable}`` and ``trainable`` masks the base,
so it gets ``optax.set_to_zero`` and no optimizer state. Under 'qlora' the NF4 kernels are not
parameters at all (integers have no gradient): the task holds them as constants
(``self.frozen``), dequantizes them in the forward pass, and the 'base' tree keeps only the
other (float) leaves: embeddings, norms, unquantized kernels.
"""
from __future__ import annotations

import dataclasses
import os
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from research.core.config import ConfigError
from research.data.windows import WindowSampler
from research.models.transformer import init_caches
from research.peft import lora, prompt
from research.quant import nf4
from research.tasks.base import Task
from research.tasks.lm import LMTask, slice_text

METHODS = ("full", "lora", "qlora", "prompt", "prefix")


def load_base(workdir, step=None):
    """(meta, params) of a pretraining run's checkpoint, with clear errors."""
    import orbax.checkpoint as ocp

    from research.core.checkpoint import Checkpointer
    if not workdir:
        raise ConfigError("config.finetune.base_workdir is not set: point it at the workdir of a "
                          "pretraining run (e.g. configs/finetune_shakespeare_pretrain.py).")
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"config.finetune.base_workdir={workdir!r} holds no checkpoints "
                          f"({directory} is missing); pretrain first.")
    ckpt = Checkpointer(directory, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise ConfigError(f"No finished checkpoint in {directory}; pretrain first.")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ConfigError(f"config.finetune.base_step={step}: {directory} has steps {steps}.")
        meta = ckpt.read_meta(step)
        if meta.get("task") != "lm" or "model" not in meta or "tokenizer" not in meta:
            raise ConfigError(f"The checkpoint in {directory} was made by task "
                              f"{meta.get('task')!r}; fine-tuning needs an 'lm' pretraining run.")
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    return meta, step, jax.tree.map(np.asarray, restored["state"]["params"])


def rebox(boxed, values):
    """The boxed (logically partitioned) tree ``boxed`` with its values replaced by ``values``."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda b, v: b.replace_boxed(v) if is_box(b) else v, boxed, values,
                        is_leaf=is_box)


def check_shapes(expected, got, directory):
    exp = {lora.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    have = {lora.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(got)}
    for k in sorted(set(exp) | set(have)):
        if exp.get(k) != have.get(k):
            raise ConfigError(f"The base checkpoint in {directory} does not match its model "
                              f"config: tensor {k} has shape {have.get(k)} where the model "
                              f"expects {exp.get(k)}.")


class FinetuneTask(Task):
    name = "finetune"

    def __init__(self, config):
        self.config = config
        ft = config.finetune
        self.method = ft.method
        if self.method not in METHODS:
            raise ConfigError(f"config.finetune.method={self.method!r}: expected one of "
                              f"{list(METHODS)}")
        meta, self.base_step, base = load_base(ft.base_workdir, ft.get("base_step"))
        self.base_meta = meta
        from research.data import tiny_shakespeare
        from research.data.tokenizers import tokenizer_from_json
        tokenizer = tokenizer_from_json(meta["tokenizer"])
        data = config.data
        kwargs = dict(data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"))
        texts = {s: tiny_shakespeare.load_text(s, **kwargs) for s in ("train", "validation")}
        texts["train"] = slice_text(texts["train"], data.get("train_range"))
        splits = {s: tokenizer.encode(t) for s, t in texts.items()}
        lm_config = ml_collections.ConfigDict(config.to_dict())
        lm_config.model = ml_collections.ConfigDict(
            {k: v for k, v in meta["model"].items() if k != "vocab_size"})
        self.lm = LMTask(lm_config, tokenizer=tokenizer, splits=splits)
        self.tokenizer = tokenizer
        self.model, self.model_config = self.lm.model, self.lm.model_config
        self._boxed_shape = jax.eval_shape(self.lm.init, jax.random.key(0))
        check_shapes(nn.meta.unbox(self._boxed_shape), base,
                     os.path.join(ft.base_workdir, "checkpoints"))
        self.base = base
        pc = config.peft
        self.num_virtual = pc.num_virtual if self.method in ("prompt", "prefix") else 0
        max_len = self.model_config.max_len
        self.seq_len = ft.get("seq_len") or max_len - pc.num_virtual
        if self.seq_len + self.num_virtual > max_len or self.seq_len < 1:
            raise ConfigError(f"config.finetune.seq_len={self.seq_len} + {self.num_virtual} virtual "
                              f"tokens must fit the base model's context max_len={max_len}.")
        self.tokens_per_example = self.seq_len
        self.flops_per_example = self.lm.flops_per_example * self.seq_len / max_len
        self.frozen = None
        if self.method == "full":
            self.trainable = None  # everything trains (the loop's default)
        if self.method in ("lora", "qlora"):
            self.lora_cfg = lora.LoraConfig(rules=tuple(pc.rules), rank=pc.rank, alpha=pc.alpha,
                                            dropout=pc.dropout, rslora=pc.rslora, dora=pc.dora)
            tokens = jnp.zeros((1, self.seq_len), jnp.int32)
            self.targets = lora.find_targets(
                lambda p: self.model.apply({"params": p}, tokens), base, self.lora_cfg.rules)
        if self.method == "qlora":
            q = config.quant
            quantized = nf4.quantize_tree(base, tuple(q.rules), blocksize=q.blocksize,
                                          double_quant=q.double_quant)
            flat = traverse_util.flatten_dict(quantized, sep="/", is_leaf=lambda k, x: nf4.is_nf4(x))
            self.frozen = {k: v for k, v in flat.items() if nf4.is_nf4(v)}
        if self.method == "prompt":
            self.prompt_cfg = prompt.PromptConfig(num_virtual=pc.num_virtual, init=pc.prompt_init,
                                                  text=pc.prompt_text)
        if self.method == "prefix":
            self.prefix_cfg = prompt.PrefixConfig(num_virtual=pc.num_virtual,
                                                  hidden=pc.prefix_hidden,
                                                  embed_dim=pc.prefix_embed_dim)
            self.template = init_caches(self.model_config, 1, pc.num_virtual)

    # -- parameters --------------------------------------------------------------------------------
    def _base_boxed(self):
        return rebox(self._boxed_shape, jax.tree.map(jnp.asarray, self.base))

    def init(self, rng):
        base = self._base_boxed()
        if self.method == "full":
            return base
        if self.method in ("lora", "qlora"):
            names = {}
            for p, x in jax.tree_util.tree_leaves_with_path(
                    base, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)):
                path = lora.path_str(p)
                if path.endswith("/kernel") and isinstance(x, nn.LogicallyPartitioned):
                    names[path.rpartition("/")[0]] = tuple(x.names)
            adapters = lora.init(rng, self.targets, self.lora_cfg, params=self.base,
                                 kernel_names=names)
            if self.method == "qlora":
                flat = traverse_util.flatten_dict(base, sep="/")
                base = traverse_util.unflatten_dict(
                    {k: v for k, v in flat.items() if k not in self.frozen}, sep="/")
            return {"base": base, "lora": adapters}
        if self.method == "prompt":
            text_ids = self.tokenizer.encode(self.prompt_cfg.text)
            table = jnp.asarray(self.base["token_embed"]["embedding"])
            return {"base": base, "prompt": nn.meta.unbox(prompt.init_prompt(
                rng, table, self.prompt_cfg, text_ids))}
        return {"base": base, "prefix": prompt.init_prefix(rng, self.template, self.prefix_cfg)}

    def trainable(self, params):
        """True under 'lora' / 'prompt' / 'prefix', False under 'base' (frozen: no optimizer
        state). Works on boxed and unboxed trees."""
        return jax.tree_util.tree_map_with_path(
            lambda p, _: lora.path_str(p).split("/")[0] != "base", params)

    def base_params(self, params):
        """The float base params (NF4 kernels dequantized under 'qlora')."""
        if self.method == "full":
            return params
        base = params["base"]
        if self.frozen is not None:
            flat = traverse_util.flatten_dict(base, sep="/")
            flat.update({k: nf4.dequantize(v) for k, v in self.frozen.items()})
            base = traverse_util.unflatten_dict(flat, sep="/")
        return base

    # -- the objective -----------------------------------------------------------------------------
    def logits(self, params, tokens, rng=None):
        """tokens [B, T] -> logits [B, T, V] of the fine-tuned model (rng: dropout; None = eval)."""
        base = self.base_params(params)
        train = rng is not None
        rngs = {"dropout": rng} if train else None

        def run(toks):
            return self.model.apply({"params": base}, toks, deterministic=not train, rngs=rngs)

        if self.method == "full":
            return run(tokens)
        if self.method in ("lora", "qlora"):
            lrng = None if rng is None else jax.random.fold_in(rng, zlib.crc32(b"lora"))
            return lora.apply(run, params["lora"], self.lora_cfg, lrng)(tokens)
        p = self.num_virtual
        if self.method == "prompt":
            out = prompt.prompt_apply(run, params["prompt"])(prompt.pad_tokens(tokens, p))
            return out[:, p:]
        values = prompt.prefix_values(params["prefix"], self.template)
        caches = prompt.prefix_caches(values, tokens.shape[0], p + tokens.shape[1],
                                      self.model_config.compute_dtype)
        out, _ = self.model.apply({"params": base}, tokens, caches, jnp.int32(p), method="decode")
        return out

    def loss(self, params, batch, rng, train: bool = True):
        logits = self.logits(params, batch["inputs"], rng if train else None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return loss, {"loss": loss}

    # -- data and bookkeeping ----------------------------------------------------------------------
    def train_data(self, seed: int, batch_size: int) -> WindowSampler:
        return WindowSampler(self.lm._split("train"), batch_size, self.seq_len, seed)

    def eval_batches(self, batch_size: int) -> list:
        sampler = WindowSampler(self.lm._split("validation"), batch_size, self.seq_len,
                                seed=self.config.seed + 1)
        return [sampler.batch_at(i) for i in range(self.config.eval_batches)]

    def summarize_eval(self, means):
        return self.lm.summarize_eval(means)

    def meta(self) -> dict:
        return {"task": self.name, "model": dataclasses.asdict(self.model_config),
                "tokenizer": self.tokenizer.to_json(), "method": self.method,
                "peft": self.config.peft.to_dict(), "base_workdir": self.config.finetune.base_workdir,
                "base_step": self.base_step}

    def frozen_bytes(self) -> int:
        """Bytes of the constants held outside the parameters (the NF4 kernels under 'qlora')."""
        return sum(v.nbytes() for v in (self.frozen or {}).values())


def export_adapters(workdir: str, out: str) -> int:
    """Write the LoRA adapters of a 'lora'/'qlora' fine-tuning run's newest checkpoint to ``out``
    (``research.peft.lora.save``: an .npz with the adapters and their LoRA config, loadable onto
    the base with ``lora.load(out, base_params)`` and ``lora.merge``). Returns the file's size.

        python -m research.tasks.finetune --workdir workdirs/peft_lora8 --out lora8.npz
    """
    import orbax.checkpoint as ocp

    from research.core.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise ConfigError(f"No checkpoint in {workdir}/checkpoints.")
        meta = ckpt.read_meta(step)
        if meta.get("method") not in ("lora", "qlora"):
            raise ConfigError(f"{workdir} is not a LoRA/QLoRA fine-tuning run "
                              f"(method {meta.get('method')!r}).")
        state = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
    finally:
        ckpt.close()
    p = meta["peft"]
    cfg = lora.LoraConfig(rules=tuple(p["rules"]), rank=p["rank"], alpha=p["alpha"],
                          dropout=p["dropout"], rslora=p["rslora"], dora=p["dora"])
    return lora.save(out, state["params"]["lora"], cfg)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=export_adapters.__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(f"Wrote {args.out}: {export_adapters(args.workdir, args.out):,} bytes.")
