"""The alignment chain through the real launcher on the smoke configs: SFT (from scratch) ->
reward model, DPO and PPO from that SFT checkpoint; then the evaluation CLI; and clean errors."""
import json

import pytest

from research.core.config import ConfigError
from tests.e2e import assert_clean_error, launch, metrics_rows


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory, shakespeare_env):
    workdir = tmp_path_factory.mktemp("sft") / "sft"
    proc = launch(workdir, config="configs/sft_shakespeare.py:smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_rows(workdir)
    assert rows[-1]["step"] == 6 and 0 < rows[-1]["val/loss"] < 5
    return workdir


def test_reward_dpo_ppo_from_the_sft_checkpoint(sft_workdir, tmp_path):
    init = f"--config.init_from={sft_workdir}"
    rm = tmp_path / "rm"
    proc = launch(rm, init, config="configs/reward_shakespeare.py:smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[reward] preference pairs (avoids the characters 'e'): train kept 256 of 256" in proc.stdout
    last = metrics_rows(rm)[-1]
    assert 0 <= last["val/accuracy"] <= 1 and last["val/loss"] > 0

    dpo = tmp_path / "dpo"
    proc = launch(dpo, init, config="configs/dpo_shakespeare.py:smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_rows(dpo)
    # The policy starts as the reference: the first eval (step 3, 2 small steps later) is near log 2.
    assert rows[0]["train/loss"] == pytest.approx(0.6931, abs=0.01)
    assert {"val/reward_accuracy", "val/reward_margin", "train/reward_chosen"} <= set(rows[-1])

    ppo = tmp_path / "ppo"
    proc = launch(ppo, init, f"--config.ppo.reward_model={rm}", config="configs/ppo_shakespeare.py:smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics_rows(ppo)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("rollout/reward", "rollout/kl", "rollout/entropy", "rollout/true_preference_rate",
                "train/clip_fraction", "train/value_error", "val/true_preference_rate", "val/kl"):
        assert key in rows[-1], key
    assert abs(rows[0]["rollout/kl"]) < 1e-4  # the first rollout comes from the reference itself
    assert (ppo / "ppo.png").exists() and (ppo / "checkpoints" / "3").is_dir()

    # The evaluation CLI, in-process (no second interpreter start): true preference rate and KL.
    from research.rlhf.evaluate import run_cli
    assert run_cli(["evaluate", f"--workdir={dpo}", "--num_prompts=8"]) == 0
    row = json.loads((dpo / "alignment_eval.jsonl").read_text().splitlines()[-1])
    assert row["num_samples"] == 8 and 0 <= row["true_preference_rate"] <= 1 and "kl" in row


def test_clean_errors(sft_workdir, tmp_path):
    proc = launch(tmp_path / "d", config="configs/dpo_shakespeare.py:smoke")
    assert_clean_error(proc, "Config error:", "config.init_from is not set")
    proc = launch(tmp_path / "s", f"--config.init_from={tmp_path / 'nowhere'}",
                  config="configs/sft_shakespeare.py:smoke")
    assert_clean_error(proc, "Config error:", "no checkpoint in")
    # A config whose model differs from the checkpoint's, and prompts longer than the context.
    from configs.sft_shakespeare import get_config
    from research.rlhf.common import lengths, model_setup
    config = get_config("smoke")
    with config.unlocked():
        config.init_from = str(sft_workdir)
        config.model.embed_dim = 64
    with pytest.raises(ConfigError, match="config.model.embed_dim=64 but the checkpoint has 32"):
        model_setup(config, None)
    config.model.embed_dim = 32
    config.data.prompt_len = 30
    with pytest.raises(ConfigError, match="exceeds the model's context max_len=32"):
        lengths(config, model_setup(config, None).model_config)
