"""CoT-SFT: next-token loss on `<think>…</think><answer>…</answer>` targets.

The prompt and the video rows are context only; the loss is the mean negative log-likelihood of
the target tokens (ending with the stop token), computed on the response rows alone (MR-SP
stage 2 when the mesh has a 'sequence' axis). With `sft.trainable` = "llm" the cached video
embeddings are used; with "llm+projector" or "all" the vision side runs inside the step.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from longrl_jax import metrics as metrics_lib
from longrl_jax.batch import (
    build_batch,
    in_layout,
    length_multiple,
    place_micro_batches,
    place_table,
    table_bits,
    table_sharding,
)
from longrl_jax.checkpoint import open_checkpoints
from longrl_jax.context import RunContext, next_examples
from longrl_jax.grad_accumulation import num_micro_batches, value_and_grad_accumulated
from longrl_jax.optim import optimizer
from longrl_jax.parallel.logprobs import batch_logprobs
from longrl_jax.parallel.mesh import DEFAULT_RULES
from longrl_jax.prompts import response_ids

log = logging.getLogger(__name__)


# ================================================================================================
# The step
# ================================================================================================

def _video_table(model, shared):
    """Video rows recomputed from frames when the vision side trains (split by sequence shard
    as the batch's `table_index` says), else the cached rows."""
    if "frames" not in shared:
        return shared["video_table"]
    frames = shared["frames"]
    v, f = frames.shape[:2]
    rows = model.encode_video(frames.reshape((v * f,) + frames.shape[2:]))
    rows = rows.reshape(-1, rows.shape[-1])
    index = shared["table_index"]
    split = jnp.take(rows, jnp.clip(index, 0, rows.shape[0] - 1), axis=0)
    split = jnp.where((index >= 0)[..., None], split, 0).astype(model.llm.dtype)
    return table_bits(split)


def micro_loss(model, mb, shared, n_tokens, mesh, rules=DEFAULT_RULES):
    """One micro-batch's share of the batch's mean next-token loss (and metrics)."""
    b = dict(mb, video_table=_video_table(model, shared))
    logp, ent = batch_logprobs(model, b, mesh=mesh, rules=rules)
    mask = b["mask"]
    loss = -(logp * mask).sum() / n_tokens
    acc = ((logp > jnp.log(0.5)) * mask).sum() / n_tokens
    return loss, {"loss": loss, "entropy": (ent * mask).sum() / n_tokens, "token_acc": acc}


def make_step(mesh, rules=DEFAULT_RULES):
    """step(model, opt, micro, shared) -> metrics: one optimizer step over a batch given as
    [n, micro, ...] row arrays (`micro`) and the rows they share (`shared`: the video table,
    and the frames when the vision side trains), gradients accumulated over n micro-batches."""
    @nnx.jit(donate_argnums=(0, 1))
    def step(model, opt, micro, shared):
        n_tokens = jnp.maximum(micro["mask"].sum(), 1.0)
        (_, aux), grads = value_and_grad_accumulated(
            lambda model, mb: micro_loss(model, mb, shared, n_tokens, mesh, rules), model, opt.wrt,
            micro)
        aux["grad_norm"] = optax.global_norm(grads)
        opt.update(model, grads)
        return aux
    return step


# ================================================================================================
# Batches
# ================================================================================================

def make_batch(ctx: RunContext, prompts) -> tuple[dict, dict]:
    """(micro, shared) for `make_step`: `sft.micro_batch_size` sequences per device."""
    c = ctx.config
    responses = [response_ids(ctx.tokenizer, p.example.sft_target(), ctx.tokens)
                 [:c.sft.max_response_tokens] for p in prompts]
    batch = build_batch(prompts, responses, response_len=c.sft.max_response_tokens,
                        length_multiple=length_multiple(ctx.mesh, c.sp.layout))
    batch = in_layout(batch, ctx.mesh, c.sp.layout)
    n = num_micro_batches(len(prompts), c.sft.micro_batch_size, ctx.mesh, ctx.rules)
    micro = place_micro_batches(batch.row_arrays(), n, ctx.mesh, ctx.rules)
    shared = {"video_table": place_table(batch.video_table, ctx.mesh, ctx.model.llm.dtype)}
    if c.sft.trainable != "llm":
        shared["table_index"] = jax.device_put(batch.table_index, table_sharding(ctx.mesh))
        seen, frames = set(), []
        for p in prompts:
            if p.video_key not in seen:
                seen.add(p.video_key)
                frames.append(ctx.embedder(c.sft.num_frames).frames(p.example.videos[0]))
        shared["frames"] = jnp.asarray(np.stack(frames))
    return micro, shared


# ================================================================================================
# The loop
# ================================================================================================

def train(ctx: RunContext) -> dict:
    c = ctx.config.sft
    model = ctx.model
    opt = optimizer(model, c.optimizer, c.trainable)
    step_fn = make_step(ctx.mesh, ctx.rules)
    it = iter(ctx.loader("sft" if c.num_examples else "train", seed=ctx.config.seed))
    ckpt, step = open_checkpoints(ctx.path("checkpoints", "sft"), c, model, opt, it, stage="sft")
    scalars = {}
    bar = metrics_lib.progress(c.steps, desc="sft", unit="step", initial=step)
    while step < c.steps:
        with ctx.timers("data"):
            prompts = []
            while len(prompts) < c.batch_size:  # refill past skipped (undecodable) videos
                prompts += ctx.prompts(next_examples(it, c.batch_size - len(prompts)),
                                       num_frames=c.num_frames)
            micro, shared = make_batch(ctx, prompts)
        with ctx.timers("update"):
            aux = jax.device_get(step_fn(model, opt, micro, shared))
        step += 1
        scalars = {k: float(v) for k, v in aux.items()}
        scalars.update(ctx.timers.pop())
        ctx.writer.write(step, scalars, stage="sft")
        metrics_lib.postfix(bar, scalars, keys=["loss"])
        bar.update(1)
        ckpt.save(step, model=model, optimizer=opt,
                  extra={"step": step, "data_state": it.get_state()},
                  force=step == c.steps)
    bar.close()
    ckpt.wait()
    ckpt.close()
    return scalars
