"""Where ``prox = log pi_prox`` comes from: the routes and their pure math (docs/design.md section 3).

This module holds the `Route` enum (the values of `proximal.source`) and the pure pieces
of the approximate repairs: the loglinear interpolation of the proximal log-probability,
the bias-corrected EWMA of the learner's weights, and the staleness-matched EWMA decay of
the revised EWMA. The routes' system side lives above: `learner.route` (the learner's
routes, the snapshot recomputation), `rollout.sampler` and `runtime.scorer` (the
sampler-side exact routes).
"""

from __future__ import annotations

import enum

import chex
import jax
import jax.numpy as jnp


class Route(str, enum.Enum):  # noqa: UP042  (not StrEnum: that would change str(Route.X))
    """`proximal.source`: where `prox = log pi_prox` comes from (docs/design.md section 3).

    The exact routes give the true `pi_old` of each token's version and differ only in
    system cost; the approximate ones substitute something cheaper and entangle the
    staleness and discrepancy terms. A `str` enum, so `Route("snapshot") == "snapshot"`
    and config values compare and serialise as plain strings.
    """

    SNAPSHOT = "snapshot"  # exact: the learner recomputes each token's version from the ring buffer
    DEDICATED = "dedicated"  # exact: an old-log-prob scorer process beside the sampler
    INTERRUPT = "interrupt"  # exact: the sampler scores in-flight segments at each weight switch
    RECOMPUTE = "recompute"  # the learner's weights at the start of the step
    BYPASS = "bypass"  # the behaviour log-probs (no discrepancy correction left)
    LOGLINEAR = "loglinear"  # interpolated between behaviour and current inside the loss
    EWMA = "ewma"  # a forward pass with an EWMA of the learner's weights
    REVISED_EWMA = "revised_ewma"  # EWMA whose decay matches the measured staleness

    @property
    def exact(self) -> bool:
        return self in (Route.SNAPSHOT, Route.DEDICATED, Route.INTERRUPT)

    @property
    def sampler_side(self) -> bool:
        """Filled by the sampler side (`Trajectory.old_logp`), not by the learner."""
        return self in (Route.DEDICATED, Route.INTERRUPT)

    @property
    def uses_ewma(self) -> bool:
        """The train state carries an EWMA of the weights."""
        return self in (Route.EWMA, Route.REVISED_EWMA)


def loglinear_logp(logp, behav_logp, token_versions, current_version) -> jax.Array:
    """Loglinear proximal log-probability ``beh + alpha * (sg(lp) - beh)``.

    ``alpha = clip((v_now - 1 - v_t) / (v_now - v_t), 0, 1)`` per token, so a token
    sampled one version ago keeps its behaviour log-prob and a very stale token moves
    towards the current policy. ``alpha = 0`` where ``v_t >= v_now`` and for prompt and
    environment tokens (``v_t = -1``), which the loss masks anyway.

    Args:
      logp: ``[B, T]`` log pi_theta (no gradient flows through the result).
      behav_logp: ``[B, T]`` log mu.
      token_versions: ``[B, T]`` int, version each token was sampled at; -1 if not sampled.
      current_version: int scalar, the learner's version ``v_now``.

    Returns:
      ``[B, T]`` log pi_prox.
    """
    logp = jax.lax.stop_gradient(jnp.asarray(logp))
    behav_logp = jnp.asarray(behav_logp)
    token_versions = jnp.asarray(token_versions)
    chex.assert_equal_shape([logp, behav_logp, token_versions])
    lag = (jnp.asarray(current_version) - token_versions).astype(jnp.float32)
    sampled = (token_versions >= 0) & (lag > 0)
    # The safe denominator keeps 0/0 out of the untaken branch of the where.
    alpha = jnp.where(sampled, jnp.clip((lag - 1) / jnp.where(sampled, lag, 1), 0, 1), 0)
    # Where alpha == 0 return beh as is, so a non-finite lp there cannot leak in via 0 * inf.
    return jnp.where(alpha > 0, behav_logp + alpha * (logp - behav_logp), behav_logp)


def ewma_update(ewma_params, params, count, beta):
    """One bias-corrected EWMA step on the learner's weights (PPO-EWMA).

    ``n_new = beta * n + 1;  ewma = ewma * (beta * n / n_new) + params / n_new``, with
    ``n = 0`` initially, so the first update copies ``params`` and after k updates the EWMA
    is ``sum_i beta^(k-i) p_i / sum_i beta^(k-i)``.

    Args:
      ewma_params: pytree, the current EWMA (any finite values when ``count == 0``).
      params: pytree of the same structure, the freshly updated weights.
      count: scalar, the bias-correction normaliser ``n``.
      beta: scalar in ``[0, 1)``, the decay.

    Returns:
      ``(ewma_params, count)`` after the update; leaves keep their dtypes.
    """
    count = jnp.asarray(count, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    new_count = beta * count + 1
    keep, take = beta * count / new_count, 1 / new_count

    def update(avg, p):
        # Mix in at least float32, so low-precision leaves are rounded once, on the way out.
        dtype = jnp.promote_types(jnp.asarray(avg).dtype, jnp.float32)
        mixed = avg.astype(dtype) * keep + jnp.asarray(p).astype(dtype) * take
        return mixed.astype(jnp.asarray(avg).dtype)

    return jax.tree.map(update, ewma_params, params), new_count


def matched_beta(mean_staleness, beta_min: float, beta_max: float) -> jax.Array:
    """Revised-EWMA decay whose average age ``beta / (1 - beta)`` matches the staleness.

    Args:
      mean_staleness: scalar, mean token staleness ``s`` in optimizer steps (negative
        values are treated as 0).
      beta_min: lower bound on the decay, ``0 <= beta_min <= beta_max``.
      beta_max: upper bound on the decay, ``< 1`` (beta = 1 would never forget).

    Returns:
      float32 scalar ``clip(s / (1 + s), beta_min, beta_max)``.
    """
    if not 0.0 <= beta_min <= beta_max < 1.0:
        raise ValueError(
            "matched_beta needs 0 <= beta_min <= beta_max < 1; "
            f"got beta_min={beta_min!r}, beta_max={beta_max!r}"
        )
    s = jnp.maximum(jnp.asarray(mean_staleness, jnp.float32), 0.0)
    return jnp.clip(s / (1 + s), beta_min, beta_max)
