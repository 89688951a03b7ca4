"""Contrastive image-text training (task ``clip``) on Fashion-MNIST with generated captions.

Config keys read here:
- ``config.model``: ``embed_dim`` (the joint space), ``loss`` ('infonce' | 'siglip'), ``lit`` (a
  workdir of a trained ``classify`` ViT or ``clip`` run: LiT, its image tower is loaded and locked;
  None = train both towers), ``image`` (the ViT: ``VitConfig`` + ``TransformerConfig`` fields of
  ``research.models.vit``; ``num_classes`` is forced to None), ``text`` (``TransformerConfig``
  fields and ``causal``; ``max_len`` is the caption length in tokens);
- ``config.data``: ``name`` ('fashion_mnist'), ``manual_dir``, ``data_dir``, ``download``,
  ``flip`` (random horizontal flips), ``crop_pad``, ``word_dropout`` (probability of replacing a
  non-class word of a training caption by [UNK]);
- ``config.zero_shot``: ``classes`` (the class names of the zero-shot classifier, default the ten
  caption names), ``probe_examples`` (training images the linear probe is fitted on),
  ``retrieval_examples`` (test pairs of the retrieval evaluation).

Training batches are (image, caption) pairs: images walk through seeded permutations of the 60k
training images (``EpochBatches`` of the ``classify`` task, state ``{seed, step}``), each caption a
random *training* template filled with the class name and attributes measured on the image
(``research.data.captions``), drawn from ``Philox(seed, step)``, so a resumed run sees the same
captions. Evaluation batches pair the test images with captions from the *held-out* templates.

Metrics. Every eval (the generic loop, over the test set in batches of ``eval_batch_size``):
``val/loss``, ``val/zero_shot_accuracy`` (prompt ensemble over the held-out templates, all test
images), ``val/i2t_recall@1`` etc. within each eval batch. ``evaluate(params, step, workdir)``
adds the full evaluators: retrieval recall@1/5 over ``retrieval_examples`` test pairs (instance
and class level), the linear probe (logistic regression on frozen image-tower features), and
plots ``similarity.png`` (a batch's image-text similarity matrix) and ``accuracy.png`` (accuracy
against steps) into the workdir. The same report for a finished run's checkpoint:

    python -m research.tasks.clip --workdir DIR
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError
from research.data import captions as cap
from research.eval import zero_shot as zs
from research.models import vit as vit_lib
from research.models.clip import LOSSES, ClipModel, contrastive_loss
from research.models.transformer import TransformerConfig, count_params
from research.tasks.base import Task
from research.tasks.classify import EpochBatches, augment, preprocess, standardize

DATASETS = ("fashion_mnist",)


def _configs(model: Mapping[str, Any], vocab_size: int):
    """``config.model`` dict -> (ViT TransformerConfig, VitConfig, text TransformerConfig, causal)."""
    image = {k: v for k, v in dict(model["image"]).items() if k != "name"}
    image["num_classes"] = None
    vcfg, vit = vit_lib.vit_configs_from_dict(image)
    text = dict(model["text"])
    causal = bool(text.pop("causal", True))
    tcfg = TransformerConfig.from_dict(text, vocab_size=vocab_size)
    return vcfg, vit, tcfg, causal


class CaptionBatches(EpochBatches):
    """``EpochBatches`` of images plus a caption per image: ``{'images', 'tokens', 'labels'}``."""

    def __init__(self, images, labels, attrs, tokenizer, batch_size, seed, templates,
                 word_dropout: float = 0.0, class_ids=None, step: int = 0):
        super().__init__(images, labels, batch_size, seed, step)
        self.attrs, self.tokenizer, self.templates = attrs, tokenizer, templates
        self.word_dropout, self.class_ids = word_dropout, class_ids

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices_at(step)
        return caption_batch(self.images, self.labels, self.attrs, idx, self.tokenizer,
                             np.random.Generator(np.random.Philox(key=[self.seed + 7919, step])),
                             self.templates, self.word_dropout, self.class_ids)


def caption_batch(images, labels, attrs, idx, tokenizer, rng, templates, word_dropout=0.0,
                  class_ids=None) -> dict[str, np.ndarray]:
    texts = cap.random_captions(labels[idx], attrs[0][idx], attrs[1][idx], rng, templates)
    tokens = cap.word_dropout(tokenizer.encode_batch(texts), word_dropout, rng, class_ids)
    return {"images": images[idx], "tokens": tokens, "labels": np.asarray(labels[idx], np.int32)}


class ClipTask(Task):
    name = "clip"

    def __init__(self, config, splits: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 lit_params: Any = None):
        """Loads Fashion-MNIST as ``config.data`` says, unless ``splits`` {'train', 'test'} are
        given; ``lit_params``: the locked image tower's params (else read from
        ``config.model.lit``)."""
        self.config = config
        data, m = config.data, config.model
        if data.get("name") not in DATASETS:
            raise ConfigError(f"config.data.name={data.get('name')!r}: expected one of "
                              f"{list(DATASETS)}")
        if m.get("loss", "infonce") not in LOSSES:
            raise ConfigError(f"config.model.loss={m.get('loss')!r}: expected one of {list(LOSSES)}")
        self.loss_kind = m.get("loss", "infonce")
        self.flip, self.crop_pad = bool(data.get("flip", False)), int(data.get("crop_pad", 0))
        self.word_dropout = float(data.get("word_dropout", 0.0) or 0.0)
        if not 0.0 <= self.word_dropout < 1.0:
            raise ConfigError(f"config.data.word_dropout={self.word_dropout!r}: expected [0, 1).")
        self.tokenizer = cap.CaptionTokenizer.build(max_len=m.text.max_len)
        zcfg = config.get("zero_shot") or {}
        try:
            self.class_names = cap.check_class_names(zcfg.get("classes") or cap.CLASS_PHRASES)
        except ValueError as e:
            raise ConfigError(f"config.zero_shot.classes: {e}") from None
        tok = self.tokenizer
        unknown = [n for n in self.class_names
                   if all(i == tok.unk_id for i in tok.encode(n)
                          if i not in (tok.pad_id, tok.eos_id))]
        if unknown:
            raise ConfigError(f"config.zero_shot.classes: {unknown} have no word in the caption "
                              f"vocabulary (the model never read them); known class words: "
                              f"{list(cap.CLASS_PHRASES)}")
        self.probe_examples = int(zcfg.get("probe_examples", 10000))
        self.retrieval_examples = int(zcfg.get("retrieval_examples", 1000))

        self.lit = m.get("lit") or None
        image_model = dict(m.image)
        if self.lit and lit_params is None:
            lit_params, image_model = load_image_tower(self.lit, image_model)
        self.lit_params = lit_params
        self.vcfg, self.vit, self.tcfg, self.causal = _configs(
            {"image": image_model, "text": m.text}, self.tokenizer.vocab_size)
        self.model = ClipModel(vit_lib.ViT(self.vcfg, self.vit), self.tcfg, embed_dim=m.embed_dim,
                               loss=self.loss_kind, text_causal=self.causal,
                               eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        self.model_meta = {"embed_dim": m.embed_dim, "loss": self.loss_kind,
                           "image": {**dataclasses.asdict(self.vit), **_tmeta(self.vcfg)},
                           "text": {**_tmeta(self.tcfg), "max_len": self.tcfg.max_len,
                                    "causal": self.causal}, "lit": self.lit}
        # Zero-shot prompts: [classes * templates, L] tokens of the held-out templates.
        prompts = [cap.fill(t, c) for c in self.class_names for t in cap.HELD_OUT_TEMPLATES]
        self.prompt_tokens = self.tokenizer.encode_batch(prompts)
        self.class_ids = np.unique([i for c in cap.CLASS_PHRASES
                                    for i in self.tokenizer.encode(c) if i > 2]).astype(np.int32)

        self._splits = dict(splits or {})
        if splits is None:
            from research.data import fashion_mnist
            kwargs = dict(manual_dir=data.get("manual_dir"), data_dir=data.get("data_dir"),
                          download=data.get("download", True))
            self._splits = {s: fashion_mnist.load(s, **kwargs) for s in ("train", "test")}
        self._attrs = {s: cap.image_attributes(x) for s, (x, _) in self._splits.items()}
        shapes = jax.eval_shape(self.init, jax.random.key(0))
        self.n_params = count_params(shapes)
        n_img = count_params(shapes["image_encoder"])
        text_flops = self.tcfg.max_len * (6.0 * (self.n_params - n_img) + 12.0 * self.tcfg.num_layers
                                          * self.tcfg.embed_dim * self.tcfg.max_len)
        self.flops_per_example = vit_lib.flops_per_image(self.vcfg, self.vit, n_img) * (
            1 / 3 if self.lit else 1) + text_flops
        self.tokens_per_example = 1  # the progress line's "tok/s" is image-caption pairs per second
        self._history: dict[int, dict] = {}

    # -- model ------------------------------------------------------------------------------------
    def init(self, rng):
        images = jnp.zeros((1, *self.vit.input_shape), jnp.float32)
        params = self.model.init({"params": rng}, images, jnp.asarray(self.prompt_tokens[:1]))
        params = params["params"]
        if self.lit_params is not None:
            params = dict(params)
            params["image_encoder"] = _replace_boxed(params["image_encoder"], self.lit_params)
        return params

    def trainable(self, params):
        """LiT: the image tower is locked; the text tower and both projections train."""
        return {k: jax.tree.map(lambda _: not (self.lit and k == "image_encoder"), v)
                for k, v in params.items()}

    def _images(self, images, rng, train):
        x = preprocess(images)
        if train and (self.crop_pad or self.flip):
            x = augment(x, rng, self.crop_pad, self.flip)
        return standardize(x)

    def embed(self, params, images, tokens, rng=None, train=False):
        """(image_emb, text_emb, scale, bias) for uint8 images and caption tokens."""
        if self.lit:  # no gradient (and no backward pass) through the locked tower
            params = {**params, "image_encoder": jax.lax.stop_gradient(params["image_encoder"])}
        rng = jax.random.key(0) if rng is None else rng
        aug_rng, dropout_rng = jax.random.split(rng)
        return self.model.apply({"params": params}, self._images(images, aug_rng, train), tokens,
                                deterministic=not train,
                                rngs={"dropout": dropout_rng} if train else None)

    def class_embeddings(self, params, class_names=None, templates=cap.HELD_OUT_TEMPLATES):
        """[C, D] zero-shot class embeddings: prompt ensembling over ``templates``."""
        if class_names is None and templates is cap.HELD_OUT_TEMPLATES:
            tokens = self.prompt_tokens
            c = len(self.class_names)
        else:
            names = cap.check_class_names(class_names or self.class_names)
            tokens = self.tokenizer.encode_batch([cap.fill(t, n) for n in names for t in templates])
            c = len(names)
        emb = self.model.apply({"params": params}, jnp.asarray(tokens), method="encode_text")
        return zs.ensemble_class_embeddings(emb.reshape(c, -1, emb.shape[-1]))

    def loss(self, params, batch, rng, train: bool = True):
        img, txt, scale, bias = self.embed(params, batch["images"], batch["tokens"], rng, train)
        loss = contrastive_loss(self.loss_kind, img, txt, scale, bias)
        sim = img @ txt.T
        n = sim.shape[0]
        hit = lambda s, k: jnp.mean(  # noqa: E731 - paired item among the top k
            (jax.lax.top_k(s, k)[1] == jnp.arange(n)[:, None]).any(-1).astype(jnp.float32))
        metrics = {"loss": loss, "temperature": 1.0 / scale, "i2t_recall@1": hit(sim, 1)}
        if bias is not None:
            metrics["bias"] = bias
        if not train:
            cls = self.class_embeddings(params)
            pred = jnp.argmax(img @ cls.T, axis=-1)
            metrics["zero_shot_accuracy"] = jnp.mean((pred == batch["labels"]).astype(jnp.float32))
            metrics["t2i_recall@1"] = hit(sim.T, 1)
            if n >= 5:
                metrics["i2t_recall@5"], metrics["t2i_recall@5"] = hit(sim, 5), hit(sim.T, 5)
        return loss, metrics

    # -- data -------------------------------------------------------------------------------------
    def train_data(self, seed: int, batch_size: int) -> CaptionBatches:
        images, labels = self._split("train")
        return CaptionBatches(images, labels, self._attrs["train"], self.tokenizer, batch_size,
                              seed, cap.TRAIN_TEMPLATES, self.word_dropout, self.class_ids)

    def eval_batches(self, batch_size: int) -> list:
        """The test set in full batches (a remainder smaller than a batch is left out: the
        contrastive loss and in-batch recall need equal batches), captions from the held-out
        templates (seeded)."""
        images, labels = self._split("test")
        rng = np.random.Generator(np.random.Philox(key=[self.config.seed, 12345]))
        return [caption_batch(images, labels, self._attrs["test"],
                              np.arange(s, s + batch_size), self.tokenizer, rng,
                              cap.HELD_OUT_TEMPLATES)
                for s in range(0, len(images) - batch_size + 1, batch_size)]

    def meta(self) -> dict:
        return {"task": self.name, "model": self.model_meta, "tokenizer": self.tokenizer.to_json()}

    def _split(self, split):
        if split not in self._splits:
            raise RuntimeError(f"This ClipTask was built without the {split!r} split.")
        return self._splits[split]

    # -- full evaluation ----------------------------------------------------------------------------
    def features(self, params, images, batch_size: int = 500):
        """(image-tower features [N, W], image embeddings [N, D]) of uint8 images, in batches."""
        if not hasattr(self, "_feat_fn"):
            def f(p, x):
                x = self._images(x, None, False)
                feats = self.model.apply({"params": p}, x, method="image_features")
                return feats, self.model.apply({"params": p}, x, method="encode_image")
            self._feat_fn = jax.jit(f)
        out = [self._feat_fn(params, images[i:i + batch_size])
               for i in range(0, len(images), batch_size)]
        return tuple(np.concatenate([np.asarray(o[j]) for o in out]) for j in range(2))

    def evaluate(self, params, step: int, workdir: str | None = None) -> dict[str, float]:
        """Zero-shot accuracy (all test images), retrieval recall@1/5 over ``retrieval_examples``
        test pairs, the linear probe; plots into ``workdir`` when given."""
        params = jax.device_get(params)
        test_x, test_y = self._split("test")
        train_x, train_y = self._split("train")
        feats, img = self.features(params, test_x)
        cls = np.asarray(self.class_embeddings(params))
        out = {"zero_shot_accuracy": zs.zero_shot_accuracy(img, cls, test_y)}
        n = min(self.retrieval_examples, len(test_x))
        batch = self.eval_batches(n)[0]
        txt = np.asarray(jax.jit(lambda p, t: self.model.apply(
            {"params": p}, t, method="encode_text"))(params, batch["tokens"]))
        out.update(zs.retrieval_metrics(img[:n], txt, test_y[:n], ks=(1, 5)))
        k = min(self.probe_examples, len(train_x))
        probe_feats, _ = self.features(params, train_x[:k])
        probe = zs.linear_probe(probe_feats, train_y[:k], feats, test_y, len(cap.CLASS_PHRASES))
        out["linear_probe_accuracy"] = probe["accuracy"]
        out = {f"eval/{k}": float(v) for k, v in out.items()}
        self._history[int(step)] = out
        if workdir is not None and jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            plot_similarity(img[:12], txt[:12], batch["tokens"][:12], self.tokenizer,
                            os.path.join(workdir, "similarity.png"), step,
                            [cap.CLASS_PHRASES[i] for i in test_y[:12]])
            plot_accuracy(workdir, self._history)
        return out


def _tmeta(cfg: TransformerConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("vocab_size", "max_len")}


def _replace_boxed(boxed, values):
    """The init's (possibly logically boxed) tree with its values replaced by ``values`` (same
    structure); a shape mismatch names the parameter."""
    import flax.linen as nn
    flat_b = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    flat_v = dict(jax.tree_util.tree_flatten_with_path(values)[0])
    out = {}
    for path, leaf in flat_b:
        key = jax.tree_util.keystr(path)
        target = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        match = [v for p, v in flat_v.items() if jax.tree_util.keystr(p) == key]
        if not match or tuple(np.shape(match[0])) != tuple(target.shape):
            raise ConfigError(f"config.model.lit: the checkpoint's image tower has no parameter "
                              f"{key} of shape {tuple(target.shape)}; it was trained with another "
                              "ViT configuration.")
        v = jnp.asarray(match[0], target.dtype)
        out[key] = leaf.replace_boxed(v) if isinstance(leaf, nn.Partitioned) else v
    treedef = jax.tree_util.tree_structure(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return jax.tree_util.tree_unflatten(treedef, [out[jax.tree_util.keystr(p)] for p, _ in flat_b])


def load_image_tower(workdir: str, image_model: dict) -> tuple[Any, dict]:
    """LiT: the image tower of a ``classify`` (ViT) or ``clip`` run's newest checkpoint ->
    (params, the ``config.model.image`` dict that rebuilds it: the checkpoint's ViT settings)."""
    import orbax.checkpoint as ocp

    from research.core import checkpoint as ckpt_lib

    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise ConfigError(f"config.model.lit={workdir!r}: no checkpoint in {ckdir}. Train a ViT "
                          "there first (configs/vit_fashion_mnist.py or a clip config).")
    ckpt = ckpt_lib.Checkpointer(ckdir, read_only=True)
    try:
        meta = ckpt.read_meta(steps[-1])
        restored = ckpt.manager.restore(steps[-1], args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    params = restored["state"]["params"]
    if meta.get("task") == "classify" and meta.get("model", {}).get("name") == "vit":
        image = {k: v for k, v in meta["model"].items() if k != "name"}
        params = {k: v for k, v in params.items() if k != "head"}
    elif meta.get("task") == "clip":
        image, params = dict(meta["model"]["image"]), params["image_encoder"]
    else:
        raise ConfigError(f"config.model.lit={workdir!r} is a {meta.get('task')!r} run; LiT "
                          "needs a 'classify' run with model.name='vit' or a 'clip' run.")
    image.pop("num_classes", None)
    params = jax.tree.map(lambda x: np.asarray(x), params)
    return params, image


# -- plots --------------------------------------------------------------------------------------------
def plot_similarity(img, txt, tokens, tokenizer, path: str, step: int | None = None,
                    image_labels=None) -> str:
    """The cosine-similarity matrix of a batch's images (rows, named by their class) and
    captions (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sim = np.asarray(img) @ np.asarray(txt).T
    n = sim.shape[0]
    fig, ax = plt.subplots(figsize=(10, 8))
    im = ax.imshow(sim, cmap="viridis")
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"image {i}" + (f" ({image_labels[i]})" if image_labels else "")
                        for i in range(n)], fontsize=7)
    ax.set_xticks(range(n))
    ax.set_xticklabels([tokenizer.decode(t) for t in tokens], rotation=60, ha="right", fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=5, color="w")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title("image-caption similarity (held-out templates)"
                 + (f", step {step}" if step is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_accuracy(workdir: str, history: Mapping[int, Mapping[str, float]] | None = None,
                  filename: str = "accuracy.png") -> str | None:
    """Zero-shot accuracy (``val/`` from metrics.jsonl, ``eval/`` from ``history``), linear-probe
    accuracy and retrieval recall@1 against steps."""
    from research.core.metrics import read_jsonl
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        for key in ("val/zero_shot_accuracy", "eval/linear_probe_accuracy",
                    "eval/i2t_recall@1", "eval/t2i_recall@1"):
            if key in r:
                series.setdefault(key, {})[r["step"]] = r[key]
    for step, m in (history or {}).items():
        for key, v in m.items():
            if key in ("eval/zero_shot_accuracy", "eval/linear_probe_accuracy",
                       "eval/i2t_recall@1", "eval/t2i_recall@1"):
                series.setdefault(key.replace("eval/zero", "val/zero"), {})[step] = v
    if not series:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], "o-", markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy / recall")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path = os.path.join(workdir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- a finished run's report ----------------------------------------------------------------------------
def load_clip(workdir: str, step: int | None = None) -> tuple[ClipTask, Any, int]:
    """(task with its data, params, step) from a ``clip`` run's workdir."""
    import ml_collections
    import orbax.checkpoint as ocp

    from research.core import checkpoint as ckpt_lib

    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"{config_path} not found: --workdir must be a clip run's workdir.")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise ConfigError(f"No checkpoint in {ckdir}; train first.")
    step = steps[-1] if step is None else step
    ckpt = ckpt_lib.Checkpointer(ckdir, read_only=True)
    try:
        meta = ckpt.read_meta(step)
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    finally:
        ckpt.close()
    if meta.get("task") != "clip":
        raise ConfigError(f"{workdir} is a {meta.get('task')!r} run, not a 'clip' run.")
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored["state"]["params"])
    with config.unlocked():  # the checkpoint's own tower settings; LiT weights are in params
        config.model.image = ml_collections.ConfigDict(meta["model"]["image"])
        config.model.lit = None
    task = ClipTask(config)
    task.lit = meta["model"].get("lit")
    return task, params, step


def main(argv: list[str]) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m research.tasks.clip",
                                     description="Evaluate a clip run's checkpoint; plots into it.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        task, params, step = load_clip(args.workdir, args.step)
    except ConfigError as e:
        print(f"Config error: {e}", file=sys.stderr)
        return 2
    from research.core.metrics import read_jsonl
    for r in read_jsonl(os.path.join(args.workdir, "evaluations.jsonl")):
        task._history[int(r["step"])] = {k: v for k, v in r.items() if k != "step"}
    out = task.evaluate(params, step, args.workdir)
    with open(os.path.join(args.workdir, "evaluations.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **out}) + "\n")
    print(json.dumps({"step": step, **{k: round(v, 4) for k, v in out.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
