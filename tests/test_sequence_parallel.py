"""MR-SP stage 2 on 8 fake CPU devices: every strategy equals dense float32 attention, forward
and gradients, with rank-coded inputs (values that encode batch, position, head and channel,
so a misplaced block or head shows up exactly)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrl_jax.models.layers import dense_attention
from longrl_jax.parallel import mesh as mesh_lib
from longrl_jax.parallel import sequence as S

TOL = 2e-4
B, T_RAW, D = 2, 45, 8  # 45 needs padding for every sp > 1


def rank_coded(b, t, h, d, salt):
    bb, tt, hh, dd = np.meshgrid(np.arange(b), np.arange(t), np.arange(h), np.arange(d),
                                 indexing="ij")
    code = 0.731 * (tt + 1) * (dd + 1) / t + 0.517 * hh + 1.37 * bb + salt
    return np.sin(code).astype(np.float32)


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@functools.lru_cache(maxsize=None)
def _mesh(sp):
    return mesh_lib.make_mesh({"sequence": sp, "fsdp": -1})


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (7, 1)], ids=["gqa1", "gqa4", "gqa7"])
@pytest.mark.parametrize("sp", [1, 2, 4, 8])
@pytest.mark.parametrize("strategy", S.STRATEGIES)
def test_strategy_equals_dense(strategy, sp, hq, hk):
    mesh = _mesh(sp)
    q, k, v, w = (rank_coded(B, T_RAW, h, D, s) for h, s in ((hq, 0), (hk, 1), (hk, 2), (hq, 3)))
    ref = dense_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True)
    ref_grads = jax.grad(lambda q, k, v: jnp.sum(dense_attention(q, k, v, causal=True) * w),
                         (0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    layout = "zigzag" if strategy == "ring" else "contiguous"
    seq = S.pad_and_shard(q, k, v, w, mesh=mesh, layout=layout)
    assert seq.arrays[0].shape[1] % (2 * sp if layout == "zigzag" else sp) == 0

    def attn(q, k, v):
        return S.attention(q, k, v, mesh=mesh, strategy=strategy, causal=True,
                           kv_valid=seq.valid, layout=layout, block_q=4, block_k=4)

    qs, ks, vs, ws = seq.arrays
    out = jax.jit(attn)(qs, ks, vs)
    if sp > 1:
        assert out.sharding.spec[1] == "sequence"
    assert _rel(seq.unshard(out), ref) < TOL
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * ws), (0, 1, 2)))(qs, ks, vs)
    for g, r in zip(grads, ref_grads):
        assert _rel(seq.unshard(g), r) < TOL


@pytest.mark.parametrize("strategy", S.STRATEGIES)
def test_padded_keys_and_non_causal(strategy):
    mesh = _mesh(4)
    q, k, v = (jnp.asarray(rank_coded(B, 32, h, D, s)) for h, s in ((8, 0), (2, 1), (2, 2)))
    valid = jnp.ones((B, 32), bool).at[0, 5:9].set(False).at[1, -7:].set(False)
    for causal in (True, False):
        ref = dense_attention(q, k, v, causal=causal, kv_valid_bs=valid)
        seq = S.pad_and_shard(q, k, v, mesh=mesh, valid=valid)
        out = S.attention(*seq.arrays, mesh=mesh, strategy=strategy, causal=causal,
                          kv_valid=seq.valid, block_q=4, block_k=4)
        assert _rel(seq.unshard(out), ref) < TOL


def test_ring_converts_contiguous_input_to_zigzag_and_back():
    mesh = _mesh(8)
    q, k, v = (jnp.asarray(rank_coded(B, 48, h, D, s)) for h, s in ((4, 0), (4, 1), (4, 2)))
    seq = S.pad_and_shard(q, k, v, mesh=mesh, layout="contiguous")
    out = S.attention(*seq.arrays, mesh=mesh, strategy="ring", block_q=3, block_k=3)
    assert _rel(out, dense_attention(q, k, v, causal=True)) < TOL


def test_ulysses_head_plan_never_asserts():
    assert S.ulysses_head_plan(28, 4, 8) == (7, 4)    # LongVILA-7B on 8: replicate, pad 28 -> 32
    assert S.ulysses_head_plan(32, 4, 8) == (2, 0)    # replicate KV just enough
    assert S.ulysses_head_plan(16, 8, 8) == (1, 0)    # plain GQA split
    assert S.ulysses_head_plan(7, 1, 4) == (7, 1)


def test_zigzag_layout_balances_causal_work():
    """Each device's queries see the same number of (query, key) pairs under causality."""
    sp, t = 4, 64
    idx = S.layout_index(t, sp, "zigzag").reshape(sp, -1)
    work = [(q_idx[:, None] >= np.arange(t)[None]).sum() for q_idx in idx]
    assert len(set(work)) == 1
    contiguous = S.layout_index(t, sp, "contiguous").reshape(sp, -1)
    assert len({(q[:, None] >= np.arange(t)[None]).sum() for q in contiguous}) == sp


def test_pad_and_shard_positions_and_masks():
    mesh = _mesh(8)
    x = jnp.arange(2 * 21, dtype=jnp.float32).reshape(2, 21)
    seq = S.pad_and_shard(x, mesh=mesh, layout="zigzag")
    assert seq.arrays[0].shape == (2, 32) and seq.length == 21
    # positions were computed globally before the reordering
    np.testing.assert_array_equal(np.asarray(seq.positions)[0], seq.index)
    np.testing.assert_array_equal(np.asarray(seq.valid)[0], seq.index < 21)
    np.testing.assert_array_equal(np.asarray(seq.unshard(seq.arrays[0])), np.asarray(x))
    with pytest.raises(ValueError, match="unknown layout"):
        S.pad_and_shard(x, mesh=mesh, layout="striped")
    with pytest.raises(ValueError, match="multiple of 2\\*sp"):
        S.attention(jnp.zeros((1, 12, 2, 4)), jnp.zeros((1, 12, 2, 4)), jnp.zeros((1, 12, 2, 4)),
                    mesh=mesh, strategy="ring", layout="zigzag")


@pytest.mark.parametrize("strategy", S.STRATEGIES)
def test_plain_arrays_of_any_length_on_an_explicit_mesh(strategy):
    """As an outside caller would: unsharded arrays, a length the axis does not divide, and a
    mesh from jax.make_mesh (explicit axis types by default)."""
    mesh = jax.make_mesh((8,), ("sequence",))
    q, k, v = (jnp.asarray(rank_coded(B, 37, h, D, s)) for h, s in ((7, 0), (1, 1), (1, 2)))
    out = S.attention(q, k, v, mesh=mesh, strategy=strategy, causal=True)
    assert out.shape == q.shape
    assert _rel(out, dense_attention(q, k, v, causal=True)) < TOL


def test_gather_rows_and_chunked_device_get():
    mesh = _mesh(8)
    x = jnp.arange(2 * 32 * 3, dtype=jnp.float32).reshape(2, 32, 3)
    seq = S.pad_and_shard(x, mesh=mesh, layout="zigzag")
    rows = np.array([[0, 5, 31], [17, 2, 9]])
    got = S.gather_rows(seq.arrays[0], seq.to_layout(rows), mesh=mesh)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x)[np.arange(2)[:, None], rows])
    host = S.chunked_device_get(seq.arrays[0], chunk_rows=5, axis=1)
    np.testing.assert_array_equal(host, np.asarray(seq.arrays[0]))


def test_put_from_a_memmap_reads_only_each_shard(tmp_path):
    mesh = _mesh(8)
    data = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    np.save(tmp_path / "v.npy", data)
    mm = np.load(tmp_path / "v.npy", mmap_mode="r")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("sequence", None))
    x = S.put_from_host(mm, sharding)
    assert x.sharding == sharding and x.addressable_shards[0].data.shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(x), data)
