"""BERT import/export against Hugging Face transformers' own BertForMaskedLM (the reference; CPU,
float32, 2 layers, hidden 32, a padded batch with token types): MLM logits and the MLM loss, exact
round trips, folders that transformers loads, shape-mismatch and unsupported-option errors."""
import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch  # the [dev] extra pins a CPU torch
import transformers

from research.convert import hf_bert
from research.core.config import ConfigError
from research.models.encoder import Encoder, EncoderConfig
from research.models.transformer import TransformerConfig
from research.tasks.mlm import masked_lm_loss

HF_CONFIG = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=24, type_vocab_size=3,
                 layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_dir(request, tmp_path_factory):
    """A random BertForMaskedLM saved with save_pretrained. Every parameter is redrawn (larger
    weights than the 0.02 init, LayerNorm weights away from 1, non-zero output bias) so that each
    one's mapping is tested."""
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        **HF_CONFIG, tie_word_embeddings=request.param)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "LayerNorm.weight" in name
                    else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.BertForMaskedLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return hf_bert.load_hf_bert(hf_dir)


def _batch(seed=1, batch=3, length=20):
    """Tokens, token types and a padding mask with two padded rows (pads hold token 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, HF_CONFIG["vocab_size"], (batch, length))
    types = rng.integers(0, HF_CONFIG["type_vocab_size"], (batch, length))
    padding = np.ones((batch, length), bool)
    padding[1, 13:] = False
    padding[2, 4:] = False
    tokens[~padding] = 0
    types[~padding] = 0
    return tokens, types, padding


def _hf_logits(model, tokens, types, padding):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                     attention_mask=torch.tensor(padding.astype(np.int64))).logits.numpy()


def _ours(cfg, enc, params, tokens, types, padding):
    return np.asarray(Encoder(cfg, enc).apply({"params": params}, jnp.asarray(tokens),
                                              jnp.asarray(types), jnp.asarray(padding)))


def test_config_from_hf(loaded, hf_model):
    cfg, enc, _ = loaded
    assert cfg == TransformerConfig(
        vocab_size=53, num_layers=2, num_heads=4, embed_dim=32, max_len=24, mlp_hidden=48,
        dropout=0.1, use_bias=True, tie_embeddings=hf_model.config.tie_word_embeddings,
        activation="gelu", norm_eps=1e-12, norm_position="post")
    assert enc == EncoderConfig(type_vocab_size=3, pad_id=0)


def test_mlm_logits_match_transformers(loaded, hf_model):
    cfg, enc, params = loaded
    batch = _batch()
    expected = _hf_logits(hf_model, *batch)
    assert np.abs(expected).max() > 1.0  # far from uniform: the comparison means something
    ours = _ours(cfg, enc, params, *batch)
    real = batch[2]
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)  # pad positions too


def test_mlm_loss_matches_transformers(loaded, hf_model):
    """Our masked-LM loss (cross-entropy at the chosen positions only) equals transformers' loss
    with labels -100 everywhere else."""
    cfg, enc, params = loaded
    tokens, types, padding = _batch(seed=4)
    rng = np.random.default_rng(5)
    chosen = (rng.random(tokens.shape) < 0.3) & padding
    targets = rng.integers(1, HF_CONFIG["vocab_size"], tokens.shape)
    labels = np.where(chosen, targets, -100)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(tokens), token_type_ids=torch.tensor(types),
                            attention_mask=torch.tensor(padding.astype(np.int64)),
                            labels=torch.tensor(labels)).loss.item()
    logits = _ours(cfg, enc, params, tokens, types, padding)
    loss, _ = masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets),
                             jnp.asarray(chosen, jnp.float32))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_params_match_init_tree(loaded):
    cfg, enc, params = loaded
    init = jax.eval_shape(lambda: nn.meta.unbox(
        Encoder(cfg, enc).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    assert jax.tree.structure(params) == jax.tree.structure(init)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(params)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(init)]


def test_round_trip_is_exact(loaded, hf_model):
    cfg, enc, params = loaded
    state = hf_bert.params_to_hf_bert_state_dict(params, cfg, enc)
    hf_state = hf_model.state_dict()
    assert sorted(state) == sorted(hf_state)
    for k, v in hf_state.items():
        if k == "cls.predictions.bias" and not cfg.tie_embeddings:
            continue  # untied, transformers keeps this unused copy apart from decoder.bias
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    back = hf_bert.from_hf_bert_state_dict(state, cfg, enc)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_saved_folder_loads_into_transformers(loaded, hf_model, tmp_path):
    cfg, enc, params = loaded
    hf_bert.save_hf_bert(params, cfg, enc, tmp_path)
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path).eval()
    batch = _batch(seed=2)
    np.testing.assert_array_equal(_hf_logits(reloaded, *batch), _hf_logits(hf_model, *batch))
    assert hf_bert.load_hf_bert(tmp_path)[:2] == (cfg, enc)


def test_wrong_shape_names_the_tensor(loaded, hf_model):
    cfg, enc, params = loaded
    state = dict(hf_model.state_dict())
    state["bert.encoder.layer.1.attention.self.key.weight"] = torch.zeros(32, 16)
    with pytest.raises(hf_bert.HFConversionError, match=r"'bert\.encoder\.layer\.1\.attention\."
                       r"self\.key\.weight' has shape \(32, 16\), expected \(32, 32\)"):
        hf_bert.from_hf_bert_state_dict(state, cfg, enc)
    state = dict(hf_model.state_dict())
    del state["bert.embeddings.token_type_embeddings.weight"]
    with pytest.raises(ConfigError, match=r"no tensor 'bert\.embeddings\.token_type_embeddings"):
        hf_bert.from_hf_bert_state_dict(state, cfg, enc)
    two_types = EncoderConfig(type_vocab_size=2, pad_id=0)
    with pytest.raises(hf_bert.HFConversionError, match=r"token_type_embeddings\.weight' has "
                       r"shape \(3, 32\), expected \(2, 32\)"):
        hf_bert.from_hf_bert_state_dict(hf_model.state_dict(), cfg, two_types)
    one_layer = TransformerConfig(**{**cfg.__dict__, "num_layers": 1})
    with pytest.raises(hf_bert.HFConversionError,
                       match=r"no place .*'bert\.encoder\.layer\.1\.attention"):
        hf_bert.from_hf_bert_state_dict(hf_model.state_dict(), one_layer, enc)
    # Export checks our tree against the Encoder's init the same way.
    bad = jax.tree.map(np.asarray, params)
    bad["layer_0"]["mlp"]["fc_in"]["kernel"] = np.zeros((32, 47), np.float32)
    with pytest.raises(hf_bert.HFConversionError,
                       match=r"layer_0/mlp/fc_in/kernel has shape \(32, 47\), expected \(32, 48\)"):
        hf_bert.params_to_hf_bert_state_dict(bad, cfg, enc)


def test_unsupported_options_are_named():
    base = transformers.BertConfig(**HF_CONFIG)
    for key, value, fragment in (("position_embedding_type", "relative_key",
                                  "position_embedding_type='relative_key'"),
                                 ("is_decoder", True, "is_decoder=True"),
                                 ("hidden_act", "silu", "hidden_act='silu'")):
        with pytest.raises(hf_bert.HFConversionError, match=fragment):
            hf_bert.config_from_hf_bert({**base.to_dict(), key: value})
    with pytest.raises(hf_bert.HFConversionError, match="norm_position='pre' has no BERT"):
        hf_bert.config_to_hf_bert(TransformerConfig(vocab_size=9, norm_position="pre"),
                                  EncoderConfig())
