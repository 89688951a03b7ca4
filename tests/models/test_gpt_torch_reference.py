"""The GPT decoder against an independent reference: nanoGPT's model written in PyTorch
(model.py of karpathy/nanoGPT, bias=False, dropout=0), run on the CPU with our weights copied in.
Logits, loss and gradients must agree."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import torch  # the [dev] extra pins torch==2.13.0 (a CPU build)
import torch.nn.functional as F

from research.models.transformer import Decoder, TransformerConfig

V, L, H, E, T = 23, 2, 4, 32, 16


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(E, bias=False)
        self.c_attn = torch.nn.Linear(E, 3 * E, bias=False)
        self.attn_proj = torch.nn.Linear(E, E, bias=False)
        self.ln_2 = torch.nn.LayerNorm(E, bias=False)
        self.c_fc = torch.nn.Linear(E, 4 * E, bias=False)
        self.mlp_proj = torch.nn.Linear(4 * E, E, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(E, dim=2)
        q, k, v = (z.view(b, t, H, E // H).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(E // H))
        att = att.masked_fill(torch.tril(torch.ones(t, t)) == 0, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, E)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TorchGPT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(V, E)
        self.wpe = torch.nn.Embedding(T, E)
        self.h = torch.nn.ModuleList(TorchBlock() for _ in range(L))
        self.ln_f = torch.nn.LayerNorm(E, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # weight tying


def load_into_torch(params, model: TorchGPT):
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        model.wte.weight.copy_(t(params["token_embed"]["embedding"]))
        model.wpe.weight.copy_(t(params["pos_embed"]))
        model.ln_f.weight.copy_(t(params["final_norm"]["scale"]))
        for i, block in enumerate(model.h):
            p = params[f"layer_{i}"]
            qkv = [np.asarray(p["attn"][n]["kernel"]).reshape(E, E) for n in ("query", "key", "value")]
            block.c_attn.weight.copy_(t(np.concatenate(qkv, axis=1).T))
            block.attn_proj.weight.copy_(t(np.asarray(p["attn"]["out"]["kernel"]).reshape(E, E).T))
            block.ln_1.weight.copy_(t(p["attn_norm"]["scale"]))
            block.ln_2.weight.copy_(t(p["mlp_norm"]["scale"]))
            block.c_fc.weight.copy_(t(np.asarray(p["mlp"]["fc_in"]["kernel"]).T))
            block.mlp_proj.weight.copy_(t(np.asarray(p["mlp"]["fc_out"]["kernel"]).T))


def test_logits_loss_and_gradients_match_nanogpt_in_pytorch():
    cfg = TransformerConfig(vocab_size=V, num_layers=L, num_heads=H, embed_dim=E, max_len=T,
                            use_bias=False)
    model = Decoder(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32))["params"])
    # Non-trivial norm scales so that their mapping is tested too.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
        if "scale" in jax.tree_util.keystr(path) else x, params)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, T + 1), 0, V))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    ref = TorchGPT()
    load_into_torch(params, ref)
    ref_logits = ref(torch.tensor(inputs).long())
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), torch.tensor(targets).long().reshape(-1))
    ref_loss.backward()

    def loss_fn(p):
        logits = model.apply({"params": p}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    np.testing.assert_allclose(logits, ref_logits.detach().numpy(), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-6)
    np.testing.assert_allclose(grads["token_embed"]["embedding"], ref.wte.weight.grad.numpy(),
                               atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["layer_1"]["mlp"]["fc_in"]["kernel"]).T,
                               ref.h[1].c_fc.weight.grad.numpy(), atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads["layer_0"]["attn"]["query"]["kernel"]).reshape(E, E).T,
                               ref.h[0].c_attn.weight.grad.numpy()[:E], atol=1e-6, rtol=1e-4)
