"""MR-SP stage 2: sequence-parallel attention over the mesh's 'sequence' axis.

`attention(q, k, v, *, mesh, strategy, causal)` takes q [B,T,Hq,D] and k/v [B,T,Hkv,D] sharded
on T and returns [B,T,Hq,D] sharded the same way. Strategies:

  all_gather_kv  queries stay local; K/V (small under GQA) are gathered. No head constraint.
  ulysses        all-to-all from sequence- to head-sharding and back. When the kv heads do not
                 divide the axis (LongVILA-7B: 28 q / 4 kv heads on 8 devices), KV heads are
                 replicated the least that makes them divide, and heads are zero-padded if even
                 full replication does not (28 -> 32): it never asserts.
  ring           K/V blocks travel around the ring with ppermute; online-softmax accumulation;
                 a custom VJP whose backward sends dK/dV around the ring with their blocks, so
                 memory stays O(T/sp). Causal load balance by the zig-zag layout (device i holds
                 chunks i and 2sp-1-i), converted to and from in-place if the input is
                 contiguous.

Every strategy computes the block attention with `models.flash` (blockwise, exact, O(T) memory,
fully masked block pairs skipped), masking by *global* token index, so all of them are exact
for any layout and any padding.

A layout is an order of T over the axis: `layout_index` (the original index at each position,
device-major) and `inverse_index` (the position of each original index). The trainers' token
batches are put in it by `batch.place_batch`; `pad_and_shard` does the same for arbitrary
[B, T, ...] activations (q/k/v in the attention tests and `bench/sp_attention.py`): pads T to a
multiple of the axis (never drops a token), computes positions globally before sharding, marks
padding invalid, reorders to the chosen layout and places the arrays. `gather_rows` pulls a few
rows (response positions) out of a T-sharded array from the shard that holds each;
`chunked_device_get` moves a long array to host in bounded pieces (the paper's chunked
gathering).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from longrl_jax.models.flash import flash_attention, flash_backward
from longrl_jax.parallel.mesh import DEFAULT_RULES, batch_axes

STRATEGIES = ("all_gather_kv", "ulysses", "ring")
LAYOUTS = ("contiguous", "zigzag")


# ---------------------------------------------------------------------------------- layouts
def layout_index(length: int, sp: int, layout: str) -> np.ndarray:
    """[T] original token index at each position of the layout (device-major order)."""
    if layout == "contiguous":
        if length % sp:
            raise ValueError(f"sequence length {length} is not a multiple of sp={sp}")
        return np.arange(length, dtype=np.int32)
    if layout == "zigzag":
        if length % (2 * sp):
            raise ValueError(f"zigzag needs the length ({length}) to be a multiple of 2*sp="
                             f"{2 * sp}")
        chunks = np.arange(length, dtype=np.int32).reshape(2 * sp, -1)
        return np.concatenate([np.concatenate([chunks[i], chunks[2 * sp - 1 - i]])
                               for i in range(sp)])
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")


def layout_multiple(sp: int, layout: str) -> int:
    """What the length must be a multiple of for `layout` over sp devices."""
    return 2 * sp if layout == "zigzag" else sp


def inverse_index(index: np.ndarray) -> np.ndarray:
    """[T] layout position of each original index, for `index` from `layout_index`."""
    inv = np.empty_like(index)
    inv[index] = np.arange(len(index), dtype=index.dtype)
    return inv


def _zigzag_perms(sp: int):
    """Device permutations that move the even- and odd-indexed chunks between layouts."""
    def zz_owner(chunk):  # device holding `chunk` in the zig-zag layout
        return chunk if chunk < sp else 2 * sp - 1 - chunk
    even = [(j, zz_owner(2 * j)) for j in range(sp)]      # contiguous -> zigzag
    odd = [(j, zz_owner(2 * j + 1)) for j in range(sp)]
    return even, odd


def _to_zigzag(x, axis_name: str, sp: int, seq_axis: int = 1):
    """Local contiguous shard (chunks 2j, 2j+1) -> local zig-zag shard (chunks i, 2sp-1-i)."""
    i = jax.lax.axis_index(axis_name)
    a, b = jnp.split(x, 2, axis=seq_axis)
    even, odd = _zigzag_perms(sp)
    a, b = jax.lax.ppermute(a, axis_name, even), jax.lax.ppermute(b, axis_name, odd)
    # chunk i arrives as an even chunk when i is even; chunk 2sp-1-i has the other parity.
    return jnp.where(i % 2 == 0, jnp.concatenate([a, b], seq_axis),
                     jnp.concatenate([b, a], seq_axis))


def _from_zigzag(x, axis_name: str, sp: int, seq_axis: int = 1):
    i = jax.lax.axis_index(axis_name)
    first, second = jnp.split(x, 2, axis=seq_axis)
    even_chunk = jnp.where(i % 2 == 0, first, second)
    odd_chunk = jnp.where(i % 2 == 0, second, first)
    even, odd = _zigzag_perms(sp)
    inv = lambda perm: [(dst, src) for src, dst in perm]  # noqa: E731
    even_chunk = jax.lax.ppermute(even_chunk, axis_name, inv(even))
    odd_chunk = jax.lax.ppermute(odd_chunk, axis_name, inv(odd))
    return jnp.concatenate([even_chunk, odd_chunk], seq_axis)


# ------------------------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class _Ctx:
    axis: str
    sp: int
    length: int      # global (padded) T
    layout: str
    causal: bool
    block_q: int
    block_k: int

    @property
    def local(self) -> int:
        return self.length // self.sp

    def index(self):
        return jnp.asarray(layout_index(self.length, self.sp, self.layout))

    def local_index(self, device):
        return jax.lax.dynamic_slice_in_dim(self.index(), device * self.local, self.local)


def _all_gather_kv(ctx: _Ctx, q, k, v, kv_valid):
    i = jax.lax.axis_index(ctx.axis)
    gather = functools.partial(jax.lax.all_gather, axis_name=ctx.axis, axis=1, tiled=True)
    return flash_attention(q, gather(k), gather(v), q_idx=ctx.local_index(i), k_idx=ctx.index(),
                           k_valid=gather(kv_valid), causal=ctx.causal, block_q=ctx.block_q,
                           block_k=ctx.block_k)


def ulysses_head_plan(num_q_heads: int, num_kv_heads: int, sp: int) -> tuple[int, int]:
    """(kv replication factor r, zero heads to pad) so that heads split evenly over sp.

    The smallest r dividing the group size with (Hkv * r) % sp == 0 keeps grouped-query
    sharing; if none exists, KV is replicated to every query head and heads are padded."""
    g = num_q_heads // num_kv_heads
    for r in range(1, g + 1):
        if g % r == 0 and (num_kv_heads * r) % sp == 0:
            return r, 0
    return g, -num_q_heads % sp


def _ulysses(ctx: _Ctx, q, k, v, kv_valid):
    hq, hk = q.shape[2], k.shape[2]
    r, pad = ulysses_head_plan(hq, hk, ctx.sp)
    if r > 1:
        k, v = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    if pad:
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        q, k, v = jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths)
    to_heads = functools.partial(jax.lax.all_to_all, axis_name=ctx.axis, split_axis=2,
                                 concat_axis=1, tiled=True)
    kv_valid = jax.lax.all_gather(kv_valid, ctx.axis, axis=1, tiled=True)
    idx = ctx.index()
    o = flash_attention(to_heads(q), to_heads(k), to_heads(v), q_idx=idx, k_idx=idx,
                        k_valid=kv_valid, causal=ctx.causal, block_q=ctx.block_q,
                        block_k=ctx.block_k)
    o = jax.lax.all_to_all(o, ctx.axis, split_axis=1, concat_axis=2, tiled=True)
    return o[:, :, :hq]


def _ring_shift(x, ctx: _Ctx):
    return jax.lax.ppermute(x, ctx.axis, [(d, (d + 1) % ctx.sp) for d in range(ctx.sp)])


def _ring_forward(ctx: _Ctx, q, k, v, kv_valid):
    i = jax.lax.axis_index(ctx.axis)
    q_idx = ctx.local_index(i)
    attn = functools.partial(flash_attention, q_idx=q_idx, causal=ctx.causal,
                             block_q=ctx.block_q, block_k=ctx.block_k, return_lse=True)
    o, lse = attn(q, k, v, k_idx=q_idx, k_valid=kv_valid)
    o = o.astype(jnp.float32)

    def step(carry, s):
        o, lse, k, v, kv_valid = carry
        k, v, kv_valid = _ring_shift(k, ctx), _ring_shift(v, ctx), _ring_shift(kv_valid, ctx)
        src = (i - s) % ctx.sp
        o_b, lse_b = attn(q, k, v, k_idx=ctx.local_index(src), k_valid=kv_valid)
        new = jnp.logaddexp(lse, lse_b)
        o = o * jnp.exp(lse - new)[..., None] + o_b.astype(jnp.float32) * \
            jnp.exp(lse_b - new)[..., None]
        return (o, new, k, v, kv_valid), None

    (o, lse, *_), _ = jax.lax.scan(step, (o, lse, k, v, kv_valid), jnp.arange(1, ctx.sp))
    return o.astype(q.dtype), lse


def _ring_backward(ctx: _Ctx, res, do):
    q, k, v, kv_valid, o, lse = res
    i = jax.lax.axis_index(ctx.axis)
    q_idx = ctx.local_index(i)
    def block(k, v, kv_valid, src):
        return flash_backward(q, k, v, o, lse, do, q_idx=q_idx, k_idx=ctx.local_index(src),
                              k_valid=kv_valid, causal=ctx.causal, block_q=ctx.block_q,
                              block_k=ctx.block_k)

    dq, dk, dv = block(k, v, kv_valid, i)

    def step(carry, s):
        dq, k, v, kv_valid, dk, dv = carry
        k, v, kv_valid, dk, dv = (_ring_shift(x, ctx) for x in (k, v, kv_valid, dk, dv))
        dq_b, dk_b, dv_b = block(k, v, kv_valid, (i - s) % ctx.sp)
        return (dq + dq_b, k, v, kv_valid, dk + dk_b, dv + dv_b), None

    carry = (dq.astype(jnp.float32), k, v, kv_valid, dk.astype(jnp.float32),
             dv.astype(jnp.float32))
    (dq, _, _, _, dk, dv), _ = jax.lax.scan(step, carry, jnp.arange(1, ctx.sp))
    # After sp-1 shifts each dK/dV block sits one device before its owner: one more shift.
    dk, dv = _ring_shift(dk, ctx), _ring_shift(dv, ctx)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _ring(ctx: _Ctx, q, k, v, kv_valid):
    # kv_valid is an argument, not a closure: a custom_vjp must not close over tracers.
    @jax.custom_vjp
    def ring(q, k, v, kv_valid):
        return _ring_forward(ctx, q, k, v, kv_valid)[0]

    def fwd(q, k, v, kv_valid):
        o, lse = _ring_forward(ctx, q, k, v, kv_valid)
        return o, (q, k, v, kv_valid, o, lse)

    def bwd(res, do):
        return (*_ring_backward(ctx, res, do), None)

    ring.defvjp(fwd, bwd)
    return ring(q, k, v, kv_valid)


_IMPLS = {"all_gather_kv": _all_gather_kv, "ulysses": _ulysses, "ring": _ring}


# ---------------------------------------------------------------------------- public entry
def _head_axis(mesh, hq: int, hk: int, axis: str):
    t = mesh.shape.get("tensor", 1)
    return "tensor" if axis != "tensor" and t > 1 and hk % t == 0 and hq % t == 0 else None


def attention(q, k, v, *, mesh, strategy: str = "all_gather_kv", causal: bool = True,
              kv_valid=None, layout: str = "contiguous", axis: str = "sequence",
              block_q: int = 512, block_k: int = 512):
    """Sequence-parallel exact attention; q [B,T,Hq,D], k/v [B,T,Hkv,D] sharded on T.

    `layout` says how T is ordered across the axis ('contiguous', or 'zigzag' as produced by
    `batch.place_batch` or `pad_and_shard`); `kv_valid` [B,T] masks padded keys. A contiguous T
    that the axis does not divide is padded here (masked keys at the end, rows dropped after); a
    zig-zag T must already be a multiple of 2*sp (`batch.length_multiple`, `pad_and_shard`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown SP strategy {strategy!r}; choose from {STRATEGIES}")
    b, t, hq, _ = q.shape
    hk = k.shape[2]
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hk})")
    sp = mesh.shape[axis]
    if kv_valid is None:
        kv_valid = jnp.ones((b, t), bool)
    multiple = 2 * sp if strategy == "ring" and causal else sp
    if layout == "contiguous" and t % multiple:
        pad = -t % multiple
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        out = attention(jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths), mesh=mesh,
                        strategy=strategy, causal=causal,
                        kv_valid=jnp.pad(kv_valid, ((0, 0), (0, pad))), layout=layout,
                        axis=axis, block_q=block_q, block_k=block_k)
        return _to_spec(out, mesh, P())[:, :t]
    layout_index(t, sp, layout)  # validates the length for the layout
    if sp == 1:
        idx = jnp.asarray(layout_index(t, 1, layout))
        return flash_attention(q, k, v, q_idx=idx, k_idx=idx, k_valid=kv_valid, causal=causal,
                               block_q=block_q, block_k=block_k)
    convert = strategy == "ring" and causal and layout == "contiguous" and t % (2 * sp) == 0
    ctx = _Ctx(axis=axis, sp=sp, length=t, layout="zigzag" if convert else layout,
               causal=causal, block_q=block_q, block_k=block_k)
    bax, hax = batch_axes(mesh, b), _head_axis(mesh, hq, hk, axis)
    spec, vspec = P(bax, axis, hax, None), P(bax, axis)

    def local(q, k, v, kv_valid):
        if convert:
            q, k, v, kv_valid = (_to_zigzag(x, axis, sp) for x in (q, k, v, kv_valid))
        o = _IMPLS[strategy](ctx, q, k, v, kv_valid)
        return _from_zigzag(o, axis, sp) if convert else o

    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, vspec), out_specs=spec,
                       check_vma=False)
    q, k, v = (_to_spec(x, mesh, spec) for x in (q, k, v))
    return fn(q, k, v, _to_spec(kv_valid, mesh, vspec))


def _to_spec(x, mesh, spec):
    """On a mesh with explicit axes, shard_map wants its inputs sharded as its in_specs say;
    on an auto mesh it reshards them itself."""
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(x, NamedSharding(mesh, spec))
    return x


def attention_fn(mesh, strategy: str, *, layout: str = "contiguous", axis: str = "sequence",
                 block_q: int = 512, block_k: int = 512):
    """An `attn_fn` for the Qwen2 layers (`q, k, v, *, causal, kv_valid_bs`) running `strategy`
    on `mesh` (see `use_sequence_parallel`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown SP strategy {strategy!r}; choose from {STRATEGIES}")

    def fn(q, k, v, *, causal, kv_valid_bs=None):
        return attention(q, k, v, mesh=mesh, strategy=strategy, causal=causal,
                         kv_valid=kv_valid_bs, layout=layout, axis=axis, block_q=block_q,
                         block_k=block_k)
    return fn


def use_sequence_parallel(llm, mesh, strategy: str, *, layout: str = "contiguous",
                          axis: str = "sequence", block_q: int = 512, block_k: int = 512,
                          rules=DEFAULT_RULES) -> None:
    """Installs `strategy` as the attention of a Qwen2 LLM (MR-SP stage 2); its inputs must then
    come in the same layout (`batch.place_batch(..., layout=)`, or `pad_and_shard`). Layer
    boundaries are constrained by the `activation_length` / `activation_embed` rules (T over
    `axis`; the batch dimension is left to the inputs)."""
    table = dict(rules)
    llm.set_attention(attention_fn(mesh, strategy, layout=layout, axis=axis, block_q=block_q,
                                   block_k=block_k),
                      act_sharding=NamedSharding(mesh, P(P.UNCONSTRAINED,
                                                         table.get("activation_length", axis),
                                                         table.get("activation_embed"))))


# --------------------------------------------------------------------------- pad and shard
@dataclasses.dataclass(frozen=True)
class ShardedSequence:
    """Padded, layout-ordered, sharded activations and what is needed to undo it (the
    attention-level tests and bench; token batches go through `batch.place_batch`)."""

    arrays: tuple            # the inputs, [B, Tp, ...] each, in layout order
    positions: jax.Array     # [B, Tp] RoPE positions, computed before reordering
    valid: jax.Array         # [B, Tp] False at padding
    index: np.ndarray        # [Tp] original index at each layout position
    length: int              # T before padding
    layout: str

    @property
    def inverse(self) -> np.ndarray:
        """[Tp] layout position of each original index."""
        return inverse_index(self.index)

    def to_layout(self, original_positions: np.ndarray) -> np.ndarray:
        """Layout positions of original indices (e.g. response token positions)."""
        return self.inverse[np.asarray(original_positions)]

    def unshard(self, x_bt):
        """Back to original order, padding removed: [B, T, ...]."""
        return jnp.take(x_bt, jnp.asarray(self.inverse[: self.length]), axis=1)


def pad_and_shard(*arrays, mesh, positions=None, valid=None, layout: str = "contiguous",
                  axis: str = "sequence", pad_value=0) -> ShardedSequence:
    """Pads every [B, T, ...] array to a multiple of the axis (2x for zigzag), reorders to
    `layout` and places it T-sharded. Positions default to 0..T-1 and are computed before any
    reordering; padding gets valid=False and positions continuing past the end."""
    if not arrays:
        raise ValueError("pad_and_shard needs at least one array")
    b, t = arrays[0].shape[:2]
    for a in arrays:
        if a.shape[:2] != (b, t):
            raise ValueError(f"all arrays must share [B, T] = {(b, t)}, got {a.shape}")
    sp = mesh.shape[axis]
    multiple = layout_multiple(sp, layout)
    pad = -t % multiple
    index = layout_index(t + pad, sp, layout)
    bax = batch_axes(mesh, b)

    def padded(x, fill):
        x = jnp.asarray(x)
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=fill) if pad else x

    def place(x):
        if layout != "contiguous":
            x = jnp.take(x, jnp.asarray(index), axis=1)
        return jax.device_put(x, NamedSharding(mesh, P(bax, axis, *([None] * (x.ndim - 2)))))

    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None \
        else jnp.asarray(positions, jnp.int32)
    pos = jnp.concatenate([pos, pos[:, -1:] + 1 + jnp.arange(pad, dtype=jnp.int32)[None]], 1)
    valid = jnp.ones((b, t), bool) if valid is None else jnp.asarray(valid, bool)
    return ShardedSequence(arrays=tuple(place(padded(a, pad_value)) for a in arrays),
                           positions=place(pos), valid=place(padded(valid, False)), index=index,
                           length=t, layout=layout)


# ---------------------------------------------------------------------- gathering rows
def gather_rows(x_btd, layout_rows_br, *, mesh, axis: str = "sequence"):
    """x[b, rows[b, r]] for a T-sharded x: each device contributes the rows it holds and a psum
    combines them, so only [B, R, D] crosses devices, never the whole sequence."""
    b, t = x_btd.shape[:2]
    sp = mesh.shape[axis]
    tl = t // sp
    bax = batch_axes(mesh, b)
    rest = (None,) * (x_btd.ndim - 2)

    def local(x, rows):
        i = jax.lax.axis_index(axis)
        mine = (rows // tl) == i
        off = jnp.where(mine, rows - i * tl, 0)
        got = jnp.take_along_axis(x, off.reshape(off.shape + (1,) * len(rest)), axis=1)
        got = jnp.where(mine.reshape(mine.shape + (1,) * len(rest)), got, 0)
        return jax.lax.psum(got, axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(bax, axis, *rest), P(bax, None)),
                         out_specs=P(bax, None, *rest), check_vma=False)(
        x_btd, jnp.asarray(layout_rows_br, jnp.int32))


def chunked_device_get(x, chunk_rows: int, axis: int = 0) -> np.ndarray:
    """Copies a (sharded) device array to host `chunk_rows` rows at a time along `axis`, so the
    peak host memory of the transfer is bounded by one chunk plus the result."""
    if chunk_rows <= 0:
        raise ValueError("chunk_rows must be positive")
    out = np.empty(x.shape, dtype=x.dtype)
    n = x.shape[axis]
    for start in range(0, n, chunk_rows):
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(start, min(start + chunk_rows, n))
        out[tuple(sl)] = np.asarray(jax.device_get(x[tuple(sl)]))
    return out


def put_from_host(host, sharding: NamedSharding) -> jax.Array:
    """Places a host array (e.g. a memory-mapped cached video embedding) onto its shards, each
    device reading only its own slice: no whole copy is made on any device, and a memmap is
    read piece by piece."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: np.asarray(host[idx]))


__all__ = ["LAYOUTS", "STRATEGIES", "ShardedSequence", "attention", "attention_fn",
           "chunked_device_get", "gather_rows", "inverse_index", "layout_index",
           "layout_multiple", "pad_and_shard", "put_from_host",
           "ulysses_head_plan", "use_sequence_parallel"]
