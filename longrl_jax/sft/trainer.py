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
from longrl_jax.batch import build_batch, length_multiple, place_batch
from longrl_jax.checkpoint import open_checkpoints
from longrl_jax.context import RunContext, next_examples
from longrl_jax.optim import optimizer
from longrl_jax.parallel.logprobs import batch_logprobs
from longrl_jax.prompts import response_ids

log = logging.getLogger(__name__)


# ================================================================================================
# The step
# ================================================================================================

def _video_table(model, b):
    """Video rows recomputed from frames when the vision side trains, else the cached rows."""
    if "frames" not in b:
        return b["video_table"]
    v, f = b["frames"].shape[:2]
    rows = model.encode_video(b["frames"].reshape((v * f,) + b["frames"].shape[2:]))
    rows = rows.reshape(-1, rows.shape[-1])
    return jnp.zeros_like(b["video_table"]).at[:rows.shape[0]].set(rows)


def loss_fn(model, b, mesh):
    b = dict(b, video_table=_video_table(model, b))
    logp, ent = batch_logprobs(model, b, mesh=mesh)
    n = jnp.maximum(b["mask"].sum(), 1.0)
    loss = -(logp * b["mask"]).sum() / n
    acc = ((logp > jnp.log(0.5)) * b["mask"]).sum() / n
    return loss, {"loss": loss, "entropy": (ent * b["mask"]).sum() / n, "token_acc": acc}


def make_step(mesh):
    @nnx.jit
    def step(model, opt, b):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, opt.wrt), has_aux=True)
        (_, aux), grads = grad_fn(model, b, mesh)
        aux["grad_norm"] = optax.global_norm(grads)
        opt.update(model, grads)
        return aux
    return step


# ================================================================================================
# Batches
# ================================================================================================

def make_batch(ctx: RunContext, prompts) -> dict:
    c = ctx.config
    responses = [response_ids(ctx.tokenizer, p.example.sft_target(), ctx.tokens)
                 [:c.sft.max_response_tokens] for p in prompts]
    batch = build_batch(prompts, responses, response_len=c.sft.max_response_tokens,
                        length_multiple=length_multiple(ctx.mesh, c.sp.layout))
    arrays = place_batch(batch, ctx.mesh, ctx.rules, c.sp.layout)
    if c.sft.trainable != "llm":
        seen, frames = set(), []
        for p in prompts:
            if p.video_key not in seen:
                seen.add(p.video_key)
                frames.append(ctx.embedder(c.sft.num_frames).frames(p.example.videos[0]))
        arrays["frames"] = jnp.asarray(np.stack(frames))
    return arrays


# ================================================================================================
# The loop
# ================================================================================================

def train(ctx: RunContext) -> dict:
    c = ctx.config.sft
    model = ctx.model
    opt = optimizer(model, c.optimizer, c.trainable)
    step_fn = make_step(ctx.mesh)
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
            b = make_batch(ctx, prompts)
        with ctx.timers("update"):
            aux = jax.device_get(step_fn(model, opt, b))
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
