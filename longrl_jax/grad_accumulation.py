"""Gradients of a mini-batch summed over micro-batches, one micro-batch alive at a time.

A long-video sequence fills a device by itself, so the trainers take a mini-batch as
[n, micro, ...] arrays and scan over the leading axis: activations of one micro-batch exist at
a time, the gradient is accumulated in float32, and the optimizer steps once per mini-batch.
The loss function scales each micro-batch's loss by the whole mini-batch's denominator
(`algorithms.aggregate(..., denominator=)`), so the sum is the mini-batch's loss and the step is
numerically the one the whole mini-batch would take at once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from longrl_jax.parallel import mesh as mesh_lib


def value_and_grad_accumulated(loss_fn: Callable[..., tuple[jax.Array, dict]], model, wrt,
                               micro_batches: Any) -> tuple[tuple[jax.Array, dict], nnx.State]:
    """((Σ loss, Σ aux), Σ gradient wrt the `wrt` parameters) of `loss_fn(model, micro)` over
    the leading axis of `micro_batches` (a pytree of [n, ...] arrays). Runs inside jit."""
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def loss_of(p, micro):
        return loss_fn(nnx.merge(graphdef, p, rest), micro)

    value_and_grad = jax.value_and_grad(loss_of, has_aux=True)

    def body(acc, micro):
        (loss, aux), g = value_and_grad(params, micro)
        acc = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc, g)
        return acc, (loss, aux)

    zeros = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=jnp.float32), params)
    grads, (losses, auxs) = jax.lax.scan(body, zeros, micro_batches)
    return (losses.sum(), jax.tree.map(lambda x: x.sum(0), auxs)), grads


def num_micro_batches(rows: int, per_device: int, mesh, rules=mesh_lib.DEFAULT_RULES) -> int:
    """How many micro-batches of `per_device` sequences on each batch-parallel device cover
    `rows` sequences (`per_device` 0: all rows at once)."""
    if per_device <= 0:
        return 1
    return -(-rows // (per_device * mesh_lib.batch_degree(mesh, rules)))
