"""The ``noisy_classify`` task (a noise-aware classifier log p(y | x_t, t)) and classifier guidance
from ``research.sample_images``: the training input is the forward process's x_t, the smoke config
trains through the launcher with per-noise-level accuracies, and ``--classifier_scale`` /
``--classifier_workdir`` steer DDPM sampling (or fail with one clear error)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError, sibling_config
from research.tasks import noisy_classify
from tests import e2e

CONFIG = "configs/noisy_classifier_fashion_mnist.py"


def clf_config(**diffusion):
    config = sibling_config(str(e2e.REPO / CONFIG),
                            "noisy_classifier_fashion_mnist").get_config("smoke")
    config.diffusion.update(diffusion)
    return config


def ddpm_config():
    return sibling_config(str(e2e.REPO / CONFIG), "ddpm_fashion_mnist").get_config("smoke")


def cosine_alphas_cumprod(T: int, s: float = 0.008) -> np.ndarray:
    """alpha-bar of Nichol & Dhariwal's cosine schedule, written out here in float64."""
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)])
    return np.cumprod(1.0 - betas)


def log_softmax_np(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def random_params(task, seed: int, gain: float = 1.0):
    """Random parameters of ``task``'s shapes drawn in numpy (no jitted init: compiling a U-Net's
    initializers costs ~20 s on a busy 2-core CPU): kernels N(0, gain^2 / fan_in), norm scales 1,
    other vectors N(0, 0.1^2)."""
    import flax.linen as nn
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return np.ones(s.shape, np.float32)
        std = gain / math.sqrt(math.prod(s.shape[:-1])) if len(s.shape) > 1 else 0.1
        return (std * rng.standard_normal(s.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(
        draw, nn.meta.unbox(jax.eval_shape(task.init, jax.random.key(0))))


def make_run(workdir, config, task) -> None:
    """A workdir as the launcher leaves it (config.json + a checkpoint at step 1) of an untrained
    model with ``random_params`` and a fresh optimizer state."""
    from research.core import checkpoint as ckpt_lib
    from research.core.mesh import make_mesh
    from research.core.train import build_state
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))
    tx, _, _, _, _ = build_state(task, config, make_mesh(config.mesh, jax.devices()[:1]))
    params = random_params(task, config.seed)
    state = {"step": jnp.ones((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jax.random.key(config.seed)}
    ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"))
    ckpt.save(1, state, {"seed": config.seed, "step": 1}, ckpt_lib.to_jsonable(task.meta()))
    ckpt.close()


# -- the objective ---------------------------------------------------------------------------------
def test_loss_is_cross_entropy_on_the_forward_process_x_t():
    """Reference: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps built by hand in float64 numpy (alpha-bar
    from the cosine formula written out above), t and eps drawn as the module docstring says from
    the same rng, and the cross-entropy of the model's logits on that x_t in numpy; in eval mode,
    accuracy at the fixed level t = 0 on the same noise."""
    task = noisy_classify.NoisyClassifyTask(clf_config(), load_data=False)
    params = random_params(task, 0)
    logits_fn = jax.jit(lambda p, x, t: task.model.apply({"params": p}, x, t))
    rng_np = np.random.default_rng(0)
    x0 = rng_np.uniform(-1, 1, (6, 28, 28, 1)).astype(np.float32)
    labels = rng_np.integers(0, 10, 6).astype(np.int32)
    rng = jax.random.key(7)
    loss, metrics = jax.jit(lambda p, b, r: task.loss(p, b, r, True))(
        params, {"images": x0, "labels": labels}, rng)

    t_rng, noise_rng, _ = jax.random.split(rng, 3)
    T = 100
    t = np.asarray(jax.random.randint(t_rng, (6,), 0, T))
    eps = np.asarray(jax.random.normal(noise_rng, x0.shape), np.float64)
    ab = cosine_alphas_cumprod(T)[t][:, None, None, None]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    logits = logits_fn(params, jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    want = -log_softmax_np(logits)[np.arange(6), labels].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert len(set(t.tolist())) > 1  # a t per example, not one for the batch
    on_x0 = logits_fn(params, jnp.asarray(x0), jnp.asarray(t))
    assert abs(-log_softmax_np(on_x0)[np.arange(6), labels].mean() - want) > 1e-4  # not vacuous
    assert float(metrics["accuracy"]) == np.mean(np.argmax(logits, -1) == labels)

    _, ev = jax.jit(lambda p, b, r: task.loss(p, b, r, False))(
        params, {"images": x0, "labels": labels}, rng)
    assert sorted(ev) == ["accuracy", "accuracy_t0", "accuracy_t25", "accuracy_t50",
                          "accuracy_t75", "loss"]
    ab0 = cosine_alphas_cumprod(T)[0]
    at0 = logits_fn(params, jnp.asarray(np.sqrt(ab0) * x0 + np.sqrt(1 - ab0) * eps, jnp.float32),
                    jnp.zeros(6, jnp.int32))
    assert float(ev["accuracy_t0"]) == np.mean(np.argmax(at0, -1) == labels)


def test_config_errors_name_the_key():
    """Reference: the key and the accepted values, as the config docstring lists them."""
    with pytest.raises(ConfigError, match=r"config.diffusion.schedule='sqrt'.*'linear', 'cosine'"):
        noisy_classify.NoisyClassifyTask(clf_config(schedule="sqrt"), load_data=False)
    bad = clf_config()
    bad.eval_noise_levels = (0.0, 1.5)
    with pytest.raises(ConfigError, match=r"config.eval_noise_levels=.*\[0, 1\)"):
        noisy_classify.NoisyClassifyTask(bad, load_data=False)
    with pytest.raises(ConfigError, match=r"schedule='cosine', num_steps=50 .* num_steps=100: "
                                          r"train the classifier with .*num_steps=100"):
        noisy_classify.check_same_schedule({"schedule": "cosine", "num_steps": 50},
                                           {"schedule": "cosine", "num_steps": 100})


# -- the launcher ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_workdir(fashion_mnist_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("noisy_clf")
    proc = e2e.launch(workdir, config=f"{CONFIG}:smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir


def test_launcher_smoke_run_writes_per_noise_level_accuracies(smoke_workdir):
    """Reference: the smoke config (T = 100, levels 0, 1/4, 1/2, 3/4 of T) gives the metric names
    val/accuracy_t{0,25,50,75}; accuracies are fractions of the 16 evaluated test images; the
    checkpoint's meta records the schedule that guidance compares."""
    rows = e2e.metrics_rows(smoke_workdir)
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    ev = [r for r in rows if "val/loss" in r]
    assert ev and ev[-1]["step"] == 4
    for key in ("val/accuracy", "val/accuracy_t0", "val/accuracy_t25", "val/accuracy_t50",
                "val/accuracy_t75"):
        assert 0.0 <= ev[-1][key] <= 1.0 and (ev[-1][key] * 16) % 1 == 0, (key, ev[-1])
    assert e2e.finished_steps(smoke_workdir) == [4]
    clf = noisy_classify.load_noisy_classifier(str(smoke_workdir))
    assert clf.step == 4 and clf.diffusion == {"schedule": "cosine", "num_steps": 100}


# -- guidance --------------------------------------------------------------------------------------
def test_classifier_guidance_scale0_is_exact_and_a_large_scale_raises_log_p():
    """Reference: unguided DDIM sampling of the same random U-Net with the same seed; the
    classifier's own log p(y | x_0, t = 0) of the final samples, which guidance at a large scale
    must raise for the requested label of every sample against scale 0. (x0 clipping is off: the
    random U-Net's x0 estimates lie far outside [-1, 1] and clipping would hide the shift.)"""
    from research.tasks.ddpm import DDPMTask
    config = ddpm_config()
    config.diffusion.clip_sample = False
    ddpm = DDPMTask(config, load_data=False)
    params = random_params(ddpm, 0)
    task = noisy_classify.NoisyClassifyTask(clf_config(), load_data=False)
    clf = noisy_classify.NoisyClassifierRun(task.model, random_params(task, 1, gain=3.0), 0,
                                            task.meta())
    labels = np.array([0, 3, 7, 9], np.int32)
    kw = dict(steps=4, guidance_scale=1.0, eta=0.0)
    plain = ddpm.sample(params, labels, jax.random.key(5), **kw)
    wrap = lambda s: noisy_classify.guidance_wrapper(clf, ddpm.schedule, s)  # noqa: E731
    zero = ddpm.sample(params, labels, jax.random.key(5), denoise_wrapper=wrap(0.0), **kw)
    np.testing.assert_array_equal(zero, plain)
    big = ddpm.sample(params, labels, jax.random.key(5), denoise_wrapper=wrap(50.0), **kw)

    def log_p(x):
        lp = clf.log_prob(jnp.asarray(x), jnp.zeros(len(labels), jnp.int32))
        return np.asarray(lp)[np.arange(len(labels)), labels]
    before, after = log_p(plain), log_p(big)
    assert (after > before).all() and after.mean() > before.mean() + 0.1, (before, after)


def run_cli(*args: str):
    from research import sample_images
    return sample_images.run_cli(["sample_images", *args])


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddpm_untrained")
    from research.tasks.ddpm import DDPMTask
    config = ddpm_config()
    make_run(workdir, config, DDPMTask(config, load_data=False))
    return workdir


def test_cli_scale0_equals_plain_sampling_and_scale5_changes_the_grid(ddpm_run, smoke_workdir):
    """Reference: the same command without the classifier flags (identical PNG bytes at
    --classifier_scale 0); at scale 5 the grid differs."""
    common = ["--workdir", str(ddpm_run), "--steps", "3", "--label", "7", "--num", "4",
              "--guidance", "1"]
    a, b, c = (ddpm_run / f"{n}.png" for n in "abc")
    assert run_cli(*common, "--out", str(a)) == 0
    assert run_cli(*common, "--out", str(b), "--classifier_workdir", str(smoke_workdir),
                   "--classifier_scale", "0") == 0
    assert a.read_bytes() == b.read_bytes()
    assert run_cli(*common, "--out", str(c), "--classifier_workdir", str(smoke_workdir),
                   "--classifier_scale", "5") == 0
    assert a.read_bytes() != c.read_bytes()


def test_cli_errors_name_the_flag_and_the_fix(ddpm_run, tmp_path, capsys):
    """Reference: the flag, the bad value and the fix that the module docstring documents."""
    other_T = tmp_path / "clf_T50"
    config = clf_config(num_steps=50)
    make_run(other_T, config, noisy_classify.NoisyClassifyTask(config, load_data=False))
    cases = [
        (["--classifier_scale", "2"], ["--classifier_scale=2 needs --classifier_workdir=DIR"]),
        (["--classifier_scale", "-1", "--classifier_workdir", "x"],
         ["--classifier_scale=-1", "S >= 0"]),
        (["--classifier_scale", "2", "--classifier_workdir", str(ddpm_run)],
         [f"--classifier_workdir={ddpm_run}", "is a 'ddpm' run, not a 'noisy_classify' run"]),
        (["--classifier_scale", "2", "--classifier_workdir", str(tmp_path / "none")],
         ["--classifier_workdir=", "no checkpoint", "research.launch"]),
        (["--classifier_scale", "2", "--classifier_workdir", str(other_T)],
         [f"--classifier_workdir={other_T}", "num_steps=50", "--config.diffusion.num_steps=100"]),
    ]
    for args, fragments in cases:
        rc = run_cli("--workdir", str(ddpm_run), "--steps", "2", *args)
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        msg = [line for line in err.splitlines() if line.startswith("Error:")]
        assert len(msg) == 1 and all(f in msg[0] for f in fragments), (args, err)
