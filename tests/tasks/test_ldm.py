"""Latent diffusion: the latent round trip, the text tower's hidden states, and the smoke config
through the launcher followed by ``research.sample_images`` with ``--prompt`` and image-to-image."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import ldm_fashion_mnist
from research.models import vqvae as vq
from research.models.clip import TextEncoder
from research.models.transformer import TransformerConfig
from research.tasks.ldm import LDMTask, latent_stats, text_sequence
from tests import e2e

CONFIG = "configs/ldm_fashion_mnist.py:smoke"


def test_text_sequence_is_the_hidden_state_the_tower_pools():
    cfg = TransformerConfig(vocab_size=20, num_layers=1, num_heads=2, embed_dim=8, max_len=6)
    enc = TextEncoder(cfg)
    tokens = jnp.array([[5, 6, 1, 0, 0, 0], [7, 8, 9, 4, 1, 0]])
    params = enc.init(jax.random.key(0), tokens)["params"]
    seq = text_sequence(enc, params, tokens)
    pooled = enc.apply({"params": params}, tokens)
    assert seq.shape == (2, 6, 8)
    np.testing.assert_allclose(seq[[0, 1], [2, 4]], pooled, rtol=1e-5, atol=1e-6)


def test_latent_round_trip_and_stats():
    task = LDMTask(ldm_fashion_mnist.get_config("smoke"), load_data=False)
    # usage-weighted code statistics (uniform weights here: a fresh codebook has counts of 1)
    emb = np.asarray(task.vq_params["quantizer"]["embedding"], np.float64)
    shift, scale = latent_stats(task.vq_params["quantizer"])
    np.testing.assert_allclose(shift, emb.mean(0), rtol=1e-5, atol=1e-6)
    assert scale == pytest.approx(1 / np.sqrt(((emb - emb.mean(0)) ** 2).mean()), rel=1e-4)
    x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1), minval=-1, maxval=1)
    z, decoded, recon = jax.jit(lambda x: (
        task.encode(None, x), task.decode(task.encode(None, x)),
        task.vq_model.apply({"params": task.vq_params}, x)["recon"]))(x)
    assert z.shape == (2, 14, 14, 4)
    # decoding the scaled latents snaps back to the same codes: the autoencoder's reconstruction
    np.testing.assert_allclose(decoded, recon, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="label 10 is out of range"):
        task.prompts_for([10])


def test_launcher_smoke_then_image_to_image(fashion_mnist_env, tmp_path):
    workdir = tmp_path / "ldm"
    proc = e2e.launch(workdir, config=CONFIG)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    rows = e2e.metrics_rows(workdir)
    assert np.isfinite(rows[-1]["val/loss"]) and e2e.finished_steps(workdir) == [4]
    # (--prompt is run in tests/tasks/test_unclip.py; one sampling subprocess here)
    init = tmp_path / "init.png"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(init)
    out2 = tmp_path / "edit.png"
    proc = e2e.run([*_sample_cmd(workdir), "--init_image", str(init), "--strength", "0.5",
                    "--label", "5", "--num", "1", "--steps", "4", "--out", str(out2)])
    assert proc.returncode == 0, proc.stderr
    assert out2.stat().st_size > 0
    # the measure script on an ldm run: class ids as prompts, the empty caption as "no label"
    res = e2e.run_measure(workdir, e2e.smoke_classifier(tmp_path / "cnn"), "--per_class", "1",
                          "--ddpm_per_class", "0", "--real", "40", "--img2img", "4", "--steps", "3")
    assert res["ddim_n"] == 10 and res["img2img_n"] == 4
    for k in ("img2img_unconditional_class_kept", "img2img_own_label_class_kept"):
        assert 0.0 <= res[k] <= 1.0 and res[k] * 4 == pytest.approx(round(res[k] * 4)), (k, res[k])


def test_sample_images_rejects_a_strength_out_of_range(tmp_path, capsys):
    from research import sample_images
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(init)
    rc = sample_images.run_cli(["sample_images", "--workdir", str(tmp_path), "--init_image",
                                str(init), "--strength", "1.5"])
    err = capsys.readouterr().err
    sample_images.flags.FLAGS.unparse_flags()  # leave no flag values to later in-process callers
    assert rc == 2 and "--strength=1.5 is out of range" in err and "0 < strength <= 1" in err


def _sample_cmd(workdir):
    return [sys.executable, "-m", "research.sample_images", "--workdir", str(workdir)]


def test_clip_text_tower_is_frozen_context():
    config = ldm_fashion_mnist.get_config("smoke")
    config.text.encoder = "clip"
    config.text.clip_untrained = True
    task = LDMTask(config, load_data=False)
    params = jax.eval_shape(task.init, jax.random.key(0))
    assert set(params) == {"unet"}  # the CLIP text tower is not trained
    tokens = jnp.asarray(task.tokenizer.encode_batch(["a photo of a bag.", ""]))
    ctx, ref = jax.jit(lambda t: (task._context({}, t),
                                  text_sequence(task.text_encoder, task.text_params, t)))(tokens)
    assert ctx.shape == (2, task.tokenizer.max_len, task.text_encoder.cfg.embed_dim)
    np.testing.assert_allclose(ctx, ref)
