"""BERT-style masked-LM pretraining on tiny Shakespeare (characters; research/tasks/mlm.py).

The encoder is BERT's layout (post-LayerNorm, learned positions, token types, embedding LayerNorm,
tied MLM head, LayerNorm epsilon 1e-12, exact GELU) at the size of the baby GPT
(configs/gpt_shakespeare_char.py:size=baby: 4 layers, 4 heads, 128 dims, context 64). Examples are
"[CLS] A [SEP] B [SEP]" over random stretches of the text; 15% of the characters are chosen, 80% of
those become [MASK], 10% a random character, 10% stay; val/masked_accuracy is the accuracy there.

Train (laptop size, the default; a CPU run of a few minutes):
    python -m research.launch --config configs/bert_mlm_shakespeare.py --workdir workdirs/bert_mlm
A GPU-sized run (6 layers, 6 heads, 384 dims, context 256, dropout 0.1, batch 64, 5000 steps):
    python -m research.launch --config configs/bert_mlm_shakespeare.py:size=default \
        --workdir workdirs/bert_mlm_gpu
A shorter run (``steps=N`` sets total_steps and the cosine decay to N; what fits ~10 CPU minutes
on a shared 2-core machine):
    python -m research.launch --config configs/bert_mlm_shakespeare.py:steps=1200 \
        --workdir workdirs/bert_mlm_1200
A run of seconds (what the tests run):
    python -m research.launch --config configs/bert_mlm_shakespeare.py:smoke --workdir /tmp/smoke
Offline, point at a local copy of input.txt:
    ... --config.data.manual_dir=../shared/data/tinyshakespeare   (or RESEARCH_SHAKESPEARE_DIR=...)
Export the trained encoder for transformers (research/convert/hf_bert.py):
    save_hf_bert(params, task.model_config, task.encoder_config, "out/")
"""
import ml_collections

from research.core.config import parse_arg

SIZES = {
    # The baby GPT's shape (nanoGPT's CPU command); a larger batch, since only 15% of the
    # positions carry a loss.
    "baby": dict(num_layers=4, num_heads=4, embed_dim=128, max_len=64, dropout=0.0,
                 batch_size=32, total_steps=2000, eval_batches=20),
    # nanoGPT's shakespeare-char size with BERT's dropout.
    "default": dict(num_layers=6, num_heads=6, embed_dim=384, max_len=256, dropout=0.1,
                    batch_size=64, total_steps=5000, eval_batches=100),
}


def get_config(arg=None):
    arg = parse_arg(arg, size="baby", steps=0, smoke=False)
    if arg.size not in SIZES:
        raise ValueError(f"Unknown size {arg.size!r} in --config ...:size=; known: {sorted(SIZES)}")
    s = SIZES[arg.size]
    c = ml_collections.ConfigDict()
    c.task = "mlm"
    c.seed = 1337
    c.model = ml_collections.ConfigDict(dict(
        num_layers=s["num_layers"], num_heads=s["num_heads"], embed_dim=s["embed_dim"],
        max_len=s["max_len"], mlp_ratio=4, dropout=s["dropout"],
        use_bias=True, tie_embeddings=True, activation="gelu",  # BERT: biases, exact GELU, tied head
        norm_position="post", norm_eps=1e-12,                   # BERT: post-LayerNorm, eps 1e-12
        type_vocab_size=2,                                      # segments A and B
        dtype="float32",         # compute dtype: 'bfloat16' for mixed precision (params stay fp32)
        remat="none",            # or 'nothing_saveable', 'dots_saveable', ...
    ))
    c.masking = ml_collections.ConfigDict(dict(
        mask_rate=0.15, mask_token_prob=0.8, random_token_prob=0.1, short_seq_prob=0.1))
    c.data = ml_collections.ConfigDict(dict(
        name="tiny_shakespeare",
        manual_dir=ml_collections.config_dict.placeholder(str),  # or $RESEARCH_SHAKESPEARE_DIR
        data_dir=ml_collections.config_dict.placeholder(str),    # or $RESEARCH_DATA_DIR
    ))
    c.batch_size = s["batch_size"]
    c.grad_accum_steps = 1
    c.total_steps = arg.steps or s["total_steps"]
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=c.total_steps,
        schedule="cosine", b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, grad_clip=1.0))
    c.log_every = 10
    c.eval_every = 250
    c.eval_batches = s["eval_batches"]
    c.eval_batch_size = ml_collections.config_dict.placeholder(int)  # None = batch_size
    c.checkpoint_every = 250
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)  # None = detect
    if arg.smoke:
        c.model.update(num_layers=2, num_heads=2, embed_dim=32, max_len=32)
        c.batch_size = 8
        c.total_steps = 6
        c.optim.update(warmup_steps=2, decay_steps=6)
        c.log_every = 2
        c.eval_every = 3
        c.eval_batches = 2
        c.checkpoint_every = 3
    return c
