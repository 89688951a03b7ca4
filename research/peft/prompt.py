"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) as transforms of a pure
apply function; the model's code is not touched.

Prompt tuning: P trainable virtual-token embeddings [P, E] are prepended to the input embeddings.
``prompt_apply`` prepends P placeholder tokens to the input and intercepts the token embedding's
``__call__`` (``flax.linen.intercept_methods``, the module at ``embed_path``, ``'token_embed'`` in
our decoders) to replace their embeddings by the virtual ones; positions and the causal mask then
cover the virtual tokens as they would real ones, and the caller drops the first P outputs.
Initialisation: ``'text'`` (the embeddings of a text's tokens, the paper's class-label/vocab init)
or ``'random'`` (normal with the embedding table's standard deviation).

Prefix tuning: trainable keys and values for P virtual positions in EVERY layer's attention.
The one model hook used is the decoder's existing KV-cache path (``Decoder.decode(tokens, caches,
index)``): the caches are filled with the prefix at positions [0, P) and the input runs at
positions [P, P + T), attending to the whole prefix and causally to itself. During training the
prefix is reparameterised (the paper's section 4.3) as ``MLP(E')`` with ``E'`` [P, d] and a
two-layer tanh MLP to all layers' keys and values; ``materialize`` computes the prefix once and
drops the MLP for inference.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError

PROMPT_INITS = ("text", "random")


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    num_virtual: int = 8
    init: str = "text"                 # 'text' | 'random'
    text: str = "Continue the play in Shakespeare's words:"
    embed_path: str = "token_embed"    # module path of the token embedding

    def __post_init__(self):
        if not (isinstance(self.num_virtual, int) and self.num_virtual > 0):
            raise ConfigError(f"num_virtual={self.num_virtual!r}: expected a positive integer.")
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"prompt init={self.init!r}: expected one of {list(PROMPT_INITS)}")


def init_prompt(rng, embedding: jax.Array, cfg: PromptConfig, text_ids=None):
    """{'embedding': [P, E]} from the base's embedding table [V, E]: rows of ``text_ids`` (cycled
    to length P) for 'text', else normal with the table's standard deviation."""
    p = cfg.num_virtual
    if cfg.init == "text":
        if text_ids is None or len(text_ids) == 0:
            raise ConfigError("Prompt init 'text' needs a non-empty text (config.peft.prompt_text).")
        ids = jnp.asarray([text_ids[i % len(text_ids)] for i in range(p)], jnp.int32)
        emb = embedding[ids]
    else:
        emb = jax.random.normal(rng, (p, embedding.shape[1]), jnp.float32) * jnp.std(embedding)
    return {"embedding": emb.astype(jnp.float32)}


def pad_tokens(tokens: jax.Array, num_virtual: int) -> jax.Array:
    """Prepend ``num_virtual`` placeholder tokens (id 0; their embeddings are replaced)."""
    return jnp.pad(tokens, ((0, 0), (num_virtual, 0)))


def prompt_apply(fn: Callable[..., Any], prompt, embed_path: str = "token_embed"):
    """``fn`` with the first P positions of the token embedding's output replaced by
    ``prompt['embedding']`` [P, E]. ``fn`` must embed inputs made by ``pad_tokens``."""
    emb = prompt["embedding"]
    hit = []

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and "/".join(context.module.path) == embed_path:
            hit.append(True)
            p = emb.shape[0]
            virtual = jnp.broadcast_to(emb.astype(y.dtype), (y.shape[0], p, y.shape[-1]))
            y = jnp.concatenate([virtual, y[:, p:]], axis=1)
        return y

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(interceptor):
            out = fn(*args, **kwargs)
        if not hit:
            raise ConfigError(f"Prompt tuning found no module at embed_path={embed_path!r} "
                              "called by the model; set it to the token embedding's module path.")
        return out

    return wrapped


# -- prefix tuning -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    num_virtual: int = 8
    hidden: int = 256          # hidden width of the reparameterisation MLP
    embed_dim: int = 128       # width of the prefix embedding E' fed to the MLP

    def __post_init__(self):
        for k in ("num_virtual", "hidden", "embed_dim"):
            v = getattr(self, k)
            if not (isinstance(v, int) and v > 0):
                raise ConfigError(f"prefix {k}={v!r}: expected a positive integer.")


def _sizes(template) -> tuple[list, list[int]]:
    leaves, treedef = jax.tree.flatten(template)
    return (leaves, treedef), [math.prod(x.shape[2:]) for x in leaves]


def init_prefix(rng, template, cfg: PrefixConfig):
    """Reparameterised prefix params for the caches ``template`` (a tree of [1, P, K, D] arrays,
    e.g. ``init_caches(model_cfg, 1, P)``): {'embed': [P, d], 'w1', 'b1', 'w2', 'b2'}."""
    (_, _), sizes = _sizes(template)
    out = sum(sizes)
    k1, k2, k3 = jax.random.split(rng, 3)
    d, h = cfg.embed_dim, cfg.hidden
    return {
        "embed": jax.random.normal(k1, (cfg.num_virtual, d), jnp.float32),
        "w1": jax.random.normal(k2, (d, h), jnp.float32) / math.sqrt(d),
        "b1": jnp.zeros((h,), jnp.float32),
        "w2": jax.random.normal(k3, (h, out), jnp.float32) / math.sqrt(h),
        "b2": jnp.zeros((out,), jnp.float32),
    }


def prefix_values(prefix, template):
    """The prefix keys/values, a tree like ``template`` of [P, K, D] arrays: from the MLP
    (training) or, after ``materialize``, stored directly."""
    (leaves, treedef), sizes = _sizes(template)
    if "values" in prefix:
        return prefix["values"]
    h = jnp.tanh(prefix["embed"] @ prefix["w1"] + prefix["b1"])
    flat = h @ prefix["w2"] + prefix["b2"]                        # [P, sum(K*D)]
    parts = jnp.split(flat, [int(i) for i in np.cumsum(sizes)[:-1]], axis=1)
    p = prefix["embed"].shape[0]
    return jax.tree.unflatten(treedef, [x.reshape(p, *t.shape[2:]) for x, t in zip(parts, leaves)])


def materialize(prefix, template):
    """Inference form: {'values': the prefix keys/values}, the MLP dropped."""
    return {"values": prefix_values(prefix, template)}


def prefix_caches(values, batch: int, length: int, dtype):
    """KV caches of ``length`` positions whose first P hold the prefix (the rest zeros), for
    ``Decoder.decode(tokens, caches, index=P)``."""
    def one(v):
        p = v.shape[0]
        full = jnp.zeros((batch, length, *v.shape[1:]), dtype)
        return full.at[:, :p].set(jnp.broadcast_to(v.astype(dtype), (batch, *v.shape)))
    return jax.tree.map(one, values)
