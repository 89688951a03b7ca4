"""unCLIP: the prior's x0 -> epsilon conversion (closed form of q(x_t | x_0)), the decoder's 10%
embedding dropout, and the smoke config through the launcher plus ``sample_images --prompt``."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from research.diffusion import schedules
from research.models.prior import DiffusionPrior, PriorConfig, x0_to_eps
from research.tasks.unclip import drop_embedding
from tests import e2e


def test_x0_to_eps_inverts_the_forward_process_and_prior_shapes():
    sched = schedules.make_schedule("cosine", 100)
    x0 = jax.random.normal(jax.random.key(0), (3, 8))
    eps = jax.random.normal(jax.random.key(1), (3, 8))
    t = jnp.array([0, 50, 99])
    x_t = schedules.q_sample(sched, x0, t, eps)  # sqrt(ab) x0 + sqrt(1 - ab) eps
    np.testing.assert_allclose(x0_to_eps(sched, x_t, t, x0), eps, rtol=1e-3, atol=1e-3)
    prior = DiffusionPrior(PriorConfig(embed_dim=8, width=16, num_layers=1, num_heads=2))
    params = prior.init(jax.random.key(2), x_t, t, x0)["params"]
    assert prior.apply({"params": params}, x_t, t, x0).shape == (3, 8)


def test_embedding_dropout_zeroes_about_ten_percent_of_rows():
    emb = jnp.ones((20000, 4))
    out = np.asarray(drop_embedding(emb, jax.random.key(0), 0.1))
    dropped = (out == 0).all(-1)
    assert ((out == 1).all(-1) | dropped).all()
    assert abs(dropped.mean() - 0.1) < 0.01  # 3 sigma = 0.0064


def test_launcher_smoke_then_prompt(fashion_mnist_env, tmp_path):
    workdir = tmp_path / "unclip"
    proc = e2e.launch(workdir, config="configs/unclip_fashion_mnist.py:smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    row = e2e.metrics_rows(workdir)[-1]
    assert np.isfinite(row["val/prior_loss"]) and np.isfinite(row["val/decoder_loss"])
    assert e2e.finished_steps(workdir) == [4]
    out = tmp_path / "sneakers.png"
    proc = e2e.run([sys.executable, "-m", "research.sample_images", "--workdir", str(workdir),
                    "--prompt", "a photo of a sneaker.", "--num", "2", "--steps", "3",
                    "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size[0] > 0
