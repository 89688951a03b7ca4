"""CLIP guidance on the predicted clean image (GLIDE's CLIP guidance with a clean-image CLIP):
the eps shift against hand-computed gradients of a linear embedder, scale 0 = the unguided
denoiser, a tiny random CLIP steering a tiny U-Net's DDIM samples towards a caption, and the
``research.sample_images --clip_workdir/--clip_guidance`` CLI path on written (untrained)
checkpoints."""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.diffusion import clip_guidance as cg
from research.diffusion import samplers, schedules
from tests.eval.test_clip_score import tiny_dataset  # noqa: F401 - a fixture


def _np_cos_grad(W, z, u):
    """d/dz cos(W z, u) in float64 by hand: with e = W z,
    W^T (u / (|e| |u|) - (e . u) e / (|e|^3 |u|))."""
    e = W @ z
    ne, nu = np.linalg.norm(e), np.linalg.norm(u)
    return W.T @ (u / (ne * nu) - (e @ u) * e / (ne ** 3 * nu))


def test_scale_zero_is_the_unguided_denoiser_and_bad_scales_raise():
    """Reference: the unguided denoiser's own output (bit-for-bit) and the scale-check contract."""
    denoise = lambda x, t: jnp.sin(x) * (t[:, None, None, None] + 1.0)  # noqa: E731
    embed = lambda x: x.reshape(x.shape[0], -1)[:, :3] ** 2  # noqa: E731
    s = schedules.make_schedule("cosine", 100)
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    t = jnp.array([3, 70])
    guided = cg.clip_guided(denoise, embed, jnp.ones(3), s, 0.0)
    np.testing.assert_array_equal(np.asarray(guided(x, t)), np.asarray(denoise(x, t)))
    # A positive scale acts, except on an example whose text embedding is zero (cos = 0 there,
    # whatever the image: no gradient), which keeps the unguided output exactly.
    out = np.asarray(cg.clip_guided(denoise, embed, jnp.array([[0.0] * 3, [1.0] * 3]), s,
                                    50.0)(x, t))
    np.testing.assert_array_equal(out[0], np.asarray(denoise(x, t))[0])
    assert np.abs(out[1] - np.asarray(denoise(x, t))[1]).max() > 1e-3
    for bad in (-0.5, 1001.0, float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError, match=r"CLIP guidance scale=.* is out of range: expected "
                                             r"0 <= s <= 1000"):
            cg.clip_guided(denoise, embed, jnp.ones(3), s, bad)
    with pytest.raises(ValueError, match="prediction='x0'"):
        cg.clip_guided(denoise, embed, jnp.ones(3), s, 1.0, prediction="x0")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_linear_embedder_constant_eps_matches_hand_gradient(prediction):
    """Reference: the closed-form gradient of cos(W x0_hat, u) (``_np_cos_grad``, float64) with a
    constant model output c: epsilon: x0_hat = (x - sqrt(1-ab) c) / sqrt(ab), so
    grad_x = grad_z / sqrt(ab) and eps' = c - s sqrt(1-ab) grad_x; v: x0_hat = sqrt(ab) x -
    sqrt(1-ab) c, grad_x = sqrt(ab) grad_z, and v' = c - s sqrt(1-ab) grad_x / sqrt(ab)."""
    s = schedules.make_schedule("linear", 100)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 8))
    u = rng.normal(size=3)
    c = rng.normal(size=(2, 2, 2, 2))
    x = rng.normal(size=(2, 2, 2, 2))
    t, scale = np.array([10, 90]), 4.0
    denoise = lambda x_, t_: jnp.asarray(c, jnp.float32)  # noqa: E731
    embed = lambda img: img.reshape(img.shape[0], -1) @ jnp.asarray(W.T, jnp.float32)  # noqa: E731
    got = cg.clip_guided(denoise, embed, jnp.asarray(u, jnp.float32), s, scale,
                         prediction=prediction)(jnp.asarray(x, jnp.float32), jnp.asarray(t))
    ab = s.alphas_cumprod[t].astype(np.float64)
    want = []
    for i in range(2):
        sa, sb = math.sqrt(ab[i]), math.sqrt(1 - ab[i])
        xi, ci = x[i].reshape(-1), c[i].reshape(-1)
        if prediction == "epsilon":
            z = (xi - sb * ci) / sa
            gx = _np_cos_grad(W, z, u) / sa
            want.append(ci - scale * sb * gx)
        else:
            z = sa * xi - sb * ci
            gx = sa * _np_cos_grad(W, z, u)
            want.append(ci - scale * sb * gx / sa)
    np.testing.assert_allclose(np.asarray(got).reshape(2, -1), np.array(want), rtol=2e-5,
                               atol=2e-6)


def test_gradient_through_eps_of_a_linear_denoiser():
    """Reference: eps(x) = a x gives x0_hat = x (1 - sqrt(1-ab) a) / sqrt(ab); the full gradient
    is (1 - sqrt(1-ab) a) / sqrt(ab) grad_z, the stopped one grad_z / sqrt(ab) (hand algebra,
    ``_np_cos_grad`` for grad_z at the same z)."""
    s = schedules.make_schedule("linear", 100)
    rng = np.random.default_rng(1)
    W, u = rng.normal(size=(3, 4)), rng.normal(size=3)
    x, t, a, scale = rng.normal(size=(1, 2, 2, 1)), np.array([60]), 0.7, 2.0
    denoise = lambda x_, t_: a * x_  # noqa: E731
    embed = lambda img: img.reshape(img.shape[0], -1) @ jnp.asarray(W.T, jnp.float32)  # noqa: E731
    sa, sb = math.sqrt(s.alphas_cumprod[60]), math.sqrt(1 - s.alphas_cumprod[60])
    xf = x.reshape(-1)
    z = xf * (1 - sb * a) / sa
    gz = _np_cos_grad(W, z, u)
    for through, factor in ((False, 1 / sa), (True, (1 - sb * a) / sa)):
        got = cg.clip_guided(denoise, embed, jnp.asarray(u, jnp.float32), s, scale,
                             grad_through_eps=through)(jnp.asarray(x, jnp.float32), jnp.asarray(t))
        np.testing.assert_allclose(np.asarray(got).reshape(-1),
                                   a * xf - scale * sb * factor * gz, rtol=2e-5, atol=2e-6)


def random_unet(cfg, seed: int = 0):
    """Random U-Net params of ``cfg`` without compiling its init (shapes by ``jax.eval_shape``,
    values from NumPy): kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), other vectors
    N(0, 0.1^2). Untrained like the zero-initialised U-Net, but every path carries signal (as
    tests/models/test_unet.py perturbs its init)."""
    import flax.linen as nn

    from research.models.unet import UNet
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(UNet(cfg).init(
        k, jnp.zeros((1, 28, 28, 1)), jnp.zeros((1,), jnp.int32),
        labels=jnp.zeros((1,), jnp.int32))["params"]), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim >= 2:
            v = rng.normal(size=leaf.shape) / math.sqrt(np.prod(leaf.shape[:-1]))
        elif name.endswith("['scale']"):
            v = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        else:
            v = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(v, leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_guidance_raises_the_clip_cosine_of_ddim_samples():
    """Reference: the unguided chain from the same initial noise. A tiny random CLIP
    (configs/clip_fashion_mnist.py:smoke) guides a tiny untrained U-Net (tests/models/test_unet.py's
    size) through 4 DDIM steps; the final samples' CLIP cosine to the caption must rise. One
    compiled chain: the batch holds each noise twice, the first copy with a zero text embedding
    (no guidance: its cosine gradient is 0, checked above), the second with the caption's."""
    from research.eval.clip_score import ClipScorer
    from research.models.unet import UNet, UNetConfig
    from tests.eval.test_clip_score import tiny_clip
    from tests.models.test_unet import TINY

    task, clip_params = tiny_clip()
    scorer = ClipScorer(task, clip_params)
    embed = scorer.image_embed_fn()
    text = jnp.asarray(scorer.embed_texts(["a photo of a large bright coat."])[0])
    cfg = UNetConfig(num_classes=10, **TINY)
    unet_params = random_unet(cfg)
    labels = jnp.full((4,), 4)
    def denoise(x, t):
        return UNet(cfg).apply({"params": unet_params}, x, t, labels=labels)
    sched = schedules.make_schedule("cosine", 100)
    noise = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    texts = jnp.stack([jnp.zeros_like(text)] * 2 + [text] * 2)
    guided = cg.clip_guided(denoise, embed, texts, sched, 300.0)

    @jax.jit
    def final_cosines():
        x = samplers.sample(guided, sched, "epsilon", (4, 28, 28, 1), jax.random.key(1),
                            sampler="ddim", steps=4, x_init=jnp.concatenate([noise, noise]))
        e = embed(x)
        return e @ text / (jnp.linalg.norm(e, axis=-1) * jnp.linalg.norm(text)), x

    cos, x = map(np.asarray, final_cosines())
    assert np.isfinite(x).all() and np.abs(x[2:] - x[:2]).max() > 1e-3
    assert (cos[2:] > cos[:2] + 5e-3).all(), cos  # measured: +0.010 and +0.013


# -- the CLI ---------------------------------------------------------------------------------------
def write_ddpm_workdir(workdir):
    """A 'ddpm' run's workdir (configs/ddpm_fashion_mnist.py:smoke) holding one checkpoint of a
    random untrained U-Net, with the state layout ``core.train.build_state`` gives (no compile:
    shapes by eval_shape, values from ``random_unet``/zeros)."""
    from configs.ddpm_fashion_mnist import get_config
    from research.core import checkpoint as ckpt_lib
    from research.core.mesh import make_mesh
    from research.core.train import build_state
    from research.tasks.ddpm import DDPMTask

    config = get_config("smoke")
    task = DDPMTask(config, load_data=False)
    _, _, _, abstract, _ = build_state(task, config, make_mesh(config.mesh,
                                                               devices=jax.devices()[:1]))
    params = random_unet(task.model_config)

    def zeros(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jnp.zeros(leaf.shape, leaf.dtype)
    state = {**jax.tree.map(zeros, {k: v for k, v in abstract.items() if k != "params"}),
             "params": params}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(4, state, {"seed": 0, "step": 4}, ckpt_lib.to_jsonable(task.meta()))
    ckpt.close()


def run_sample_images(capsys, *args):
    """``python -m research.sample_images ARGS`` in-process (``run_cli``): (rc, stdout, stderr)."""
    from research import sample_images
    rc = sample_images.run_cli(["sample_images", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_sample_images_cli_with_clip_guidance(tmp_path, capsys, tiny_dataset):
    """References: the CLI contract (a PNG grid at --out, the CLIP score printed within CLIP-S's
    range [0, 2.5]) on written untrained checkpoints (a smoke-size ddpm run and the tiny random
    CLIP), and one ``Error:`` line naming the flag and the fix for each bad use."""
    from PIL import Image

    from tests.eval.test_clip_score import write_clip_workdir
    ddpm, clip = tmp_path / "ddpm", tmp_path / "clip"
    write_ddpm_workdir(ddpm)
    write_clip_workdir(clip)
    out = tmp_path / "coats.png"
    base = ("--workdir", ddpm, "--sampler", "ddim", "--steps", "2", "--guidance", "1",
            "--label", "4", "--num", "2")
    rc, stdout, err = run_sample_images(capsys, *base, "--clip_workdir", clip,
                                        "--clip_guidance", "30", "--out", out)
    assert rc == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    assert np.asarray(Image.open(out)).shape[0] >= 28
    score = re.findall(r"\[CLIP score ([0-9.]+) \(CLIP-S, w=2.5\) against each sample's class\]",
                       err)
    assert len(score) == 1 and 0.0 <= float(score[0]) <= 2.5, err
    # Bad uses: one clear error each.
    for args, fragments in [
        (("--clip_guidance", "5"), ["--clip_guidance=5 needs --clip_workdir=DIR", "clip run"]),
        (("--clip_guidance", "-1", "--clip_workdir", clip),
         ["--clip_guidance=-1.0 is out of range", "0 <= s <= 1000"]),
        (("--clip_guidance", "2000", "--clip_workdir", clip), ["--clip_guidance=2000.0"]),
        (("--clip_guidance", "5", "--clip_workdir", ddpm),
         [f"--clip_workdir={str(ddpm)!r} is a 'ddpm' run, not a 'clip' run",
          "point it at a trained CLIP run"]),
    ]:
        rc, stdout, err = run_sample_images(capsys, *base, *args)
        msg = one_error(err)
        assert rc == 2 and stdout == "" and all(f in msg for f in fragments), (args, msg)
