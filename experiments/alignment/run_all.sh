#!/usr/bin/env bash
# The alignment chain of experiments/alignment/README.md: a character LM, SFT on prompt/response
# pairs, a reward model, DPO and PPO from the SFT model, each evaluated for its TRUE preference rate
# and KL to the SFT reference, and the frontier plot (WORKDIRS/frontier.png). Usage (from the
# repository root):
#     bash experiments/alignment/run_all.sh [WORKDIRS=workdirs/alignment] [LM_STEPS=1000]
# Sized for <= 30 minutes on 2 shared CPU cores (the configs' defaults); each stage's wall time is
# appended to WORKDIRS/times.txt. Offline: export RESEARCH_SHAKESPEARE_DIR=../shared/data/tinyshakespeare.
set -euo pipefail
W=${1:-workdirs/alignment}
LM_STEPS=${2:-1000}
N=${NICE:-10}
mkdir -p "$W"
L="nice -n $N python -m research.launch"
stage() {  # stage NAME CMD...: run, log to $W/NAME.log, record the wall time
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" > "$W/$name.log" 2>&1 || { echo "$name failed; see $W/$name.log"; tail -20 "$W/$name.log"; exit 1; }
    echo "$name $((SECONDS - t0)) s" | tee -a "$W/times.txt"
}
stage lm $L --config configs/gpt_shakespeare_char.py:size=baby --workdir $W/lm \
    --config.total_steps=$LM_STEPS --config.optim.decay_steps=$LM_STEPS
stage sft $L --config configs/sft_shakespeare.py --workdir $W/sft --config.init_from=$W/lm
stage reward $L --config configs/reward_shakespeare.py --workdir $W/reward --config.init_from=$W/sft
stage dpo $L --config configs/dpo_shakespeare.py --workdir $W/dpo --config.init_from=$W/sft
stage ppo $L --config configs/ppo_shakespeare.py --workdir $W/ppo --config.init_from=$W/sft \
    --config.ppo.reward_model=$W/reward
# Denser checkpoints at low KL for the frontier: DPO's first 20 steps (a checkpoint every 4) and
# PPO's first 10 iterations (every one; bit-identical to the first 10 of the run above).
stage dpo_early $L --config configs/dpo_shakespeare.py --workdir $W/dpo_early --config.init_from=$W/sft \
    --config.total_steps=20 --config.checkpoint_every=4 --config.eval_every=20
stage ppo_early $L --config configs/ppo_shakespeare.py --workdir $W/ppo_early --config.init_from=$W/sft \
    --config.ppo.reward_model=$W/reward --config.total_steps=10 --config.checkpoint_every=1 \
    --config.eval_every=10
E="nice -n $N python -m research.rlhf.evaluate --reference $W/sft --reward_model $W/reward --num_prompts 256"
stage eval_sft $E --workdir $W/sft
stage eval_dpo $E --workdir $W/dpo --all_checkpoints
stage eval_ppo $E --workdir $W/ppo --all_checkpoints
stage eval_dpo_early $E --workdir $W/dpo_early --all_checkpoints
stage eval_ppo_early $E --workdir $W/ppo_early --all_checkpoints
python experiments/alignment/plot_frontier.py --sft $W/sft --runs $W/dpo $W/ppo --out $W/frontier.png \
    | tee "$W/frontier.txt"
python experiments/alignment/plot_frontier.py --sft $W/sft --runs $W/dpo,$W/dpo_early \
    $W/ppo,$W/ppo_early --out $W/frontier_dense.png | tee "$W/frontier_dense.txt"
grep -h '"val/accuracy"' $W/reward/metrics.jsonl | tail -1 | python -c \
    "import json,sys; r=json.loads(sys.stdin.read()); print('reward model held-out pairwise accuracy', r['val/accuracy'], 'at step', r['step'])" \
    | tee -a "$W/frontier.txt"
awk '{s += $2} END {print "total", s, "s"}' "$W/times.txt"
