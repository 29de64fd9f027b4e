"""A training step compiles once: the parameters and optimizer state it returns are placed
exactly as the ones it was given, so step 2 is a cache hit (a silent recompile per step would
cost minutes on a real model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from longrl_jax import batch as batch_lib
from longrl_jax import build
from longrl_jax import prompts as prompts_lib
from longrl_jax.models.splice import splice_layout
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
    rng = np.random.default_rng(seed)
    ids = [10, 11, 3, 12, 13]
    prompts = []
    for i in range(b):
        lay = splice_layout(ids, video_token_id=3, frames_per_video=[4], tokens_per_frame=4,
                            separator_id=4)
        rows = rng.normal(size=(16, 64)).astype(np.float32) * 0.02
        prompts.append(prompts_lib.Prompt(None, np.array(ids), lay, f"v{i}", rows))
    responses = [rng.integers(20, 60, size=int(rng.integers(3, 9))).astype(np.int32)
                 for _ in range(b)]
    batch = batch_lib.build_batch(prompts, responses, response_len=8,
                                  length_multiple=batch_lib.length_multiple(mesh, layout))
    return batch, batch_lib.place_batch(batch, mesh, layout=layout)


@pytest.mark.parametrize("mesh_cfg,layout", [
    (dict(data=1, fsdp=8, sequence=1, tensor=1), "contiguous"),
    (dict(data=2, fsdp=2, sequence=1, tensor=2), "contiguous"),
    (dict(data=1, fsdp=4, sequence=2, tensor=1), "zigzag")])
def test_sft_and_rl_steps_compile_once(mesh_cfg, layout):
    config = demo.get_config("quick")
    config.mesh.update(mesh_cfg)
    config.sp.layout = layout
    model, mesh = build.build_model(config, video_token_id=3, separator_token_id=4)
    opt = optimizer(model, config.sft.optimizer, "llm")
    step = make_step(mesh)
    batch, placed = _batch(mesh, layout=layout)
    step(model, opt, placed)
    before = COMPILES.n
    for seed in (1, 2):
        step(model, opt, _batch(mesh, seed=seed, layout=layout)[1])
    assert COMPILES.n == before, "the SFT step compiled again"

    update = make_update_fn(mesh, config.rl)
    shape = batch.targets.shape
    args = [jnp.zeros(shape, jnp.float32)] * 3
    update(model, opt, placed, *args)
    before = COMPILES.n
    update(model, opt, _batch(mesh, seed=3, layout=layout)[1], *args)
    assert COMPILES.n == before, "the RL update compiled again"
