"""The ``vq`` task through the launcher (its own loop: EMA codebook, restarts, checkpoints), and
latent diffusion reading that checkpoint (the latent-shape check names both shapes)."""
import json

import numpy as np
import pytest

from research.core.config import ConfigError
from tests import e2e

CONFIG = "configs/vqvae_fashion_mnist.py"


def test_launcher_smoke_run_and_ldm_reads_the_checkpoint(fashion_mnist_env, tmp_path):
    workdir = tmp_path / "vq"
    proc = e2e.launch(workdir, config=f"{CONFIG}:smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "usage" in proc.stdout and "ppl" in proc.stdout
    evals = [r for r in e2e.metrics_rows(workdir) if "val/usage" in r]
    assert [r["step"] for r in evals] == [4]
    r = evals[0]
    assert 0.0 < r["val/usage"] <= 1.0 and 1.0 <= r["val/perplexity"] <= 32.0
    assert np.isfinite(r["val/recon_mse"]) and r["train/loss"] < 5.0
    assert e2e.finished_steps(workdir) == [4]
    assert (workdir / "recon_4.png").stat().st_size > 0
    assert json.loads((workdir / "summary.json").read_text())["step"] == 4

    # The checkpoint's codebook moved by EMA (not the optimizer): ema_sum / smoothed count.
    from research.tasks.vq import load_vq
    cfg, params, meta = load_vq(str(workdir))
    assert meta["latent_shape"] == [14, 14, 4] and cfg.codebook_size == 32
    q = params["quantizer"]
    n = q["ema_count"].sum()
    smoothed = (q["ema_count"] + cfg.eps) / (n + cfg.codebook_size * cfg.eps) * n
    np.testing.assert_allclose(q["embedding"], q["ema_sum"] / smoothed[:, None], rtol=1e-4, atol=1e-5)

    # Latent diffusion on that checkpoint: a U-Net config of another latent shape is one error
    # naming both shapes; the matching one builds.
    from configs import ldm_fashion_mnist
    from research.tasks.ldm import LDMTask
    config = ldm_fashion_mnist.get_config("smoke")
    config.vq.untrained = False
    config.vq.workdir = str(workdir)
    config.model.in_channels = 3
    with pytest.raises(ConfigError, match=r"\(14, 14, 4\).*\(14, 14, 3\)"):
        LDMTask(config, load_data=False)
    config.model.in_channels = 4
    task = LDMTask(config, load_data=False)
    assert task.latent_shape == (14, 14, 4) and task.scale > 0


def test_config_errors():
    from configs import vqvae_fashion_mnist
    from research.tasks.vq import VQTask
    config = vqvae_fashion_mnist.get_config("smoke")
    config.model.channels = (8, 10)
    with pytest.raises(ConfigError, match="groups"):
        VQTask(config, load_data=False)
    from configs import ldm_fashion_mnist
    from research.tasks.ldm import LDMTask
    config = ldm_fashion_mnist.get_config()
    with pytest.raises(ConfigError, match="config.vq.workdir"):
        LDMTask(config, load_data=False)
    config.vq.workdir = "/nonexistent/vq"
    with pytest.raises(ConfigError, match="No VQ checkpoint"):
        LDMTask(config, load_data=False)
