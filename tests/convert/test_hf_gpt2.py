"""GPT-2 import/export against Hugging Face transformers' own GPT2LMHeadModel (CPU, float32):
logits, greedy generation, exact round trips and shape-mismatch errors."""
import dataclasses

import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch  # the [dev] extra pins torch==2.13.0 (a CPU build)
import transformers

from research.convert import hf_gpt2
from research.generate import generate
from research.models.transformer import Decoder, TransformerConfig

HF_CONFIG = dict(vocab_size=101, n_positions=32, n_embd=48, n_layer=2, n_head=4,
                 bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A randomly initialised GPT-2 saved with save_pretrained. Every parameter is perturbed
    (biases and LayerNorm parameters away from 0/1) so that each one's mapping is tested."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return hf_gpt2.load_hf(hf_dir)


def _tokens(batch=3, length=32, seed=1):
    return np.random.default_rng(seed).integers(0, HF_CONFIG["vocab_size"], (batch, length))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_config_from_hf(loaded):
    cfg, _ = loaded
    assert cfg == TransformerConfig(vocab_size=101, num_layers=2, num_heads=4, embed_dim=48,
                                    max_len=32, mlp_ratio=4, dropout=0.1, use_bias=True,
                                    tie_embeddings=True, activation="gelu_tanh")


def test_logits_match_transformers(loaded, hf_model):
    cfg, params = loaded
    tokens = _tokens()
    ours = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens), atol=1e-4, rtol=0)


def test_params_match_init_tree(loaded):
    cfg, params = loaded
    init = jax.eval_shape(lambda: nn.meta.unbox(
        Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    assert jax.tree.structure(params) == jax.tree.structure(init)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(params)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(init)]


def test_round_trip_is_exact(loaded, hf_model):
    cfg, params = loaded
    state = hf_gpt2.params_to_hf_state_dict(params, cfg)
    hf_state = hf_model.state_dict()
    assert sorted(state) == sorted(hf_state)
    for k, v in hf_state.items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    back = hf_gpt2.params_from_hf_state_dict(state, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_saved_folder_loads_into_transformers(loaded, hf_model, tmp_path):
    cfg, params = loaded
    hf_gpt2.save_hf(params, cfg, tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = _tokens(seed=2)
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(hf_model, tokens))
    assert hf_gpt2.load_hf(tmp_path)[0] == cfg


def test_untied_and_bias_free_round_trip(tmp_path):
    """Export -> transformers -> import of our own models: untied head, and no biases (exported
    as zero biases)."""
    for i, kw in enumerate([dict(tie_embeddings=False), dict(use_bias=False, activation="gelu")]):
        cfg = TransformerConfig(vocab_size=37, num_layers=1, num_heads=2, embed_dim=16,
                                max_len=8, mlp_ratio=3, **kw)
        params = jax.tree.map(np.asarray, nn.meta.unbox(
            Decoder(cfg).init(jax.random.key(i), jnp.zeros((1, 8), jnp.int32))["params"]))
        hf_gpt2.save_hf(params, cfg, tmp_path / str(i))
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / str(i)).eval()
        tokens = _tokens(2, 8, seed=i) % 37
        ours = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens))
        np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=1e-4, rtol=0)
        back = hf_gpt2.params_from_hf_state_dict(model.state_dict(), cfg)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
            np.testing.assert_array_equal(a, b)


def test_greedy_generation_matches_transformers(loaded, hf_model):
    cfg, params = loaded
    prompt = _tokens(2, 8, seed=3)  # 8 + 20 <= n_positions = 32: our cache never re-prefills
    ours = generate(Decoder(cfg), params, jnp.asarray(prompt), max_new_tokens=20, rng=None,
                    greedy=True)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape,
                                   dtype=torch.long), max_new_tokens=20, do_sample=False)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_wrong_shape_names_the_tensor(loaded, hf_model):
    cfg, _ = loaded
    state = dict(hf_model.state_dict())
    state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(48, 100)
    with pytest.raises(hf_gpt2.HFConversionError, match=r"'transformer\.h\.1\.mlp\.c_fc\.weight' "
                       r"has shape \(48, 100\), expected \(48, 192\)"):
        hf_gpt2.params_from_hf_state_dict(state, cfg)
    state = dict(hf_model.state_dict())
    del state["transformer.h.0.ln_2.bias"]
    with pytest.raises(hf_gpt2.HFConversionError, match=r"no tensor 'h\.0\.ln_2\.bias'"):
        hf_gpt2.params_from_hf_state_dict(state, cfg)
    one_layer = TransformerConfig(vocab_size=101, num_layers=1, num_heads=4, embed_dim=48,
                                  max_len=32)
    with pytest.raises(hf_gpt2.HFConversionError,
                       match=r"no place .*'transformer\.h\.1\.attn\.c_attn\.bias'"):
        hf_gpt2.params_from_hf_state_dict(hf_model.state_dict(), one_layer)


def test_epsilon_and_mlp_width(tmp_path):
    """layer_norm_epsilon and an n_inner that is no multiple of n_embd map to norm_eps and
    mlp_hidden where TransformerConfig has them, and are rejected where it does not."""
    hf_config = transformers.GPT2Config(**HF_CONFIG, layer_norm_epsilon=1e-6, n_inner=100)
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    if not {"norm_eps", "mlp_hidden"} <= fields:
        with pytest.raises(hf_gpt2.HFConversionError, match="layer_norm_epsilon|n_inner"):
            hf_gpt2.config_from_hf(hf_config)
        return
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    cfg, params = hf_gpt2.load_hf(tmp_path)
    assert (cfg.norm_eps, cfg.mlp_hidden) == (1e-6, 100)
    tokens = _tokens(2, 16, seed=4)
    ours = Decoder(cfg).apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(ours, _hf_logits(model, tokens), atol=1e-4, rtol=0)
    exported = hf_gpt2.config_to_hf(cfg)
    assert (exported.layer_norm_epsilon, exported.n_inner) == (1e-6, 100)


def test_unsupported_configs_raise():
    with pytest.raises(hf_gpt2.HFConversionError, match="model_type"):
        hf_gpt2.config_from_hf({"model_type": "llama"})
    with pytest.raises(hf_gpt2.HFConversionError, match="scale_attn_by_inverse_layer_idx"):
        hf_gpt2.config_from_hf(transformers.GPT2Config(**HF_CONFIG,
                                                       scale_attn_by_inverse_layer_idx=True))


def test_old_buffers_and_base_model_keys(loaded, hf_model):
    """Older checkpoints carry causal-mask buffers (ignored); GPT2Model's keys have no prefix."""
    cfg, params = loaded
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(cfg.num_layers):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32, dtype=torch.bool))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    back = hf_gpt2.params_from_hf_state_dict(state, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
