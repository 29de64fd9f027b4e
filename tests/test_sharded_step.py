"""The RL step with a 'sequence' axis keeps long sequences sharded: compiled on 8 fake devices
(sequence 4, the ring in both layouts), no buffer of the step holds a whole sequence's
activations [.., T, D], and the video rows each device receives shrink with the sequence axis
(the split table of `batch.in_layout`, never a replicated copy)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from batch_fixtures import SEP_ID, VIDEO_ID, toy_batch
from flax import nnx

from configs import demo
from longrl_jax import batch as batch_lib
from longrl_jax import build
from longrl_jax.optim import optimizer
from longrl_jax.parallel import logprobs
from longrl_jax.parallel import mesh as mesh_lib
from longrl_jax.rl.trainer import make_update_fn

FRAMES = 96      # 96 x (4 rows + 1 separator) = 480 video tokens: the video spans T
T = 512          # long enough that T and T/sp cannot be confused with other dimensions


def _setup(sequence, layout="zigzag"):
    config = demo.get_config("quick")
    config.mesh.update(dict(data=1, fsdp=-1, sequence=sequence, tensor=1))
    config.sp.update(strategy="ring", layout=layout)
    config.rl.kl_coef = 0.05
    config.model.scan_layers = config.model.remat = True
    model, mesh = build.build_model(config, video_token_id=VIDEO_ID, separator_token_id=SEP_ID)
    return config, model, mesh


def _compiled(sequence, layout="zigzag", rows=4):
    config, model, mesh = _setup(sequence, layout)
    batch = toy_batch([3, 5, 8, 2][:rows], seed=0, length_multiple=T, num_videos=rows,
                      frames=FRAMES)
    assert batch.token_ids.shape[1] == T
    batch = batch_lib.in_layout(batch, mesh, layout)
    r = batch.targets.shape
    rl = dict(adv=np.ones(r[0], np.float32), old_logp=np.zeros(r, np.float32),
              ref_logp=np.zeros(r, np.float32))
    micro = batch_lib.place_micro_batches(dict(batch.row_arrays(), **rl), 1, mesh,
                                          zero=("mask", "adv"))
    table = batch_lib.place_table(batch.video_table, mesh, model.llm.dtype)
    opt = optimizer(model, config.rl.optimizer, "llm")
    update = make_update_fn(mesh, config.rl)
    return update.lower(model, opt, micro, table).compile(), model.llm.cfg.hidden_size


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_no_full_length_activation_with_sequence_parallelism(layout):
    compiled, d = _compiled(4, layout)
    hlo = compiled.as_text()
    local = re.findall(rf"\[[0-9,]*\b{T // 4},{d}\]", hlo)
    assert local, "the per-device [.., T/sp, D] activations were not found: test is blind"
    full = re.findall(rf"[a-z0-9]+\[[0-9,]*\b{T},{d}\]", hlo)
    assert not full, f"full-length activations in the compiled RL step: {sorted(set(full))}"


def test_video_rows_per_device_shrink_with_the_sequence_axis():
    """Each device receives its sequence shard's rows only (the compiled step's argument bytes
    are checked the same way in tests/test_trainer_memory.py)."""
    per_device = {}
    for sp in (1, 2, 4):
        mesh = mesh_lib.make_mesh(dict(fsdp=-1, sequence=sp))
        batch = batch_lib.in_layout(toy_batch([3, 5, 8, 2], seed=0, length_multiple=T,
                                              num_videos=4, frames=FRAMES), mesh, "zigzag")
        table = batch_lib.place_table(batch.video_table, mesh, jnp.bfloat16)
        shard = table.addressable_shards[0].data
        assert table.shape[0] == sp and shard.shape[0] == 1
        per_device[sp] = shard.nbytes
    # 4 videos x 384 rows: a device holds about 1/sp of them (zig-zag chunks, table padding)
    assert per_device[2] <= 0.6 * per_device[1], per_device
    assert per_device[4] <= 0.35 * per_device[1], per_device


def test_a_bf16_table_travels_as_bits_and_splices_the_same_rows():
    """A bfloat16 model's table is sent as uint16 bits (`batch.table_bits`); the splice of
    those bits equals the splice of the float32 rows cast to bfloat16, bit for bit."""
    config = demo.get_config("quick")
    config.mesh.update(dict(data=1, fsdp=-1, sequence=4, tensor=1))
    config.sp.update(strategy="ring", layout="zigzag")
    config.model.dtype = "bfloat16"
    model, mesh = build.build_model(config, video_token_id=VIDEO_ID, separator_token_id=SEP_ID)
    batch = batch_lib.in_layout(toy_batch([3, 5], seed=1, length_multiple=T, frames=FRAMES,
                                          row_scale=0.5), mesh, "zigzag")
    bits = batch_lib.place_batch(batch, mesh, dtype=jnp.bfloat16)
    floats = batch_lib.place_batch(batch, mesh)
    assert bits["video_table"].dtype == jnp.uint16
    assert floats["video_table"].dtype == jnp.float32
    embed = nnx.jit(lambda m, b: logprobs.embed_inputs(m, b, mesh=mesh), graph_updates=False)
    a, b = embed(model, bits), embed(model, floats)
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    video = np.asarray(batch_lib.original_video_rows(batch.video_rows, batch.table_index)) >= 0
    assert video.sum() > 0 and not np.allclose(np.asarray(a, np.float32)[video], 0)


def _logprobs_and_grads(mlp_chunk):
    config = demo.get_config("quick")
    config.mesh.update(dict(data=1, fsdp=-1, sequence=4, tensor=1))
    config.sp.update(strategy="ring", layout="zigzag")
    config.model.update(scan_layers=True, remat=True, mlp_chunk=mlp_chunk)
    model, mesh = build.build_model(config, video_token_id=VIDEO_ID, separator_token_id=SEP_ID)
    batch = batch_lib.in_layout(toy_batch([3, 8], seed=2, length_multiple=T, frames=FRAMES,
                                          row_scale=0.5), mesh, "zigzag")
    placed = batch_lib.place_batch(batch, mesh)

    def loss(m):
        lp, _ = logprobs.batch_logprobs(m, placed, mesh=mesh)
        return -(lp * placed["mask"]).sum(), lp
    grad_fn = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.PathContains("llm")),
                                 has_aux=True)
    (_, lp), g = nnx.jit(grad_fn)(model)
    return np.asarray(lp), [np.asarray(x) for x in jax.tree.leaves(g)]


def test_mlp_in_pieces_changes_nothing():
    """`model.mlp_chunk`: the MLP on pieces of each shard's tokens (here 8 pieces of 16) gives
    the log-probs and the gradient of the whole MLP (float32, sequence 4, zig-zag ring,
    scanned remat layers)."""
    lp0, g0 = _logprobs_and_grads(0)
    lp1, g1 = _logprobs_and_grads(16)
    np.testing.assert_allclose(lp1, lp0, rtol=0, atol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, np.abs(b).max()))
