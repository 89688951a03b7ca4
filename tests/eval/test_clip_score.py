"""CLIP score (CLIPScore, Hessel et al. 2021): the formula against hand-computed cosines, and the
workdir loader end to end on a tiny randomly initialised CLIP (no training: its checkpoint is
written here, as the training loop would)."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from research.core import checkpoint as ckpt_lib
from research.core.config import ConfigError
from research.eval import clip_score as cs


# -- helpers shared with tests/diffusion/test_clip_guidance.py -------------------------------------
def tiny_clip(seed: int = 0):
    """(ClipTask of configs/clip_fashion_mnist.py:smoke on 64 random images, unboxed random
    params): built as tests/tasks/test_clip.py builds it."""
    from research.tasks.clip import ClipTask
    from tests.tasks.test_clip import smoke_config, tiny_splits
    task = ClipTask(smoke_config(), splits=tiny_splits())
    # jitted: one compile (~2 s) instead of op-by-op initialisation (~9 s on a 2-core CPU)
    return task, nn.meta.unbox(jax.jit(task.init)(jax.random.key(seed)))


def write_clip_workdir(workdir, seed: int = 0):
    """A clip run's workdir holding the random tiny CLIP as one checkpoint (config.json, state
    and meta as ``research.launch`` / ``core.train`` write them). Returns (task, params)."""
    task, params = tiny_clip(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(task.config.to_json_best_effort(indent=1))
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(1, {"params": params}, {"seed": 0, "step": 1}, ckpt_lib.to_jsonable(task.meta()))
    ckpt.close()
    return task, params


@pytest.fixture
def tiny_dataset(monkeypatch):
    """``load_clip`` rebuilds the ClipTask with its dataset: serve the 64 random images of
    ``tiny_splits`` instead of Fashion-MNIST (the scores never read it)."""
    from research.data import fashion_mnist
    from tests.tasks.test_clip import tiny_splits
    monkeypatch.setattr(fashion_mnist, "load", lambda split, **kw: tiny_splits()[split])


# -- the formula -----------------------------------------------------------------------------------
def test_clip_score_closed_form():
    """Reference: the cosines of hand-made 2-D vectors, computed by hand: cos 1, cos 0,
    cos(135 deg) = -1/sqrt 2 (negative: clipped to 0), and (3, 4).(4, 3) / 25 = 24/25.
    CLIP-S = 2.5 * mean(max(cos, 0)) = 2.5 * (1 + 0 + 0 + 0.96) / 4 = 1.225."""
    img = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [4.0, 3.0]])
    np.testing.assert_allclose(cs.clip_scores(img, txt), [2.5, 0.0, 0.0, 2.5 * 0.96], atol=1e-6)
    assert cs.clip_score(img, txt) == pytest.approx(1.225, abs=1e-6)
    assert cs.clip_score(img, txt, w=1.0) == pytest.approx(0.49, abs=1e-6)
    # Only the negative pair: max(cos, 0) = 0, not -2.5/sqrt(2).
    assert cs.clip_score(img[2:3], txt[2:3]) == 0.0
    # Scale invariance: positive rescaling of any row changes no cosine.
    scale = np.array([[0.01], [7.0], [3.0], [123.0]])
    assert cs.clip_score(img * scale, txt * scale[::-1]) == pytest.approx(1.225, abs=1e-6)
    # One text for all images ([D]): cosines of each image with (1, 1)/sqrt 2.
    want = 2.5 * np.mean([1 / math.sqrt(2)] * 3 + [7 / (5 * math.sqrt(2))])
    assert cs.clip_score(img, np.array([2.0, 2.0])) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="do not pair"):
        cs.clip_score(img, txt[:3])


def test_class_captions_use_held_out_templates():
    """Reference: the template list of research.data.captions (held-out, not training)."""
    from research.data import captions as cap
    got = cs.class_captions([4, 9])
    assert got == ["a blurry photo of a coat.", "a blurry photo of an ankle boot."]
    assert cap.HELD_OUT_TEMPLATES[0] not in cap.TRAIN_TEMPLATES
    with pytest.raises(ValueError, match="out of range"):
        cs.class_captions([10])


# -- the loader on a tiny random CLIP --------------------------------------------------------------
def test_scorer_from_workdir_end_to_end(tmp_path, tiny_dataset):
    """Loads a written checkpoint through ``research.tasks.clip.load_clip``; references: the
    in-memory model the checkpoint was written from (same embeddings, same score), the range
    [0, 2.5] of CLIP-S, and the image preprocessing of the CLIP task (uint8 pixels: a [-1, 1]
    image quantised to uint8 embeds as the uint8 image does)."""
    from research.diffusion import data as data_lib
    task, params = write_clip_workdir(tmp_path / "clip")
    scorer = cs.ClipScorer.from_workdir(str(tmp_path / "clip"))
    assert scorer.step == 1
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    texts = cs.class_captions([0, 3, 5, 9])
    s = scorer.score(images, texts)
    assert np.isfinite(s) and 0.0 <= s <= 2.5
    ref_img = task.features(params, data_lib.to_uint8(images))[1]
    ref_txt = jax.jit(lambda p, t: task.model.apply({"params": p}, t, method="encode_text"))(
        params, task.tokenizer.encode_batch(texts))
    assert s == pytest.approx(cs.clip_score(ref_img, ref_txt), abs=1e-5)
    assert 0.0 <= scorer.score(images, labels=[0, 3, 5, 9]) <= 2.5
    assert 0.0 <= scorer.score(images, "a photo of a coat.") <= 2.5
    # The [-1, 1] -> uint8 conversion matches the CLIP task's own input: uint8 pixels.
    u8 = data_lib.to_uint8(images)
    np.testing.assert_allclose(scorer.embed_images(images), task.features(params, u8)[1],
                               atol=1e-5)
    # The differentiable guidance embedder equals the quantised path on already-quantised images.
    x = u8.astype(np.float32) / 127.5 - 1.0
    embed = jax.jit(scorer.image_embed_fn())
    np.testing.assert_allclose(np.asarray(embed(x)), scorer.embed_images(x), atol=1e-4)


def test_from_workdir_errors_name_the_option(tmp_path, tiny_dataset):
    """Reference: the ConfigError contract (message names the option, the problem and the fix)."""
    with pytest.raises(ConfigError, match=r"--clip_workdir='.*' has no config.json: point it at "
                                          r"a trained CLIP run"):
        cs.ClipScorer.from_workdir(str(tmp_path), option="--clip_workdir")
    (tmp_path / "config.json").write_text('{"task": "ddpm"}')
    with pytest.raises(ConfigError, match=r"--clip_workdir=.* is a 'ddpm' run, not a 'clip' run"):
        cs.ClipScorer.from_workdir(str(tmp_path), option="--clip_workdir")
    (tmp_path / "config.json").write_text('{"task": "clip"}')
    with pytest.raises(ConfigError, match=r"--clip_workdir=.*No checkpoint in .*train first"):
        cs.ClipScorer.from_workdir(str(tmp_path), option="--clip_workdir")
