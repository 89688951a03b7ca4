"""The ViT (research/models/vit.py) and the small CNN (research/models/cnn.py): shapes, the
bad-shape errors, the patch embedding against explicit references (a per-patch loop in numpy and
PyTorch's stride-p ``Conv2d``), bidirectional attention, and the whole ViT's logits against
Hugging Face ``transformers``' ``ViTForImageClassification`` with the same weights (CPU, 1e-4)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.models.cnn import Cnn, CnnConfig
from research.models.vit import PatchEmbed, ViT, VitConfig, patchify, vit_configs_from_dict

TINY = dict(num_layers=2, num_heads=2, embed_dim=16, mlp_ratio=2, patch_size=7)


def make_vit(**kw):
    cfg, vit = vit_configs_from_dict({**TINY, **kw})
    model = ViT(cfg, vit)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, vit.channels)))["params"]
    # Larger weights than the init (the head starts at zero), so every dependency shows.
    leaves, tree = jax.tree.flatten(nn.meta.unbox(boxed))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    return model, boxed, params


def images(n=3, c=1, size=28, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, c)), jnp.float32)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes_and_grayscale_without_channel_axis(pool):
    model, boxed, params = make_vit(pool=pool)
    x = images()
    logits = model.apply({"params": params}, x)
    feats = model.apply({"params": params}, x, method="features")
    tokens = model.apply({"params": params}, x, method="tokens")
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert feats.shape == (3, 16)
    assert tokens.shape == (3, 16 + (pool == "cls"), 16)
    np.testing.assert_allclose(feats, tokens[:, 0] if pool == "cls" else tokens.mean(1), atol=1e-6)
    np.testing.assert_allclose(model.apply({"params": params}, x[..., 0]), logits, atol=1e-6)
    assert ("cls_token" in params) == (pool == "cls")
    assert params["pos_embed"].shape == (16 + (pool == "cls"), 16)
    assert tuple(nn.get_partition_spec(boxed)["patch_embed"]["kernel"]) == (None, None, None, "embed")
    fresh = model.apply({"params": nn.meta.unbox(boxed)}, x)
    np.testing.assert_array_equal(fresh, 0.0)  # the head starts at zero (ViT paper)


def test_wrong_image_shape_names_the_expected_shape():
    model, _, params = make_vit()
    with pytest.raises(ValueError, match=r"expects images of shape \[N, 28, 28, 1\].*got \(2, 32, "
                                         r"32, 1\)"):
        model.apply({"params": params}, images(2, size=32))
    with pytest.raises(ValueError, match=r"\[N, 28, 28, 1\].*got \(2, 28, 28, 3\)"):
        model.apply({"params": params}, images(2, c=3))
    rgb, _, rgb_params = make_vit(channels=3)
    assert rgb.apply({"params": rgb_params}, images(2, c=3)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"shape \[N, 28, 28, 3\] \(config.model.image_size=28, "
                                         r"channels=3\); got \(2, 28, 28\)"):
        rgb.apply({"params": rgb_params}, images(2)[..., 0])


def test_config_errors():
    with pytest.raises(ConfigError, match="patch_size=5 is invalid: expected a positive divisor "
                                          "of image_size=28"):
        VitConfig(patch_size=5)
    with pytest.raises(ConfigError, match="pool='max'"):
        VitConfig(pool="max")
    with pytest.raises(ConfigError, match=r"Unknown config.model keys \['patchsize'\]"):
        vit_configs_from_dict({"patchsize": 4})
    cfg, vit = vit_configs_from_dict({"name": "vit", "patch_size": 4, "pool": "mean"})
    assert cfg.max_len == vit.num_tokens == 49
    with pytest.raises(ConfigError, match="widths"):
        CnnConfig(widths=())


def test_patch_embedding_equals_explicit_references():
    """References: (1) a loop over the p x p patches of each image in numpy, each flattened in
    (row, column, channel) order and multiplied by the kernel reshaped to [p*p*C, E]; (2) PyTorch's
    ``nn.Conv2d(C, E, kernel_size=p, stride=p)`` (the usual ViT patch embedding) with the weight
    ``kernel.transpose(3, 2, 0, 1)``."""
    torch = pytest.importorskip("torch")
    p, c, e = 4, 3, 8
    x = np.asarray(images(2, c=c, size=12, seed=3))
    module = PatchEmbed(p, e)
    params = nn.meta.unbox(module.init(jax.random.key(0), x)["params"])
    params["bias"] = np.random.default_rng(4).normal(size=e).astype(np.float32)
    out = np.asarray(module.apply({"params": params}, x))
    kernel = np.asarray(params["kernel"])
    assert kernel.shape == (p, p, c, e) and out.shape == (2, 9, e)
    ref = np.zeros((2, 9, e), np.float32)
    for n in range(2):
        for i in range(3):
            for j in range(3):
                patch = x[n, i * p:(i + 1) * p, j * p:(j + 1) * p, :]
                ref[n, i * 3 + j] = patch.reshape(-1) @ kernel.reshape(-1, e) + params["bias"]
                np.testing.assert_array_equal(np.asarray(patchify(x, p))[n, i * 3 + j],
                                              patch.reshape(-1))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    conv = torch.nn.Conv2d(c, e, kernel_size=p, stride=p)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(np.asarray(params["bias"])))
        t = conv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))  # [N, E, 3, 3]
    np.testing.assert_allclose(out, t.flatten(2).transpose(1, 2).numpy(), atol=1e-5, rtol=1e-5)


def test_attention_is_bidirectional():
    """The class token (position 0) sees the last patch: with a causal mask it would not."""
    model, _, params = make_vit()
    x = images()
    y = x.at[:, 21:, 21:].add(1.0)  # change only the bottom-right patch
    f = lambda im: model.apply({"params": params}, im, method="features")  # noqa: E731
    assert float(jnp.abs(f(x) - f(y)).max()) > 1e-3


def _hf_state_dict(params, cfg, vit, torch):
    """Our parameters in the layout of transformers' ViTForImageClassification."""
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731 - a writable copy
    e = cfg.embed_dim
    sd = {
        "vit.embeddings.cls_token": t(params["cls_token"][None, None]),
        "vit.embeddings.position_embeddings": t(params["pos_embed"][None]),
        "vit.embeddings.patch_embeddings.projection.weight":
            t(np.asarray(params["patch_embed"]["kernel"]).transpose(3, 2, 0, 1)),
        "vit.embeddings.patch_embeddings.projection.bias": t(params["patch_embed"]["bias"]),
        "vit.layernorm.weight": t(params["final_norm"]["scale"]),
        "vit.layernorm.bias": t(params["final_norm"]["bias"]),
        "classifier.weight": t(np.asarray(params["head"]["kernel"]).T),
        "classifier.bias": t(params["head"]["bias"]),
    }
    for i in range(cfg.num_layers):
        lp, pre = params[f"layer_{i}"], f"vit.layers.{i}."  # transformers 5.x names
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            sd[pre + f"attention.{theirs}.weight"] = t(
                np.asarray(lp["attn"][ours]["kernel"]).reshape(e, e).T)
            sd[pre + f"attention.{theirs}.bias"] = t(np.asarray(lp["attn"][ours]["bias"]).reshape(e))
        sd[pre + "attention.o_proj.weight"] = t(np.asarray(lp["attn"]["out"]["kernel"]).reshape(e, e).T)
        sd[pre + "attention.o_proj.bias"] = t(lp["attn"]["out"]["bias"])
        for ours, theirs in (("attn_norm", "layernorm_before"), ("mlp_norm", "layernorm_after")):
            sd[pre + theirs + ".weight"] = t(lp[ours]["scale"])
            sd[pre + theirs + ".bias"] = t(lp[ours]["bias"])
        for ours, theirs in (("fc_in", "fc1"), ("fc_out", "fc2")):
            sd[pre + f"mlp.{theirs}.weight"] = t(np.asarray(lp["mlp"][ours]["kernel"]).T)
            sd[pre + f"mlp.{theirs}.bias"] = t(lp["mlp"][ours]["bias"])
    return sd


def test_logits_match_transformers_vit():
    """Reference: transformers' ViTForImageClassification (pre-LN encoder, class token, final
    LayerNorm, linear classifier on the class token) with our weights copied in."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, _, params = make_vit(patch_size=4, channels=2)
    cfg, vit = model.cfg, model.vit
    hf_config = transformers.ViTConfig(
        image_size=28, patch_size=4, num_channels=2, hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_hidden_dim, hidden_act="gelu", layer_norm_eps=cfg.norm_eps,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True,
        num_labels=vit.num_classes)
    hf = transformers.ViTForImageClassification(hf_config).eval()
    missing, unexpected = hf.load_state_dict(_hf_state_dict(params, cfg, vit, torch), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    x = images(4, c=2, seed=5)
    ours = np.asarray(model.apply({"params": params}, x))
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).logits
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)


def test_cnn_shapes_features_and_bad_shape():
    model = Cnn(CnnConfig(widths=(4, 8), hidden=16))
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
    x = images()
    assert model.apply({"params": params}, x).shape == (3, 10)
    feats = model.apply({"params": params}, x, method="features")
    assert feats.shape == (3, 16) and float(feats.min()) >= 0.0  # after the ReLU
    head = params["head"]
    np.testing.assert_allclose(model.apply({"params": params}, x),
                               feats @ head["kernel"] + head["bias"], atol=1e-5)
    with pytest.raises(ValueError, match=r"The CNN expects images of shape \[N, 28, 28, 1\]"):
        model.apply({"params": params}, images(2, size=32))
