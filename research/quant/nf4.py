"""NF4 (4-bit NormalFloat) quantization of weights with double quantization, as in QLoRA
(Dettmers et al. 2023, https://arxiv.org/abs/2305.14314) and ``bitsandbytes``.

A tensor is flattened and cut into blocks of ``blocksize`` (64) values. Each block is scaled by its
absolute maximum (``absmax``) into [-1, 1] and every value is replaced by the index of the nearest
of the 16 NF4 code values (``NF4_VALUES``: quantiles of N(0, 1), asymmetric with an exact zero,
normalised to [-1, 1]; the paper's Eq. 4 and bitsandbytes' ``create_normal_map``). Two 4-bit codes
are packed into one uint8, the first in the high nibble (bitsandbytes' layout).

Double quantization (paper section 3, "Double Quantization"): the float32 absmax of each block is
itself quantized: its mean (``scale_offset``) is subtracted and the result is quantized in blocks
of 256 with the signed 8-bit dynamic data type (``dynamic_map``; bitsandbytes'
``create_dynamic_map``) and one float32 absmax per 256 blocks. Storage per parameter:
4 + 8/64 + 32/(64*256) = 4.127 bits (plus one float32 offset per tensor).

``quantize(w)`` -> ``NF4Tensor`` (a pytree: uint8 codes, uint8 scale codes, float32 second-level
scales, the offset; the shape and sizes are static), ``dequantize(q)`` -> float32 array,
``quantize_tree(params, rules)`` / ``dequantize_tree(tree)`` over parameter pytrees,
``bits_per_param`` measures storage.
"""
from __future__ import annotations

import math
import re
from statistics import NormalDist
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from research.core.config import ConfigError

# The 16 NF4 values (bitsandbytes ``create_normal_map()``, printed in the QLoRA paper's appendix).
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982985305786, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
NF4_OFFSET = 0.9677083  # the outermost quantile used by bitsandbytes (and the paper's reference code)
ZERO_CODE = 7  # NF4_VALUES[7] == 0.0
BLOCKSIZE = 64
SCALE_BLOCKSIZE = 256


def normal_map(offset: float = NF4_OFFSET) -> np.ndarray:
    """The NF4 values from their definition (QLoRA Eq. 4 with an exact zero): 8 positive values
    ``Phi^-1`` at 9 evenly spaced quantiles in [0.5, offset] (dropping 0.5), 7 negative ones from 8
    quantiles, plus 0, normalised by the maximum. Computed with the standard library's inverse
    normal CDF; equals ``NF4_VALUES`` (tested)."""
    ppf = NormalDist().inv_cdf
    pos = [ppf(float(p)) for p in np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1]]
    neg = [-ppf(float(p)) for p in np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1]]
    v = np.sort(np.array(pos + [0.0] + neg, np.float64))
    return (v / v.max()).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The 8-bit dynamic (exponent + fraction) data type of Dettmers (2016), as bitsandbytes'
    ``create_dynamic_map``: 256 sorted values in [-1, 1] used for the second-level scales."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = np.linspace(0.1, 1, n, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means.astype(np.float64)).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means.astype(np.float64)).tolist()
    if additional_items > 0:
        bounds = np.linspace(0.1, 1, additional_items + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means.astype(np.float64)).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means.astype(np.float64)).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return np.sort(np.array(data, np.float32))


def _nearest(x: jax.Array, code: jax.Array) -> jax.Array:
    """Index of the nearest value of the sorted ``code`` for every element of ``x`` (midpoint
    thresholds, as bitsandbytes' search), uint8."""
    mid = (code[1:] + code[:-1]) / 2
    return jnp.searchsorted(mid, x, side="left").astype(jnp.uint8)


def quantize_blockwise(x: jax.Array, code: jax.Array, blocksize: int):
    """Flat ``x`` -> (uint8 indices into ``code``, float32 absmax per block). ``x`` is zero-padded
    to a whole number of blocks."""
    n = x.shape[0]
    nblocks = -(-n // blocksize)
    xb = jnp.pad(x.astype(jnp.float32), (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    absmax = jnp.max(jnp.abs(xb), axis=1)
    scaled = xb / jnp.where(absmax == 0, 1.0, absmax)[:, None]
    return _nearest(scaled, code).reshape(-1)[:n], absmax


def dequantize_blockwise(idx: jax.Array, absmax: jax.Array, code: jax.Array, blocksize: int):
    n = idx.shape[0]
    nblocks = absmax.shape[0]
    vals = jnp.pad(code[idx.astype(jnp.int32)], (0, nblocks * blocksize - n))
    return (vals.reshape(nblocks, blocksize) * absmax[:, None]).reshape(-1)[:n]


@flax.struct.dataclass
class NF4Tensor:
    """An NF4-quantized tensor. ``codes``: uint8 [ceil(n/2)] (two 4-bit codes each, first in the
    high nibble); with double quantization ``scale_codes`` uint8 [n_blocks], ``scale_absmax``
    float32 [ceil(n_blocks/256)], ``scale_offset`` float32 []; without it ``scale_absmax`` holds
    the float32 absmax per block and ``scale_codes`` is empty."""

    codes: jax.Array
    scale_codes: jax.Array
    scale_absmax: jax.Array
    scale_offset: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    blocksize: int = flax.struct.field(pytree_node=False, default=BLOCKSIZE)
    double_quant: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in
                   (self.codes, self.scale_codes, self.scale_absmax, self.scale_offset))


def quantize(w: jax.Array, blocksize: int = BLOCKSIZE, double_quant: bool = True,
             scale_blocksize: int = SCALE_BLOCKSIZE) -> NF4Tensor:
    """NF4-quantize ``w`` (any shape, flattened in C order)."""
    flat = jnp.asarray(w, jnp.float32).reshape(-1)
    idx, absmax = quantize_blockwise(flat, jnp.asarray(NF4_VALUES), blocksize)
    if idx.shape[0] % 2:  # pad with the code of 0.0 (index 7), as bitsandbytes does
        idx = jnp.pad(idx, (0, 1), constant_values=ZERO_CODE)
    packed = (idx[0::2] << 4) | idx[1::2]
    if double_quant:
        offset = jnp.mean(absmax)
        scale_codes, scale_absmax = quantize_blockwise(
            absmax - offset, jnp.asarray(dynamic_map()), scale_blocksize)
    else:
        offset = jnp.zeros((), jnp.float32)
        scale_codes, scale_absmax = jnp.zeros((0,), jnp.uint8), absmax
    return NF4Tensor(packed.astype(jnp.uint8), scale_codes, scale_absmax, offset,
                     tuple(int(d) for d in np.shape(w)), blocksize, double_quant)


def block_absmax(q: NF4Tensor, scale_blocksize: int = SCALE_BLOCKSIZE) -> jax.Array:
    """The (double-dequantized) float32 absmax of every block."""
    if not q.double_quant:
        return q.scale_absmax
    return dequantize_blockwise(q.scale_codes, q.scale_absmax, jnp.asarray(dynamic_map()),
                                scale_blocksize) + q.scale_offset


def codes(q: NF4Tensor) -> jax.Array:
    """The unpacked 4-bit code of every element, uint8 [n]."""
    unpacked = jnp.stack([q.codes >> 4, q.codes & 15], axis=1).reshape(-1)
    return unpacked[:q.size]


def dequantize(q: NF4Tensor, dtype=jnp.float32) -> jax.Array:
    out = dequantize_blockwise(codes(q), block_absmax(q), jnp.asarray(NF4_VALUES), q.blocksize)
    return out.reshape(q.shape).astype(dtype)


def bits_per_param(tree: Any) -> float:
    """Storage bits per quantized parameter over every ``NF4Tensor`` in ``tree`` (all arrays
    counted: packed codes, scale codes, second-level scales, offsets)."""
    qs = [x for x in jax.tree.leaves(tree, is_leaf=is_nf4) if is_nf4(x)]
    if not qs:
        raise ValueError("No NF4Tensor in the tree.")
    return 8.0 * sum(q.nbytes() for q in qs) / sum(q.size for q in qs)


def is_nf4(x) -> bool:
    return isinstance(x, NF4Tensor)


def path_str(path: Sequence) -> str:
    """A pytree key path -> 'layer_0/attn/query/kernel' (Flax box ``.value`` attributes dropped)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
    return "/".join(parts)


def quantize_tree(params: Any, rules: Sequence[str] | str = (r"kernel$",), min_size: int = 0,
                  blocksize: int = BLOCKSIZE, double_quant: bool = True):
    """Replace every array whose path matches one of the regexes ``rules`` (``re.search``) and
    has at least ``min_size`` elements by its ``NF4Tensor``. A rule set that matches nothing is an
    error listing the paths."""
    rules = (rules,) if isinstance(rules, str) else tuple(rules)
    matched = []

    def f(path, x):
        p = path_str(path)
        if any(re.search(r, p) for r in rules) and x.size >= min_size:
            matched.append(p)
            return quantize(x, blocksize, double_quant)
        return x

    out = jax.tree_util.tree_map_with_path(f, params)
    if not matched:
        paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
        raise ConfigError(f"Quantization rules {list(rules)} match no parameter; the paths are:\n  "
                          + "\n  ".join(paths))
    return out


def dequantize_tree(tree: Any, dtype=jnp.float32) -> Any:
    return jax.tree.map(lambda x: dequantize(x, dtype) if is_nf4(x) else x, tree, is_leaf=is_nf4)


def split_quantized(tree: Any) -> tuple[Any, Any]:
    """(the tree with NF4 leaves replaced by None, the tree of NF4 leaves only, others None)."""
    rest = jax.tree.map(lambda x: None if is_nf4(x) else x, tree, is_leaf=is_nf4)
    quant = jax.tree.map(lambda x: x if is_nf4(x) else None, tree, is_leaf=is_nf4)
    return rest, quant


def join_quantized(rest: Any, quant: Any) -> Any:
    """Inverse of ``split_quantized`` (with the NF4 leaves dequantized or not, as given)."""
    return jax.tree.map(lambda a, b: a if b is None else b, rest, quant,
                        is_leaf=lambda x: x is None or is_nf4(x))
