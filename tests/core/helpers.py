"""A small LM task on synthetic tokens, for loop tests that need no dataset."""
import numpy as np

from configs.gpt_shakespeare_char import get_config
from research.data.tokenizers import CharTokenizer
from research.tasks.lm import LMTask


def synthetic_task(**overrides):
    config = get_config("size=baby,smoke")
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    tok = CharTokenizer.from_text("abcdefghij")
    rng = np.random.default_rng(0)
    # A learnable stream: mostly "abcdefghij" repeated, with some noise.
    stream = np.tile(np.arange(10), 400)
    noise = rng.random(stream.shape) < 0.1
    stream = np.where(noise, rng.integers(0, 10, stream.shape), stream).astype(np.int32)
    task = LMTask(config, tokenizer=tok, splits={"train": stream[:3600], "validation": stream[3600:]})
    return config, task
