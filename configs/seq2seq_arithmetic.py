"""The original encoder-decoder Transformer trained on integer arithmetic (as in the Goat study):
problems like ``123*45=`` -> ``5535`` generated on the fly, evaluated on held-out problems (never
trained on) by exact match and character BLEU with greedy decoding and beam search.

Addition of 1-3 digit numbers on a CPU (the default; a few minutes):
    python -m research.launch --config configs/seq2seq_arithmetic.py --workdir workdirs/s2s_add
Addition and multiplication of 1-5 digit numbers (the full experiment; size=base, GPU-sized):
    python -m research.launch --config configs/seq2seq_arithmetic.py:ops=add+mul,digits=5,size=base \
        --workdir workdirs/s2s_addmul
A run of seconds (what the tests run):
    python -m research.launch --config configs/seq2seq_arithmetic.py:smoke --workdir /tmp/s2s_smoke
Arguments: ``ops`` = add | sub | mul | add+mul | add+sub+mul; ``digits`` = the most digits per
operand; ``size`` = small | base (the paper's base model: 6 layers, 8 heads, 512 dims);
``steps`` = total steps (and the cosine decay), 0 = the size's default.
Every eval logs val/exact_match, val/bleu (greedy) and val/exact_match_beam, val/bleu_beam
(``config.decode.num_beams``); they are in WORKDIR/metrics.jsonl and summary.json.
"""
import ml_collections

from research.core.config import ConfigError, parse_arg

OPS = {"add": "+", "sub": "-", "mul": "*"}
SIZES = {
    # 2+2 layers of 128 dims: learns 1-3 digit addition in a few CPU minutes.
    "small": dict(num_layers=2, num_heads=4, embed_dim=128, dropout=0.0, batch_size=128,
                  total_steps=1500, lr=1e-3, warmup_steps=100),
    # The paper's base model (Vaswani et al. 2017, table 3): N=6, d_model=512, h=8, d_ff=2048,
    # P_drop=0.1.
    "base": dict(num_layers=6, num_heads=8, embed_dim=512, dropout=0.1, batch_size=256,
                 total_steps=20000, lr=5e-4, warmup_steps=2000),
}


def get_config(arg=None):
    arg = parse_arg(arg, ops="add", digits=3, size="small", steps=0, smoke=False)
    names = arg.ops.split("+")
    if not names or any(n not in OPS for n in names):
        raise ConfigError(f"Unknown ops {arg.ops!r} in --config ...:ops=; use names from "
                          f"{sorted(OPS)} joined by '+', e.g. ops=add+mul")
    if arg.size not in SIZES:
        raise ConfigError(f"Unknown size {arg.size!r} in --config ...:size=; known: {sorted(SIZES)}")
    s = SIZES[arg.size]
    ops = "".join(OPS[n] for n in names)
    answer_len = max({"+": arg.digits + 1, "-": arg.digits + 1, "*": 2 * arg.digits}[o] for o in ops)
    c = ml_collections.ConfigDict()
    c.task = "seq2seq"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        num_layers=s["num_layers"], num_heads=s["num_heads"], embed_dim=s["embed_dim"],
        # sources: 2 * digits + 2 tokens; targets: BOS + answer + EOS
        max_len=max(2 * arg.digits + 2, answer_len + 2),
        mlp_ratio=4, dropout=s["dropout"], use_bias=True, tie_embeddings=True,
        activation="relu",       # the paper's FFN
        norm_position="post",    # the paper's Norm(x + Sublayer(x)); 'pre' is more stable deep
        dtype="float32", remat="none"))
    c.data = ml_collections.ConfigDict(dict(
        name="arithmetic", ops=ops, min_digits=1, max_digits=arg.digits,
        test_size=2000, test_seed=0))
    c.decode = ml_collections.ConfigDict(dict(num_beams=4, length_penalty=1.0))
    c.label_smoothing = 0.0      # the paper used 0.1 for translation; exact answers prefer 0
    c.batch_size = s["batch_size"]
    c.grad_accum_steps = 1
    c.total_steps = arg.steps or s["total_steps"]
    c.optim = ml_collections.ConfigDict(dict(
        name="adamw", lr=s["lr"], min_lr=s["lr"] / 10, warmup_steps=s["warmup_steps"],
        decay_steps=c.total_steps, schedule="cosine",
        b1=0.9, b2=0.98, eps=1e-9,  # the paper's Adam settings
        weight_decay=0.01, grad_clip=1.0))
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 4
    c.eval_batch_size = 250      # 4 x 250 = 1000 held-out problems decoded per eval
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, pipeline=1, expert=1))
    c.sharding = ml_collections.ConfigDict(dict(preset="data_parallel"))
    c.peak_flops = ml_collections.config_dict.placeholder(float)  # None = detect
    if arg.smoke:
        c.model.update(num_layers=1, num_heads=2, embed_dim=32)
        c.data.test_size = 64
        c.batch_size = 16
        c.total_steps = 6
        c.optim.update(warmup_steps=2, decay_steps=6)
        c.decode.num_beams = 2
        c.log_every = 2
        c.eval_every = 3
        c.eval_batches = 2
        c.eval_batch_size = 16
        c.checkpoint_every = 3
    return c
