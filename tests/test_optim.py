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


def test_optimizer_state_keeps_its_dtypes_with_bf16_params():
    """bf16 parameters, float32 gradients (accumulated in float32): the state a checkpoint saves
    after a step has the dtypes a fresh optimizer restores it into."""
    model = _Model()
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                   nnx.state(model, nnx.Param)))
    cfg = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, weight_decay=0.01,
                                         grad_clip=1.0, b1=0.9, b2=0.999))
    opt = optimizer(model, cfg, "llm")
    dtypes = lambda: [x.dtype for x in jax.tree.leaves(nnx.state(opt, nnx.OptState))]  # noqa: E731
    before = dtypes()
    grads = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), nnx.state(model, nnx.Param))
    opt.update(model, grads)
    assert dtypes() == before
    assert model.llm.kernel[...].dtype == jnp.bfloat16
