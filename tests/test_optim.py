"""The stage optimizer: a 0-step warmup means the full learning rate from the first step; a
warmup ramps linearly from 0."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from longrl_jax.optim import optimizer


class _Model(nnx.Module):
    def __init__(self):
        self.llm = nnx.Linear(3, 2, rngs=nnx.Rngs(0))


def _first_step_change(warmup_steps: int) -> float:
    model = _Model()
    cfg = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=warmup_steps, weight_decay=0.0,
                                         grad_clip=1e9, b1=0.9, b2=0.999))
    opt = optimizer(model, cfg, "llm")
    before = np.asarray(model.llm.kernel[...])
    opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    return float(np.abs(np.asarray(model.llm.kernel[...]) - before).max())


def test_no_warmup_steps_at_full_lr_from_the_first_step():
    np.testing.assert_allclose(_first_step_change(0), 0.1, rtol=1e-4)


def test_warmup_starts_at_zero():
    assert _first_step_change(10) == 0.0
