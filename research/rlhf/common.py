"""What the alignment tasks share: the text, the tokenizer and the model (fresh or from a
checkpoint named in the config), and the prompt/response length checks.

Config keys read here: ``config.model`` (``TransformerConfig`` fields), ``config.data``
(``name``, ``manual_dir``, ``data_dir``, ``prompt_len``, ``response_len``, ``num_train``,
``num_eval``), ``config.preference`` (``kind``, ``arg``) and ``config.init_from`` (a workdir).
"""
from __future__ import annotations

import dataclasses

from research.core.config import ConfigError
from research.data.tokenizers import CharTokenizer
from research.models.transformer import Decoder, TransformerConfig
from research.rlhf.models import Pretrained, check_task, load_pretrained, model_config_from

DECODER_TASKS = ("lm", "sft", "dpo", "ppo", "reward")


def load_texts(config) -> dict[str, str]:
    data = config.data
    if data.get("name", "tiny_shakespeare") != "tiny_shakespeare":
        raise ConfigError(f"config.data.name={data.name!r}: expected 'tiny_shakespeare'")
    from research.data import tiny_shakespeare
    kwargs = dict(data_dir=data.get("data_dir"), manual_dir=data.get("manual_dir"))
    return {s: tiny_shakespeare.load_text(s, **kwargs) for s in ("train", "validation")}


@dataclasses.dataclass
class Setup:
    tokenizer: object
    model_config: TransformerConfig
    model: Decoder
    pretrained: Pretrained | None


def model_setup(config, texts: dict[str, str] | None, key: str = "init_from",
                allowed: tuple[str, ...] = DECODER_TASKS, tokenizer=None) -> Setup:
    """The model this run trains: from the checkpoint in ``config.<key>`` (its architecture and
    tokenizer; ``config.model`` may only change dropout/dtype/remat) or fresh from ``config.model``
    with the character vocabulary of the text (or the given ``tokenizer``)."""
    workdir = config.get(key) if tokenizer is None else None
    pre = None
    if workdir:
        pre = load_pretrained(workdir, key)
        check_task(pre, key, allowed)
        tokenizer = pre.tokenizer()
        model_config = model_config_from(config.model, pre, key)
    else:
        if tokenizer is None:
            if texts is None:
                raise ConfigError(f"config.{key} is required for this task.")
            tokenizer = CharTokenizer.from_text(texts["train"] + texts["validation"])
        model_config = TransformerConfig.from_dict(config.model.to_dict(),
                                                   vocab_size=tokenizer.vocab_size)
    return Setup(tokenizer, model_config, Decoder(model_config), pre)


def lengths(config, model_config: TransformerConfig) -> tuple[int, int]:
    """``(prompt_len, response_len)`` checked against the context: prompt + response tokens must
    fit in ``max_len`` (char tokenizer: one token per character)."""
    p, r = config.data.prompt_len, config.data.response_len
    if not (isinstance(p, int) and p > 0 and isinstance(r, int) and r > 0):
        raise ConfigError(f"config.data.prompt_len={p!r} and response_len={r!r} must be positive ints.")
    if p + r > model_config.max_len:
        raise ConfigError(
            f"config.data.prompt_len + response_len = {p} + {r} = {p + r} exceeds the model's "
            f"context max_len={model_config.max_len}; shorten them (prompts longer than the "
            "context cannot be trained on).")
    return p, r


def model_meta(name: str, setup: Setup, **extra) -> dict:
    return {"task": name, "model": dataclasses.asdict(setup.model_config),
            "tokenizer": setup.tokenizer.to_json(), **extra}
