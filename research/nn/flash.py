"""FlashAttention-style attention: blockwise, online softmax, and a custom VJP that recomputes the
attention blocks in the backward pass (Dao et al. 2022, FlashAttention; the backward of
FlashAttention-2), in plain JAX so it runs everywhere; on GPU/TPU the fused kernels.

``attention(q, k, v, mask=None, causal=False, impl='blockwise')``: q [B, T, H, D], k/v [B, S, K, D]
with K dividing H (grouped-query attention), ``mask`` boolean broadcastable to [B, H, T, S]
(True = attend; a padding mask [B, 1, 1, S] stays that small: only blocks of it are read), and
``causal`` (query i sees keys <= i + S - T). Memory is O(T + S) per head instead of the naive
O(T S): the forward keeps only the output and the log-sum-exp of each row; the backward walks
the blocks again. Key blocks wholly above the causal diagonal are skipped, forward and backward.

``impl``: 'blockwise' (this file), 'cudnn' (``jax.nn.dot_product_attention(...,
implementation='cudnn')``, GPU), 'pallas' (``jax.experimental.pallas.ops``: the Triton kernel on
GPU, the TPU flash kernel on TPU). Masked logits are set to the float32 minimum, as the naive path
does, so the two agree even on fully masked rows.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from research.core.config import ConfigError

IMPLS = ("xla", "blockwise", "cudnn", "pallas")
NEG = float(jnp.finfo(jnp.float32).min)


def attention(q, k, v, mask=None, *, causal: bool = False, impl: str = "blockwise",
              block_q: int = 512, block_k: int = 512, dtype=None):
    """softmax(q k^T / sqrt(D) [masked]) v -> [B, T, H, D] in ``dtype`` (default q's)."""
    dtype = dtype or q.dtype
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask, causal=causal, block_q=block_q,
                                   block_k=block_k).astype(dtype)
    if impl in ("cudnn", "pallas"):
        backend = jax.default_backend()
        if backend == "cpu":
            raise ConfigError(
                f"config.model.attention_impl={impl!r} needs a GPU{' or TPU' if impl == 'pallas' else ''}"
                f" (this run is on {backend}); use 'blockwise' (any backend) or 'xla'.")
        if impl == "cudnn":
            return jax.nn.dot_product_attention(
                q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                mask=mask, is_causal=causal, implementation="cudnn").astype(dtype)
        return _pallas(q, k, v, mask, causal).astype(dtype)
    raise ConfigError(f"config.model.attention_impl={impl!r}: expected one of {list(IMPLS)}")


def _pallas(q, k, v, mask, causal):
    if mask is not None:
        raise ConfigError("attention_impl='pallas' takes no padding mask here; use 'cudnn' or "
                          "'blockwise' for padded batches.")
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if jax.default_backend() == "tpu":
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_fa
        out = tpu_fa.flash_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), causal=causal,
                                     sm_scale=scale)
        return out.swapaxes(1, 2)
    from jax.experimental.pallas.ops.gpu import attention as gpu_fa
    return gpu_fa.mha(q, k, v, None, sm_scale=scale, causal=causal)


def blockwise_attention(q, k, v, mask=None, *, causal=False, block_q=512, block_k=512):
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h % kh:
        raise ValueError(f"{h} query heads do not group over {kh} key/value heads")
    g = h // kh
    bq, bk = min(block_q, t), min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    # [B, K, G, T, D] queries (scaled, as the naive path does), [B, K, S, D] keys and values.
    qs = (q * (1.0 / jnp.sqrt(d).astype(q.dtype))).reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)
    ks, vs = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    qs = jnp.pad(qs, ((0, 0),) * 3 + ((0, tp - t), (0, 0)))
    ks = jnp.pad(ks, ((0, 0),) * 2 + ((0, sp - s), (0, 0)))
    vs = jnp.pad(vs, ((0, 0),) * 2 + ((0, sp - s), (0, 0)))
    m = _prepare_mask(mask, b, h, kh, g, t, s, tp, sp)
    out = _flash(qs, ks, vs, m, (causal, bq, bk, t, s))
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _prepare_mask(mask, b, h, kh, g, t, s, tp, sp):
    """Boolean mask -> [Bm, Km, Gm, Tm, Sm] (each 1 or full, padded), or None; padded keys are
    handled by the kernel itself."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mb, mh, mt, ms = mask.shape
    if mh == h:
        mask = mask.reshape(mb, kh, g, mt, ms)
    elif mh == 1:
        mask = mask.reshape(mb, 1, 1, mt, ms)
    else:
        raise ValueError(f"mask heads {mh} do not broadcast to {h}")
    pads = [(0, 0)] * 3 + [(0, tp - t if mt > 1 else 0), (0, sp - s if ms > 1 else 0)]
    return jnp.pad(mask, pads)


def _block_mask(mask, static, i, j):
    """[.., bq, bk] boolean: what query block i may see of key block j (or None: everything)."""
    causal, bq, bk, t, s = static
    qpos = i * bq + jnp.arange(bq)[:, None]
    kpos = j * bk + jnp.arange(bk)[None, :]
    allowed = kpos < s
    if causal:
        allowed = allowed & (kpos <= qpos + (s - t))
    if mask is not None:
        mt, ms = mask.shape[-2:]
        mblk = mask
        if mt > 1:
            mblk = jax.lax.dynamic_slice_in_dim(mblk, i * bq, bq, axis=3)
        if ms > 1:
            mblk = jax.lax.dynamic_slice_in_dim(mblk, j * bk, bk, axis=4)
        allowed = allowed & mblk
    return allowed


def _key_blocks(static, i, n_k):
    """Key blocks [0, hi) query block i needs (causal: up to its diagonal)."""
    causal, bq, bk, t, s = static
    if not causal:
        return n_k
    last_q = (i + 1) * bq - 1 + (s - t)
    return jnp.clip(last_q // bk + 1, 0, n_k)


def _first_query_block(static, j, n_q):
    causal, bq, bk, t, s = static
    if not causal:
        return 0
    first_q = j * bk - (s - t)  # the first query position that sees key block j
    return jnp.clip(first_q // bq, 0, n_q)


def _logits(qb, kb, allowed):
    sc = jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32)
    return jnp.where(allowed, sc, NEG)


def _forward(qs, ks, vs, mask, static):
    causal, bq, bk, t, s = static
    b, kh, g, tp, d = qs.shape
    n_q, n_k = tp // bq, ks.shape[2] // bk

    def q_block(_, i):
        qb = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=3)

        def k_block(j, carry):
            m, l, acc = carry
            kb = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=2)
            vb = jax.lax.dynamic_slice_in_dim(vs, j * bk, bk, axis=2)
            sc = _logits(qb, kb, _block_mask(mask, static, i, j))
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vs.dtype), vb,
                            preferred_element_type=jnp.float32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
                jnp.zeros((b, kh, g, bq), jnp.float32), jnp.zeros((b, kh, g, bq, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _key_blocks(static, i, n_k), k_block, init)
        l = jnp.maximum(l, 1e-30)  # only padded query rows can be empty
        return None, ((acc / l[..., None]).astype(qs.dtype), m + jnp.log(l))

    _, (out, lse) = jax.lax.scan(q_block, None, jnp.arange(n_q))
    # [n_q, B, K, G, bq, ...] -> [B, K, G, Tp, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, tp, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, tp)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qs, ks, vs, mask, static):
    return _forward(qs, ks, vs, mask, static)[0]


def _flash_fwd(qs, ks, vs, mask, static):
    out, lse = _forward(qs, ks, vs, mask, static)
    return out, (qs, ks, vs, mask, out, lse)


def _flash_bwd(static, res, dout):
    qs, ks, vs, mask, out, lse = res
    causal, bq, bk, t, s = static
    b, kh, g, tp, d = qs.shape
    n_q, n_k = tp // bq, ks.shape[2] // bk
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,K,G,Tp]

    def k_block(dq, j):
        kb = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(vs, j * bk, bk, axis=2)

        def q_block(i, carry):
            dq, dk, dv = carry
            sl = lambda x, axis=3: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=axis)  # noqa
            qb, dob = sl(qs), sl(dout)
            sc = _logits(qb, kb, _block_mask(mask, static, i, j))
            p = jnp.exp(sc - sl(lse)[..., None])                      # recomputed probabilities
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p, dob, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", dob, vb, preferred_element_type=jnp.float32)
            ds = p * (dp - sl(delta)[..., None])
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds, qb, preferred_element_type=jnp.float32)
            dqb = jnp.einsum("bkgqs,bksd->bkgqd", ds, kb, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, sl(dq) + dqb, i * bq, axis=3)
            return dq, dk, dv

        zeros = jnp.zeros((b, kh, bk, d), jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(_first_query_block(static, j, n_q), n_q, q_block,
                                       (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(qs.shape, jnp.float32), jnp.arange(n_k))
    dk = jnp.moveaxis(dk, 0, 2).reshape(ks.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(vs.shape)
    return dq.astype(qs.dtype), dk.astype(ks.dtype), dv.astype(vs.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
