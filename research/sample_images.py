"""Sample images from a trained diffusion model's workdir (task 'ddpm' or 'ldm') into a PNG grid.

    python -m research.sample_images --workdir DIR --sampler ddim --steps 50 --guidance 3 \
        --label 7 [--num 16] [--seed 0] [--eta 0] [--checkpoint latest] [--out FILE.png]

Without ``--label``: one row per class (``--num`` samples each). ``--guidance`` is the
classifier-free guidance scale w (0 = unconditional, 1 = conditional, > 1 guided). Image-to-image
(SDEdit): ``--init_image FILE.png --strength 0.5`` noises the image to that fraction of the chain
and denoises it toward ``--label``. Prints the file written and the sampling time.

Classifier guidance (Dhariwal & Nichol 2021; 'ddpm' runs with epsilon prediction):
``--classifier_workdir DIR --classifier_scale S`` steers every step with a noise-aware classifier
trained by ``configs/noisy_classifier_fashion_mnist.py`` on the same noise schedule (checked):
``eps' = eps - S sqrt(1 - ab_t) grad_x log p(label | x_t, t)``. S = 0 (the default) is plain
sampling and leaves the classifier unread; it combines with ``--guidance`` (``--guidance 0``:
classifier guidance of the unconditional model alone).

CLIP guidance (GLIDE's, with our clean-image CLIP looking at the predicted clean image x0_hat;
'ddpm' runs, see ``research.diffusion.clip_guidance``):
``--clip_workdir DIR --clip_guidance S`` (DIR: a run of ``configs/clip_fashion_mnist.py``) steers
each sample towards ``--prompt`` (with ``--label``, or unconditional without it) or, without
``--prompt``, towards its class's held-out caption ensemble:

    python -m research.sample_images --workdir workdirs/ddpm --label 4 --num 16 \
        --clip_workdir workdirs/clip_fmnist --clip_guidance 30 --prompt "a large dark coat."

With ``--clip_workdir`` (any S, also 0) the CLIP score of the samples (CLIP-S, Hessel et al. 2021,
``research.eval.clip_score``) against their prompt or class is printed with the timing.
"""
from __future__ import annotations

import json
import os
import sys
import time

import ml_collections
from absl import flags

from research.core.config import ConfigError

# Its own flag registry: importing several CLIs into one process (tests) must not collide.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (holds config.json, checkpoints/).", flag_values=FLAGS)
_SAMPLER = flags.DEFINE_string("sampler", "ddim", "'ddim' or 'ddpm' (ancestral, all T steps).", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps (ignored by ddpm, which takes T).", flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float("guidance", 3.0, "Classifier-free guidance scale w in [0, 20].", flag_values=FLAGS)
_LABEL = flags.DEFINE_integer("label", None, "Class to sample (0..9); default: every class.", flag_values=FLAGS)
_NUM = flags.DEFINE_integer("num", 8, "Samples (per class without --label).", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM eta in [0, 1]: 0 deterministic, 1 DDPM's variance.", flag_values=FLAGS)
_CKPT = flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/samples_<settings>.png).", flag_values=FLAGS)
_INIT = flags.DEFINE_string("init_image", None, "Image-to-image: a 28x28 grayscale image file.", flag_values=FLAGS)
_STRENGTH = flags.DEFINE_float("strength", 0.5, "Image-to-image: noise level in (0, 1].", flag_values=FLAGS)
_PROMPT = flags.DEFINE_string("prompt", None, "Text-conditioned runs (ldm, unclip): sample --num "
                              "images of this caption instead of class prompts.", flag_values=FLAGS)

_CLF_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "Classifier guidance: a "
                                   "noisy_classify run's workdir.", flag_values=FLAGS)
_CLF_SCALE = flags.DEFINE_float("classifier_scale", 0.0, "Classifier guidance scale S >= 0 (0 = "
                                "off).", flag_values=FLAGS)
_CLIP_WORKDIR = flags.DEFINE_string("clip_workdir", None, "CLIP guidance / CLIP score: a clip "
                                    "run's workdir.", flag_values=FLAGS)
_CLIP_GUIDANCE = flags.DEFINE_float("clip_guidance", 0.0, "CLIP guidance scale S in [0, 1000] "
                                    "(0 = off).", flag_values=FLAGS)

TASKS = ("ddpm", "ldm", "unclip")


def load_task(workdir: str, which: str = "latest"):
    """-> (task, params, step) from ``workdir``'s checkpoint ``which``; the task is built from the
    run's config.json with the checkpoint's model config, without loading training data."""
    import jax

    from research import tasks
    from research.core import checkpoint as ckpt_lib
    from research.core.mesh import make_mesh
    from research.core.train import build_state

    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ConfigError(f"{config_path} not found: --workdir must be a training run's workdir.")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("task") not in TASKS:
        raise ConfigError(f"{workdir} is a {config.get('task')!r} run; sample_images needs one of "
                          f"{list(TASKS)}")
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
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
        if "model" in meta:
            model = {k: v for k, v in meta["model"].items()
                     if k not in ("num_classes", "image_size", "in_channels")}
            config.model = ml_collections.ConfigDict(model)
        task = tasks.get(config.task)(config, load_data=False)
        mesh = make_mesh(config.mesh, devices=jax.devices()[:1])
        _, _, _, abstract, shardings = build_state(task, config, mesh)
        _, state, _ = ckpt.restore(ckpt_lib.abstract_with_shardings(abstract, shardings), step=step)
    finally:
        ckpt.close()
    return task, state["params"], step


def read_image(path: str):
    """A grayscale image file -> float32 [1, 28, 28, 1] in [-1, 1]."""
    import numpy as np
    from PIL import Image
    if not os.path.exists(path):
        raise ConfigError(f"--init_image={path!r}: no such file")
    img = Image.open(path).convert("L")
    if img.size != (28, 28):
        raise ConfigError(f"--init_image={path!r} is {img.size[0]}x{img.size[1]}: expected 28x28 "
                          "(a Fashion-MNIST-sized grayscale image)")
    return np.asarray(img, np.float32)[None, :, :, None] / 127.5 - 1.0


def check_classifier_flags() -> None:
    """The classifier-guidance flags alone (before anything is loaded)."""
    import math
    scale = _CLF_SCALE.value
    if not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"--classifier_scale={scale} is out of range: expected S >= 0 (0 = off)")
    if scale > 0 and not _CLF_WORKDIR.value:
        raise ConfigError(f"--classifier_scale={scale:g} needs --classifier_workdir=DIR, a "
                          "noisy_classify run (configs/noisy_classifier_fashion_mnist.py)")
    if scale > 0 and _INIT.value is not None:
        raise ConfigError("--classifier_scale does not combine with --init_image: drop one")
    if scale > 0 and _PROMPT.value is not None and _LABEL.value is None:
        raise ConfigError("--classifier_scale with --prompt needs --label: the classifier steers "
                          "towards a class (0..9), and a prompt without --label samples "
                          "unconditionally")


def classifier_guidance(task):
    """``denoise_wrapper`` for ``task.sample`` from ``--classifier_workdir``/``--classifier_scale``;
    ConfigError naming the flag when the run or the classifier does not fit."""
    from research.tasks import noisy_classify
    where = f"--classifier_workdir={_CLF_WORKDIR.value}"
    if task.name != "ddpm" or task.diffusion.get("prediction") != "epsilon":
        raise ConfigError(f"--classifier_scale needs a pixel-space 'ddpm' run with epsilon "
                          f"prediction; {_WORKDIR.value} is a {task.name!r} run"
                          + (f" predicting {task.diffusion.get('prediction')!r}"
                             if task.name == "ddpm" else "") + ": use --guidance only")
    try:
        clf = noisy_classify.load_noisy_classifier(_CLF_WORKDIR.value)
        noisy_classify.check_same_schedule(clf.diffusion, task.diffusion)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return noisy_classify.guidance_wrapper(clf, task.schedule, _CLF_SCALE.value)


def check_clip_flags() -> None:
    """The CLIP-guidance flags alone (before anything is loaded)."""
    from research.diffusion import clip_guidance
    try:
        scale = clip_guidance.check_clip_guidance_scale(_CLIP_GUIDANCE.value, "--clip_guidance")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if scale > 0 and not _CLIP_WORKDIR.value:
        raise ConfigError(f"--clip_guidance={scale:g} needs --clip_workdir=DIR, a trained clip run "
                          "(configs/clip_fashion_mnist.py)")
    if scale > 0 and _INIT.value is not None:
        raise ConfigError("--clip_guidance does not combine with --init_image: drop one")


def load_clip_scorer():
    from research.eval.clip_score import ClipScorer
    return ClipScorer.from_workdir(_CLIP_WORKDIR.value, option="--clip_workdir")


def clip_guidance_wrapper(task, prompt):
    """(``denoise_wrapper`` for ``task.sample``, the ClipScorer): CLIP guidance towards
    ``prompt`` (one caption for all samples) or, for ``prompt=None``, each sample's class (its
    held-out prompt ensemble)."""
    import jax.numpy as jnp

    from research.diffusion import clip_guidance
    if task.name != "ddpm":
        raise ConfigError(f"--clip_guidance needs a pixel-space 'ddpm' run; {_WORKDIR.value} is a "
                          f"{task.name!r} run: drop --clip_guidance (--clip_workdir alone scores)")
    scorer = load_clip_scorer()
    table = jnp.asarray(scorer.embed_texts([prompt]) if prompt is not None
                        else scorer.class_embeds())
    embed = scorer.image_embed_fn()

    def wrapper(denoise, labels):
        text = table[0] if prompt is not None else table[labels]
        return clip_guidance.clip_guided(denoise, embed, text, task.schedule, _CLIP_GUIDANCE.value,
                                         prediction=task.diffusion["prediction"])
    return wrapper, scorer


def main(argv) -> int:
    try:
        FLAGS.unparse_flags()  # defaults again when main runs twice in one process
        FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    if not _WORKDIR.value:
        raise ConfigError("--workdir is required.")
    from research.diffusion import guidance
    try:
        guidance.check_guidance_scale(_GUIDANCE.value, "--guidance")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if _LABEL.value is not None and not 0 <= _LABEL.value <= 9:
        raise ConfigError(f"--label={_LABEL.value} is out of range: expected a class in 0..9")
    if _NUM.value < 1:
        raise ConfigError(f"--num={_NUM.value}: expected >= 1")
    if not 0.0 <= _ETA.value <= 1.0:
        raise ConfigError(f"--eta={_ETA.value} is out of range: expected 0 <= eta <= 1")
    if _INIT.value is not None and not 0.0 < _STRENGTH.value <= 1.0:
        raise ConfigError(f"--strength={_STRENGTH.value} is out of range: expected 0 < strength <= 1")
    check_classifier_flags()
    check_clip_flags()
    from research.diffusion import samplers
    if _SAMPLER.value not in samplers.SAMPLERS:
        raise ConfigError(f"--sampler={_SAMPLER.value!r}: expected one of {list(samplers.SAMPLERS)}")

    import jax
    import numpy as np

    from research.diffusion import data as data_lib

    task, params, step = load_task(_WORKDIR.value, _CKPT.value)
    sample_kwargs = {}
    if _CLF_SCALE.value > 0:
        sample_kwargs["denoise_wrapper"] = classifier_guidance(task)
    T = task.schedule.num_steps
    if _SAMPLER.value == "ddim" and not 1 <= _STEPS.value <= T:
        raise ConfigError(f"--steps={_STEPS.value} is out of range: expected 1..{T} (the model's "
                          "training steps)")
    classes = [_LABEL.value] if _LABEL.value is not None else list(range(10))
    labels = np.repeat(np.asarray(classes, np.int32), _NUM.value)
    if _PROMPT.value is not None and _CLIP_GUIDANCE.value > 0 and task.name == "ddpm":
        # CLIP steers a class-conditional (--label) or unconditional (null class) ddpm run
        classes = [_PROMPT.value]
        labels = np.full(_NUM.value, task.null_id if _LABEL.value is None else _LABEL.value,
                         np.int32)
    elif _PROMPT.value is not None:  # text-conditioned runs: class ids become prompts there too
        if not hasattr(task, "prompts_for"):
            raise ConfigError(f"--prompt needs a text-conditioned run (ldm, unclip) or CLIP "
                              f"guidance (--clip_workdir DIR --clip_guidance S); "
                              f"{_WORKDIR.value} is a {task.name!r} run: use --label.")
        classes, labels = [_PROMPT.value], [_PROMPT.value] * _NUM.value
    scorer = None
    if _CLIP_GUIDANCE.value > 0:
        clip_wrapper, scorer = clip_guidance_wrapper(task, _PROMPT.value)
        inner = sample_kwargs.get("denoise_wrapper")
        sample_kwargs["denoise_wrapper"] = clip_wrapper if inner is None else (
            lambda denoise, y: clip_wrapper(inner(denoise, y), y))
    elif _CLIP_WORKDIR.value:
        scorer = load_clip_scorer()
    rng = jax.random.key(_SEED.value)
    t0 = time.perf_counter()
    if _INIT.value is not None:
        from research.diffusion import img2img
        init = np.repeat(read_image(_INIT.value), len(labels), axis=0)
        images = img2img.sdedit(task, params, init, labels, rng, strength=_STRENGTH.value,
                                steps=_STEPS.value, guidance_scale=_GUIDANCE.value, eta=_ETA.value)
    else:
        images = task.sample(params, labels, rng, sampler=_SAMPLER.value, steps=_STEPS.value,
                             guidance_scale=_GUIDANCE.value, eta=_ETA.value, **sample_kwargs)
    dt = time.perf_counter() - t0
    label_part = f"label{_LABEL.value}" if _LABEL.value is not None else "all"
    steps_part = T if _SAMPLER.value == "ddpm" else _STEPS.value
    out = _OUT.value or os.path.join(
        _WORKDIR.value, f"samples_{_SAMPLER.value}{steps_part}_g{_GUIDANCE.value:g}"
        f"{f'_c{_CLF_SCALE.value:g}' if _CLF_SCALE.value > 0 else ''}"
        f"{f'_clip{_CLIP_GUIDANCE.value:g}' if _CLIP_GUIDANCE.value > 0 else ''}_{label_part}.png")
    data_lib.save_grid(images, out, rows=len(classes) if _LABEL.value is None else
                       max(1, int(np.sqrt(len(labels)))))
    print(out)
    print(f"[checkpoint step {step}; {len(labels)} images in {dt:.1f} s incl. compile]",
          file=sys.stderr)
    if scorer is not None:
        score = (scorer.score(images, texts=_PROMPT.value) if _PROMPT.value is not None
                 else scorer.score(images, labels=labels))
        target = repr(_PROMPT.value) if _PROMPT.value is not None else "each sample's class"
        print(f"[CLIP score {score:.4f} (CLIP-S, w=2.5) against {target}]", file=sys.stderr)
    return 0


def run_cli(argv=None) -> int:
    try:
        return main(sys.argv if argv is None else argv)
    except (ConfigError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli())
