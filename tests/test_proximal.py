"""Tests of the pure proximal-policy pieces: loglinear interpolation, EWMA, matched decay."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxrl_async import config as config_lib
from jaxrl_async.core.proximal import Route, ewma_update, loglinear_logp, matched_beta


def _logps(shape=(2, 5), seed=0):
    rng = np.random.default_rng(seed)
    return (-rng.exponential(1.0, shape)).astype(np.float32), (-rng.exponential(1.0, shape)).astype(
        np.float32
    )


class LoglinearTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_alpha_per_token(self):
        lp, beh = _logps()
        v_now = 10
        versions = np.array([[10, 9, 8, 5, -1], [0, 10, 9, 1, -1]], np.int32)
        out = self.variant(loglinear_logp)(lp, beh, versions, v_now)
        lag = v_now - versions
        alpha = np.where(
            (versions >= 0) & (lag > 0), np.clip((lag - 1) / np.maximum(lag, 1), 0, 1), 0
        )
        np.testing.assert_allclose(out, beh + alpha * (lp - beh), rtol=1e-6)
        # v_t = v_now and v_now - v_t = 1 both give the behaviour log-prob exactly.
        for b, t in [(0, 0), (0, 1), (1, 1), (1, 2), (0, 4), (1, 4)]:
            self.assertEqual(float(out[b, t]), float(beh[b, t]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_large_lag_approaches_current_policy(self):
        lp, beh = _logps()
        out = self.variant(loglinear_logp)(lp, beh, np.zeros(lp.shape, np.int32), 10_000)
        np.testing.assert_allclose(out, lp, atol=1e-3 * np.abs(lp - beh).max())

    @chex.variants(with_jit=True, without_jit=True)
    def test_no_gradient_to_logp_and_no_nan(self):
        lp, beh = _logps()
        versions = np.array([[3, 2, 0, -1, 4], [-1, -1, 1, 2, 3]], np.int32)
        lp = np.where(versions < 0, np.float32(-np.inf), lp)  # prompt tokens may hold anything
        grad = self.variant(jax.grad(lambda x: jnp.sum(loglinear_logp(x, beh, versions, 3))))(lp)
        np.testing.assert_array_equal(grad, 0.0)
        self.assertTrue(np.all(np.isfinite(loglinear_logp(lp, beh, versions, 3))))


class EwmaTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_first_update_copies_weights(self):
        params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
        zeros = jax.tree.map(jnp.zeros_like, params)
        ewma, count = self.variant(ewma_update)(zeros, params, 0.0, 0.9)
        chex.assert_trees_all_equal(ewma, params)
        chex.assert_trees_all_equal_dtypes(ewma, params)
        self.assertEqual(float(count), 1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_beta_tracks_and_constant_stays(self):
        update = self.variant(ewma_update)
        ewma, count = jnp.zeros(4), 0.0
        rng = np.random.default_rng(0)
        const = jnp.asarray(rng.normal(size=4), jnp.float32)
        tracked, tcount = jnp.zeros(4), 0.0
        for _ in range(5):
            p = jnp.asarray(rng.normal(size=4), jnp.float32)
            tracked, tcount = update(tracked, p, tcount, 0.0)
            np.testing.assert_array_equal(tracked, p)
            ewma, count = update(ewma, const, count, 0.9)
            np.testing.assert_allclose(ewma, const, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_closed_form_weighted_average(self):
        update = self.variant(ewma_update)
        rng = np.random.default_rng(1)
        beta = 0.8
        history = [rng.normal(size=(3, 2)) for _ in range(7)]
        ewma, count = {"p": jnp.zeros((3, 2))}, 0.0
        for k, p in enumerate(history, start=1):
            ewma, count = update(ewma, {"p": jnp.asarray(p, jnp.float32)}, count, beta)
            coeffs = beta ** np.arange(k - 1, -1, -1.0)  # beta^(k-i) for i = 1..k
            expected = sum(c * h for c, h in zip(coeffs, history)) / coeffs.sum()
            np.testing.assert_allclose(ewma["p"], expected, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(count, coeffs.sum(), rtol=1e-6)


@given(st.floats(0, 1e4), st.floats(0, 0.5), st.floats(0.5, 0.999))
def test_matched_beta_matches_staleness_within_bounds(s, beta_min, beta_max):
    beta = float(matched_beta(s, beta_min, beta_max))
    assert beta_min - 1e-6 <= beta <= beta_max + 1e-6
    if beta_min + 1e-3 < s / (1 + s) < beta_max - 1e-3:
        # The EWMA's average age beta / (1 - beta) is then the staleness itself.
        np.testing.assert_allclose(beta / (1 - beta), s, rtol=1e-3)


def test_matched_beta_is_jittable():
    np.testing.assert_allclose(jax.jit(matched_beta, static_argnums=(1, 2))(3.0, 0.0, 0.9), 0.75)
    assert float(matched_beta(-2.0, 0.0, 0.9)) == 0.0


@pytest.mark.parametrize("beta_min, beta_max", [(-0.1, 0.5), (0.6, 0.5), (0.0, 1.0), (0.2, 1.5)])
def test_matched_beta_validates_bounds(beta_min, beta_max):
    with pytest.raises(ValueError, match="0 <= beta_min <= beta_max < 1"):
        matched_beta(1.0, beta_min, beta_max)


# -- Route: the values of proximal.source ------------------------------------------------------


def test_route_values_are_the_config_choices():
    assert tuple(r.value for r in Route) == config_lib.CHOICES["proximal.source"]
    assert config_lib.base_config().proximal.source in config_lib.CHOICES["proximal.source"]
    # A str enum: config strings compare and look up directly.
    for r in Route:
        assert Route(r.value) is r and r == r.value
    with pytest.raises(ValueError):
        Route("snapshots")


# route: (exact, sampler_side, uses_ewma), from docs/design.md section 3.
ROUTE_PROPERTIES = {
    Route.SNAPSHOT: (True, False, False),
    Route.DEDICATED: (True, True, False),
    Route.INTERRUPT: (True, True, False),
    Route.RECOMPUTE: (False, False, False),
    Route.BYPASS: (False, False, False),
    Route.LOGLINEAR: (False, False, False),
    Route.EWMA: (False, False, True),
    Route.REVISED_EWMA: (False, False, True),
}


@pytest.mark.parametrize("route", list(Route))
def test_route_properties(route):
    assert route in ROUTE_PROPERTIES, f"new route {route!r}: add it to ROUTE_PROPERTIES"
    assert (route.exact, route.sampler_side, route.uses_ewma) == ROUTE_PROPERTIES[route]
