"""GRPO core: the loss against a float64 NumPy restatement and finite differences,
the on-policy gradient identity, advantage invariances, chunked log-probs against
the full-logits forward, and clear errors on bad input."""
from __future__ import annotations

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import grpo
from grpo_jax.model.config import LoraConfig, TINY
from grpo_jax.model import gemma3, vocab_parallel

from _tiny_model import random_lora, random_params

# Jitted once per shape: eager dispatch of the tiny model compiles op by op and is slow.
_forward = jax.jit(gemma3.forward, static_argnums=4)
_logprobs = jax.jit(grpo.per_token_logprobs, static_argnums=(4, 5),
                    static_argnames=("chunk_size", "temperature", "return_entropy"))

ALL_OPTIONS = list(itertools.product(grpo.AGGREGATIONS, grpo.KL_ESTIMATORS, grpo.RATIO_LEVELS))


@pytest.fixture
def rng(request):
    """A fresh draw every run; the seed is printed so a failure can be replayed."""
    seed = np.random.SeedSequence().entropy % 2 ** 32
    print(f"{request.node.name}: numpy seed {seed}")
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# A float64 NumPy restatement of the loss


def np_policy_loss(logp, old, ref, adv, mask, *, eps_low, eps_high, beta, kl_estimator,
                   aggregation, ratio_level):
    logp, old, ref, adv = (np.asarray(x, np.float64) for x in (logp, old, ref, adv))
    mask = np.asarray(mask, bool)
    n, t = logp.shape
    per_token = np.zeros((n, t))
    for i in range(n):
        valid = np.flatnonzero(mask[i])
        if ratio_level == "sequence" and len(valid):
            seq_ratio = math.exp(np.mean(logp[i, valid] - old[i, valid]))
        for j in valid:
            r = seq_ratio if ratio_level == "sequence" else math.exp(logp[i, j] - old[i, j])
            surrogate = min(r * adv[i], min(max(r, 1 - eps_low), 1 + eps_high) * adv[i])
            d = ref[i, j] - logp[i, j]
            # k1 is a reward penalty (grpo.kl_reward_penalty): no loss term.
            kl = {"k3": math.exp(d) - d - 1, "k2": 0.5 * d * d, "k1": 0.0}[kl_estimator]
            per_token[i, j] = -surrogate + beta * kl
    lengths = mask.sum(1)
    if aggregation == "seq-mean-token-mean":
        return np.mean([per_token[i].sum() / lengths[i] if lengths[i] else 0.0 for i in range(n)])
    if aggregation == "token-mean":
        return per_token.sum() / max(lengths.sum(), 1)
    return per_token.sum() / (n * t)


def _inputs(rng, n=6, t=7, garbage=np.nan):
    """Random log-probs with ratios around 1 (some clipped on each side), one empty
    row, one full row, and garbage (NaN by default) in every padded slot."""
    logp = -3.0 * rng.random((n, t))
    old = logp + 0.3 * rng.standard_normal((n, t))
    ref = logp + 0.5 * rng.standard_normal((n, t))
    adv = rng.standard_normal(n)
    lengths = rng.integers(1, t + 1, n)
    lengths[0], lengths[1] = 0, t
    mask = np.arange(t)[None, :] < lengths[:, None]
    for x in (logp, old, ref):
        x[~mask] = garbage
    return logp, old, ref, adv, mask


def _weights(mask, aggregation):
    """d(aggregate)/d(per-token loss): each valid token's weight in the scalar loss."""
    mask = np.asarray(mask, np.float64)
    n, t = mask.shape
    if aggregation == "seq-mean-token-mean":
        return mask / np.maximum(mask.sum(1, keepdims=True), 1) / n
    if aggregation == "token-mean":
        return mask / max(mask.sum(), 1)
    return mask / (n * t)


# ---------------------------------------------------------------------------
# policy_loss


@pytest.mark.parametrize("aggregation,kl_estimator,ratio_level", ALL_OPTIONS)
def test_policy_loss_matches_numpy(rng, aggregation, kl_estimator, ratio_level):
    logp, old, ref, adv, mask = _inputs(rng)
    kw = dict(aggregation=aggregation, kl_estimator=kl_estimator, ratio_level=ratio_level)
    eps_low, eps_high, beta = 0.2, 0.28, 0.07
    loss, metrics = grpo.policy_loss(
        jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
        jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32), jnp.asarray(mask),
        epsilon_low=eps_low, epsilon_high=eps_high, beta=beta, **kw)
    want = np_policy_loss(logp, old, ref, adv, mask, eps_low=eps_low, eps_high=eps_high,
                          beta=beta, **kw)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-6)
    chex.assert_tree_all_finite(metrics)


def test_policy_loss_metrics(rng):
    logp, old, ref, adv, mask = _inputs(rng)
    ent = rng.random(logp.shape)
    _, m = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref),
                            jnp.asarray(adv), jnp.asarray(mask), epsilon_low=0.1,
                            epsilon_high=0.2, entropy=jnp.asarray(ent))
    valid = mask
    r = np.exp(logp - old)[valid]
    a = np.broadcast_to(adv[:, None], mask.shape)[valid]
    low = (r < 0.9) & (a < 0)
    high = (r > 1.2) & (a > 0)
    d = (ref - logp)[valid]
    want = {"clip_frac_low": low.mean(), "clip_frac_high": high.mean(),
            "clip_frac": (low | high).mean(), "ratio_mean": r.mean(), "ratio_min": r.min(),
            "ratio_max": r.max(), "kl_mean": (np.exp(d) - d - 1).mean(),
            "entropy_mean": ent[valid].mean()}
    for k, v in want.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    # kl_mean is k3's value (unbiased, >= 0 estimate of KL(pi || ref)) whatever the
    # estimator, so runs with different estimators log comparable KL.
    for est in grpo.KL_ESTIMATORS:
        _, m = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref),
                                jnp.asarray(adv), jnp.asarray(mask), kl_estimator=est)
        np.testing.assert_allclose(float(m["kl_mean"]), want["kl_mean"], rtol=1e-5, atol=1e-6,
                                   err_msg=est)


@pytest.mark.parametrize("aggregation,kl_estimator,ratio_level", ALL_OPTIONS)
def test_policy_loss_gradient_matches_finite_differences(rng, aggregation, kl_estimator,
                                                         ratio_level):
    """jax.grad in float64 against central differences of the NumPy restatement."""
    logp, old, ref, adv, mask = _inputs(rng, n=4, t=5)
    kw = dict(aggregation=aggregation, kl_estimator=kl_estimator, ratio_level=ratio_level,
              beta=0.1)
    with jax.enable_x64(True):
        grad = np.asarray(jax.grad(lambda lp: grpo.policy_loss(
            lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
            **kw)[0])(jnp.asarray(logp, jnp.float64)))
    h = 1e-6
    fd = np.zeros_like(logp)
    for i, j in zip(*np.nonzero(mask)):
        up, down = logp.copy(), logp.copy()
        up[i, j] += h
        down[i, j] -= h
        fd[i, j] = (np_policy_loss(up, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, **kw)
                    - np_policy_loss(down, old, ref, adv, mask, eps_low=0.2, eps_high=0.2,
                                     **kw)) / (2 * h)
    assert np.all(np.isfinite(grad)), "NaN garbage in padded slots leaked into the gradient"
    np.testing.assert_array_equal(grad[~mask], 0.0)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("aggregation,ratio_level",
                         list(itertools.product(grpo.AGGREGATIONS, grpo.RATIO_LEVELS)))
@pytest.mark.parametrize("old_given", [True, False])
def test_on_policy_gradient_is_advantage_weighted_logprob(rng, aggregation, ratio_level,
                                                          old_given):
    """old = current, beta = 0: d loss / d logp[i, t] = -A_i * (aggregation weight)."""
    logp, _, _, adv, mask = _inputs(rng)
    old = jnp.asarray(logp) if old_given else None
    grad = jax.grad(lambda lp: grpo.policy_loss(
        lp, old, None, jnp.asarray(adv), jnp.asarray(mask), beta=0.0,
        aggregation=aggregation, ratio_level=ratio_level)[0])(jnp.asarray(logp))
    want = -adv[:, None] * _weights(mask, aggregation)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)


def test_policy_loss_jits_with_static_options(rng):
    logp, old, ref, adv, mask = (jnp.asarray(x) for x in _inputs(rng))
    fn = jax.jit(grpo.policy_loss, static_argnames=(
        "aggregation", "kl_estimator", "ratio_level", "epsilon_low", "epsilon_high", "beta"))
    for agg in grpo.AGGREGATIONS:
        eager, _ = grpo.policy_loss(logp, old, ref, adv, mask, aggregation=agg)
        jitted, _ = fn(logp, old, ref, adv, mask, aggregation=agg)
        # Terms are O(1) in f32 and cancel across rows, so the loss may sit near zero:
        # XLA's reassociation then moves it by a few ulps of the terms, not of the sum.
        np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6, atol=1e-6)
    # Numeric hyperparameters may also be traced (schedules).
    traced = jax.jit(lambda beta, eps: grpo.policy_loss(logp, old, ref, adv, mask, beta=beta,
                                                        epsilon_low=eps, epsilon_high=eps)[0])
    np.testing.assert_allclose(
        float(traced(0.1, 0.3)),
        float(grpo.policy_loss(logp, old, ref, adv, mask, beta=0.1, epsilon_low=0.3,
                               epsilon_high=0.3)[0]), rtol=1e-6, atol=1e-6)


def test_policy_loss_all_rows_empty_is_zero(rng):
    logp, old, ref, adv, mask = _inputs(rng)
    mask[:] = False
    for agg in grpo.AGGREGATIONS:
        loss, metrics = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref),
                                         jnp.asarray(adv), jnp.asarray(mask), aggregation=agg)
        assert float(loss) == 0.0
        assert all(np.isfinite(float(v)) for v in metrics.values())


def test_policy_loss_bad_input():
    lp = jnp.zeros((4, 5))
    adv = jnp.zeros(4)
    mask = jnp.ones((4, 5), bool)
    cases = [
        (dict(aggregation="mean"), "unknown aggregation 'mean'"),
        (dict(kl_estimator="k4"), "unknown kl_estimator 'k4'"),
        (dict(ratio_level="seq"), "unknown ratio_level 'seq'"),
        (dict(beta=-1.0), "beta must be >= 0"),
        (dict(epsilon_low=-0.1), "epsilon_low/high must be >= 0"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            grpo.policy_loss(lp, lp, lp, adv, mask, **kw)
    with pytest.raises(ValueError, match=r"old_logprobs shape \(4, 6\) does not match"):
        grpo.policy_loss(lp, jnp.zeros((4, 6)), lp, adv, mask)
    with pytest.raises(ValueError, match=r"mask shape \(3, 5\) does not match"):
        grpo.policy_loss(lp, lp, lp, adv, mask[:3])
    with pytest.raises(ValueError, match=r"advantages shape \(5,\) must be \[N\]"):
        grpo.policy_loss(lp, lp, lp, jnp.zeros(5), mask)
    with pytest.raises(ValueError, match=r"logprobs must be \[N, T\]"):
        grpo.policy_loss(lp[0], None, None, adv, mask[0], beta=0.0)
    with pytest.raises(ValueError, match=r"beta > 0 \(or traced\) needs ref_logprobs"):
        grpo.policy_loss(lp, lp, None, adv, mask, beta=0.04)


# ---------------------------------------------------------------------------
# KL estimators: exact on-policy expectations over a small categorical policy
#
# One "token" per sequence, K outcomes, pi = softmax(theta), a different reference.
# Each expectation enumerates the K outcomes weighted by pi (held fixed), so it is
# exact: no sampling noise, float64 throughout.


def _categorical(rng):
    """K in 5..10 outcomes, random policy logits theta, a different reference log-pmf."""
    k = int(rng.integers(5, 11))
    theta = rng.standard_normal(k) * 1.5
    ref = np.asarray(jax.nn.log_softmax(rng.standard_normal(k) * 1.5))
    msg = f"numpy seed {rng.bit_generator.seed_seq.entropy}: K={k}, theta={theta}, ref={ref}"
    return k, theta, ref, msg


def _kl_forward(theta, ref):
    """KL(pi || ref) as a function of the policy's logits."""
    logpi = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logpi) * (logpi - ref))


def _kl_reverse(theta, ref):
    """KL(ref || pi) as a function of the policy's logits."""
    return jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(theta)))


def _expected_loss_gradient(theta, ref, estimator, beta=1.0, advantages=None):
    """sum_x pi(x) grad_theta loss(x): `policy_loss` on the one-token sequence x."""
    k = theta.shape[0]
    adv = jnp.zeros(k) if advantages is None else jnp.asarray(advantages)

    def loss_at(theta, x):
        logp = jax.nn.log_softmax(theta)[x].reshape(1, 1)
        return grpo.policy_loss(logp, None, jnp.asarray(ref)[x].reshape(1, 1), adv[x][None],
                                jnp.ones((1, 1), bool), beta=beta, kl_estimator=estimator)[0]

    per_outcome = jax.vmap(jax.grad(loss_at), in_axes=(None, 0))(jnp.asarray(theta),
                                                                 jnp.arange(k))
    assert per_outcome.dtype == jnp.float64, "run under jax.enable_x64"
    pi = np.asarray(jax.nn.softmax(theta))  # the sampling distribution: not differentiated
    return pi @ np.asarray(per_outcome)


@pytest.mark.parametrize("estimator,claimed,other", [("k3", _kl_reverse, _kl_forward),
                                                     ("k2", _kl_forward, _kl_reverse)])
def test_kl_loss_expected_gradient_is_claimed_kl(rng, estimator, claimed, other):
    """On-policy, E_pi[grad k3] = grad KL(ref || pi) and E_pi[grad k2] = grad KL(pi || ref),
    exactly; and the draw tells the two KLs apart, so the test can see a swap."""
    with jax.enable_x64(True):
        k, theta, ref, msg = _categorical(rng)
        # Advantages 0: the clipped surrogate contributes exactly nothing.
        np.testing.assert_array_equal(
            _expected_loss_gradient(theta, ref, estimator, beta=0.0), 0.0, err_msg=msg)
        got = _expected_loss_gradient(theta, ref, estimator, beta=1.0)
        want = np.asarray(jax.grad(claimed)(jnp.asarray(theta), jnp.asarray(ref)))
        wrong = np.asarray(jax.grad(other)(jnp.asarray(theta), jnp.asarray(ref)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=msg)
    assert np.max(np.abs(got - wrong)) > 1e-3, f"draw cannot tell the KLs apart: {msg}"
    assert np.max(np.abs(want)) > 1e-3, msg


def test_k1_as_loss_term_has_zero_expected_gradient_so_policy_loss_adds_none(rng):
    """Why k1 is not a loss term: E_pi[grad (log pi - log ref)] = E_pi[grad log pi] = 0,
    whatever ref. So kl_estimator="k1" adds nothing to the loss (the reward carries it)."""
    with jax.enable_x64(True):
        k, theta, ref, msg = _categorical(rng)
        beta = float(rng.uniform(0.1, 2.0))
        msg += f", beta={beta}"
        jac = np.asarray(jax.jacobian(
            lambda t: beta * (jax.nn.log_softmax(t) - ref))(jnp.asarray(theta)))
        pi = np.asarray(jax.nn.softmax(theta))
        np.testing.assert_allclose(pi @ jac, 0.0, rtol=0, atol=1e-12, err_msg=msg)
        # Not because each outcome's gradient vanishes: only their expectation does.
        assert np.max(np.abs(jac)) > 1e-2, msg
        np.testing.assert_array_equal(_expected_loss_gradient(theta, ref, "k1", beta=beta),
                                      0.0, err_msg=msg)


def test_k1_reward_penalty_policy_gradient_is_forward_kl(rng):
    """k1 in the reward: sum_x pi(x) grad log pi(x) * (-penalty(x)) = -beta grad KL(pi || ref),
    and through `policy_loss` (advantages = -penalty, kl_estimator="k1") the expected loss
    gradient is +beta grad KL(pi || ref): descending the loss descends the forward KL."""
    with jax.enable_x64(True):
        k, theta, ref, msg = _categorical(rng)
        beta = float(rng.uniform(0.1, 2.0))
        msg += f", beta={beta}"
        logpi = jax.nn.log_softmax(jnp.asarray(theta))
        penalty = np.asarray(grpo.kl_reward_penalty(logpi[:, None], jnp.asarray(ref)[:, None],
                                                    jnp.ones((k, 1), bool), beta))
        chex.assert_shape(penalty, (k,))
        score = np.asarray(jax.jacobian(jax.nn.log_softmax)(jnp.asarray(theta)))  # [x, theta]
        pi = np.asarray(jax.nn.softmax(theta))
        got = (pi * -penalty) @ score
        grad_kl = np.asarray(jax.grad(_kl_forward)(jnp.asarray(theta), jnp.asarray(ref)))
        through_loss = _expected_loss_gradient(theta, ref, "k1", beta=beta,
                                               advantages=-penalty)
        grad_rev = np.asarray(jax.grad(_kl_reverse)(jnp.asarray(theta), jnp.asarray(ref)))
    np.testing.assert_allclose(got, -beta * grad_kl, rtol=0, atol=1e-6, err_msg=msg)
    np.testing.assert_allclose(through_loss, beta * grad_kl, rtol=0, atol=1e-6, err_msg=msg)
    assert np.max(np.abs(grad_kl - grad_rev)) > 1e-3, f"draw cannot tell the KLs apart: {msg}"


def test_kl_reward_penalty_sums_valid_tokens_and_jits(rng):
    logp, _, ref, _, mask = _inputs(rng)  # NaN garbage in the padding, an empty row
    beta = 0.07
    want = beta * np.where(mask, logp - ref, 0.0).sum(1)
    got = grpo.kl_reward_penalty(jnp.asarray(logp), jnp.asarray(ref), jnp.asarray(mask), beta)
    chex.assert_shape(got, (logp.shape[0],))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert float(got[0]) == 0.0
    jitted = jax.jit(grpo.kl_reward_penalty)(jnp.asarray(logp), jnp.asarray(ref),
                                             jnp.asarray(mask), jnp.float32(beta))
    np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-5, atol=1e-6)


def test_kl_reward_penalty_bad_input():
    lp = jnp.zeros((4, 5))
    mask = jnp.ones((4, 5), bool)
    with pytest.raises(ValueError, match=r"sample_logprobs must be \[N, T\]"):
        grpo.kl_reward_penalty(lp[0], lp[0], mask[0], 0.1)
    with pytest.raises(ValueError, match=r"ref_logprobs shape \(4, 6\) does not match"):
        grpo.kl_reward_penalty(lp, jnp.zeros((4, 6)), mask, 0.1)
    with pytest.raises(ValueError, match=r"mask shape \(3, 5\) does not match"):
        grpo.kl_reward_penalty(lp, lp, mask[:3], 0.1)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        grpo.kl_reward_penalty(lp, lp, mask, -0.1)


# ---------------------------------------------------------------------------
# group_advantages


def np_advantages(rewards, g, scale_by_std=True, eps=1e-6):
    r = np.asarray(rewards, np.float64).reshape(-1, g)
    out = r - r.mean(1, keepdims=True)
    if scale_by_std:
        out = out / (r.std(1, ddof=1, keepdims=True) + eps)
    out[np.ptp(r, axis=1) == 0] = 0.0
    return out.reshape(-1)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_advantages_match_numpy_and_zero_for_flat_groups(rng, scale_by_std):
    g = 4
    rewards = rng.standard_normal(5 * g) * 3
    rewards[4:8] = 0.1          # flat groups: exactly zero, not rounding noise / eps
    rewards[12:16] = -2.5
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rewards, jnp.float32), g,
                                           scale_by_std=scale_by_std))
    np.testing.assert_allclose(adv, np_advantages(rewards, g, scale_by_std), rtol=1e-4, atol=1e-5)
    assert np.all(adv[4:8] == 0) and np.all(adv[12:16] == 0)


def test_advantages_invariances(rng):
    g, groups = 6, 5
    rewards = rng.standard_normal(g * groups)
    shift = np.repeat(rng.standard_normal(groups) * 10, g)
    scale = np.repeat(rng.uniform(0.5, 10.0, groups), g)
    base = np.asarray(grpo.group_advantages(rewards, g))
    shifted = np.asarray(grpo.group_advantages(rewards + shift, g))
    scaled = np.asarray(grpo.group_advantages(rewards * scale, g))
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-4)
    # Without std scaling (Dr. GRPO): shift-invariant, and scaling scales the advantages.
    base = np.asarray(grpo.group_advantages(rewards, g, scale_by_std=False))
    np.testing.assert_allclose(
        np.asarray(grpo.group_advantages(rewards + shift, g, scale_by_std=False)), base,
        rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(grpo.group_advantages(rewards * scale, g, scale_by_std=False)), base * scale,
        rtol=1e-4, atol=1e-4)
    # Groups are independent and each sums to zero.
    np.testing.assert_allclose(
        np.asarray(grpo.group_advantages(rewards, g)).reshape(groups, g).sum(1), 0, atol=1e-5)


def test_advantages_jit(rng):
    rewards = jnp.asarray(rng.standard_normal(12), jnp.float32)
    jitted = jax.jit(grpo.group_advantages, static_argnums=1, static_argnames="scale_by_std")
    np.testing.assert_allclose(np.asarray(jitted(rewards, 4)),
                               np.asarray(grpo.group_advantages(rewards, 4)), rtol=1e-6,
                               atol=1e-6)


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="group_size=4 does not divide the batch of 6"):
        grpo.group_advantages(np.zeros(6), 4)
    with pytest.raises(ValueError, match=r"NaN or inf at rows \[2\]"):
        grpo.group_advantages(np.array([1.0, 2.0, np.nan, 0.0]), 2)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        grpo.group_advantages(np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        grpo.group_advantages(np.zeros(4), 0)


# ---------------------------------------------------------------------------
# per_token_logprobs


@pytest.fixture(scope="module")
def tiny_model():
    rng = np.random.default_rng()
    return TINY, random_params(TINY, rng), random_lora(TINY, LoraConfig(rank=4, alpha=8.0), rng)


def make_batch(rng, cfg, n=4, prompt_len=6, steps=7):
    """Left-padded prompts then right-padded completions; garbage ids in the padding."""
    tokens = rng.integers(0, cfg.vocab_size, (n, prompt_len + steps)).astype(np.int32)
    p_lens = rng.integers(1, prompt_len + 1, n)
    c_lens = rng.integers(0, steps + 1, n)
    c_lens[0] = steps
    idx = np.arange(prompt_len + steps)
    input_mask = ((idx[None] >= prompt_len - p_lens[:, None])
                  & (idx[None] < prompt_len + c_lens[:, None]))
    completion_mask = input_mask[:, prompt_len:]
    return jnp.asarray(tokens), jnp.asarray(input_mask), jnp.asarray(completion_mask)


def full_logits_reference(params, lw, tokens, input_mask, prompt_len, cfg, temperature=1.0):
    """log p and entropy from the whole [N, L, V] logits of gemma3.forward."""
    logits = _forward(params, tokens, gemma3.left_padded_positions(input_mask),
                            input_mask, cfg, lw)
    logits = np.asarray(logits, np.float64)[:, prompt_len - 1:-1] / temperature
    logits -= logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits).sum(-1, keepdims=True))
    logq = logits - logz
    targets = np.asarray(tokens)[:, prompt_len:]
    logp = np.take_along_axis(logq, targets[..., None], -1)[..., 0]
    return logp, -(np.exp(logq) * logq).sum(-1)


@pytest.mark.parametrize("chunk_size,temperature,use_lora", [(5, 1.0, True), (1000, 0.7, False)])
def test_per_token_logprobs_match_full_logits(rng, tiny_model, chunk_size, temperature, use_lora):
    cfg, params, lw = tiny_model
    lw = lw if use_lora else None
    tokens, input_mask, cmask = make_batch(rng, cfg)
    logp, ent = _logprobs(params, lw, tokens, input_mask, 6, cfg,
                                        chunk_size=chunk_size, temperature=temperature,
                                        return_entropy=True)
    want_logp, want_ent = full_logits_reference(params, lw, tokens, input_mask, 6, cfg,
                                                temperature)
    m = np.asarray(cmask)
    chex.assert_shape([logp, ent], m.shape)
    chex.assert_type([logp, ent], jnp.float32)
    chex.assert_tree_all_finite((logp, ent))
    np.testing.assert_allclose(np.asarray(logp)[m], want_logp[m], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[m], want_ent[m], rtol=1e-4, atol=1e-4)


def _arrays_in(jaxpr):
    """Every intermediate array shape in a closed jaxpr, sub-jaxprs (scan, remat) included."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(v.aval.shape)
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _arrays_in(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _arrays_in(sub)


def test_per_token_logprobs_never_materialises_full_logits(rng, tiny_model):
    """Forward and backward: no array holds more than `chunk` rows of vocabulary logits."""
    cfg, params, lw = tiny_model
    tokens, input_mask, cmask = make_batch(rng, cfg, n=4, prompt_len=6, steps=8)
    chunk = 4

    def loss(lw):
        logp = grpo.per_token_logprobs(params, lw, tokens, input_mask, 6, cfg, chunk_size=chunk)
        return jnp.sum(jnp.where(cmask, logp, 0.0))

    jaxpr = jax.make_jaxpr(jax.grad(loss))(lw).jaxpr
    v, d = cfg.vocab_size, cfg.embed_dim
    vocab_arrays = [s for s in _arrays_in(jaxpr)
                    if v in s and sorted(s) != sorted((v, d))]  # the embedding itself is fine
    assert vocab_arrays, "expected chunk logits in the jaxpr"
    too_big = [s for s in vocab_arrays if math.prod(s) > chunk * v]
    assert not too_big, f"arrays with more than {chunk} rows of logits: {too_big}"


def make_groups(rng, cfg, prompts=3, group=4, prompt_len=6, steps=9):
    """GRPO's layout: each prompt (its own left padding) repeated for `group`
    consecutive rows, each row its own completion (lengths 0..steps)."""
    tokens, input_mask, _ = make_batch(rng, cfg, n=prompts * group, prompt_len=prompt_len,
                                       steps=steps)
    tokens, input_mask = np.array(tokens), np.array(input_mask)
    for x in (tokens, input_mask):
        x[:, :prompt_len] = np.repeat(x[::group, :prompt_len], group, axis=0)
    input_mask[1, prompt_len:] = False  # an empty completion
    return jnp.asarray(tokens), jnp.asarray(input_mask), jnp.asarray(input_mask[:, prompt_len:])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_packing_equals_one_row_per_completion(rng, tiny_model, temperature):
    """group=G packs each prompt once with its G completions behind it: log-probs,
    entropies and gradients must equal the plain layout's (sequences of 15 tokens
    cross the tiny model's 4-token window, so the window sees the packed positions)."""
    cfg, params, lw = tiny_model
    group, prompt_len = 4, 6
    tokens, input_mask, cmask = make_groups(rng, cfg, group=group, prompt_len=prompt_len)
    weights = jnp.asarray(rng.standard_normal(cmask.shape), jnp.float32) * cmask
    m = np.asarray(cmask)

    def logprobs(params, lw, g):
        return grpo.per_token_logprobs(params, lw, tokens, input_mask, prompt_len, cfg,
                                       chunk_size=5, temperature=temperature,
                                       return_entropy=True, group=g)

    (packed, packed_ent), (plain, plain_ent) = logprobs(params, lw, group), logprobs(params, lw, 1)
    want, want_ent = full_logits_reference(params, lw, tokens, input_mask, prompt_len, cfg,
                                           temperature)
    # The random tiny model's log-probs reach -100, where an f32 ulp is 8e-6.
    np.testing.assert_allclose(np.asarray(packed)[m], np.asarray(plain)[m], rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(np.asarray(packed_ent)[m], np.asarray(plain_ent)[m], rtol=2e-6,
                               atol=2e-5)
    np.testing.assert_allclose(np.asarray(packed)[m], want[m], rtol=1e-4, atol=1e-4)

    def objective(params, lw, g):
        return jnp.sum(weights * logprobs(params, lw, g)[0])

    got = jax.jit(jax.grad(objective, argnums=(0, 1)), static_argnums=2)(params, lw, group)
    ref = jax.jit(jax.grad(objective, argnums=(0, 1)), static_argnums=2)(params, lw, 1)
    # f32 sums in another order (a prompt's cotangents arrive together, not per row).
    chex.assert_trees_all_close(got[1], ref[1], rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(got[0]["embed"], ref[0]["embed"], rtol=2e-4, atol=2e-5)
    assert float(jnp.max(jnp.abs(got[1].layers[0]["attn"]["q"]["b"]))) > 0


def test_pack_shared_prompt_layout():
    """Two groups of two: [pad, p, p | c c pad | c c c] with positions continuing the
    prompt."""
    tokens = jnp.asarray([[0, 5, 6, 7, 8, 0], [0, 5, 6, 9, 10, 11],
                          [4, 5, 6, 1, 0, 0], [4, 5, 6, 2, 3, 0]], jnp.int32)
    mask = tokens != 0
    packed, positions, pmask = grpo.pack_shared_prompt(tokens, mask, 3, 2)
    np.testing.assert_array_equal(packed, [[0, 5, 6, 7, 8, 0, 9, 10, 11],
                                           [4, 5, 6, 1, 0, 0, 2, 3, 0]])
    np.testing.assert_array_equal(positions, [[0, 0, 1, 2, 3, 4, 2, 3, 4],
                                              [0, 1, 2, 3, 4, 5, 3, 4, 5]])
    np.testing.assert_array_equal(pmask, packed != 0)
    np.testing.assert_array_equal(grpo._predicting_index(3, 3, 2), [2, 3, 4, 2, 6, 7])


def test_per_token_logprobs_bad_input(tiny_model):
    cfg, params, lw = tiny_model
    tokens = jnp.zeros((2, 8), jnp.int32)
    mask = jnp.ones((2, 8), bool)
    with pytest.raises(ValueError, match="must be the same"):
        grpo.per_token_logprobs(params, lw, tokens, mask[:, :7], 4, cfg)
    with pytest.raises(ValueError, match="prompt_len=8 must be in"):
        grpo.per_token_logprobs(params, lw, tokens, mask, 8, cfg)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        grpo.per_token_logprobs(params, lw, tokens, mask, 4, cfg, chunk_size=0)
    with pytest.raises(ValueError, match="group=3 must be positive and divide the 2 rows"):
        grpo.per_token_logprobs(params, lw, tokens, mask, 4, cfg, group=3)
    with pytest.raises(ValueError, match="positions cannot be given with group > 1"):
        grpo.per_token_logprobs(params, lw, tokens, mask, 4, cfg, group=2,
                                positions=gemma3.left_padded_positions(mask))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logprobs_gradient_matches_full_logits_autodiff(rng, tiny_model, temperature):
    """The hand-written chunk VJP against autodiff of log_softmax over the whole
    [N, L, V] logits: gradients with respect to LoRA, and to the embedding (the
    cotangent a run that trains the embedding would use)."""
    cfg, params, lw = tiny_model
    tokens, input_mask, cmask = make_batch(rng, cfg)
    weights = jnp.asarray(rng.standard_normal(cmask.shape), jnp.float32) * cmask

    def ours(params, lw):
        logp = grpo.per_token_logprobs(params, lw, tokens, input_mask, 6, cfg, chunk_size=5,
                                       temperature=temperature)
        return jnp.sum(weights * logp)

    def full(params, lw):
        logits = gemma3.forward(params, tokens, gemma3.left_padded_positions(input_mask),
                                input_mask, cfg, lw)[:, 5:-1] / temperature
        logq = jax.nn.log_softmax(logits, axis=-1)
        logp = jnp.take_along_axis(logq, tokens[:, 6:, None], axis=-1)[..., 0]
        return jnp.sum(weights * logp)

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, lw)
    want = jax.jit(jax.grad(full, argnums=(0, 1)))(params, lw)
    chex.assert_trees_all_close(got[1], want[1], rtol=2e-4, atol=2e-5)
    chex.assert_trees_all_close(got[0]["embed"], want[0]["embed"], rtol=2e-4, atol=2e-5)
    assert float(jnp.max(jnp.abs(got[1].layers[0]["attn"]["q"]["b"]))) > 0  # a gradient that can differ


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_chosen_logprobs_against_float64_at_any_logit_scale(rng, scale):
    """log softmax at the targets, the entropy and the gradient of their sum, against
    float64 NumPy, for logits of order 1 and of order 1000 (the shift must hold)."""
    logits = rng.normal(size=(3, 5, 97)) * scale
    targets = rng.integers(0, 97, size=(3, 5))
    shifted = logits / 0.7 - (logits / 0.7).max(-1, keepdims=True)
    logq = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want_logp = np.take_along_axis(logq, targets[..., None], -1)[..., 0]
    want_ent = -(np.exp(logq) * logq).sum(-1)
    # d sum(logp) / d logits = (onehot - softmax) / temperature
    want_grad = (np.eye(97)[targets] - np.exp(logq)) / 0.7

    def total(x):
        return jnp.sum(vocab_parallel.chosen_logprobs(x, jnp.asarray(targets), 0.7, False)[0])

    x = jnp.asarray(logits, jnp.float32)
    logp, ent = vocab_parallel.chosen_logprobs(x, jnp.asarray(targets), 0.7, True)
    np.testing.assert_allclose(np.asarray(logp), want_logp, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(ent), want_ent, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jax.grad(total)(x)), want_grad, atol=1e-5)
