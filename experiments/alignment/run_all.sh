#!/usr/bin/env bash
# The alignment chain of experiments/alignment/README.md: a character LM, SFT on prompt/response
# pairs, a reward model, DPO and PPO from the SFT model, each evaluated for its TRUE preference rate
# and KL to the SFT reference, and the frontier plot. Usage (from the repository root):
#     bash experiments/alignment/run_all.sh [WORKDIRS=workdirs/alignment] [LM_STEPS=2000]
# Offline: export RESEARCH_SHAKESPEARE_DIR=../shared/data/tinyshakespeare first.
set -euo pipefail
W=${1:-workdirs/alignment}
LM_STEPS=${2:-2000}
L="python -m research.launch"
$L --config configs/gpt_shakespeare_char.py:size=baby --workdir $W/lm --config.total_steps=$LM_STEPS \
    --config.optim.decay_steps=$LM_STEPS
$L --config configs/sft_shakespeare.py --workdir $W/sft --config.init_from=$W/lm
$L --config configs/reward_shakespeare.py --workdir $W/reward --config.init_from=$W/sft
$L --config configs/dpo_shakespeare.py --workdir $W/dpo --config.init_from=$W/sft
$L --config configs/ppo_shakespeare.py --workdir $W/ppo --config.init_from=$W/sft \
    --config.ppo.reward_model=$W/reward
E="python -m research.rlhf.evaluate --reference $W/sft --reward_model $W/reward"
$E --workdir $W/sft
$E --workdir $W/dpo --all_checkpoints
$E --workdir $W/ppo --all_checkpoints
python experiments/alignment/plot_frontier.py --sft $W/sft --runs $W/dpo $W/ppo \
    --out experiments/alignment/frontier.png
