"""LLaMA import/export against Hugging Face transformers' own LlamaForCausalLM (CPU, float32,
grouped-query attention, rope_theta 5e5): logits, greedy generation, exact round trips, folders
that transformers loads, shape-mismatch and unsupported-option errors."""
import numpy as np
import pytest

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch  # the [dev] extra pins a CPU torch
import transformers

from research.convert import hf_llama
from research.core.config import ConfigError
from research.generate import generate
from research.models.transformer import Decoder, TransformerConfig

HF_CONFIG = dict(vocab_size=61, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2, intermediate_size=96, rope_theta=5e5, rms_norm_eps=1e-6,
                 max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory):
    """A random LlamaForCausalLM saved with save_pretrained. Every parameter is redrawn (larger
    weights than the 0.02 init, norm weights away from 1) so that each one's mapping is tested."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **HF_CONFIG, tie_word_embeddings=request.param)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name
                    else 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return hf_llama.load_hf_llama(hf_dir)


def _tokens(batch=2, length=24, seed=1, vocab=HF_CONFIG["vocab_size"]):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _ours(cfg, params, tokens):
    return np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(tokens)))


def test_config_from_hf(loaded, hf_model):
    cfg, _ = loaded
    assert cfg == TransformerConfig(
        vocab_size=61, num_layers=2, num_heads=4, embed_dim=64, max_len=32, mlp_hidden=96,
        num_kv_heads=2, use_bias=False, tie_embeddings=hf_model.config.tie_word_embeddings,
        norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", positions="rope", rope_theta=5e5,
        dropout=0.0)


def test_logits_match_transformers(loaded, hf_model):
    cfg, params = loaded
    tokens = _tokens()
    expected = _hf_logits(hf_model, tokens)
    assert np.abs(expected).max() > 1.0  # far from uniform: the comparison means something
    np.testing.assert_allclose(_ours(cfg, params, tokens), expected, atol=1e-4, rtol=0)


def test_params_match_init_tree(loaded):
    cfg, params = loaded
    init = jax.eval_shape(lambda: nn.meta.unbox(
        Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    assert jax.tree.structure(params) == jax.tree.structure(init)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(params)] == \
        [(x.shape, x.dtype) for x in jax.tree.leaves(init)]


def test_round_trip_is_exact(loaded, hf_model):
    cfg, params = loaded
    state = hf_llama.params_to_hf_llama_state_dict(params, cfg)
    hf_state = hf_model.state_dict()
    assert sorted(state) == sorted(hf_state)
    for k, v in hf_state.items():
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    back = hf_llama.from_hf_llama_state_dict(state, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_saved_folder_loads_into_transformers(loaded, hf_model, tmp_path):
    cfg, params = loaded
    hf_llama.save_hf_llama(params, cfg, tmp_path, bos_token_id=None, eos_token_id=None)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, transformers.LlamaForCausalLM)
    tokens = _tokens(seed=2)
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), _hf_logits(hf_model, tokens))
    assert hf_llama.load_hf_llama(tmp_path)[0] == cfg


def test_greedy_generation_matches_transformers(loaded, hf_model):
    cfg, params = loaded
    prompt = _tokens(2, 8, seed=3)  # 8 + 20 <= max_position_embeddings = 32: no re-prefill
    ours = generate(Decoder(cfg), params, jnp.asarray(prompt), max_new_tokens=20, rng=None,
                    greedy=True)
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor(prompt), attention_mask=torch.ones(
            prompt.shape, dtype=torch.long), max_new_tokens=20, do_sample=False,
            eos_token_id=None, pad_token_id=0)
    assert theirs.shape == (2, 28)
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_wrong_shape_names_the_tensor(loaded, hf_model):
    cfg, _ = loaded
    state = dict(hf_model.state_dict())
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    with pytest.raises(hf_llama.HFConversionError, match=r"'model\.layers\.1\.self_attn\.k_proj"
                       r"\.weight' has shape \(64, 64\), expected \(32, 64\)"):
        hf_llama.from_hf_llama_state_dict(state, cfg)
    state = dict(hf_model.state_dict())
    del state["model.layers.0.post_attention_layernorm.weight"]
    with pytest.raises(ConfigError, match=r"no tensor 'layers\.0\.post_attention_layernorm"):
        hf_llama.from_hf_llama_state_dict(state, cfg)
    one_layer = hf_llama.config_from_hf_llama(hf_model.config, num_layers=1)
    with pytest.raises(hf_llama.HFConversionError,
                       match=r"no place .*'model\.layers\.1\.input_layernorm\.weight'"):
        hf_llama.from_hf_llama_state_dict(hf_model.state_dict(), one_layer)
    # Export checks our tree against Decoder's init the same way.
    params = jax.tree.map(np.asarray, loaded[1])
    params["layer_0"]["mlp"]["up"]["kernel"] = np.zeros((64, 95), np.float32)
    with pytest.raises(hf_llama.HFConversionError,
                       match=r"layer_0/mlp/up/kernel has shape \(64, 95\), expected \(64, 96\)"):
        hf_llama.params_to_hf_llama_state_dict(params, cfg)


def test_base_model_keys_and_rotary_buffers(loaded, hf_model):
    """LlamaModel's keys have no ``model.`` prefix; old checkpoints carry rotary inv_freq."""
    cfg, params = loaded
    state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
    if cfg.tie_embeddings:
        del state["lm_head.weight"]
    for i in range(cfg.num_layers):
        state[f"layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    back = hf_llama.from_hf_llama_state_dict(state, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_lm_head_tied_must_equal_embedding_untied_is_its_own(loaded, hf_model):
    """A changed lm_head: refused for a tied checkpoint, imported as the head when untied."""
    cfg, _ = loaded
    state = dict(hf_model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    if cfg.tie_embeddings:
        with pytest.raises(hf_llama.HFConversionError, match="lm_head.weight' differs"):
            hf_llama.from_hf_llama_state_dict(state, cfg)
    else:
        params = hf_llama.from_hf_llama_state_dict(state, cfg)
        np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]),
                                      state["lm_head.weight"].numpy().T)


def test_our_biased_model_exports(tmp_path):
    """Our own LLaMA with biases (attention_bias = mlp_bias = True) -> transformers -> back."""
    cfg = TransformerConfig(vocab_size=37, num_layers=1, num_heads=4, embed_dim=32, max_len=16,
                            num_kv_heads=1, mlp_hidden=40, use_bias=True, tie_embeddings=False,
                            norm="rmsnorm", mlp="swiglu", positions="rope", rope_theta=1e4,
                            norm_eps=1e-5)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05, nn.meta.unbox(
        Decoder(cfg).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]))
    hf_llama.save_hf_llama(params, cfg, tmp_path)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (model.config.attention_bias, model.config.mlp_bias) == (True, True)
    tokens = _tokens(2, 12, seed=5, vocab=37)
    np.testing.assert_allclose(_ours(cfg, params, tokens), _hf_logits(model, tokens),
                               atol=1e-4, rtol=0)
    cfg2, back = hf_llama.load_hf_llama(tmp_path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


BASE = dict(HF_CONFIG, model_type="llama", hidden_act="silu")


@pytest.mark.parametrize("kw, option", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_parameters"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="mistral"), "model_type='mistral'"),
])
def test_unsupported_options_are_named(kw, option):
    with pytest.raises(hf_llama.HFConversionError, match=option):
        hf_llama.config_from_hf_llama({**BASE, **kw})


def test_rope_scaling_in_a_transformers_config_is_rejected():
    hf_config = transformers.LlamaConfig(**{**HF_CONFIG, "max_position_embeddings": 8192},
                                         rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(hf_llama.HFConversionError, match="RoPE scaling"):
        hf_llama.config_from_hf_llama(hf_config)


def test_non_llama_configs_do_not_export():
    cfg = TransformerConfig(vocab_size=37, num_layers=1, num_heads=2, embed_dim=16,
                            norm="rmsnorm", mlp="swiglu", positions="alibi")
    with pytest.raises(hf_llama.HFConversionError, match="positions='alibi'"):
        hf_llama.config_to_hf_llama(cfg)
    with pytest.raises(hf_llama.HFConversionError, match="norm='layernorm'"):
        hf_llama.params_to_hf_llama_state_dict({}, TransformerConfig(vocab_size=37))
