"""The ``ddpm`` task end to end: ``configs/ddpm_fashion_mnist.py:smoke`` through the launcher, then
``python -m research.sample_images --sampler ddim --steps 50 --guidance 3 --label 7`` on its
workdir writing a PNG grid; bad guidance / strength / label values are one clear error naming the
value and its range."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from tests import e2e

CONFIG = "configs/ddpm_fashion_mnist.py"


@pytest.fixture(scope="module")
def smoke_workdir(fashion_mnist_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddpm")
    proc = e2e.launch(workdir, config=f"{CONFIG}:smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir, proc


def test_launcher_smoke_run_trains_checkpoints_and_writes_a_grid(smoke_workdir):
    workdir, _ = smoke_workdir
    rows = e2e.metrics_rows(workdir)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses and all(np.isfinite(losses))
    assert any("val/loss" in r and np.isfinite(r["val/loss"]) for r in rows)
    assert e2e.finished_steps(workdir) == [4]
    assert (workdir / "samples_4.png").stat().st_size > 0  # a row per class, DDIM with guidance


def test_sample_images_cli_writes_a_png_grid(smoke_workdir):
    from PIL import Image
    workdir, _ = smoke_workdir
    out = workdir / "sneakers.png"
    proc = e2e.run([sys.executable, "-m", "research.sample_images", "--workdir", str(workdir),
                    "--sampler", "ddim", "--steps", "50", "--guidance", "3", "--label", "7",
                    "--num", "4", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    img = np.asarray(Image.open(out))
    # 4 samples of one class -> a 2 x 2 grid of 28 x 28 tiles (plus any padding between tiles)
    assert img.shape[0] >= 56 and img.shape[1] >= 56 and img.std() > 0


@pytest.mark.parametrize("args,fragments", [
    (["--guidance", "25"], ["--guidance=25", "0 <= w <= 20"]),
    (["--guidance", "-1"], ["--guidance=-1", "0 <= w <= 20"]),
    (["--label", "12"], ["--label=12", "0..9"]),
    (["--init_image", "x.png", "--strength", "1.5"], ["--strength=1.5", "0 < strength <= 1"]),
    (["--init_image", "x.png", "--strength", "0"], ["--strength=0", "0 < strength <= 1"]),
])
def test_sample_images_bad_values_are_one_clear_error(args, fragments, tmp_path, capsys):
    """Checked before anything is loaded: run in-process (a subprocess would spend seconds on
    imports); ``run_cli`` is what ``python -m research.sample_images`` calls."""
    from absl import flags

    from research import sample_images
    flags.FLAGS.unparse_flags()  # absl keeps values between in-process parses: start from defaults
    rc = sample_images.run_cli(["sample_images", "--workdir", str(tmp_path), *args])
    flags.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    msg = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(msg) == 1 and all(f in msg[0] for f in fragments), err


def test_task_level_range_errors(fashion_mnist_env):
    """The library calls (not only the CLI) name the bad value and the range."""
    import jax

    from configs import ddpm_fashion_mnist
    from research.diffusion import img2img
    from research.tasks.ddpm import DDPMTask
    task = DDPMTask(ddpm_fashion_mnist.get_config("smoke"), load_data=False)
    params = task.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"label 11 is out of range: expected 0\.\.9"):
        task.sample(params, [3, 11], jax.random.key(0), steps=2)
    with pytest.raises(ValueError, match=r"guidance scale=30.* expected 0 <= w <= 20"):
        task.sample(params, [3], jax.random.key(0), steps=2, guidance_scale=30.0)
    with pytest.raises(ValueError, match=r"strength=1\.2 is out of range: expected 0 < strength <= 1"):
        img2img.sdedit(task, params, np.zeros((1, 28, 28, 1)), [3], jax.random.key(0),
                       strength=1.2, steps=4)


def test_measure_script_reports_quality_speed_and_img2img(smoke_workdir, tmp_path):
    """``experiments/diffusion/measure.py`` end to end on the smoke run and a smoke classifier
    (untrained models: the figures are not judged, their presence, ranges and consistency are):
    conditional accuracy and class-kept shares are fractions of the images scored, the Frechet
    distances finite and >= 0, the sampling times positive, the grids written."""
    workdir, _ = smoke_workdir
    res = e2e.run_measure(workdir, e2e.smoke_classifier(tmp_path / "cnn"), "--per_class", "1",
                          "--ddpm_per_class", "1", "--real", "40", "--img2img", "4", "--steps", "3")
    assert res["ddim_n"] == 10 and res["ddpm_n"] == 10 and res["img2img_n"] == 4
    for k, n in (("ddim_conditional_accuracy", 10), ("ddpm_conditional_accuracy", 10),
                 ("img2img_unconditional_class_kept", 4), ("img2img_own_label_class_kept", 4)):
        assert 0.0 <= res[k] <= 1.0 and res[k] * n == pytest.approx(round(res[k] * n)), (k, res[k])
    for k in ("ddim_frechet", "ddpm_frechet", "ddim_frechet_same_n"):
        assert np.isfinite(res[k]) and res[k] >= 0, (k, res[k])
    assert res["ddim_s_per_image"] > 0 and res["speedup_ddim_over_ddpm"] > 0
    for name in ("measure_ddim3.png", "measure_ddpm.png", "measure_img2img_unconditional.png"):
        assert (workdir / name).stat().st_size > 0


def test_measure_script_classifier_guidance_and_clip_score(smoke_workdir, tmp_path):
    """The optional parts of the measure script on smoke runs: classifier guidance of the
    unconditional model at each scale (a fraction for the accuracy, a finite Frechet distance, a
    grid per scale), the CLIP score of samples and of real images (CLIP-S lies in [0, 2.5]) and CLIP
    guidance at each scale."""
    workdir, _ = smoke_workdir
    runs = {"noisy": "configs/noisy_classifier_fashion_mnist.py:smoke",
            "clip": "configs/clip_fashion_mnist.py:smoke"}
    for name, config in runs.items():
        proc = e2e.launch(tmp_path / name, config=config)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    res = e2e.run_measure(
        workdir, e2e.smoke_classifier(tmp_path / "cnn"), "--per_class", "1", "--ddpm_per_class",
        "0", "--real", "40", "--img2img", "0", "--steps", "3", "--noisy_classifier",
        str(tmp_path / "noisy"), "--classifier_scales", "0,5", "--clip", str(tmp_path / "clip"),
        "--clip_guidance_scales", "0,50")
    for s in ("0", "5"):
        g = res[f"classifier_guided_s{s}"]
        acc = g["conditional_accuracy"]
        assert 0.0 <= acc <= 1.0 and acc * 10 == pytest.approx(round(acc * 10)), (s, acc)
        assert np.isfinite(g["frechet"]) and g["frechet"] >= 0, (s, g)
        assert (workdir / f"measure_classifier_s{s}.png").stat().st_size > 0
    for k in ("clip_score_ddim", "clip_score_real"):
        assert 0.0 <= res[k] <= 2.5, (k, res[k])
    for s in ("0", "50"):
        g = res[f"clip_guided_s{s}"]
        assert 0.0 <= g["clip_score"] <= 2.5 and np.isfinite(g["frechet"]), (s, g)
        assert (workdir / f"measure_clip_guided_s{s}.png").stat().st_size > 0
    # scale 0 of either guidance is the same unguided chain (w = 0, same seed): same samples
    assert res["clip_guided_s0"]["frechet"] == pytest.approx(res["classifier_guided_s0"]["frechet"])
    assert "ddpm_n" not in res and "img2img_n" not in res  # 0 skips those parts
