"""Where ``prox = log pi_prox`` comes from (DESIGN section 1).

This module holds the list of routes, the exact snapshot recomputation of the old
log-probs from the parameter-version ring buffer, and the pure pieces of the approximate
repairs: the loglinear interpolation of the proximal log-probability, the bias-corrected
EWMA of the learner's weights, and the staleness-matched EWMA decay of the revised EWMA.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_async.old_logit import bucket

# `proximal.source` values. The exact routes produce the true pi_old of each token's
# version; they differ only in system cost.
EXACT_SOURCES = ("snapshot", "dedicated", "interrupt")
APPROX_SOURCES = ("recompute", "bypass", "loglinear", "ewma", "revised_ewma")
SOURCES = EXACT_SOURCES + APPROX_SOURCES


def snapshot_logp(logprob_fn: Callable, get_params: Callable, tokens: np.ndarray, versions: np.ndarray,
                  loss_mask: np.ndarray, missing: tuple = (KeyError,), row_multiple: int = 1):
    """Exact old log-probs from retained parameter versions (the `snapshot` route).

    For each version present among the generated tokens, one learner-numerics forward pass
    over only the rows that hold it (padded to a power-of-two row count, rounded up to a
    multiple of `row_multiple` so the rows split evenly over a device mesh), and a gather
    of the tokens of that version.

    Args:
      logprob_fn: `(params, tokens [b, T]) -> [b, T]` learner log-probs.
      get_params: `version -> params`; raises one of `missing` for a version no longer retained.
      tokens, versions: `[B, T]` int; loss_mask: `[B, T]` bool.
      row_multiple: padded row counts are multiples of this (the learner's device count, so
        each forward shards evenly over the mesh); B must be a multiple of it.

    Returns:
      (old_logp `[B, T]` float32 (0 off the mask and on rows with a missing version),
       missing_rows `[B]` bool: rows holding a token of a version no longer retained,
       forward_passes: int, rows_scored: int).
    """
    b = tokens.shape[0]
    old = np.zeros(tokens.shape, np.float32)
    missing_rows = np.zeros(b, bool)
    passes = rows_scored = 0
    for v in np.unique(versions[loss_mask]):
        rows = np.flatnonzero(((versions == v) & loss_mask).any(axis=1))
        try:
            params = get_params(int(v))
        except missing:
            missing_rows[rows] = True
            continue
        # Power-of-two row counts (at most B): a few shapes, so a few compilations.
        n = min(-(-bucket(len(rows)) // row_multiple) * row_multiple, b)
        padded = np.concatenate([rows, np.repeat(rows[:1], n - len(rows))])
        lp = np.asarray(logprob_fn(params, jnp.asarray(tokens[padded])))[: len(rows)]
        sel = (versions[rows] == v) & loss_mask[rows]
        block = old[rows]
        block[sel] = lp[sel]
        old[rows] = block
        passes += 1
        rows_scored += len(padded)
    old[missing_rows] = 0.0
    return old, missing_rows, passes, rows_scored


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
