"""NF4 with double quantization (research.quant.nf4) against the QLoRA paper's definition and
against bitsandbytes (its CPU ``quantize_4bit``/``dequantize_4bit``), and int8 (research.quant.int8)
against its closed-form error bounds."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.core.config import ConfigError
from research.quant import int8, nf4

HALF_GAP = float(np.max(np.diff(nf4.NF4_VALUES)) / 2)


def test_code_values_follow_the_paper_definition():
    """Reference: QLoRA Eq. 4 (quantiles of N(0,1), asymmetric with an exact zero), computed from
    the inverse normal CDF in ``normal_map``."""
    np.testing.assert_allclose(nf4.normal_map(), nf4.NF4_VALUES, atol=1e-6)
    assert nf4.NF4_VALUES[nf4.ZERO_CODE] == 0.0 and len(set(nf4.NF4_VALUES.tolist())) == 16


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_bounded_by_the_format(double_quant):
    """Each element lands on the nearest code: |w/absmax - code| <= half the largest code gap; with
    double quantization the block scale adds its own error |absmax - absmax'| * |code| <= that."""
    w = jax.random.normal(jax.random.key(0), (96, 130)) * 0.05    # 12480: not a multiple of 64
    q = nf4.quantize(w, double_quant=double_quant)
    err = np.abs(np.asarray(nf4.dequantize(q)) - np.asarray(w)).reshape(-1)
    flat = np.pad(np.asarray(w).reshape(-1), (0, -w.size % 64)).reshape(-1, 64)
    absmax = np.abs(flat).max(1)
    absmax_dq = np.asarray(nf4.block_absmax(q))
    bound = np.repeat(absmax * HALF_GAP + np.abs(absmax - absmax_dq), 64)[:w.size]
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)
    if not double_quant:
        np.testing.assert_array_equal(absmax_dq, absmax)
    assert np.abs(absmax_dq - absmax).max() <= 0.01 * absmax.max()


def test_storage_bits_per_parameter():
    """4 + 8/64 + 32/(64*256) = 4.127 bits (QLoRA section 3) plus one float32 offset."""
    q = nf4.quantize(jnp.ones((512, 1024)))
    bits = nf4.bits_per_param(q)
    assert 4.127 <= bits <= 4.128, bits
    assert nf4.bits_per_param({"a": q, "b": nf4.quantize(jnp.ones((64, 64)))}) <= 4.2
    assert 4.5 <= nf4.bits_per_param(nf4.quantize(jnp.ones((512, 1024)), double_quant=False)) <= 4.51


def test_equals_bitsandbytes():
    """Reference: bitsandbytes.functional.quantize_4bit(quant_type='nf4', blocksize=64,
    compress_statistics=True) on the CPU: the same packed codes, code tables, and dequantized
    values (the 8-bit dynamic table differs from bitsandbytes' in the last float32 bit of some
    entries, from torch.linspace's rounding, so a scale code on a boundary may differ by one)."""
    import bitsandbytes.functional as F  # a dev dependency (pyproject.toml)
    import torch
    np.testing.assert_allclose(nf4.dynamic_map(), F.create_dynamic_map().numpy(), atol=1e-7)
    bnb_nf4 = F.create_normal_map().numpy()
    np.testing.assert_array_equal(np.concatenate([bnb_nf4[:7], [0.0], bnb_nf4[-8:]]),
                                  nf4.NF4_VALUES)
    torch.manual_seed(0)
    for shape in [(128, 256), (33, 7)]:
        w = torch.randn(*shape) * 0.02
        packed, state = F.quantize_4bit(w, quant_type="nf4", blocksize=64,
                                        compress_statistics=True)
        q = nf4.quantize(jnp.asarray(w.numpy()))
        np.testing.assert_array_equal(np.asarray(q.codes), packed.numpy().reshape(-1))
        assert np.mean(np.asarray(q.scale_codes) == state.absmax.numpy()) >= 0.99
        np.testing.assert_allclose(np.asarray(q.scale_absmax), state.state2.absmax.numpy(),
                                   rtol=1e-6)
        np.testing.assert_allclose(float(q.scale_offset), float(state.offset), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(nf4.dequantize(q)),
                                   F.dequantize_4bit(packed, state).numpy(), atol=1e-6)


def test_quantize_tree_rules():
    params = {"attn": {"kernel": jnp.ones((64, 64)), "bias": jnp.ones(64)}}
    tree = nf4.quantize_tree(params, (r"kernel$",))
    assert nf4.is_nf4(tree["attn"]["kernel"]) and not nf4.is_nf4(tree["attn"]["bias"])
    np.testing.assert_array_equal(nf4.dequantize_tree(tree)["attn"]["kernel"], params["attn"]["kernel"])
    with pytest.raises(ConfigError, match=r"match no parameter[\s\S]*attn/kernel"):
        nf4.quantize_tree(params, ("q_proj",))


def test_int8_weight_only_error_bound():
    """Per-output-channel absmax: |W - W'| <= scale_j / 254 (half a quantization step)."""
    w = jax.random.normal(jax.random.key(0), (40, 3, 5))
    t = int8.quantize(w, n_in=1)
    err = jnp.abs(int8.dequantize(t) - w)
    assert bool(jnp.all(err <= t.scale / 254 + 1e-7))
    assert t.q.dtype == jnp.int8 and int8.nbytes({"w": t}) == w.size + 4 * 15


def test_llm_int8_keeps_outliers_in_float():
    """Reference: the float product. An outlier feature (|x| >= threshold) quantized with the rest
    inflates every row's scale; the mixed decomposition keeps it in float."""
    k = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(k[0], (32, 64)).at[:, 5].set(40.0)
    w = jax.random.normal(k[1], (64, 16)) * 0.1
    exact = x @ w
    mixed, frac = int8.int8_matmul(x, w, threshold=6.0)
    plain, frac0 = int8.int8_matmul(x, w, threshold=jnp.inf)
    assert float(frac) == 1 / 64 and float(frac0) == 0.0
    e_mixed = float(jnp.max(jnp.abs(mixed - exact)))
    e_plain = float(jnp.max(jnp.abs(plain - exact)))
    assert e_mixed < e_plain / 5, (e_mixed, e_plain)
    # Vector-wise bound: |error| <= sum_i |x_i| (s_w/254) + |w_i| (s_x/254) per entry, roughly.
    assert e_mixed < 0.05 * float(jnp.max(jnp.abs(exact)))
