"""The policy loss of docs/design.md section 2: PPO clipping on the staleness term, truncated IS
and rejection masks on the discrepancy term, and its diagnostics.

Per generated token, with ``lp = log pi_theta``, ``prox = log pi_prox``, ``beh = log mu``::

    log_r = clip(lp - prox, -20, 20)   staleness term: PPO trust region (clipped)
    log_w = clip(prox - beh, -20, 20)  discrepancy term: a constant weight / mask

Given the exact ``old = log pi_old`` as well (the three-term form), ``prox`` is only the
PPO anchor and the ratio splits once more::

    log_r = clip(lp - prox, -20, 20)   PPO trust region (clipped)
    log_s = clip(prox - old, -20, 20)  staleness weight s: a constant weight / mask
    log_w = clip(old - beh, -20, 20)   discrepancy term: a constant weight / mask (numerics only)

Only ``lp`` carries gradient. Every function here is a pure function of arrays; the
config is a hashable frozen dataclass, so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

IS_MODES = ("none", "token", "sequence", "geometric")
SEQ_MASK_MODES = ("none", "sum", "geometric")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# Bound on every log-ratio: exp(20) ~ 5e8 is far beyond any sane IS weight, and the bound
# keeps exp() finite for tokens the sampler scored as (near) impossible.
LOG_W_CLAMP = 20.0
LOG_R_CLAMP = LOG_W_CLAMP  # the PPO log-ratio lp - prox: an unclamped extreme gives inf and a NaN gradient


def _choices(options: tuple[str, ...]) -> str:
    return ", ".join(repr(o) for o in options)


def _as_band(name: str, value) -> tuple[float, float]:
    """Validates a ``(lo, hi)`` band on a ratio (ratios are >= 0) and returns it as a tuple."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(
            f"LossConfig.{name} must be a (lo, hi) pair of numbers; got {value!r}"
        ) from None
    if not 0.0 <= lo <= hi:
        raise ValueError(
            f"LossConfig.{name} must satisfy 0 <= lo <= hi (a band on a ratio, not a log-ratio); "
            f"got {value!r}"
        )
    return (lo, hi)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static configuration of :func:`policy_loss` (hashable: usable as a static jit arg).

    Attributes:
      clip_low: PPO lower clip, the ratio is clipped at ``1 - clip_low``.
      clip_high: PPO upper clip, the ratio is clipped at ``1 + clip_high``.
      dual_clip: ``c > 1`` bounds the per-token loss by ``-c * A`` for ``A < 0``; None is off.
      is_mode: truncated-IS weight on the discrepancy term: 'none', 'token', 'sequence'
        (product of token ratios) or 'geometric' (geometric mean of token ratios).
      is_floor: lower truncation of the IS weight.
      is_cap: upper truncation of the IS weight.
      token_mask: ``(lo, hi)``: reject tokens whose discrepancy ratio lies outside; None is off.
      seq_mask_mode: sequence statistic for the sequence band: 'none', 'sum' (product of
        ratios) or 'geometric' (geometric mean of ratios).
      seq_mask: ``(lo, hi)`` band for the sequence statistic.
      catastrophic_thr: reject a whole sequence if any token ratio is below it; None is off.
      aggregation: 'token_mean', 'seq_mean_token_mean' or 'seq_mean_token_sum_norm'.
      norm_length: the constant length normaliser of 'seq_mean_token_sum_norm'.
      staleness_is_mode, staleness_is_floor, staleness_is_cap: the staleness weight
        ``s = pi_prox / pi_old`` of the three-term form (only used when ``old_logp`` is
        given): same modes and truncation as ``is_mode``, ``is_floor``, ``is_cap``.
      staleness_token_mask: ``(lo, hi)``: reject tokens whose staleness ratio lies outside;
        None is off (three-term form only).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    is_mode: str = "token"
    is_floor: float = 0.0
    is_cap: float = 2.0
    token_mask: tuple[float, float] | None = None
    seq_mask_mode: str = "none"
    seq_mask: tuple[float, float] = (0.0, math.inf)
    catastrophic_thr: float | None = None
    aggregation: str = "token_mean"
    norm_length: float | None = None
    staleness_is_mode: str = "token"
    staleness_is_floor: float = 0.0
    staleness_is_cap: float = 2.0
    staleness_token_mask: tuple[float, float] | None = None

    def __post_init__(self):
        for name, options in (
            ("is_mode", IS_MODES),
            ("staleness_is_mode", IS_MODES),
            ("seq_mask_mode", SEQ_MASK_MODES),
            ("aggregation", AGGREGATIONS),
        ):
            value = getattr(self, name)
            if value not in options:
                raise ValueError(
                    f"LossConfig.{name} must be one of {_choices(options)}; got {value!r}"
                )
        for name in ("clip_low", "clip_high"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LossConfig.{name} must be >= 0; got {getattr(self, name)!r}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(
                f"LossConfig.dual_clip must be None or a number > 1; got {self.dual_clip!r}"
            )
        for prefix in ("", "staleness_"):
            floor, cap = getattr(self, f"{prefix}is_floor"), getattr(self, f"{prefix}is_cap")
            if not floor >= 0:
                raise ValueError(f"LossConfig.{prefix}is_floor must be >= 0; got {floor!r}")
            if not cap >= floor:
                raise ValueError(
                    f"LossConfig.{prefix}is_cap must be >= {prefix}is_floor ({floor!r}); got {cap!r}"
                )
        # Lists are accepted for convenience, but stored as tuples to keep the config hashable.
        for name in ("token_mask", "staleness_token_mask"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _as_band(name, getattr(self, name)))
        object.__setattr__(self, "seq_mask", _as_band("seq_mask", self.seq_mask))
        if self.catastrophic_thr is not None and not self.catastrophic_thr > 0:
            raise ValueError(
                "LossConfig.catastrophic_thr must be None or a number > 0; "
                f"got {self.catastrophic_thr!r}"
            )
        if self.norm_length is not None and not self.norm_length > 0:
            raise ValueError(
                f"LossConfig.norm_length must be None or a number > 0; got {self.norm_length!r}"
            )
        if self.aggregation == "seq_mean_token_sum_norm" and self.norm_length is None:
            raise ValueError(
                "LossConfig.norm_length must be a number > 0 when aggregation is "
                "'seq_mean_token_sum_norm'; got None"
            )


class LossTerms(NamedTuple):
    """Per-token pieces of the loss; ``loss = numerator / denominator``.

    Numerator and denominator are both sums over the batch, so shards (or micro-batches)
    combine exactly: ``sum(numerators) / sum(denominators)`` is the full-batch loss.
    The ``[B, T]`` fields are what the metrics are computed from. The ``staleness_*`` and
    ``log_s`` fields are None in the two-term form (no ``old_logp``).
    """

    per_token: jax.Array  # [B, T] w * k * m * pg, the summand of the numerator
    numerator: jax.Array  # [] aggregation numerator
    denominator: jax.Array  # [] aggregation denominator (valid counts, before rejection)
    valid: jax.Array  # [B, T] bool, the loss mask m
    log_r: jax.Array  # [B, T] clipped lp - prox (stop-gradient), 0 where invalid
    log_w: jax.Array  # [B, T] clipped X - beh, 0 where invalid (X = prox, or old in the three-term form)
    weight: jax.Array  # [B, T] truncated IS weight w
    truncated: jax.Array  # [B, T] bool, floor or cap changed the raw weight
    keep_token: jax.Array  # [B, T] bool, token band keeps the token
    keep_seq: jax.Array  # [B] bool, sequence band keeps the sequence
    keep_catastrophic: jax.Array  # [B] bool, catastrophic rule keeps the sequence
    clip_low: jax.Array  # [B, T] bool, clipped branch active at 1 - clip_low
    clip_high: jax.Array  # [B, T] bool, clipped branch active at 1 + clip_high
    dual_clip: jax.Array  # [B, T] bool, dual clip active
    log_s: jax.Array | None = None  # [B, T] clipped prox - old, 0 where invalid
    staleness_weight: jax.Array | None = None  # [B, T] truncated staleness weight s
    staleness_truncated: jax.Array | None = None  # [B, T] bool, floor or cap changed the raw s
    keep_staleness: jax.Array | None = None  # [B, T] bool, staleness band keeps the token


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``x`` over entries where ``mask`` is true; 0 when the mask is empty.

    Args:
      x: any shape.
      mask: bool or 0/1, same shape as ``x``.
    """
    mask = jnp.asarray(mask).astype(bool)
    total = jnp.sum(jnp.where(mask, x, 0))
    return total / jnp.maximum(jnp.sum(mask), 1)


def _masked_max_nonneg(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Max of a non-negative ``x`` over ``mask``; 0 when the mask is empty."""
    return jnp.max(jnp.where(mask, x, 0), initial=0.0)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 where ``den == 0`` (no NaN, in values or in gradients)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def _in_band(x: jax.Array, band: tuple[float, float]) -> jax.Array:
    lo, hi = band
    return (x >= lo) & (x <= hi)


def _truncated_weight(log_ratio, valid, n_seq_tokens, mode, floor, cap):
    """``(weight, truncated)`` of a per-token log-ratio (0 where invalid) in IS mode ``mode``."""
    if mode == "none":
        return jnp.ones_like(log_ratio), jnp.zeros_like(valid)
    if mode == "token":
        raw = jnp.exp(log_ratio)
    else:
        seq_log = jnp.sum(log_ratio, axis=1)  # [B]
        if mode == "geometric":
            seq_log = seq_log / jnp.maximum(n_seq_tokens, 1)
        raw = jnp.broadcast_to(jnp.exp(seq_log)[:, None], log_ratio.shape)
    return jnp.clip(raw, floor, cap), (raw < floor) | (raw > cap)


def policy_loss_terms(
    logp: jax.Array,
    prox_logp: jax.Array,
    behav_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: LossConfig,
    old_logp: jax.Array | None = None,
) -> LossTerms:
    """The loss of docs/design.md section 2 as per-token terms plus aggregation numerator/denominator.

    Args:
      logp: ``[B, T]`` log pi_theta of the taken tokens (the only input with gradient).
      prox_logp: ``[B, T]`` log pi_prox, the PPO anchor (log pi_old under exact repairs in
        the two-term form).
      behav_logp: ``[B, T]`` log mu, logged by the sampler.
      advantages: ``[B, T]`` per-token advantages.
      mask: ``[B, T]`` bool or 0/1, generated (trainable) tokens.
      config: static :class:`LossConfig`.
      old_logp: optional ``[B, T]`` exact log pi_old of each token's sampling version
        (learner numerics). Given, the loss takes the three-term form: the staleness
        weight ``s = pi_prox / pi_old`` (``config.staleness_*``) and the discrepancy term on
        ``pi_old / mu``. None: the two-term form, unchanged.

    Returns:
      :class:`LossTerms`.
    """
    inputs = [logp, prox_logp, behav_logp, advantages, mask]
    if old_logp is not None:
        inputs.append(old_logp)
    inputs = [jnp.asarray(x) for x in inputs]
    chex.assert_rank(inputs, 2)
    chex.assert_equal_shape(inputs)
    logp, prox_logp, behav_logp, advantages, mask = inputs[:5]
    # Log-ratios are computed in at least float32: bf16 log-probs are too coarse for exp().
    dtype = jnp.promote_types(logp.dtype, jnp.float32)
    valid = mask.astype(bool)

    # Zero every input outside the mask first, so garbage in padding (even inf or NaN)
    # cannot reach the loss or the gradient through 0 * inf.
    def clean(x):
        return jnp.where(valid, x.astype(dtype), 0)

    lp = clean(logp)
    prox = jax.lax.stop_gradient(clean(prox_logp))
    beh = jax.lax.stop_gradient(clean(behav_logp))
    adv = jax.lax.stop_gradient(clean(advantages))
    m = valid.astype(dtype)
    n_seq_tokens = jnp.sum(m, axis=1)  # [B]
    has_tokens = n_seq_tokens > 0  # [B]

    log_r = jnp.clip(lp - prox, -LOG_R_CLAMP, LOG_R_CLAMP)
    if old_logp is None:
        old = prox  # two-term form: pi_prox is both the PPO anchor and pi_old
    else:
        # Three-term form: the discrepancy term sees pi_old / mu (numerics only); the
        # staleness pi_prox / pi_old between anchor and sampling version is its own weight.
        old = jax.lax.stop_gradient(clean(inputs[5]))
        log_s = jnp.clip(prox - old, -LOG_W_CLAMP, LOG_W_CLAMP)
        staleness_weight, staleness_truncated = _truncated_weight(
            log_s, valid, n_seq_tokens, config.staleness_is_mode,
            config.staleness_is_floor, config.staleness_is_cap)
        keep_staleness = (
            jnp.ones_like(valid)
            if config.staleness_token_mask is None
            else _in_band(jnp.exp(log_s), config.staleness_token_mask)
        )
    log_w = jnp.clip(old - beh, -LOG_W_CLAMP, LOG_W_CLAMP)
    token_ratio = jnp.exp(log_w)  # [B, T] pi_prox / mu (pi_old / mu) per token
    seq_log_sum = jnp.sum(log_w, axis=1)  # [B] (log_w is already 0 where invalid)
    seq_log_mean = seq_log_sum / jnp.maximum(n_seq_tokens, 1)

    # Discrepancy weight w: truncated IS, a constant w.r.t. the parameters.
    weight, truncated = _truncated_weight(
        log_w, valid, n_seq_tokens, config.is_mode, config.is_floor, config.is_cap)

    # Rejection masks k, one per rule, combined by AND.
    keep_token = (
        jnp.ones_like(valid)
        if config.token_mask is None
        else _in_band(token_ratio, config.token_mask)
    )
    if config.seq_mask_mode == "none":
        keep_seq = jnp.ones_like(has_tokens)
    else:
        seq_log = seq_log_sum if config.seq_mask_mode == "sum" else seq_log_mean
        keep_seq = _in_band(jnp.exp(seq_log), config.seq_mask)
    if config.catastrophic_thr is None:
        keep_catastrophic = jnp.ones_like(has_tokens)
    else:
        keep_catastrophic = ~jnp.any(valid & (token_ratio < config.catastrophic_thr), axis=1)
    keep = keep_token & (keep_seq & keep_catastrophic)[:, None]
    k = keep.astype(dtype)

    # PPO term on the staleness ratio, asymmetric clip, optional dual clip.
    ratio = jnp.exp(log_r)
    lower, upper = 1.0 - config.clip_low, 1.0 + config.clip_high
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, lower, upper) * adv
    pg = -jnp.minimum(unclipped, clipped)
    # The clipped branch wins (and kills the gradient) only on the side the advantage pushes.
    r_sg = jax.lax.stop_gradient(ratio)
    clip_low = valid & (adv < 0) & (r_sg < lower)
    clip_high = valid & (adv > 0) & (r_sg > upper)
    if config.dual_clip is None:
        dual_clip = jnp.zeros_like(valid)
    else:
        # For A < 0 the PPO term grows without bound in r; cap it at -c * A.
        bound = -config.dual_clip * adv
        dual_clip = valid & (adv < 0) & (jax.lax.stop_gradient(pg) > bound)
        pg = jnp.where(adv < 0, jnp.minimum(pg, bound), pg)

    if old_logp is None:
        per_token = jax.lax.stop_gradient(weight * k) * m * pg
    else:
        constant = weight * staleness_weight * k * keep_staleness.astype(dtype)
        per_token = jax.lax.stop_gradient(constant) * m * pg

    # Denominators count valid tokens before rejection: a rejected token contributes 0 to
    # the numerator but still counts, so rejection never inflates the other tokens' gradients.
    # Sequences without valid tokens (e.g. rows padding a batch) count nowhere.
    n_sequences = jnp.sum(has_tokens.astype(dtype))
    if config.aggregation == "token_mean":
        numerator = jnp.sum(per_token)
        denominator = jnp.sum(m)
    elif config.aggregation == "seq_mean_token_mean":
        numerator = jnp.sum(jnp.sum(per_token, axis=1) / jnp.maximum(n_seq_tokens, 1))
        denominator = n_sequences
    else:
        numerator = jnp.sum(per_token)
        denominator = n_sequences * config.norm_length

    return LossTerms(
        per_token=per_token,
        numerator=numerator,
        denominator=denominator,
        valid=valid,
        log_r=jax.lax.stop_gradient(log_r),
        log_w=log_w,
        weight=weight,
        truncated=truncated,
        keep_token=keep_token,
        keep_seq=keep_seq,
        keep_catastrophic=keep_catastrophic,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        **({} if old_logp is None else dict(
            log_s=log_s,
            staleness_weight=staleness_weight,
            staleness_truncated=staleness_truncated,
            keep_staleness=keep_staleness,
        )),
    )


def loss_metrics(terms: LossTerms) -> dict[str, jax.Array]:
    """Diagnostics over valid tokens (or sequences with >= 1 valid token), all float32 scalars.

    Each rejection fraction is measured on its own, before the masks are combined, so every
    rule stays visible even when another one already rejects the same tokens.

    The tokens were sampled by mu, so with ``X`` the log-prob the discrepancy term uses
    (``prox``, or ``old`` in the three-term form) ``mean(beh - X)`` and
    ``mean(exp(X - beh) - 1 - (X - beh))`` estimate ``KL(mu || pi_X)`` (both >= 0 in
    expectation). The three-term form adds the ``staleness/`` weight metrics.
    """
    valid = terms.valid
    n_valid = jnp.sum(valid)
    has_tokens = jnp.any(valid, axis=1)
    ratio = jnp.exp(terms.log_r)
    w = terms.weight
    log_w = terms.log_w  # X - beh, clamped
    sum_w = jnp.sum(jnp.where(valid, w, 0))
    sum_w2 = jnp.sum(jnp.where(valid, w * w, 0))
    keep = terms.keep_token & (terms.keep_seq & terms.keep_catastrophic)[:, None]
    if terms.keep_staleness is not None:
        keep = keep & terms.keep_staleness
    metrics = {
        "loss/policy": _safe_div(terms.numerator, terms.denominator),
        "ratio/clip_frac": masked_mean(terms.clip_low | terms.clip_high, valid),
        "ratio/clip_frac_low": masked_mean(terms.clip_low, valid),
        "ratio/clip_frac_high": masked_mean(terms.clip_high, valid),
        "ratio/dual_clip_frac": masked_mean(terms.dual_clip, valid),
        # Tokens that give no gradient at all: PPO-clipped, dual-clipped or rejected.
        "ratio/effective_clip_frac": masked_mean(
            terms.clip_low | terms.clip_high | terms.dual_clip | ~keep, valid),
        "ratio/mean": masked_mean(ratio, valid),
        "ratio/max": _masked_max_nonneg(ratio, valid),
        "is/weight_mean": masked_mean(w, valid),
        "is/weight_max": _masked_max_nonneg(w, valid),
        "is/truncated_frac": masked_mean(terms.truncated, valid),
        "is/ess": _safe_div(sum_w * sum_w, n_valid * sum_w2),
        "mismatch/kl_k1": masked_mean(-log_w, valid),
        "mismatch/kl_k3": masked_mean(jnp.exp(log_w) - 1 - log_w, valid),
        "mask/token_frac": masked_mean(~terms.keep_token, valid),
        "mask/seq_frac": masked_mean(~terms.keep_seq, has_tokens),
        "mask/catastrophic_frac": masked_mean(~terms.keep_catastrophic, has_tokens),
        "mask/kept_frac": masked_mean(keep, valid),
        "mask/valid_tokens": n_valid,
        "staleness/kl": masked_mean(0.5 * terms.log_r**2, valid),
    }
    if terms.log_s is not None:  # three-term form: the staleness weight s = pi_prox / pi_old
        s = terms.staleness_weight
        metrics.update({
            "staleness/is_weight_mean": masked_mean(s, valid),
            "staleness/is_weight_max": _masked_max_nonneg(s, valid),
            "staleness/is_truncated_frac": masked_mean(terms.staleness_truncated, valid),
            "staleness/mask_frac": masked_mean(~terms.keep_staleness, valid),
            "staleness/kl_k1": masked_mean(-terms.log_s, valid),  # mean(old - prox)
        })
    return {
        name: jax.lax.stop_gradient(value).astype(jnp.float32) for name, value in metrics.items()
    }


def policy_loss(
    logp: jax.Array,
    prox_logp: jax.Array,
    behav_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    config: LossConfig,
    old_logp: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Decoupled PPO loss with truncated IS and rejection masks (docs/design.md section 2);
    with ``old_logp``, the three-term form with its own staleness weight.

    Args:
      logp: ``[B, T]`` log pi_theta of the taken tokens (the only input with gradient).
      prox_logp: ``[B, T]`` log pi_prox.
      behav_logp: ``[B, T]`` log mu.
      advantages: ``[B, T]`` per-token advantages.
      mask: ``[B, T]`` bool or 0/1, generated (trainable) tokens.
      config: static :class:`LossConfig`.
      old_logp: optional ``[B, T]`` exact log pi_old: the three-term form (see
        :func:`policy_loss_terms`); None is the two-term form.

    Returns:
      ``(loss, metrics)``: the scalar loss (0 for a batch without valid tokens) and a flat
      dict of float32 scalars, see :func:`loss_metrics`.
    """
    terms = policy_loss_terms(logp, prox_logp, behav_logp, advantages, mask, config, old_logp)
    loss = _safe_div(terms.numerator, terms.denominator)
    return loss, loss_metrics(terms)
