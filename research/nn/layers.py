"""Feed-forward blocks, norms and embeddings with logical axis names on their parameters.

Every parameter carries logical axis names (``embed``, ``mlp``, ``vocab``, ...) through
``nn.with_logical_partitioning``; ``research.core.sharding`` maps them to mesh axes.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
logical = nn.with_logical_partitioning

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # PyTorch's nn.GELU() default is the exact erf form; nanoGPT uses it.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    # OpenAI CLIP's (and HF CLIPModel's hidden_act='quick_gelu'): x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def normal_init(stddev: float):
    return nn.initializers.normal(stddev=stddev)


class Mlp(nn.Module):
    """Two-layer position-wise MLP: Dense(hidden) -> activation -> Dense(out)."""

    hidden_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed_dim, lead = x.shape[-1], x.shape[:-1]
        # As 2-D matmuls over [B*T, E]: with 3-D activations XLA:CPU materialises the weight
        # gradients' transposed operands with a slow strided copy (baby GPT forward+backward:
        # 56 -> 36 ms on this 2-core CPU).
        x = x.reshape(-1, embed_dim)
        h = nn.Dense(
            self.hidden_dim,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=logical(normal_init(self.init_std), ("embed", "mlp")),
            bias_init=logical(nn.initializers.zeros, ("mlp",)),
            name="fc_in",
        )(x)
        h = ACTIVATIONS[self.activation](h)
        return nn.Dense(
            embed_dim,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=logical(normal_init(self.out_init_std), ("mlp", "embed")),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="fc_out",
        )(h).reshape(*lead, embed_dim)


class SwiGluMlp(nn.Module):
    """LLaMA's gated MLP: down(silu(gate(x)) * up(x)); parameters ``gate``, ``up``, ``down``."""

    hidden_dim: int
    use_bias: bool = False
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        embed_dim, lead = x.shape[-1], x.shape[:-1]
        x = x.reshape(-1, embed_dim)  # 2-D matmuls over [B*T, E], as in ``Mlp`` (same reason)
        dense = lambda features, std, axes, name: nn.Dense(  # noqa: E731
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            kernel_init=logical(normal_init(std), axes),
            bias_init=logical(nn.initializers.zeros, axes[-1:]),
            name=name,
        )
        gate = dense(self.hidden_dim, self.init_std, ("embed", "mlp"), "gate")(x)
        up = dense(self.hidden_dim, self.init_std, ("embed", "mlp"), "up")(x)
        h = jax.nn.silu(gate) * up
        out = dense(embed_dim, self.out_init_std, ("mlp", "embed"), "down")(h)
        return out.reshape(*lead, embed_dim)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable ``scale`` (LLaMA's): x / sqrt(mean(x^2) + eps) * scale, computed in
    float32 and returned in ``dtype``."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                           jnp.float32)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (x * scale).astype(self.dtype)


def layer_norm(*, use_bias: bool = True, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.LayerNorm:
    """LayerNorm with PyTorch's epsilon (1e-5) and optional bias, as nanoGPT's ``LayerNorm``."""
    return nn.LayerNorm(
        epsilon=epsilon,
        use_bias=use_bias,
        dtype=dtype,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )
