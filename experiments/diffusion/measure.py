"""Sample quality of a trained class-conditional DDPM (``ddpm`` workdir) or of latent diffusion
(``ldm`` workdir: class ids become "a photo of a {class}." prompts), offline.

    python -m experiments.diffusion.measure --workdir workdirs/ddpm --classifier workdirs/cnn \
        [--per_class 10] [--guidance 3] [--ddpm_per_class 2] [--real 2000]

Prints (and writes ``WORKDIR/measure.json``):
- conditional accuracy of DDIM 50 steps at guidance ``--guidance`` (the classifier agrees with the
  requested class);
- the Frechet distance **in the project's Fashion-MNIST classifier's feature space (not Inception
  FID)** of DDIM-50 samples and of DDPM-1000 (ancestral, all T steps) samples, each against
  ``--real`` test images, and the two sampling times per image (after a compile call; DDPM's on
  its first 10 images).
The DDPM-1000 set may be smaller (``--ddpm_per_class``) on a slow machine: then the DDIM set is
also scored on the same number of images for a like-for-like comparison (the Frechet distance is
biased upward at small N).
- with ``--noisy_classifier DIR``: classifier guidance (Dhariwal & Nichol) of the *unconditional*
  model (classifier-free scale w = 0) at each of ``--classifier_scales``: conditional accuracy and
  Frechet distance (DDIM 50, ``--per_class`` images per class);
- with ``--clip DIR``: the CLIP score (CLIP-S, 2.5 max(cos, 0)) of the DDIM samples and of as many
  real test images against their class's held-out prompt ensemble; with
  ``--clip_guidance_scales``, GLIDE-style CLIP guidance of the unconditional model (w = 0) towards
  each sample's class at each scale: conditional accuracy, Frechet distance and CLIP score;
- image-to-image (SDEdit, DDIM 50 at ``--strength``) on ``--img2img`` test images not among the
  reference images: the share whose class (by the classifier) is kept, (a) denoised without a
  label (the null class, w = 1: only the image carries the class) and (b) towards the input's own
  label at ``--guidance``. (a) is the honest reading of "keeps the class of the input".
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "ddpm workdir")
_CLF = flags.DEFINE_string("classifier", None, "classify workdir (e.g. configs/cnn_fashion_mnist.py)")
_PER_CLASS = flags.DEFINE_integer("per_class", 10, "DDIM samples per class")
_DDPM_PER_CLASS = flags.DEFINE_integer("ddpm_per_class", 2, "DDPM-1000 samples per class (0: skip)")
_GUIDANCE = flags.DEFINE_float("guidance", 3.0, "classifier-free guidance scale")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps")
_REAL = flags.DEFINE_integer("real", 2000, "test images for the reference statistics")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_IMG2IMG = flags.DEFINE_integer("img2img", 200, "test images for the image-to-image measure (0: skip)")
_STRENGTH = flags.DEFINE_float("strength", 0.5, "image-to-image strength")
_NOISY_CLF = flags.DEFINE_string("noisy_classifier", None, "noisy_classify workdir: also measure "
                                 "classifier guidance of the unconditional model (w = 0)")
_CLF_SCALES = flags.DEFINE_list("classifier_scales", ["0", "1", "3", "10"],
                                "classifier-guidance scales for --noisy_classifier")
_CLIP = flags.DEFINE_string("clip", None, "clip workdir: also report the CLIP score (CLIP-S) of "
                            "the DDIM samples and of real test images against their class prompts")
_CLIP_SCALES = flags.DEFINE_list("clip_guidance_scales", [], "with --clip on a ddpm run: CLIP "
                                 "guidance (GLIDE) of the unconditional model at these scales")


def _timed(task, params, labels, rng, time_n=None, **kw):
    """Samples for ``labels`` and seconds per image, timed on the first ``time_n`` labels (all by
    default) after a compile call on the same shape; the rest are sampled untimed (DDPM-1000 is
    ~10 s an image here: timing all of them twice would double the measure's longest part)."""
    import jax
    import numpy as np
    n = len(labels) if time_n is None else min(time_n, len(labels))
    task.sample(params, labels[:n], rng, **kw)  # compile
    t0 = time.perf_counter()
    head = np.asarray(task.sample(params, labels[:n], rng, **kw))
    seconds = (time.perf_counter() - t0) / n
    if n == len(labels):
        return head, seconds
    rest = np.asarray(task.sample(params, labels[n:], jax.random.fold_in(rng, 1), **kw))
    return np.concatenate([head, rest]), seconds


def main(argv):
    import jax
    import numpy as np

    from research.diffusion import data as data_lib
    from research.eval import image_metrics as im
    from research.sample_images import load_task
    from research.tasks.classify import load_classifier

    task, params, step = load_task(_WORKDIR.value)
    clf = load_classifier(_CLF.value)
    real, real_labels = data_lib.load_split(task.config.data, "test")
    idx = np.random.default_rng(0).permutation(len(real))[:_REAL.value]
    metrics = im.ClassifierMetrics(clf, real[idx])
    res = {"checkpoint_step": step, "guidance": _GUIDANCE.value, "classifier_test_accuracy":
           float(np.mean(clf.predict(im.to_pixels(real[idx])) == real_labels[idx]))}

    labels = np.repeat(np.arange(10, dtype=np.int32), _PER_CLASS.value)
    rng = jax.random.key(_SEED.value)
    ddim, ddim_s = _timed(task, params, labels, rng, sampler="ddim", steps=_STEPS.value,
                          guidance_scale=_GUIDANCE.value)
    m = metrics(ddim, labels)
    res.update({"ddim_n": len(labels), "ddim_conditional_accuracy": m["conditional_accuracy"],
                "ddim_frechet": m["frechet_classifier"], "ddim_s_per_image": ddim_s})
    data_lib.save_grid(ddim, os.path.join(_WORKDIR.value, f"measure_ddim{_STEPS.value}.png"), rows=10)
    if _DDPM_PER_CLASS.value:
        small = np.repeat(np.arange(10, dtype=np.int32), _DDPM_PER_CLASS.value)
        ddpm, ddpm_s = _timed(task, params, small, rng, time_n=10, sampler="ddpm",
                              guidance_scale=_GUIDANCE.value)
        md = metrics(ddpm, small)
        sel = np.concatenate([np.where(labels == c)[0][:_DDPM_PER_CLASS.value] for c in range(10)])
        res.update({"ddpm_n": len(small), "ddpm_conditional_accuracy": md["conditional_accuracy"],
                    "ddpm_frechet": md["frechet_classifier"], "ddpm_s_per_image": ddpm_s,
                    "ddim_frechet_same_n": metrics(ddim[sel])["frechet_classifier"],
                    "speedup_ddim_over_ddpm": ddpm_s / ddim_s})
        data_lib.save_grid(ddpm, os.path.join(_WORKDIR.value, "measure_ddpm.png"), rows=10)

    def guided(wrap, grid_name):
        """DDIM samples of the unconditional model (w = 0) for ``labels`` under the guidance
        ``wrap`` (None: unguided), their grid, and {conditional_accuracy, frechet}."""
        images = np.asarray(task.sample(params, labels, rng, sampler="ddim", steps=_STEPS.value,
                                        guidance_scale=0.0, denoise_wrapper=wrap))
        m = metrics(images, labels)
        data_lib.save_grid(images, os.path.join(_WORKDIR.value, grid_name), rows=10)
        return images, {"conditional_accuracy": m["conditional_accuracy"],
                        "frechet": m["frechet_classifier"]}

    if _NOISY_CLF.value:
        from research.tasks import noisy_classify
        nclf = noisy_classify.load_noisy_classifier(_NOISY_CLF.value)
        noisy_classify.check_same_schedule(nclf.diffusion, task.diffusion)
        for scale in sorted(float(v) for v in _CLF_SCALES.value):
            wrap = noisy_classify.guidance_wrapper(nclf, task.schedule, scale) if scale > 0 else None
            _, res[f"classifier_guided_s{scale:g}"] = guided(
                wrap, f"measure_classifier_s{scale:g}.png")
    if _CLIP.value:
        from research.eval.clip_score import ClipScorer
        scorer = ClipScorer.from_workdir(_CLIP.value, option="--clip")
        real_sel = idx[:len(labels)]
        res.update({"clip_score_ddim": scorer.score(ddim, labels=labels),
                    "clip_score_real": scorer.score(real[real_sel], labels=real_labels[real_sel])})
        if _CLIP_SCALES.value:
            import jax.numpy as jnp

            from research.diffusion import clip_guidance
            table, embed = jnp.asarray(scorer.class_embeds()), scorer.image_embed_fn()
            for scale in sorted(float(v) for v in _CLIP_SCALES.value):
                def wrap(denoise, labels_, scale=scale):
                    return clip_guidance.clip_guided(denoise, embed, table[labels_], task.schedule,
                                                     scale, prediction=task.diffusion["prediction"])
                images, g = guided(wrap if scale > 0 else None,
                                   f"measure_clip_guided_s{scale:g}.png")
                res[f"clip_guided_s{scale:g}"] = {
                    **g, "clip_score": scorer.score(images, labels=labels)}
    if _IMG2IMG.value:
        from research.diffusion.img2img import sdedit
        pick = np.random.default_rng(1).permutation(np.setdiff1d(np.arange(len(real)), idx))
        src, src_labels = real[pick[:_IMG2IMG.value]], real_labels[pick[:_IMG2IMG.value]]
        pred_src = clf.predict(im.to_pixels(src))
        # the null condition: the null class of a ddpm run, the empty caption of an ldm run
        null = (np.full_like(src_labels, task.null_id) if hasattr(task, "null_id")
                else [""] * len(src_labels))
        for name, labels_, w in (("unconditional", null, 1.0),
                                 ("own_label", src_labels, _GUIDANCE.value)):
            out = np.asarray(sdedit(task, params, src, labels_, rng,
                                    strength=_STRENGTH.value, steps=_STEPS.value, guidance_scale=w))
            pred = clf.predict(im.to_pixels(out))
            res[f"img2img_{name}_class_kept"] = float(np.mean(pred == pred_src))
            res[f"img2img_{name}_true_class"] = float(np.mean(pred == src_labels))
            data_lib.save_grid(np.concatenate([src[:10], out[:10]]), os.path.join(
                _WORKDIR.value, f"measure_img2img_{name}.png"), rows=2)
        res.update({"img2img_n": int(len(src)), "img2img_strength": _STRENGTH.value,
                    "img2img_classifier_on_inputs": float(np.mean(pred_src == src_labels))})
    print(json.dumps(res, indent=1))
    with open(os.path.join(_WORKDIR.value, "measure.json"), "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "classifier"])
    sys.exit(app.run(main))
