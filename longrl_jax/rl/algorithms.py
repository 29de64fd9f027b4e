"""Advantage estimators, the PPO-clip policy loss, KL penalties and DAPO pieces.

Pure functions of arrays: they take jax or NumPy arrays, compute in float32 and work under
`jax.jit` (string options such as `kind` and `agg` are static Python values). They follow
Long-RL's `verl/trainer/core_algos.py` (EasyR1/verl lineage) unless a docstring says otherwise.

Shape letters: `b` sequences in the batch, `t` response tokens. `mask_bt` is 1 on response
tokens that count (0 after EOS and on padding); any numeric or boolean dtype is accepted.

Groups: `group_ids` are arbitrary integers (the prompt's uid), not necessarily contiguous or
sorted. They are mapped to dense segment ids with `jnp.unique(..., size=B)` (B groups at most),
so the group statistics are O(B) segment sums that jit with no host-side `num_groups`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KL_KINDS = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _group_segments(group_ids) -> jax.Array:
    """Dense segment ids in [0, B) for arbitrary integer group ids, shape [B]."""
    ids = jnp.asarray(group_ids)
    if ids.ndim != 1:
        raise ValueError(f"group_ids must be 1-D, got shape {ids.shape}")
    _, seg_b = jnp.unique(ids, return_inverse=True, size=ids.shape[0])
    return seg_b.reshape(-1)


def _group_sum(x_b, seg_b) -> jax.Array:
    """Per-sample sum over the sample's group (segment sum gathered back to samples)."""
    return jax.ops.segment_sum(x_b, seg_b, num_segments=x_b.shape[0])[seg_b]


def _masked_mean(x, mask) -> jax.Array:
    """Mean over the mask; 0 (not NaN) for an empty mask."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------------------------
# Advantage estimators (outcome rewards: one scalar per sequence unless stated)
# ----------------------------------------------------------------------------------------------

def grpo_advantages(rewards, group_ids, eps: float = 1e-6, *, norm_by_std: bool = True
                    ) -> jax.Array:
    """GRPO advantage per sequence: (r − group mean) / (group std + eps), shape [B].

    The std is the unbiased one (Long-RL uses `torch.std`, Bessel-corrected). A group of one
    sample has no defined std (torch returns NaN; Long-RL asserts rollout.n > 1): it gets
    advantage 0, since a lone sample carries no relative signal. An all-equal group gets 0
    (0 / eps), not NaN. `norm_by_std=False` is Dr.GRPO (arXiv 2503.20783): r − group mean,
    without the std division that up-weights near-uniform groups.
    """
    r_b = _f32(rewards)
    if r_b.shape[0] == 0:
        return r_b
    seg_b = _group_segments(group_ids)
    n_b = _group_sum(jnp.ones_like(r_b), seg_b)
    centered_b = r_b - _group_sum(r_b, seg_b) / n_b
    if not norm_by_std:
        return centered_b
    var_b = _group_sum(centered_b**2, seg_b) / jnp.maximum(n_b - 1.0, 1.0)
    adv_b = centered_b / (jnp.sqrt(var_b) + eps)
    return jnp.where(n_b > 1, adv_b, 0.0)


def rloo_advantages(rewards, group_ids) -> jax.Array:
    """RLOO (arXiv 2402.14740) per sequence: r_i − mean of the *other* samples of its group.

    As verl's `compute_rloo_outcome_advantage`; a singleton group (no others) gets 0 where verl
    asserts.
    """
    r_b = _f32(rewards)
    if r_b.shape[0] == 0:
        return r_b
    seg_b = _group_segments(group_ids)
    n_b = _group_sum(jnp.ones_like(r_b), seg_b)
    others_mean_b = (_group_sum(r_b, seg_b) - r_b) / jnp.maximum(n_b - 1.0, 1.0)
    return jnp.where(n_b > 1, r_b - others_mean_b, 0.0)


def reinforce_pp_advantages(token_rewards_bt, mask_bt, gamma: float) -> jax.Array:
    """REINFORCE++ (arXiv 2501.03262) per token, shape [B, T], as verl computes it.

    Returns G_t = r_t + γ·G_{t+1}, where the running return is zeroed after every position
    whose mask is 0 (so rewards on padding never leak into earlier tokens), then whitened over
    all masked tokens of the batch: (G − mean) / sqrt(unbiased var + 1e-8). Unlike verl, the
    result is zeroed outside the mask (verl leaves G − mean there and relies on the loss mask).
    """
    r_bt, m_bt = _f32(token_rewards_bt), _f32(mask_bt)

    def step(running_b, xs):
        r_b, m_b = xs
        ret_b = r_b + gamma * running_b
        return ret_b * m_b, ret_b

    _, returns_tb = jax.lax.scan(step, jnp.zeros(r_bt.shape[0], jnp.float32),
                                 (r_bt.T, m_bt.T), reverse=True)
    returns_bt = returns_tb.T
    count = jnp.sum(m_bt)
    mean = _masked_mean(returns_bt, m_bt)
    var = _masked_mean((returns_bt - mean) ** 2, m_bt)
    var = jnp.where(count > 1, var * count / jnp.maximum(count - 1.0, 1.0), var)
    return (returns_bt - mean) * jax.lax.rsqrt(var + 1e-8) * m_bt


def remax_advantages(rewards, baseline_rewards) -> jax.Array:
    """ReMax (arXiv 2310.10505): reward minus the reward of the greedy response, shape [B]."""
    return _f32(rewards) - _f32(baseline_rewards)


def broadcast_to_tokens(adv_b, mask_bt) -> jax.Array:
    """A per-sequence advantage on every response token, 0 outside the mask, shape [B, T]."""
    return _f32(adv_b)[:, None] * _f32(mask_bt)


# ----------------------------------------------------------------------------------------------
# KL penalty
# ----------------------------------------------------------------------------------------------

def kl_penalty(logp, ref_logp, kind: str = "low_var_kl") -> jax.Array:
    """Per-token KL estimate between the policy and the reference (J. Schulman, "Approximating
    KL divergence", 2020), elementwise.

    kl / k1:          logp − ref (unbiased, high variance, can be negative)
    abs:              |logp − ref|
    mse / k2:         ½ (logp − ref)²
    low_var_kl / k3:  exp(ref − logp) − (ref − logp) − 1 (non-negative, low variance); as verl,
                      the log-ratio is clamped to [−20, 20] and the result to [−10, 10] so one
                      very unlikely token cannot blow up the loss. Long-RL's default.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; allowed: {', '.join(KL_KINDS)}")
    diff = _f32(logp) - _f32(ref_logp)
    if kind in ("kl", "k1"):
        return diff
    if kind == "abs":
        return jnp.abs(diff)
    if kind in ("mse", "k2"):
        return 0.5 * diff**2
    log_ratio = jnp.clip(-diff, -20.0, 20.0)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, -10.0, 10.0)


# ----------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------

def aggregate(loss_bt, mask_bt, agg: str = "token-mean", *, denominator=None) -> jax.Array:
    """Reduce a per-token loss to a scalar, verl's `loss_agg_mode`s.

    token-mean:               Σ masked loss / number of masked tokens (Long-RL's default; every
                              token weighs the same, so long answers weigh more).
    seq-mean-token-mean:      mean over sequences of each sequence's token mean (original GRPO).
    seq-mean-token-sum:       mean over sequences of each sequence's token sum.
    seq-mean-token-sum-norm:  Σ masked loss / T with T = mask_bt.shape[-1], the max response
                              length (Dr.GRPO: a constant divisor, so no length bias). As in
                              verl this is a sum over sequences, not a mean.

    Rows with an empty mask are padding (static batch shapes): they are left out of the
    sequence means (verl counts them, which in seq-mean-token-mean gives NaN), and an all-empty
    mask gives 0.

    Every mode is a sum over rows divided by a `denominator` that depends on the mask alone
    (`aggregate_denominator`). A micro-batch of a larger batch passes the whole batch's
    denominator, so the micro-batches' results add up to the whole batch's.
    """
    if agg not in AGG_MODES:
        raise ValueError(f"unknown agg {agg!r}; allowed: {', '.join(AGG_MODES)}")
    loss_bt, mask_bt = _f32(loss_bt), _f32(mask_bt)
    if denominator is None:
        denominator = aggregate_denominator(mask_bt, agg)
    sum_b = jnp.sum(loss_bt * mask_bt, axis=-1)
    if agg == "seq-mean-token-mean":
        sum_b = sum_b / jnp.maximum(jnp.sum(mask_bt, axis=-1), 1.0)
    return jnp.sum(sum_b) / denominator


def aggregate_denominator(mask_bt, agg: str = "token-mean") -> jax.Array:
    """What `aggregate` divides by, for a mask [..., T] (any leading shape)."""
    mask_bt = _f32(mask_bt)
    if agg == "token-mean":
        return jnp.maximum(jnp.sum(mask_bt), 1.0)
    if agg == "seq-mean-token-sum-norm":
        return jnp.float32(mask_bt.shape[-1])
    nonempty = (jnp.sum(mask_bt, axis=-1) > 0).astype(jnp.float32)
    return jnp.maximum(jnp.sum(nonempty), 1.0)


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2,
                clip_high: float = 0.3, clip_dual: float | None = 3.0,
                agg: str = "token-mean", denominator=None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate with asymmetric (DAPO clip-higher) and dual clipping.

    Per token, ratio = exp(logp − old_logp) and loss = max(−A·ratio, −A·clip(ratio, 1 − clip_low,
    1 + clip_high)); for A < 0 the loss is further capped at −A·clip_dual (dual-clip PPO, arXiv
    1912.09729: a huge ratio on a bad action cannot dominate the batch). Long-RL defaults: 0.2 /
    0.3 / 3.0, token-mean. `clip_dual=None` disables the dual clip.

    `advantages` is per token [B, T] or per sequence [B] (broadcast over tokens). As verl, the
    log-ratio is clamped to [−20, 20] before exp, and the clipped ratio is exp of the clamped
    log-ratio, so neither overflows nor has NaN gradients.

    Metrics (means over masked tokens): `clip_frac` where the PPO clip chose the clipped term,
    `clip_frac_dual` where the dual clip was active, `approx_kl` mean of old − new log-prob
    (verl's ppo_kl, from the clamped log-ratio), `ratio_mean`. `denominator`: see `aggregate`.
    """
    if clip_dual is not None and clip_dual <= 1.0:
        raise ValueError(f"clip_dual must be > 1 (or None), got {clip_dual}")
    logp_bt, old_bt, mask_bt = _f32(logp), _f32(old_logp), _f32(mask)
    adv_bt = _f32(advantages)
    if adv_bt.ndim == 1:
        adv_bt = adv_bt[:, None]
    adv_bt = jnp.broadcast_to(adv_bt, logp_bt.shape)

    log_ratio_bt = jnp.clip(logp_bt - old_bt, -20.0, 20.0)
    ratio_bt = jnp.exp(log_ratio_bt)
    clipped_ratio_bt = jnp.exp(jnp.clip(log_ratio_bt, np.log(1.0 - clip_low),
                                        np.log(1.0 + clip_high)))
    loss1_bt = -adv_bt * ratio_bt
    loss2_bt = -adv_bt * clipped_ratio_bt
    loss_bt = jnp.maximum(loss1_bt, loss2_bt)
    clipped_bt = loss1_bt < loss2_bt
    if clip_dual is None:
        dual_bt = jnp.zeros_like(clipped_bt)
    else:
        loss3_bt = -adv_bt * clip_dual
        dual_bt = (adv_bt < 0) & (loss_bt > loss3_bt)
        loss_bt = jnp.where(dual_bt, loss3_bt, loss_bt)

    metrics = {
        "clip_frac": _masked_mean(clipped_bt.astype(jnp.float32), mask_bt),
        "clip_frac_dual": _masked_mean(dual_bt.astype(jnp.float32), mask_bt),
        "approx_kl": _masked_mean(-log_ratio_bt, mask_bt),
        "ratio_mean": _masked_mean(ratio_bt, mask_bt),
    }
    metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
    return aggregate(loss_bt, mask_bt, agg, denominator=denominator), metrics


# ----------------------------------------------------------------------------------------------
# DAPO pieces (arXiv 2503.14476)
# ----------------------------------------------------------------------------------------------

def dynamic_sampling_keep(rewards, group_ids, *, low: float | None = None,
                          high: float | None = None) -> jax.Array:
    """Which samples to keep for the update, per sample [B] bool, whole groups at a time.

    A group whose rewards are all equal has zero GRPO advantage everywhere and only dilutes the
    batch. By default (DAPO) a group is kept iff its rewards are not all equal; a singleton group
    is therefore dropped. With `low`/`high` it is Long-RL's online filter instead: keep iff
    low < group mean reward < high (Long-RL: filter_low 0.01, filter_high 0.99 on the `overall`
    score); a missing bound is open.
    """
    r_b = _f32(rewards)
    if r_b.shape[0] == 0:
        return jnp.zeros((0,), bool)
    seg_b = _group_segments(group_ids)
    n = r_b.shape[0]
    if low is None and high is None:
        max_b = jax.ops.segment_max(r_b, seg_b, num_segments=n)[seg_b]
        min_b = jax.ops.segment_min(r_b, seg_b, num_segments=n)[seg_b]
        return max_b > min_b
    mean_b = _group_sum(r_b, seg_b) / _group_sum(jnp.ones_like(r_b), seg_b)
    keep_b = jnp.ones_like(r_b, dtype=bool)
    if low is not None:
        keep_b &= mean_b > low
    if high is not None:
        keep_b &= mean_b < high
    return keep_b


def overlong_penalty(lengths, max_len: int, buffer_len: int, penalty_factor: float = 1.0
                     ) -> jax.Array:
    """DAPO soft overlong punishment per sequence, added to the reward.

    0 up to max_len − buffer_len tokens, then linear down to −penalty_factor at max_len, and
    −penalty_factor beyond (as Long-RL's examples/reward_function/dapo.py). Truncated answers
    are penalised gradually instead of being cut off with a reward of 0 that says nothing about
    length. buffer_len = 0 is a hard step at max_len.
    """
    len_b = _f32(lengths)
    expected = float(max_len - buffer_len)
    ramp_b = (expected - len_b) / max(float(buffer_len), 1.0)
    frac_b = jnp.where(len_b <= expected, 0.0, jnp.where(len_b <= max_len, ramp_b, -1.0))
    return frac_b * penalty_factor


# ------------------------------------------------------------------------------------------------
# Estimators by name (what `config.rl.algorithm` chooses)
# ------------------------------------------------------------------------------------------------

def _reinforce_pp_outcome(rewards, group_ids, mask_bt, gamma):
    """REINFORCE++ from an outcome reward: the reward on the last response token."""
    del group_ids
    mask = np.asarray(mask_bt, np.float32)
    tok_r = np.zeros_like(mask)
    last = np.maximum(mask.sum(-1).astype(int) - 1, 0)
    tok_r[np.arange(len(last)), last] = np.asarray(rewards, np.float32)
    return reinforce_pp_advantages(tok_r, mask, gamma)


ESTIMATORS = {
    "grpo": lambda r, g, m, gamma: grpo_advantages(r, g),
    "dr_grpo": lambda r, g, m, gamma: grpo_advantages(r, g, norm_by_std=False),
    "rloo": lambda r, g, m, gamma: rloo_advantages(r, g),
    "reinforce_pp": _reinforce_pp_outcome,
}


def advantages(algorithm: str, rewards, group_ids, mask_bt, *, gamma: float = 1.0) -> jax.Array:
    """The advantages of `algorithm` (a key of ESTIMATORS) from per-sequence rewards: [B] for
    the group baselines, [B, T] for REINFORCE++; `policy_loss` takes either."""
    if algorithm not in ESTIMATORS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose from {tuple(ESTIMATORS)}")
    return ESTIMATORS[algorithm](rewards, group_ids, mask_bt, gamma)
