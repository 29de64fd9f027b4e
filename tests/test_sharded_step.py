"""The RL step with a 'sequence' axis keeps long sequences sharded: compiled on 8 fake devices
(sequence 4, the ring in both layouts), no buffer of the step holds a whole sequence's
activations [.., T, D], and the video rows each device receives shrink with the sequence axis
(the split table of `batch.in_layout`, never a replicated copy)."""

import re

import numpy as np
import pytest
from batch_fixtures import SEP_ID, VIDEO_ID, toy_batch

from configs import demo
from longrl_jax import batch as batch_lib
from longrl_jax import build
from longrl_jax.optim import optimizer
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
    return update.lower(model, opt, micro, table).compile(), table, model.llm.cfg.hidden_size


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_no_full_length_activation_with_sequence_parallelism(layout):
    compiled, _, d = _compiled(4, layout)
    hlo = compiled.as_text()
    local = re.findall(rf"\[[0-9,]*\b{T // 4},{d}\]", hlo)
    assert local, "the per-device [.., T/sp, D] activations were not found: test is blind"
    full = re.findall(rf"[a-z0-9]+\[[0-9,]*\b{T},{d}\]", hlo)
    assert not full, f"full-length activations in the compiled RL step: {sorted(set(full))}"


def test_video_rows_per_device_shrink_with_the_sequence_axis():
    per_device = {}
    for sp in (1, 2, 4):
        _, table, d = _compiled(sp)
        shard = table.addressable_shards[0].data
        per_device[sp] = shard.nbytes
        assert table.shape[0] == sp and shard.shape[0] == 1
    # 4 videos x 384 rows: a device holds about 1/sp of them (zig-zag chunks, table padding)
    assert per_device[2] <= 0.6 * per_device[1], per_device
    assert per_device[4] <= 0.35 * per_device[1], per_device
