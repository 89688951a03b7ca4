"""GPT on a byte-level BPE vocabulary of tiny Shakespeare, to compare bits per character with the
character model (``configs/gpt_shakespeare_char.py:size=baby``).

The same model and schedule as the char config's ``size=baby`` (4x4x128, batch 12, 2000 steps),
on a 512-token byte-level BPE trained on the train split (``research.data.tokenizers.BpeTokenizer``;
256 bytes + 256 merges). Measured with that tokenizer: 1.944 chars/token on the train split, 1.878
on validation (1.937 on the whole text). So the context is ``max_len=32`` tokens, about 62 train
characters (60 validation), against the char model's 64 (64 / 1.94 = 33; 32 keeps a power of two).
The smoke variant halves the char smoke's 32 likewise, to 16 tokens.

Compare models by ``val/bits_per_char`` (``val/loss`` is nats per TOKEN here, per char there).

Train (the baby-sized comparison run):
    python -m research.launch --config configs/gpt_shakespeare_bpe.py --workdir workdirs/baby_bpe
A run of seconds:
    python -m research.launch --config configs/gpt_shakespeare_bpe.py:smoke --workdir /tmp/smoke_bpe
Offline, point at a local copy of input.txt:
    ... --config.data.manual_dir=../shared/data/tinyshakespeare   (or RESEARCH_SHAKESPEARE_DIR=...)
Sample (the BPE tokenizer is restored from the checkpoint):
    python -m research.sample --workdir workdirs/baby_bpe --prompt "ROMEO:" --max_new_tokens 250 \
        --temperature 0.8 --top_k 200
"""
from research.core.config import parse_arg, sibling_config


VOCAB_SIZE = 512
MAX_LEN = 32        # tokens: ~62 characters at 1.94 chars/token (the char model sees 64)
SMOKE_MAX_LEN = 16  # the char smoke config's 32 characters


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = sibling_config(__file__, "gpt_shakespeare_char").get_config(f"size=baby,smoke={arg.smoke}")
    c.data.tokenizer = "bpe"
    c.data.vocab_size = VOCAB_SIZE
    c.model.max_len = SMOKE_MAX_LEN if arg.smoke else MAX_LEN
    return c
