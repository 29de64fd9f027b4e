"""Blockwise (flash-style) attention in pure JAX with a custom VJP.

Memory is O(T) rather than O(T^2): queries and keys are processed in blocks with an online
softmax, and the backward pass recomputes each block's probabilities from the saved
log-sum-exp instead of storing them. Masks are given as *global token indices* (`q_idx`,
`k_idx`) plus a key-validity mask, so a block of a sharded or reordered (zig-zag) sequence
is masked exactly as the whole sequence would be. A (query block, key block) pair that causality
masks entirely is skipped.

Shapes: q [B, Tq, N, H]; k, v [B, Tk, K, H] (N = K * G, grouped-query); q_idx [Tq]; k_idx [Tk];
k_valid [B, Tk]. All accumulation is float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

NEG = -1e30  # "minus infinity" that stays finite through exp/logaddexp arithmetic


def _split(x, block, axis):
    """[..., T, ...] -> [T/block, ..., block, ...] with the block index leading."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // block, block) + shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _mask(q_idx, k_idx, k_valid, causal):
    """[B, Tq, Tk] bool."""
    m = k_valid[:, None, :]
    if causal:
        m = m & (k_idx[None, None, :] <= q_idx[None, :, None])
    return m


def _scores(q5, k, scale):
    # q5 [B, Tq, K, G, H], k [B, Tk, K, H] -> [B, K, G, Tq, Tk]
    return jnp.einsum("BTKGH,BSKH->BKGTS", q5, k, preferred_element_type=jnp.float32) * scale


def _needed(q_idx, k_idx, causal):
    return (jnp.min(k_idx) <= jnp.max(q_idx)) if causal else jnp.bool_(True)


# ------------------------------------------------------------------------------- forward
def _fwd_qblock(q5, k_blocks, v_blocks, q_idx, kidx_blocks, kval_blocks, causal, scale):
    """One query block against all key blocks. Returns o [B,Tq,K,G,H] f32, lse [B,K,G,Tq]."""
    b, tq, kh, g, h = q5.shape
    init = (jnp.full((b, kh, g, tq), NEG, jnp.float32), jnp.zeros((b, kh, g, tq), jnp.float32),
            jnp.zeros((b, kh, g, tq, h), jnp.float32))

    def step(carry, blk):
        k, v, k_idx, k_valid = blk

        def compute(carry):
            m, l, acc = carry
            mask = _mask(q_idx, k_idx, k_valid, causal)[:, None, None]
            s = jnp.where(mask, _scores(q5, k, scale), NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("BKGTS,BSKH->BKGTH", p, v.astype(jnp.float32))
            return m_new, l, acc

        carry = jax.lax.cond(_needed(q_idx, k_idx, causal), compute, lambda c: c, carry)
        return carry, None

    (m, l, acc), _ = jax.lax.scan(step, init, (k_blocks, v_blocks, kidx_blocks, kval_blocks))
    empty = l == 0
    o = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, NEG, m + jnp.log(jnp.where(empty, 1.0, l)))
    return jnp.einsum("BKGTH->BTKGH", o), lse


def _blocks(q, k, v, q_idx, k_idx, k_valid, block_q, block_k):
    b, tq, n, h = q.shape
    kh = k.shape[2]
    q5 = q.reshape(b, tq, kh, n // kh, h)
    return (_split(q5, block_q, 1), _split(q_idx, block_q, 0), _split(k, block_k, 1),
            _split(v, block_k, 1), _split(k_idx, block_k, 0), _split(k_valid, block_k, 1))


def _tie(q, *consts):
    """Makes the index/validity arrays depend on `q`. Inside a scan over layers they are loop
    invariant, and JAX's partial evaluation would then hoist every block's mask out of the loop
    and store all of them, [T/bq, T/bk, bq, bk]: the O(T^2) memory this kernel exists to avoid."""
    return jax.lax.optimization_barrier((q, *consts))


def _forward(q, k, v, q_idx, k_idx, k_valid, causal, block_q, block_k):
    q, q_idx, k_idx, k_valid = _tie(q, q_idx, k_idx, k_valid)
    b, tq, n, h = q.shape
    scale = 1.0 / math.sqrt(h)
    qb, qib, kb, vb, kib, kvb = _blocks(q, k, v, q_idx, k_idx, k_valid, block_q, block_k)
    o, lse = jax.lax.map(
        lambda xs: _fwd_qblock(xs[0], kb, vb, xs[1], kib, kvb, causal, scale), (qb, qib))
    o = _merge(o, 1).reshape(b, tq, n, h).astype(q.dtype)  # [B, Tq, N, H]
    lse = _merge(lse, 3)                            # [B, K, G, Tq]
    lse = jnp.einsum("BKGT->BTKG", lse).reshape(b, tq, n)
    return o, lse


# ------------------------------------------------------------------------------ backward
def _backward(q, k, v, q_idx, k_idx, k_valid, o, lse, do, dlse, causal, block_q, block_k):
    """Gradients of sum(do * o) + sum(dlse * lse) for o, lse = attention(q, k, v)."""
    q, q_idx, k_idx, k_valid = _tie(q, q_idx, k_idx, k_valid)
    b, tq, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = 1.0 / math.sqrt(h)
    qb, qib, kb, vb, kib, kvb = _blocks(q, k, v, q_idx, k_idx, k_valid, block_q, block_k)
    # d lse / d s = p, so an lse cotangent enters exactly like -delta.
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # [B, Tq, N]
    if dlse is not None:
        delta = delta - dlse.astype(jnp.float32)
    to5 = lambda x: x.reshape(x.shape[:2] + (kh, g) + x.shape[3:])  # noqa: E731
    dob = _split(to5(do), block_q, 1)
    lseb = _split(jnp.einsum("BTKG->BKGT", lse.reshape(b, tq, kh, g)), block_q, 3)
    deltab = _split(jnp.einsum("BTKG->BKGT", delta.reshape(b, tq, kh, g)), block_q, 3)

    def q_step(dkv, xs):
        q5, q_idx_b, do5, lse_b, delta_b = xs

        def k_step(dq, blk):
            k, v, k_idx_b, k_valid_b = blk

            def compute(dq):
                mask = _mask(q_idx_b, k_idx_b, k_valid_b, causal)[:, None, None]
                s = _scores(q5, k, scale)
                p = jnp.where(mask, jnp.exp(s - lse_b[..., None]), 0.0)   # [B,K,G,Tq,Tk]
                dv = jnp.einsum("BKGTS,BTKGH->BSKH", p, do5.astype(jnp.float32))
                dp = jnp.einsum("BTKGH,BSKH->BKGTS", do5.astype(jnp.float32),
                                v.astype(jnp.float32))
                ds = p * (dp - delta_b[..., None]) * scale
                dq = dq + jnp.einsum("BKGTS,BSKH->BTKGH", ds, k.astype(jnp.float32))
                dk = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q5.astype(jnp.float32))
                return dq, (dk, dv)

            def skip(dq):
                zero = jnp.zeros(k.shape, jnp.float32)
                return dq, (zero, zero)

            return jax.lax.cond(_needed(q_idx_b, k_idx_b, causal), compute, skip, dq)

        dq0 = jnp.zeros(q5.shape, jnp.float32)
        dq, (dk_blocks, dv_blocks) = jax.lax.scan(k_step, dq0, (kb, vb, kib, kvb))
        return (dkv[0] + dk_blocks, dkv[1] + dv_blocks), dq

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), (qb, qib, dob, lseb, deltab))
    dq = _merge(dq, 1).reshape(q.shape).astype(q.dtype)
    dk = _merge(dk, 1).astype(k.dtype)
    dv = _merge(dv, 1).astype(v.dtype)
    return dq, dk, dv


# -------------------------------------------------------------------------- public entry
def _pad_to(x, axis, multiple, value=0):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, q_idx, k_idx, k_valid, causal, block_q, block_k):
    return _forward(q, k, v, q_idx, k_idx, k_valid, causal, block_q, block_k)


def _flash_fwd(q, k, v, q_idx, k_idx, k_valid, causal, block_q, block_k):
    o, lse = _forward(q, k, v, q_idx, k_idx, k_valid, causal, block_q, block_k)
    return (o, lse), (q, k, v, q_idx, k_idx, k_valid, o, lse)


def _flash_bwd(causal, block_q, block_k, res, cotangents):
    q, k, v, q_idx, k_idx, k_valid, o, lse = res
    do, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, q_idx, k_idx, k_valid, o, lse, do, dlse, causal, block_q,
                           block_k)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pick_block(length: int, block: int) -> int:
    """A block size for `length`: a divisor in [block/2, block] when one exists (no padding),
    else `block` itself (pad)."""
    if length <= block:
        return length
    for d in range(block, block // 2 - 1, -1):
        if length % d == 0:
            return d
    return block


def _prepare(q, k, v, q_idx, k_idx, k_valid, block_q, block_k):
    """Defaults for the index/validity arguments, and padding of T to the block sizes.
    Padded queries get index -1 (they see no key under causality); padded keys are invalid."""
    b, tq = q.shape[:2]
    tk = k.shape[1]
    q_idx = jnp.arange(tq, dtype=jnp.int32) if q_idx is None else q_idx.astype(jnp.int32)
    k_idx = jnp.arange(tk, dtype=jnp.int32) if k_idx is None else k_idx.astype(jnp.int32)
    k_valid = jnp.ones((b, tk), bool) if k_valid is None else k_valid.astype(bool)
    block_q, block_k = pick_block(tq, block_q), pick_block(tk, block_k)
    return (_pad_to(q, 1, block_q), _pad_to(k, 1, block_k), _pad_to(v, 1, block_k),
            _pad_to(q_idx, 0, block_q, value=-1),
            _pad_to(k_idx, 0, block_k, value=jnp.iinfo(jnp.int32).max),
            _pad_to(k_valid, 1, block_k, value=False), block_q, block_k)


def flash_attention(q, k, v, *, q_idx=None, k_idx=None, k_valid=None, causal=True,
                    block_q: int = 512, block_k: int = 512, return_lse: bool = False):
    """Exact softmax attention, blockwise. Queries with no visible key get zeros.

    Differentiable (custom VJP), also through the returned log-sum-exp."""
    tq = q.shape[1]
    qp, kp, vp, qip, kip, kvp, block_q, block_k = _prepare(q, k, v, q_idx, k_idx, k_valid,
                                                           block_q, block_k)
    o, lse = _flash(qp, kp, vp, qip, kip, kvp, causal, block_q, block_k)
    o, lse = o[:, :tq], lse[:, :tq]
    return (o, lse) if return_lse else o


def flash_backward(q, k, v, o, lse, do, *, q_idx=None, k_idx=None, k_valid=None, causal=True,
                   block_q: int = 512, block_k: int = 512):
    """dq, dk, dv of sum(do * o) for one key block, given the *final* o and lse of each query
    row: the building block of a ring backward, where a row's softmax spans many key blocks."""
    tq, tk = q.shape[1], k.shape[1]
    qp, kp, vp, qip, kip, kvp, block_q, block_k = _prepare(q, k, v, q_idx, k_idx, k_valid,
                                                           block_q, block_k)
    op, dop = _pad_to(o, 1, block_q), _pad_to(do, 1, block_q)
    lsep = _pad_to(lse, 1, block_q, value=NEG)
    dq, dk, dv = _backward(qp, kp, vp, qip, kip, kvp, op, lsep, dop, None, causal, block_q,
                           block_k)
    return dq[:, :tq], dk[:, :tk], dv[:, :tk]


def attention_fn(block_q: int = 512, block_k: int = 512):
    """`flash_attention` as a Qwen2 `attn_fn` (`q, k, v, *, causal, kv_valid_bs`): O(T) memory
    on one device, the same numbers as dense attention."""
    def fn(q, k, v, *, causal, kv_valid_bs=None):
        return flash_attention(q, k, v, k_valid=kv_valid_bs, causal=causal, block_q=block_q,
                               block_k=block_k)
    return fn
