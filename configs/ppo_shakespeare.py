"""RLHF with PPO from the SFT model: rollouts of 16-character continuations sampled with the
KV-cached sampler, scored by the reward model (configs/reward_shakespeare.py) minus a per-token KL
penalty to the SFT reference, a value head on the policy's trunk, GAE, the clipped surrogate and
value losses, 4 epochs of minibatch updates per rollout batch (research/rlhf/ppo_loop.py).
``total_steps`` counts PPO iterations; logs reward, KL, entropy, clip fraction, value error and the
TRUE preference rate of the rollouts (rollout/*) and of held-out prompts every eval_every (val/*).

After the SFT and reward runs:
    python -m research.launch --config configs/ppo_shakespeare.py --workdir workdirs/ppo \
        --config.init_from=workdirs/sft --config.ppo.reward_model=workdirs/reward
Oracle ablation (the programmatic rule as the reward, no reward model):
    ... --config.ppo.score=ground_truth
A run of seconds (from the SFT and reward smoke runs; what the tests run):
    python -m research.launch --config configs/ppo_shakespeare.py:smoke --workdir /tmp/ppo_smoke \
        --config.init_from=/tmp/sft_smoke --config.ppo.reward_model=/tmp/rm_smoke
"""
import ml_collections

from research.core.config import parse_arg, sibling_config


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = sibling_config(__file__, "sft_shakespeare").base_config(arg.smoke)
    c.task = "ppo"
    c.ppo = ml_collections.ConfigDict(dict(
        reward_model=ml_collections.config_dict.placeholder(str),  # a reward run's workdir
        reference=ml_collections.config_dict.placeholder(str),     # None = config.init_from
        score="reward_model",      # or 'ground_truth' (the preference rule itself; an oracle)
        rollout_batch=64,          # rollouts per iteration
        epochs=4,                  # passes over each rollout batch
        clip=0.2,                  # PPO ratio clip
        value_clip=0.2,            # value clip around the rollout's values (None = off)
        vf_coef=0.1,
        kl_coef=0.05,              # per-token KL penalty to the reference, in the reward
        kl_kind="k1",              # 'k1' | 'abs' | 'mse' | 'k3'
        gamma=1.0,
        lam=0.95,
        temperature=1.0,           # of the rollouts (and of the log-probs PPO uses)
        whiten_advantages=True,
    ))
    c.total_steps = 3 if arg.smoke else 30  # PPO iterations
    c.batch_size = 8 if arg.smoke else 32    # minibatch
    # The optimizer steps once per minibatch: rollout_batch / batch_size * epochs per iteration.
    c.optim.update(lr=1e-4, min_lr=1e-4, warmup_steps=2 if arg.smoke else 10, schedule="constant",
                   weight_decay=0.0, grad_clip=1.0)
    c.log_every = 1
    c.eval_every = 2 if arg.smoke else 10
    c.checkpoint_every = 2 if arg.smoke else 5
    c.data.num_eval = 128
    c.keep_checkpoints = 20
    if arg.smoke:
        c.ppo.rollout_batch = 16
        c.data.num_eval = 16
    return c
