"""Hugging Face CLIPModel import: logits parity with a randomly initialised tiny
``transformers.CLIPModel`` on the CPU (the reference), to 1e-4."""
import numpy as np
import torch
import transformers

from research.convert.hf_clip import load_hf_clip


def tiny_hf_clip():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=12,
                         eos_token_id=39, pad_token_id=0, bos_token_id=38),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=7, num_channels=1),
        projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases (HF initialises them to 1 and 0)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_logits_parity_with_transformers():
    import jax.numpy as jnp

    hf = tiny_hf_clip()
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 1, 28, 28)).astype(np.float32)
    # Captions of different lengths: bos, words, eos, then padding.
    ids = np.zeros((4, 12), np.int64)
    for i, n in enumerate([3, 7, 10, 5]):
        ids[i, 0] = 38
        ids[i, 1:n + 1] = rng.integers(1, 38, n)
        ids[i, n + 1] = 39
    mask = (ids != 0).astype(np.int64)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 pixel_values=torch.tensor(pixels))
    model, params = load_hf_clip(hf)
    img, txt, scale, _ = model.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                                     jnp.asarray(ids, jnp.int32))
    logits = np.asarray(scale * img @ txt.T)
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(img), (out.image_embeds).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(txt), (out.text_embeds).numpy(), atol=1e-5)
