"""The optimizer of a training stage: AdamW with global-norm clipping and linear warmup, over
the parameters the stage trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

TRAINABLE = {"llm": ("llm",), "llm+projector": ("llm", "mm_projector"),
             "all": ("llm", "mm_projector", "vision_tower")}


def optimizer(model, opt_cfg, trainable: str) -> nnx.Optimizer:
    """AdamW with global-norm clipping and linear warmup (Long-RL: constant lr after warmup)."""
    sched = optax.constant_schedule(opt_cfg.lr)
    if opt_cfg.warmup_steps > 0:   # (a 0-step warmup would make the first step's lr 0)
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, opt_cfg.lr, opt_cfg.warmup_steps), sched],
            [opt_cfg.warmup_steps])
    # mu_dtype: the first moment is kept in float32 from the start. Left to optax, it is
    # created in the parameters' dtype and becomes float32 after the first float32 gradient:
    # with bfloat16 parameters the state changed dtype after step 1 (a second compile), and a
    # resume restored it into the bf16 arrays of a fresh optimizer (a different trajectory).
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip),
                     optax.adamw(sched, b1=opt_cfg.b1, b2=opt_cfg.b2,
                                 weight_decay=opt_cfg.weight_decay, mu_dtype=jnp.float32))
    opt = nnx.Optimizer(model, tx, wrt=trainable_filter(trainable))
    _onto_model_mesh(opt, model)
    return opt


def _onto_model_mesh(opt: nnx.Optimizer, model) -> None:
    """optax creates the step counts on the default device, and the first step returns them on
    the mesh: the second step would compile again. Put them there from the start. Under
    `nnx.eval_shape` (an abstract model: `build.abstract_model`) nothing is placed: the caller
    gives the abstract state its shardings (`mesh.abstract_sharded`)."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    if any(isinstance(x, jax.core.Tracer) for x in params):
        return
    meshes = [x.sharding.mesh for x in params if isinstance(x.sharding, NamedSharding)]
    if not meshes:
        return
    replicated = NamedSharding(meshes[0], PartitionSpec())

    def put(x):
        return x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated)
    nnx.update(opt, jax.tree.map(put, nnx.state(opt)))


def trainable_filter(trainable: str):
    return nnx.All(nnx.Param, nnx.Any(*[nnx.PathContains(p) for p in TRAINABLE[trainable]]))
