"""A training step compiles once: the parameters and optimizer state it returns are placed
exactly as the ones it was given, so step 2 is a cache hit (a silent recompile per step would
cost minutes on a real model)."""

import jax
import numpy as np
import pytest
from batch_fixtures import SEP_ID, VIDEO_ID, toy_batch

from configs import demo
from longrl_jax import batch as batch_lib
from longrl_jax import build
from longrl_jax.optim import optimizer
from longrl_jax.rl.trainer import make_update_fn
from longrl_jax.sft.trainer import make_step


class _Compiles:
    def __init__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self)

    def __call__(self, event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1


COMPILES = _Compiles()


def _batch(mesh, b=8, seed=0, layout="contiguous"):
    lengths = np.random.default_rng(seed + 100).integers(3, 9, size=b)
    batch = toy_batch(lengths, seed=seed,
                      length_multiple=batch_lib.length_multiple(mesh, layout))
    batch = batch_lib.in_layout(batch, mesh, layout)
    return batch, batch_lib.place_micro_batches(batch.row_arrays(), 1, mesh), \
        {"video_table": batch_lib.place_table(batch.video_table, mesh)}


@pytest.mark.parametrize("mesh_cfg,layout", [
    (dict(data=1, fsdp=8, sequence=1, tensor=1), "contiguous"),
    (dict(data=2, fsdp=2, sequence=1, tensor=2), "contiguous"),
    (dict(data=1, fsdp=4, sequence=2, tensor=1), "zigzag")])
def test_sft_and_rl_steps_compile_once(mesh_cfg, layout):
    config = demo.get_config("quick")
    config.mesh.update(mesh_cfg)
    config.sp.layout = layout
    model, mesh = build.build_model(config, video_token_id=VIDEO_ID, separator_token_id=SEP_ID)
    opt = optimizer(model, config.sft.optimizer, "llm")
    step = make_step(mesh)
    batch, micro, shared = _batch(mesh, layout=layout)
    step(model, opt, micro, shared)
    before = COMPILES.n
    for seed in (1, 2):
        step(model, opt, *_batch(mesh, seed=seed, layout=layout)[1:])
    assert COMPILES.n == before, "the SFT step compiled again"

    update = make_update_fn(mesh, config.rl)

    def rl_micro(batch):
        zeros = np.zeros(batch.targets.shape, np.float32)
        return batch_lib.place_micro_batches(
            dict(batch.row_arrays(), adv=zeros, old_logp=zeros, ref_logp=zeros), 1, mesh)
    update(model, opt, rl_micro(batch), shared["video_table"])
    before = COMPILES.n
    batch3, _, shared3 = _batch(mesh, seed=3, layout=layout)
    update(model, opt, rl_micro(batch3), shared3["video_table"])
    assert COMPILES.n == before, "the RL update compiled again"
