"""GRPO (and relatives) on long videos, one readable step.

  prompts from the loader -> video rows (cache / MR-SP stage 1), sent to the rollout server once
  -> G samples per prompt at the current weight version, scored (`Rollouts`, flat)
  -> old-policy and reference log-probs of the identical spliced sequences (MR-SP stage 2)
  -> advantages (`algorithms.advantages`, by name) -> mini-batch updates -> one UpdateWeights
  -> metrics, evaluation, checkpoint.

The rollout's own log-probs are compared with the trainer's old-policy log-probs every step
(`rollout/logp_mismatch`): stale or mis-mapped weights show up there at once.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from longrl_jax import hosts
from longrl_jax import metrics as metrics_lib
from longrl_jax.batch import (
    SequenceBatch,
    build_batch,
    in_layout,
    length_multiple,
    place_rows,
    place_table,
    stack_micro_batches,
    table_sharding,
)
from longrl_jax.build import copy_model
from longrl_jax.checkpoint import open_checkpoints
from longrl_jax.context import RunContext, next_examples
from longrl_jax.grad_accumulation import num_micro_batches, value_and_grad_accumulated
from longrl_jax.optim import optimizer
from longrl_jax.parallel.logprobs import batch_logprobs
from longrl_jax.parallel.mesh import DEFAULT_RULES
from longrl_jax.rl import algorithms as alg
from longrl_jax.rl.rollouts import Rollouts, sample_and_score

log = logging.getLogger(__name__)


# ================================================================================================
# Device functions
# ================================================================================================

def make_logprob_fn(mesh, rules=DEFAULT_RULES):
    """logprobs(model, b) -> (log p, entropy) [B, R] of one placed micro-batch. The model is
    only read: nothing of it is returned (nnx.jit would otherwise hand back a copy of every
    parameter on each call)."""
    @nnx.jit(graph_updates=False)
    def logprobs(model, b):
        return batch_logprobs(model, b, mesh=mesh, rules=rules)
    return logprobs


def make_update_fn(mesh, c, rules=DEFAULT_RULES):
    """update(model, opt, micro, video_table) -> metrics: one optimizer step over a mini-batch
    given as [n, micro, ...] arrays (`micro` holds the batch fields and `adv`, `old_logp`,
    `ref_logp`), gradients accumulated over the n micro-batches. The model's parameters and
    the optimizer state are donated: updated in place, never held twice."""

    def micro_loss(model, mb, table, den, n_tokens):
        b = dict(mb, video_table=table)
        logp, ent = batch_logprobs(model, b, mesh=mesh, rules=rules)
        mask = b["mask"]
        loss, m = alg.policy_loss(logp, mb["old_logp"], mb["adv"], mask, clip_low=c.clip_low,
                                  clip_high=c.clip_high, clip_dual=c.clip_dual or None,
                                  agg=c.loss_agg, denominator=den)
        m = dict(m, entropy=alg.aggregate(ent, mask, "token-mean"))
        if c.kl_coef:                       # without KL there is no reference model
            kl = alg.kl_penalty(logp, mb["ref_logp"], c.kl_type)
            if c.kl_in == "loss":
                loss = loss + c.kl_coef * alg.aggregate(kl, mask, c.loss_agg, denominator=den)
            m["kl"] = alg.aggregate(kl, mask, "token-mean")
        share = jnp.sum(mask) / n_tokens    # token means add up weighted by their tokens
        return loss, dict({k: v * share for k, v in m.items()}, loss=loss)

    @nnx.jit(donate_argnums=(0, 1))
    def update(model, opt, micro, table):
        mask = micro["mask"]
        den = alg.aggregate_denominator(mask, c.loss_agg)
        n_tokens = jnp.maximum(jnp.sum(mask), 1.0)
        (_, m), grads = value_and_grad_accumulated(
            lambda model, mb: micro_loss(model, mb, table, den, n_tokens), model, opt.wrt, micro)
        m["grad_norm"] = optax.global_norm(grads)
        opt.update(model, grads)
        return m
    return update


def micro_batch_rows(rows: int, per_device: int, mesh, rules) -> int:
    """Sequences per micro-batch call for mini-batches of `rows` sequences, `per_device` per
    batch-parallel device (0: the whole mini-batch at once)."""
    n = num_micro_batches(rows, per_device, mesh, rules)
    return -(-rows // n)


def stack_rows(arrays: dict[str, np.ndarray], per: int, *, zero=("mask",)) -> dict:
    """[B, ...] -> [ceil(B/per), per, ...]: micro-batches of exactly `per` rows, whatever B (one
    compiled step); the rows that fill the last one add nothing (`stack_micro_batches`)."""
    b = next(iter(arrays.values())).shape[0]
    n = -(-b // per)
    if n * per == b:
        return stack_micro_batches(arrays, n, zero=zero)
    padded = stack_micro_batches(arrays, b, zero=zero)          # [b, 1, ...] as is
    fill = {k: np.repeat(np.zeros_like(v[:1]) if k in zero else v[:1], n * per - b, axis=0)
            for k, v in padded.items()}
    return {k: np.concatenate([v, fill[k]]).reshape((n, per) + v.shape[2:])
            for k, v in padded.items()}


class StepVideo:
    """The step's sequences cut into mini-batches of whole groups, each with its own split
    video table, placed once per step: on the devices, or with `rl.video_on_host` in the
    devices' pinned host memory, moved to the devices for each pass over that mini-batch (the
    rows never cross from the host process twice in a step)."""

    def __init__(self, ctx: RunContext, batch: SequenceBatch, group_ids, step: int):
        c = ctx.config.rl
        self.ctx = ctx
        n = batch.token_ids.shape[0]
        self.size = min(c.minibatch_size, n)
        order = minibatch_order(group_ids, np.random.default_rng([ctx.config.seed, step]))
        self.index = [np.sort(order[k:k + self.size]) for k in range(0, n, self.size)]
        self.parts = [batch.take(idx) for idx in self.index]
        kind = "pinned_host" if c.video_on_host else None
        self.tables = [place_table(p.video_table, ctx.mesh, ctx.model.llm.dtype, kind)
                       for p in self.parts]
        self.full = [len(idx) == self.size for idx in self.index]   # the rest: log-probs only

    def table(self, k: int):
        t = self.tables[k]
        if self.ctx.config.rl.video_on_host:
            t = jax.device_put(t, table_sharding(self.ctx.mesh))
        return t


def minibatch_order(group_ids, rng) -> np.ndarray:
    """Sequence indices, whole groups in a random order: consecutive slices are mini-batches
    of whole groups (as Long-RL's), so a mini-batch needs only its own groups' videos."""
    groups = np.unique(group_ids)
    return np.concatenate([np.flatnonzero(group_ids == g) for g in rng.permutation(groups)])


def logprobs_in_micro_batches(logprob_fn, models, video: StepVideo) -> list[np.ndarray]:
    """Per model: [N, R] log-probs of the step's responses (original order), one mini-batch's
    video at a time, `rl.logprob_micro_batch_size` sequences per device per call (one compiled
    step whatever the count); each micro-batch is placed once for all the models."""
    ctx = video.ctx
    per = micro_batch_rows(video.size, ctx.config.rl.logprob_micro_batch_size, ctx.mesh,
                           ctx.rules)
    rows = sum(len(i) for i in video.index)
    outs = [np.zeros((rows,) + video.parts[0].targets.shape[1:], np.float32) for _ in models]
    for k, (idx, part) in enumerate(zip(video.index, video.parts)):
        stacked = stack_rows(part.row_arrays(), per)
        table = video.table(k)
        got = [[] for _ in models]
        for i in range(next(iter(stacked.values())).shape[0]):
            placed = dict(place_rows({n: v[i] for n, v in stacked.items()}, ctx.mesh,
                                     ctx.rules), video_table=table)
            for g, model in zip(got, models):
                g.append(logprob_fn(model, placed)[0])
        for out, g in zip(outs, got):
            out[idx] = np.concatenate(hosts.to_host(g))[:len(idx)]   # rows span processes
    return outs


class RefModel:
    """The frozen reference policy of the KL term: a copy of the starting policy (never the
    policy's own buffers, which the update donates) in the compute dtype, numerically the
    policy's forward pass. With `rl.ref_on_host` it waits in the devices' pinned host memory
    between log-prob passes, leaving the devices to the update."""

    def __init__(self, model, *, on_host: bool = False):
        self.on_host = on_host
        self.model = copy_model(model, dtype=model.llm.dtype,
                                memory_kind="pinned_host" if on_host else None)

    @contextlib.contextmanager
    def on_device(self):
        if not self.on_host:
            yield self.model
            return
        dev = copy_model(self.model, memory_kind="device")
        try:
            yield dev
        finally:
            del dev


# ================================================================================================
# Rollout and rewards
# ================================================================================================

def collect(ctx: RunContext, connection, it, step: int) -> tuple[Rollouts, dict]:
    """The step's scored samples, G per prompt. With dynamic sampling, groups whose rewards are
    all equal are dropped and new prompts drawn, up to `max_refills` times (DAPO)."""
    c = ctx.config.rl
    parts, groups, tries, drawn = [], 0, 0, 0
    while groups < c.prompts_per_step:
        prompts = ctx.prompts(next_examples(it, c.prompts_per_step - groups))
        drawn += len(prompts)
        if not prompts:
            continue
        r = sample_and_score(connection, prompts, n=c.group_size, tokenizer=ctx.tokenizer,
                             tokens=ctx.tokens, judge=ctx.judge, timers=ctx.timers,
                             max_tokens=c.max_response_tokens, temperature=c.temperature,
                             top_p=c.top_p, seed=ctx.config.seed * 1_000_003 + step * 100 + tries)
        if c.dynamic_sampling and tries < c.max_refills:
            keep = alg.dynamic_sampling_keep(r.metric("overall"), r.group_ids)
            r = r.take(np.flatnonzero(np.asarray(keep)))
        parts.append(r)
        groups += len(np.unique(r.group_ids))
        tries += 1
    return Rollouts.concat(parts), {"rollout/prompts_drawn": drawn, "rollout/refills": tries - 1}


def shaped_rewards(rollouts: Rollouts, c) -> np.ndarray:
    """[N] the score, plus DAPO's soft overlong penalty when configured."""
    rewards = rollouts.metric("overall")
    if c.overlong_buffer:
        lengths = np.asarray([len(s.token_ids) for s in rollouts.samples], np.float32)
        rewards = rewards + np.asarray(alg.overlong_penalty(
            lengths, c.max_response_tokens, c.overlong_buffer, c.overlong_penalty))
    return rewards


def sequence_batch(ctx: RunContext, rollouts: Rollouts) -> SequenceBatch:
    """The sampled sequences, their length a multiple that the mesh's sequence layout splits."""
    c = ctx.config.rl
    responses = [np.asarray(s.token_ids[:c.max_response_tokens], np.int32)
                 for s in rollouts.samples]
    return build_batch(rollouts.prompts, responses, response_len=c.max_response_tokens,
                       length_multiple=length_multiple(ctx.mesh, ctx.config.sp.layout))


def server_logprobs(rollouts: Rollouts, shape) -> np.ndarray:
    """[N, R] the rollout engine's log-probs of its own samples."""
    out = np.zeros(shape, np.float32)
    for i, s in enumerate(rollouts.samples):
        n = min(len(s.logprobs), shape[1])
        out[i, :n] = s.logprobs[:n]
    return out


# ================================================================================================
# The update
# ================================================================================================

def minibatch_updates(ctx: RunContext, update_fn, model, opt, video: StepVideo,
                      adv, old_logp, ref_logp, step: int) -> list[dict]:
    """`ppo_epochs` passes over the step's full mini-batches (whole groups; a fresh mini-batch
    order each epoch), one optimizer step each, in micro-batches of `rl.micro_batch_size`
    sequences per device."""
    c = ctx.config.rl
    per = micro_batch_rows(video.size, c.micro_batch_size, ctx.mesh, ctx.rules)
    order_rng = np.random.default_rng([ctx.config.seed, step, 1])
    full = [k for k, ok in enumerate(video.full) if ok]
    ms = []
    for _ in range(c.ppo_epochs):
        for k in order_rng.permutation(full):
            idx = video.index[k]
            rows = dict(video.parts[k].row_arrays(), adv=adv[idx], old_logp=old_logp[idx],
                        ref_logp=ref_logp[idx])
            micro = place_rows(stack_rows(rows, per, zero=("mask", "adv")), ctx.mesh,
                               ctx.rules, stacked=True)
            ms.append(update_fn(model, opt, micro, video.table(k)))
    return jax.device_get(ms)


def step_metrics(rollouts: Rollouts, rewards, mask, old_logp, roll_logp, ms, c) -> dict:
    lengths = np.asarray([len(s.token_ids) for s in rollouts.samples], np.float32)
    mismatch = np.abs(old_logp - roll_logp) * mask
    out = {"reward/mean": float(rewards.mean()),
           "reward/accuracy": float(rollouts.metric("accuracy").mean()),
           "reward/format": float(rollouts.metric("format").mean()),
           "response/length": float(lengths.mean()),
           "response/clipped": float((lengths >= c.max_response_tokens).mean()),
           "rollout/logp_mismatch": float(mismatch.sum() / max(mask.sum(), 1)),
           "rollout/logp_mismatch_max": float(mismatch.max())}
    for k in ms[0]:
        out[f"actor/{k}"] = float(np.mean([m[k] for m in ms]))
    return out


# ================================================================================================
# The loop
# ================================================================================================

def train(ctx: RunContext, connection, evaluator=None) -> dict:
    """Runs `config.rl.steps` steps (resuming from the stage's newest checkpoint); `evaluator()`
    (an `evaluate.Evaluator`) runs every `rl.eval_every` steps and at the end."""
    c = ctx.config.rl
    model = ctx.model
    ref = RefModel(model, on_host=c.ref_on_host) if c.kl_coef else None   # KL anchor
    opt = optimizer(model, c.optimizer, "llm")
    logprob_fn = make_logprob_fn(ctx.mesh, ctx.rules)
    update_fn = make_update_fn(ctx.mesh, c, ctx.rules)
    it = iter(ctx.loader("train", seed=ctx.config.seed + 1))
    ckpt, step = open_checkpoints(ctx.path("checkpoints", "rl"), c, model, opt, it, stage="rl")
    connection.sync(model)
    scalars = {}
    bar = metrics_lib.progress(c.steps, desc="rl", unit="step", initial=step)
    while step < c.steps:
        # ---- rollout and rewards ----------------------------------------------------------------
        rollouts, info = collect(ctx, connection, it, step)
        rewards = shaped_rewards(rollouts, c)

        # ---- old-policy and reference log-probs on the identical sequences ------------------------
        with ctx.timers("prefill"):
            batch = in_layout(sequence_batch(ctx, rollouts), ctx.mesh, ctx.config.sp.layout)
            video = StepVideo(ctx, batch, rollouts.group_ids, step)    # placed once per step
            with ref.on_device() if ref is not None else contextlib.nullcontext() as ref_model:
                old_logp, *ref_logp = logprobs_in_micro_batches(
                    logprob_fn, [model] + ([ref_model] if ref is not None else []), video)
            ref_logp = ref_logp[0] if ref_logp else old_logp     # unused without KL
        if c.kl_coef and c.kl_in == "reward":
            kl = np.asarray(alg.kl_penalty(old_logp, ref_logp, c.kl_type))
            rewards = rewards - c.kl_coef * (kl * batch.mask).sum(-1)

        # ---- advantages and updates --------------------------------------------------------------
        adv = np.asarray(alg.advantages(c.algorithm, rewards, rollouts.group_ids, batch.mask,
                                        gamma=c.gamma), np.float32)
        with ctx.timers("update"):
            ms = minibatch_updates(ctx, update_fn, model, opt, video, adv, old_logp,
                                   ref_logp, step)
            del video
        with ctx.timers("weight_sync"):
            nbytes = connection.sync(model)
        step += 1

        # ---- metrics, evaluation, checkpoint -------------------------------------------------------
        scalars = step_metrics(rollouts, rewards, batch.mask, old_logp,
                               server_logprobs(rollouts, old_logp.shape), ms, c)
        scalars.update({"rollout/weight_version": float(connection.version),
                        "weight_sync/bytes": nbytes, **info, **connection.counters()})
        scalars.update(ctx.timers.pop())
        if evaluator is not None and c.eval_every and (step % c.eval_every == 0
                                                       or step == c.steps):
            with ctx.timers("eval"):
                res = evaluator()
            scalars.update({"eval/accuracy": res["accuracy"], "eval/format": res["format"]})
        ctx.writer.write(step, scalars, stage="rl")
        metrics_lib.postfix(bar, scalars, keys=["reward/mean", "reward/accuracy", "eval/accuracy"])
        bar.update(1)
        ckpt.save(step, model=model, optimizer=opt,
                  extra={"step": step, "data_state": it.get_state()}, force=step == c.steps)
    bar.close()
    ckpt.wait()
    ckpt.close()
    return scalars
