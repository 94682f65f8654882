"""Tests of group-relative and leave-one-out advantages and their per-token broadcast."""

import chex
import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxrl_async.core.advantages import broadcast_to_tokens, episode_advantages, group_relative, rloo

# Rewards [G, n] with n >= 2: binary successes are common, so they are drawn half the time.
rewards_strategy = st.tuples(st.integers(1, 4), st.integers(2, 6)).flatmap(
    lambda shape: st.one_of(
        hnp.arrays(np.float32, shape, elements=st.floats(-10, 10, width=32)),
        hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0])),
    )
)


@given(rewards_strategy)
def test_group_relative_is_zero_mean_unit_std(rewards):
    adv = np.asarray(group_relative(rewards), np.float64)
    chex.assert_shape(adv, rewards.shape)
    np.testing.assert_allclose(adv.mean(axis=1), 0.0, atol=1e-5)
    std = np.asarray(rewards, np.float64).std(axis=1)
    spread = std > 0.1  # eps only matters for (near-)constant groups
    np.testing.assert_allclose(adv.std(axis=1)[spread], 1.0, rtol=1e-3)


@given(rewards_strategy)
def test_group_relative_without_std_is_centered_rewards(rewards):
    adv = group_relative(rewards, normalize_std=False)
    expected = rewards.astype(np.float64) - rewards.astype(np.float64).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(adv, expected, atol=1e-5)


@pytest.mark.parametrize("fn", [group_relative, rloo])
def test_constant_groups_give_zero(fn):
    rewards = np.array([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.3, 0.7, 0.9]], np.float32)
    adv = np.asarray(fn(rewards))
    np.testing.assert_array_equal(adv[:2], 0.0)
    assert np.all(np.isfinite(adv)) and np.all(adv[2] != 0.0)


@given(rewards_strategy)
def test_rloo_matches_loop_reference(rewards):
    G, n = rewards.shape
    expected = np.zeros((G, n))
    for g in range(G):
        for i in range(n):
            others = [float(rewards[g, j]) for j in range(n) if j != i]
            expected[g, i] = float(rewards[g, i]) - sum(others) / len(others)
    np.testing.assert_allclose(rloo(rewards), expected, atol=1e-4)


def test_rloo_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples per group"):
        rloo(np.ones((3, 1)))


def test_integer_rewards_and_jit():
    rewards = np.array([[0, 1, 1, 0]])
    np.testing.assert_allclose(jax.jit(group_relative)(rewards), [[-1, 1, 1, -1]], rtol=1e-5)
    np.testing.assert_allclose(jax.jit(rloo)(rewards), [[-2 / 3, 2 / 3, 2 / 3, -2 / 3]], rtol=1e-6)


def test_broadcast_puts_advantages_on_generated_tokens_only():
    adv = np.array([0.5, -1.5, 2.0], np.float32)
    mask = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], bool)
    out = np.asarray(jax.jit(broadcast_to_tokens)(adv, mask))
    np.testing.assert_array_equal(out, np.where(mask, adv[:, None], 0.0))
    np.testing.assert_array_equal(broadcast_to_tokens(adv, mask.astype(np.int32)), out)


# -- episode_advantages: the host version over a flat batch with group ids -------------------


@pytest.mark.parametrize("estimator, normalize_std", [("grpo", True), ("grpo", False), ("rloo", True)])
@given(rewards=rewards_strategy)
def test_episode_advantages_match_the_grouped_estimators_in_group_order(estimator, normalize_std, rewards):
    G, n = rewards.shape
    ids = np.repeat(np.arange(G) * 7 + 3, n)  # in order, not 0..G-1: only equality of ids matters
    out = episode_advantages(rewards.reshape(-1), ids, estimator, normalize_std)
    if estimator == "grpo":
        expected = group_relative(rewards, normalize_std=normalize_std)
    else:
        expected = rloo(rewards)
    assert out.dtype == np.float32 and out.shape == (G * n,)
    np.testing.assert_allclose(out, np.asarray(expected).reshape(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@given(rewards=rewards_strategy, seed=st.integers(0, 2**16))
def test_episode_advantages_are_invariant_to_permuting_the_episodes(estimator, rewards, seed):
    G, n = rewards.shape
    flat, ids = rewards.reshape(-1), np.repeat(np.arange(G), n)
    base = episode_advantages(flat, ids, estimator)
    perm = np.random.default_rng(seed).permutation(G * n)
    shuffled = episode_advantages(flat[perm], ids[perm], estimator)
    # Each episode keeps its advantage wherever it sits in the batch, up to float32 rounding:
    # the group's sums run in another order, so the error scales with the rewards' magnitude
    # (and, for grpo, with 1 / the group's std).
    scale = 1.0 + float(np.abs(rewards).max())
    if estimator == "grpo":
        scale /= float(rewards.astype(np.float64).std(axis=1).min()) + 1e-6
    np.testing.assert_allclose(shuffled, base[perm], rtol=1e-5, atol=1e-5 * scale)


def test_episode_advantages_interleaved_groups_by_hand():
    # Groups a = {1, 0} and b = {5, 5, ...} interleaved: [a, b, a, b].
    # grpo: a: mean 0.5, std 0.5 -> +1, -1 (up to eps); b constant -> 0.
    out = episode_advantages([1.0, 5.0, 0.0, 5.0], ["a", "b", "a", "b"], "grpo")
    np.testing.assert_allclose(out, [1.0, 0.0, -1.0, 0.0], atol=1e-5)
    # rloo: a: 1 - 0 = 1, 0 - 1 = -1; b: 5 - 5 = 0.
    out = episode_advantages([1.0, 5.0, 0.0, 5.0], [0, 1, 0, 1], "rloo")
    np.testing.assert_allclose(out, [1.0, 0.0, -1.0, 0.0], atol=1e-6)


def test_episode_advantages_reject_unequal_groups_and_unknown_estimators():
    with pytest.raises(ValueError, match="same number of episodes"):
        episode_advantages([1.0, 0.0, 1.0], [0, 0, 1])
    with pytest.raises(ValueError, match="estimator"):
        episode_advantages([1.0, 0.0], [0, 0], "ppo")
    with pytest.raises(AssertionError):  # chex: rewards and ids of different lengths
        episode_advantages([1.0, 0.0, 1.0], [0, 0])


def test_episode_advantages_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="at least one episode"):
        episode_advantages([], [])
