"""GRPO (and relatives) on long videos, one readable step.

  batch from the loader -> video rows (cache / MR-SP stage 1) -> sent to the rollout server once
  -> G samples per prompt at the current weight version -> rewards -> old-policy and reference
  log-probs of the identical spliced sequences (MR-SP stage 2) -> advantages -> mini-batch
  updates -> one UpdateWeights -> metrics and checkpoint.

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

from longrl_jax import evaluate as eval_lib
from longrl_jax import metrics as metrics_lib
from longrl_jax import sequences
from longrl_jax.rl import algorithms as alg
from longrl_jax.rl import rewards as rewards_lib
from longrl_jax.run import RunContext, next_examples, open_checkpoints, optimizer

log = logging.getLogger(__name__)


# ================================================================================================
# Device functions
# ================================================================================================

def make_logprob_fn(mesh):
    @nnx.jit
    def logprobs(model, b):
        return sequences.response_logprobs(model, b, mesh=mesh)
    return logprobs


def make_update_fn(mesh, c):
    def loss_fn(model, b, adv, old_logp, ref_logp):
        logp, ent = sequences.response_logprobs(model, b, mesh=mesh)
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

def rollout(ctx: RunContext, serving, prompts, step: int) -> tuple[list, list, list]:
    """(per prompt: G samples, their texts, their scores)."""
    c = ctx.config.rl
    with ctx.timers("rollout"):
        outs = serving.generate(prompts, n=c.group_size, max_tokens=c.max_response_tokens,
                                temperature=c.temperature, top_p=c.top_p,
                                seed=ctx.config.seed * 1_000_003 + step,
                                stop_token_ids=ctx.tokens.stop)
    with ctx.timers("reward"):
        texts = [[eval_lib.decode(ctx.tokenizer, s.token_ids, ctx.tokens.stop) for s in group]
                 for group in outs]
        flat_scores = rewards_lib.score_batch(
            [t for g in texts for t in g],
            [p.example.answer for p in prompts for _ in range(c.group_size)],
            [p.example.problem_type for p in prompts for _ in range(c.group_size)],
            judge=ctx.judge, questions=[p.example.problem for p in prompts
                                        for _ in range(c.group_size)])
    g = c.group_size
    scores = [flat_scores[i * g:(i + 1) * g] for i in range(len(prompts))]
    return outs, texts, scores


def collect(ctx: RunContext, serving, it, step: int):
    """Prompts, samples and scores for one step. With dynamic sampling, groups whose rewards are
    all equal are dropped and new prompts drawn, up to `max_refills` times (DAPO)."""
    c = ctx.config.rl
    kept_p, kept_o, kept_s, tries, drawn = [], [], [], 0, 0
    while len(kept_p) < c.prompts_per_step:
        need = c.prompts_per_step - len(kept_p)
        prompts = ctx.prompts(next_examples(it, need))
        drawn += len(prompts)
        if not prompts:
            continue
        outs, _, scores = rollout(ctx, serving, prompts, step * 100 + tries)
        for p, o, s in zip(prompts, outs, scores):
            r = [x["overall"] for x in s]
            if not c.dynamic_sampling or max(r) > min(r) or tries >= c.max_refills:
                kept_p.append(p)
                kept_o.append(o)
                kept_s.append(s)
        tries += 1
    return kept_p[:c.prompts_per_step], kept_o, kept_s, {"rollout/prompts_drawn": drawn,
                                                        "rollout/refills": tries - 1}


# ================================================================================================
# The loop
# ================================================================================================

def train(ctx: RunContext, serving) -> None:
    c = ctx.config.rl
    model = ctx.model
    ref = nnx.clone(model)             # the SFT policy, frozen: KL anchor
    opt = optimizer(model, c.optimizer, "llm")
    logprob_fn = make_logprob_fn(ctx.mesh)
    update_fn = make_update_fn(ctx.mesh, c)
    it = iter(ctx.loader("train", seed=ctx.config.seed + 1))
    ckpt, step = open_checkpoints(ctx, "rl", c, model, opt, it)
    serving.sync(model)
    g = c.group_size
    eval_prompts = ctx.prompts(ctx.eval_examples()) if c.eval_every else []
    bar = metrics_lib.progress(c.steps, desc="rl", unit="step", initial=step)
    while step < c.steps:
        # ---- rollout and rewards ----------------------------------------------------------------
        prompts, outs, scores, info = collect(ctx, serving, it, step)
        samples = [s for group in outs for s in group]
        flat = [x for s in scores for x in s]
        rewards = np.asarray([x["overall"] for x in flat], np.float32)
        acc = np.asarray([x["accuracy"] for x in flat], np.float32)
        fmt = np.asarray([x["format"] for x in flat], np.float32)
        lengths = np.asarray([len(s.token_ids) for s in samples], np.float32)
        if c.overlong_buffer:
            rewards = rewards + np.asarray(alg.overlong_penalty(
                lengths, c.max_response_tokens, c.overlong_buffer, c.overlong_penalty))
        group_ids = np.repeat(np.arange(len(prompts)), g)

        # ---- old-policy and reference log-probs on the identical sequences ------------------------
        with ctx.timers("prefill"):
            episodes = [p for p in prompts for _ in range(g)]
            responses = [np.asarray(s.token_ids[:c.max_response_tokens], np.int32) for s in samples]
            batch = sequences.build_batch(episodes, responses, response_len=c.max_response_tokens)
            placed = sequences.place_batch(batch, ctx.mesh)
            old_logp, _ = jax.device_get(logprob_fn(model, placed))
            ref_logp, _ = jax.device_get(logprob_fn(ref, placed))
        roll_lp = np.zeros_like(old_logp)
        for i, s in enumerate(samples):
            n = min(len(s.logprobs), c.max_response_tokens)
            roll_lp[i, :n] = s.logprobs[:n]
        mask = batch.mask
        mismatch = np.abs(old_logp - roll_lp) * mask
        if c.kl_coef and c.kl_in == "reward":
            kl_seq = (np.asarray(alg.kl_penalty(old_logp, ref_logp, c.kl_type)) * mask).sum(-1)
            rewards = rewards - c.kl_coef * kl_seq

        # ---- advantages ----------------------------------------------------------------------
        if c.algorithm == "grpo":
            adv = alg.grpo_advantages(rewards, group_ids)
        elif c.algorithm == "dr_grpo":
            adv = alg.grpo_advantages(rewards, group_ids, norm_by_std=False)
        elif c.algorithm == "rloo":
            adv = alg.rloo_advantages(rewards, group_ids)
        else:  # reinforce_pp: the outcome reward on the last response token
            tok_r = np.zeros_like(mask)
            last = np.maximum(mask.sum(-1).astype(int) - 1, 0)
            tok_r[np.arange(len(last)), last] = rewards
            adv = alg.reinforce_pp_advantages(tok_r, mask, c.gamma)
        adv = np.asarray(adv, np.float32)

        # ---- mini-batch updates --------------------------------------------------------------
        with ctx.timers("update"):
            b_total = len(samples)
            mb = min(c.minibatch_size, b_total)
            order_rng = np.random.default_rng([ctx.config.seed, step])
            ms = []
            for _ in range(c.ppo_epochs):
                order = order_rng.permutation(b_total)
                for k in range(0, b_total - mb + 1, mb):
                    idx = np.sort(order[k:k + mb])
                    sub = sequences.SequenceBatch(
                        batch.token_ids[idx], batch.video_rows[idx], batch.video_table,
                        batch.positions[idx], batch.valid[idx], batch.rows[idx],
                        batch.targets[idx], batch.mask[idx])
                    ms.append(update_fn(model, opt, sequences.place_batch(sub, ctx.mesh),
                                        jnp.asarray(adv[idx]), jnp.asarray(old_logp[idx]),
                                        jnp.asarray(ref_logp[idx])))
            ms = jax.device_get(ms)
        with ctx.timers("weight_sync"):
            nbytes = serving.sync(model)
        step += 1

        # ---- metrics and checkpoint ------------------------------------------------------------
        scalars = {"reward/mean": float(rewards.mean()), "reward/accuracy": float(acc.mean()),
                   "reward/format": float(fmt.mean()), "response/length": float(lengths.mean()),
                   "response/clipped": float((lengths >= c.max_response_tokens).mean()),
                   "rollout/logp_mismatch": float(mismatch.sum() / max(mask.sum(), 1)),
                   "rollout/logp_mismatch_max": float(mismatch.max()),
                   "rollout/weight_version": float(serving.version),
                   "weight_sync/bytes": nbytes, **info}
        for k in ms[0]:
            scalars[f"actor/{k}"] = float(np.mean([m[k] for m in ms]))
        scalars.update(ctx.timers.pop())
        if c.eval_every and (step % c.eval_every == 0 or step == c.steps):
            with ctx.timers("eval"):
                res = eval_lib.evaluate(serving, eval_prompts, ctx.tokenizer, ctx.tokens,
                                        max_tokens=ctx.config.eval.max_tokens,
                                        temperature=ctx.config.eval.get("temperature", 0.0),
                                        seed=ctx.config.seed)
            scalars.update({"eval/accuracy": res["accuracy"], "eval/format": res["format"]})
        ctx.writer.write(step, scalars, stage="rl")
        metrics_lib.postfix(bar, scalars, keys=["reward/mean", "reward/accuracy", "eval/accuracy"])
        bar.update(1)
        ckpt.save(step, model=model, optimizer=opt,
                  extra={"step": step, "data_state": it.get_state()}, force=step == c.steps)
    bar.close()
    ckpt.wait()
    ckpt.close()
