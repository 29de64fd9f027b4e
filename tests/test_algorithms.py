"""longrl_jax.rl.algorithms against numbers worked out by hand (the working is in the comments)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrl_jax.rl import algorithms as alg

ATOL = 1e-6


def close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, dtype=np.float32), atol=atol,
                               rtol=0)


# ------------------------------------------------------------------------------- advantages

def test_grpo_groups_equal_singleton_and_arbitrary_ids():
    # group 7: [1,0,0,1] mean .5, unbiased var 1/3, std .5773503 -> ±.5/(.5773503+1e-6)
    # group -3: all .5 -> 0 (no NaN); group 100: a single sample -> 0
    rewards = np.array([1.0, 0.5, 0.0, 2.0, 0.0, 0.5, 1.0, 0.5])
    ids = np.array([7, -3, 7, 100, 7, -3, 7, -3])
    a = 0.8660239
    close(alg.grpo_advantages(rewards, ids), [a, 0, -a, 0, -a, 0, a, 0])


def test_grpo_unbiased_std_and_dr_grpo():
    # [0,1,2]: mean 1, unbiased var (1+0+1)/2 = 1 -> (r-1)/(1+1e-6)
    close(alg.grpo_advantages([0.0, 1.0, 2.0], [0, 0, 0]), [-0.999999, 0.0, 0.999999])
    # Dr.GRPO: only the mean is subtracted
    close(alg.grpo_advantages([1.0, 0.0, 0.0, 1.0, 3.0], [4, 4, 4, 4, 2], norm_by_std=False),
          [0.5, -0.5, -0.5, 0.5, 0.0])


def test_rloo():
    # [1,0,0,1]: 1 - (2-1)/3 = .666667, 0 - 2/3; [0,1,2]: 0-1.5, 1-1, 2-.5; singleton -> 0
    got = alg.rloo_advantages([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 2.0, 9.0],
                              [3, 3, 3, 3, 8, 8, 8, 1])
    close(got, [0.6666667, -0.6666667, -0.6666667, 0.6666667, -1.5, 0.0, 1.5, 0.0])


def test_reinforce_pp_returns_reset_and_whitening():
    # gamma .5. row 0: returns [.25, .5, 1]; row 1 (last token masked): [1, 2, (0)].
    # masked values .25 .5 1 1 2: mean .95, Σdev² 1.8, unbiased var 1.8/4 = .45, std .6708204
    r = [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]]
    m = [[1, 1, 1], [1, 1, 0]]
    close(alg.reinforce_pp_advantages(r, m, 0.5),
          [[-1.0434984, -0.6708204, 0.0745356], [0.0745356, 1.5652476, 0.0]])


def test_reinforce_pp_reward_on_padding_does_not_leak():
    # gamma 1. row 0 has 5 on a masked position: its returns are [1, 1], not [6, 6].
    # masked values 1 1 3 3 3: mean 2.2, Σdev² 4.8, unbiased var 1.2, std 1.0954451
    r = [[0.0, 1.0, 5.0], [0.0, 0.0, 3.0]]
    m = [[1, 1, 0], [1, 1, 1]]
    a, b = -1.2 / 1.0954451, 0.8 / 1.0954451
    close(alg.reinforce_pp_advantages(r, m, 1.0), [[a, a, 0.0], [b, b, b]])


def test_reinforce_pp_empty_and_single_token_masks_are_finite():
    out = alg.reinforce_pp_advantages([[1.0, 2.0]], [[0, 0]], 1.0)
    close(out, [[0.0, 0.0]])
    close(alg.reinforce_pp_advantages([[1.0, 2.0]], [[1, 0]], 1.0), [[0.0, 0.0]])


def test_remax_and_broadcast():
    close(alg.remax_advantages([1.0, 0.0], [0.25, 0.5]), [0.75, -0.5])
    close(alg.broadcast_to_tokens([2.0, -1.0], [[1, 1, 0], [1, 0, 0]]),
          [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])


# ------------------------------------------------------------------------------- KL

@pytest.mark.parametrize("kind,want", [
    ("kl", [1.0, -1.0]), ("k1", [1.0, -1.0]), ("abs", [1.0, 1.0]),
    ("mse", [0.5, 0.5]), ("k2", [0.5, 0.5]),
    # ref - logp = -1: e^-1 + 1 - 1 = .3678794; = 1: e - 2 = .7182818
    ("low_var_kl", [0.3678794, 0.7182818]), ("k3", [0.3678794, 0.7182818]),
])
def test_kl_kinds(kind, want):
    close(alg.kl_penalty(np.array([-1.0, -2.0]), np.array([-2.0, -1.0]), kind), want)


def test_k3_is_clamped_to_ten():
    # ref - logp = 30 -> clamped to 20 -> e^20 - 21 -> 10; = -30 -> e^-20 + 19 -> 10
    close(alg.kl_penalty([0.0, 0.0], [30.0, -30.0], "k3"), [10.0, 10.0])


def test_unknown_kl_kind_names_the_allowed_ones():
    with pytest.raises(ValueError, match="low_var_kl"):
        alg.kl_penalty([0.0], [0.0], "full")


# ------------------------------------------------------------------------------- policy loss

# Seven real tokens (old_logp 0, logp = log ratio), clip 0.2 / 0.3, dual 3:
#   A  ratio  -A·r  -A·clip(r)  loss   PPO clip  dual
#   1  1.5    -1.5  -1.3        -1.3   yes
#   1  0.5    -0.5  -0.8        -0.5
#  -1  0.5     0.5   0.8         0.8   yes
#  -1  1.5     1.5   1.3         1.5
#  -1  5.0     5.0   1.3         3.0             yes (5 > 3·1)
#   2  1.0    -2.0  -2.0        -2.0
#   1  1.2    -1.2  -1.2        -1.2
# Row 0 holds the first three plus a masked token with ratio 100 that must not count.
RATIOS = [[1.5, 0.5, 0.5, 100.0], [1.5, 5.0, 1.0, 1.2]]
ADV = [[1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 2.0, 1.0]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1]]
LOGP = np.log(np.array(RATIOS, np.float32))
OLD = np.zeros_like(LOGP)


@pytest.mark.parametrize("agg,want", [
    ("token-mean", 0.3 / 7),                               # (-1.0 + 1.3) / 7
    ("seq-mean-token-mean", (-1.0 / 3 + 1.3 / 4) / 2),     # -0.0041667
    ("seq-mean-token-sum", (-1.0 + 1.3) / 2),              # 0.15
    ("seq-mean-token-sum-norm", 0.3 / 4),                  # Σ / T
])
def test_policy_loss_each_agg(agg, want):
    loss, _ = alg.policy_loss(LOGP, OLD, ADV, MASK, agg=agg)
    close(loss, want)


def test_policy_loss_metrics():
    _, m = alg.policy_loss(LOGP, OLD, ADV, MASK)
    close(m["clip_frac"], 2 / 7)
    close(m["clip_frac_dual"], 1 / 7)
    close(m["ratio_mean"], 11.2 / 7)
    # -(2 ln1.5 + 2 ln.5 + ln5 + ln1.2) / 7
    close(m["approx_kl"], -0.1737708)


def test_policy_loss_without_dual_clip():
    loss, m = alg.policy_loss(LOGP, OLD, ADV, MASK, clip_dual=None)
    close(loss, 2.3 / 7)  # the ratio-5 token now costs 5, not 3
    close(m["clip_frac_dual"], 0.0)


def test_policy_loss_per_sequence_advantages_and_length_one():
    # ratio 1 everywhere -> loss = -A on each real token
    logp = np.zeros((2, 3), np.float32)
    loss, _ = alg.policy_loss(logp, logp, [1.0, -1.0], [[1, 1, 0], [1, 0, 0]])
    close(loss, (-1 - 1 + 1) / 3)
    loss, _ = alg.policy_loss(logp, logp, [1.0, -1.0], [[1, 0, 0], [1, 0, 0]],
                              agg="seq-mean-token-mean")
    close(loss, 0.0)


@pytest.mark.parametrize("agg", alg.AGG_MODES)
def test_empty_mask_rows_are_ignored_not_nan(agg):
    logp = np.log(np.array(RATIOS + [[2.0, 2.0, 2.0, 2.0]], np.float32))
    adv = ADV + [[1.0, 1.0, 1.0, 1.0]]
    mask = MASK + [[0, 0, 0, 0]]
    with_empty, _ = alg.policy_loss(logp, np.zeros_like(logp), adv, mask, agg=agg)
    without, _ = alg.policy_loss(LOGP, OLD, ADV, MASK, agg=agg)
    close(with_empty, without)
    loss, m = alg.policy_loss(LOGP, OLD, ADV, np.zeros((2, 4)), agg=agg)
    close(loss, 0.0)
    for v in m.values():
        close(v, 0.0)


def test_aggregate_by_hand():
    loss = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
    mask = [[1, 1, 0], [1, 0, 0]]
    close(alg.aggregate(loss, mask, "token-mean"), 7 / 3)
    close(alg.aggregate(loss, mask, "seq-mean-token-mean"), (1.5 + 4) / 2)
    close(alg.aggregate(loss, mask, "seq-mean-token-sum"), (3 + 4) / 2)
    close(alg.aggregate(loss, mask, "seq-mean-token-sum-norm"), 7 / 3)


def test_unknown_agg_and_bad_dual():
    with pytest.raises(ValueError, match="token-mean"):
        alg.aggregate([[1.0]], [[1]], "seq-sum")
    with pytest.raises(ValueError, match="token-mean"):
        alg.policy_loss(LOGP, OLD, ADV, MASK, agg="mean")
    with pytest.raises(ValueError, match="clip_dual"):
        alg.policy_loss(LOGP, OLD, ADV, MASK, clip_dual=0.5)


def test_policy_loss_gradient_by_hand_and_finite():
    # d/dlogp of -A·r (r = e^logp) is -A·r, divided by the 7 tokens; clipped, dual-clipped and
    # masked tokens get 0.
    grad = jax.grad(lambda lp: alg.policy_loss(lp, OLD, ADV, MASK)[0])(jnp.asarray(LOGP))
    close(grad, np.array([[0.0, -0.5, 0.0, 0.0], [1.5, 0.0, -2.0, -1.2]]) / 7)
    # a huge log-ratio (clamped before exp) still gives finite gradients
    logp = jnp.array([[1000.0, -1000.0]])
    for agg in alg.AGG_MODES:
        g = jax.grad(lambda lp, agg=agg: alg.policy_loss(lp, jnp.zeros((1, 2)), [[1.0, -1.0]],
                                                         [[1, 1]], agg=agg)[0])(logp)
        assert np.isfinite(np.asarray(g)).all()
    g = jax.grad(lambda lp: alg.kl_penalty(lp, jnp.array([50.0, -50.0, 0.0]), "k3").sum())(
        jnp.array([0.0, 0.0, 0.1]))
    assert np.isfinite(np.asarray(g)).all()


def test_jit_compatible():
    rewards = jnp.array([1.0, 0.5, 0.0, 2.0, 0.0, 0.5, 1.0, 0.5])
    ids = jnp.array([7, -3, 7, 100, 7, -3, 7, -3])
    close(jax.jit(alg.grpo_advantages)(rewards, ids), alg.grpo_advantages(rewards, ids))
    close(jax.jit(alg.rloo_advantages)(rewards, ids), alg.rloo_advantages(rewards, ids))
    close(jax.jit(alg.dynamic_sampling_keep)(rewards, ids),
          alg.dynamic_sampling_keep(rewards, ids))
    close(jax.jit(alg.reinforce_pp_advantages, static_argnums=2)(
        jnp.ones((2, 3)), jnp.ones((2, 3)), 0.9), alg.reinforce_pp_advantages(
        np.ones((2, 3)), np.ones((2, 3)), 0.9))
    for agg in alg.AGG_MODES:
        fn = jax.jit(functools.partial(alg.policy_loss, agg=agg))
        got, metrics = fn(LOGP, OLD, jnp.asarray(ADV), jnp.asarray(MASK))
        want, want_metrics = alg.policy_loss(LOGP, OLD, ADV, MASK, agg=agg)
        close(got, want)
        jax.tree.map(close, metrics, want_metrics)
    kl = jax.jit(alg.kl_penalty, static_argnums=2)
    close(kl(jnp.zeros(2), jnp.ones(2), "k3"), [math.e - 2] * 2)
    close(jax.jit(alg.overlong_penalty, static_argnums=(1, 2))(jnp.array([9]), 10, 4),
          [-0.75])


# ------------------------------------------------------------------------------- DAPO

def test_dynamic_sampling_default_drops_uniform_and_singleton_groups():
    keep = alg.dynamic_sampling_keep([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 1.0],
                                     [5, 5, 5, 9, 9, 2, 0, 0])
    assert np.asarray(keep).tolist() == [False] * 3 + [True] * 2 + [False] * 3


def test_dynamic_sampling_long_rl_mean_band():
    # group means: 0 -> .25, 1 -> 0, 2 -> 1; keep 0.01 < mean < 0.99
    keep = alg.dynamic_sampling_keep([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0],
                                     [0, 0, 0, 0, 1, 1, 2, 2], low=0.01, high=0.99)
    assert np.asarray(keep).tolist() == [True] * 4 + [False] * 4


def test_overlong_penalty():
    # max 10, buffer 4: free up to 6, then (6 - len)/4, -1 at 10 and beyond; times 0.5
    close(alg.overlong_penalty(np.array([0, 6, 7, 8, 10, 11]), 10, 4, 0.5),
          [0.0, 0.0, -0.125, -0.25, -0.5, -0.5])
    close(alg.overlong_penalty([10, 11], 10, 0), [0.0, -1.0])
