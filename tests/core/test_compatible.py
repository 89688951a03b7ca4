"""A workdir's checkpoints are refused, with the difference named, when the config would build
another task, model or vocabulary."""
import pytest

from research.core.checkpoint import check_compatible
from research.core.config import ConfigError
from research.data.tokenizers import CharTokenizer

META = {"task": "lm", "model": {"num_layers": 2, "vocab_size": 3},
        "tokenizer": CharTokenizer.from_text("abc").to_json()}


def test_same_meta_is_accepted():
    check_compatible(META, dict(META), "/ckpt")


def test_a_different_vocabulary_of_the_same_size_is_refused():
    other = {**META, "tokenizer": CharTokenizer.from_text("abd").to_json()}
    with pytest.raises(ConfigError, match=r"tokenizer: checkpoint char tokenizer \(3 symbols\) vs "
                                          r"config char tokenizer \(3 symbols\) with a different"):
        check_compatible(META, other, "/ckpt")


def test_a_different_model_names_the_key():
    other = {**META, "model": {"num_layers": 4, "vocab_size": 3}}
    with pytest.raises(ConfigError, match="model.num_layers: checkpoint 2 vs config 4"):
        check_compatible(META, other, "/ckpt")
