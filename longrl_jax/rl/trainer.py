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

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from longrl_jax import metrics as metrics_lib
from longrl_jax.batch import SequenceBatch, build_batch, length_multiple, place_batch
from longrl_jax.checkpoint import open_checkpoints
from longrl_jax.context import RunContext, next_examples
from longrl_jax.optim import optimizer
from longrl_jax.parallel.logprobs import batch_logprobs
from longrl_jax.rl import algorithms as alg
from longrl_jax.rl.rollouts import Rollouts, sample_and_score

log = logging.getLogger(__name__)


# ================================================================================================
# Device functions
# ================================================================================================

def make_logprob_fn(mesh):
    @nnx.jit
    def logprobs(model, b):
        return batch_logprobs(model, b, mesh=mesh)
    return logprobs


def make_update_fn(mesh, c):
    def loss_fn(model, b, adv, old_logp, ref_logp):
        logp, ent = batch_logprobs(model, b, mesh=mesh)
        mask = b["mask"]
        loss, m = alg.policy_loss(logp, old_logp, adv, mask, clip_low=c.clip_low,
                                  clip_high=c.clip_high, clip_dual=c.clip_dual or None,
                                  agg=c.loss_agg)
        kl = alg.kl_penalty(logp, ref_logp, c.kl_type)
        kl_mean = alg.aggregate(kl, mask, "token-mean")
        if c.kl_coef and c.kl_in == "loss":
            loss = loss + c.kl_coef * alg.aggregate(kl, mask, c.loss_agg)
        m = dict(m, kl=kl_mean, entropy=alg.aggregate(ent, mask, "token-mean"), loss=loss)
        return loss, m

    @nnx.jit
    def update(model, opt, b, adv, old_logp, ref_logp):
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, opt.wrt), has_aux=True)
        (_, m), grads = grad_fn(model, b, adv, old_logp, ref_logp)
        m["grad_norm"] = optax.global_norm(grads)
        opt.update(model, grads)
        return m
    return update


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

def minibatch_updates(ctx: RunContext, update_fn, model, opt, batch: SequenceBatch, adv,
                      old_logp, ref_logp, step: int) -> list[dict]:
    """`ppo_epochs` passes over the step's sequences in shuffled mini-batches, one optimizer
    step each."""
    c = ctx.config.rl
    n = batch.token_ids.shape[0]
    mb = min(c.minibatch_size, n)
    order_rng = np.random.default_rng([ctx.config.seed, step])
    ms = []
    for _ in range(c.ppo_epochs):
        order = order_rng.permutation(n)
        for k in range(0, n - mb + 1, mb):
            idx = np.sort(order[k:k + mb])
            placed = place_batch(batch.take(idx), ctx.mesh, ctx.rules, ctx.config.sp.layout)
            ms.append(update_fn(model, opt, placed, jnp.asarray(adv[idx]),
                                jnp.asarray(old_logp[idx]), jnp.asarray(ref_logp[idx])))
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
    ref = nnx.clone(model)             # the SFT policy, frozen: KL anchor
    opt = optimizer(model, c.optimizer, "llm")
    logprob_fn = make_logprob_fn(ctx.mesh)
    update_fn = make_update_fn(ctx.mesh, c)
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
            batch = sequence_batch(ctx, rollouts)
            placed = place_batch(batch, ctx.mesh, ctx.rules, ctx.config.sp.layout)
            old_logp, _ = jax.device_get(logprob_fn(model, placed))
            ref_logp, _ = jax.device_get(logprob_fn(ref, placed))
        if c.kl_coef and c.kl_in == "reward":
            kl = np.asarray(alg.kl_penalty(old_logp, ref_logp, c.kl_type))
            rewards = rewards - c.kl_coef * (kl * batch.mask).sum(-1)

        # ---- advantages and updates --------------------------------------------------------------
        adv = np.asarray(alg.advantages(c.algorithm, rewards, rollouts.group_ids, batch.mask,
                                        gamma=c.gamma), np.float32)
        with ctx.timers("update"):
            ms = minibatch_updates(ctx, update_fn, model, opt, batch, adv, old_logp, ref_logp,
                                   step)
        with ctx.timers("weight_sync"):
            nbytes = connection.sync(model)
        step += 1

        # ---- metrics, evaluation, checkpoint -------------------------------------------------------
        scalars = step_metrics(rollouts, rewards, batch.mask, old_logp,
                               server_logprobs(rollouts, old_logp.shape), ms, c)
        scalars.update({"rollout/weight_version": float(connection.version),
                        "weight_sync/bytes": nbytes, **info})
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
