"""Fine-tuning the baby character GPT (pretrained on the first 80% of tiny Shakespeare's train
text by configs/finetune_shakespeare_pretrain.py) on the later plays (the train text's last 20%),
evaluated on the validation split (the file's last 10%), with one method from
``research.peft`` / ``research.quant``: full fine-tuning, LoRA (rsLoRA, DoRA), QLoRA (NF4 base),
prompt tuning or prefix tuning. The study and its table: experiments/peft/README.md.

Pretrain the base once, then fine-tune:
    python -m research.launch --config configs/finetune_shakespeare_pretrain.py --workdir workdirs/peft_base
    python -m research.launch --config configs/finetune_shakespeare.py:method=lora,rank=8 \
        --workdir workdirs/peft_lora8 --config.finetune.base_workdir=workdirs/peft_base
Other methods: ``:method=full``, ``:method=qlora,rank=8``, ``:method=prompt``, ``:method=prefix``;
``:method=lora,rank=8,targets=all`` (every attention and MLP kernel), ``:method=lora,dora``,
``:method=lora,rslora``. A run of seconds (what the tests run; needs a base, e.g. the pretrain
config's ``:smoke`` run):
    python -m research.launch --config configs/finetune_shakespeare.py:method=lora,smoke \
        --workdir /tmp/ft_smoke --config.finetune.base_workdir=/tmp/peft_base_smoke
Offline: ... --config.data.manual_dir=../shared/data/tinyshakespeare (or RESEARCH_SHAKESPEARE_DIR).
"""
import ml_collections

from research.core.config import ConfigError, parse_arg

TARGETS = {
    "qv": (r"attn/(query|value)/kernel$",),
    "all": (r"attn/(query|key|value|out)/kernel$", r"mlp/\w+/kernel$"),
}


def get_config(arg=None):
    arg = parse_arg(arg, method="lora", rank=8, alpha=16.0, targets="qv", dora=False,
                    rslora=False, steps=500, lr=0.0, smoke=False, base="")
    if arg.targets not in TARGETS:
        raise ConfigError(f"targets={arg.targets!r}: expected one of {sorted(TARGETS)}")
    c = ml_collections.ConfigDict()
    c.task = "finetune"
    c.seed = 2024
    c.finetune = ml_collections.ConfigDict(dict(
        method=arg.method,
        base_workdir=arg.base or ml_collections.config_dict.placeholder(str),
        base_step=ml_collections.config_dict.placeholder(int),    # None = newest
        seq_len=ml_collections.config_dict.placeholder(int),      # None = max_len - num_virtual
    ))
    c.peft = ml_collections.ConfigDict(dict(
        rank=arg.rank, alpha=arg.alpha, dropout=0.05, rules=TARGETS[arg.targets],
        rslora=arg.rslora, dora=arg.dora,
        num_virtual=8, prompt_init="text", prompt_text="\nFirst Citizen:\nBefore we proceed",
        prefix_hidden=256, prefix_embed_dim=128,
    ))
    c.quant = ml_collections.ConfigDict(dict(
        blocksize=64, double_quant=True,
        rules=(r"attn/(query|key|value|out)/kernel$", r"mlp/\w+/kernel$")))
    c.data = ml_collections.ConfigDict(dict(
        name="tiny_shakespeare", train_range=(0.8, 1.0),
        manual_dir=ml_collections.config_dict.placeholder(str),
        data_dir=ml_collections.config_dict.placeholder(str),
    ))
    # Learning rates: full fine-tuning a small one; adapters and prompts larger ones (their usual
    # practice: LoRA 1e-3..2e-3 at this scale, prompt/prefix tuning 1e-2..3e-2).
    default_lr = {"full": 3e-4, "lora": 2e-3, "qlora": 2e-3, "prompt": 3e-2, "prefix": 3e-3}
    if arg.method not in default_lr:
        raise ConfigError(f"method={arg.method!r}: expected one of {sorted(default_lr)}")
    lr = arg.lr or default_lr[arg.method]
    c.batch_size = 12
    c.grad_accum_steps = 1
    c.total_steps = arg.steps
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=lr, min_lr=lr / 10, warmup_steps=min(50, arg.steps // 10),
        decay_steps=arg.steps, schedule="cosine", b1=0.9, b2=0.99, eps=1e-8,
        weight_decay=0.0 if arg.method != "full" else 0.1, grad_clip=1.0))
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 20
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)
    c.checkpoint_every = 500
    c.keep_checkpoints = 1
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)
    if arg.smoke:
        c.total_steps = 4
        c.batch_size = 4
        c.optim.update(warmup_steps=1, decay_steps=4)
        c.log_every = 2
        c.eval_every = 4
        c.eval_batches = 2
        c.checkpoint_every = 4
        c.peft.num_virtual = 4
        c.peft.prefix_hidden = 32
        c.peft.prefix_embed_dim = 16
    return c
