"""Tests of the policy loss (docs/design.md section 2): properties, and a float64 NumPy reference."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_async.core.losses import (
    AGGREGATIONS,
    IS_MODES,
    SEQ_MASK_MODES,
    LossConfig,
    masked_mean,
    policy_loss,
    policy_loss_terms,
)

METRIC_KEYS = {
    "loss/policy",
    "ratio/clip_frac",
    "ratio/clip_frac_low",
    "ratio/clip_frac_high",
    "ratio/dual_clip_frac",
    "ratio/effective_clip_frac",
    "ratio/mean",
    "ratio/max",
    "is/weight_mean",
    "is/weight_max",
    "is/truncated_frac",
    "is/ess",
    "mismatch/kl_k1",
    "mismatch/kl_k3",
    "mask/token_frac",
    "mask/seq_frac",
    "mask/catastrophic_frac",
    "mask/kept_frac",
    "mask/valid_tokens",
    "staleness/kl",
}
# The three-term form (old_logp given) adds the staleness weight's metrics.
STALENESS_KEYS = {
    "staleness/is_weight_mean",
    "staleness/is_weight_max",
    "staleness/is_truncated_frac",
    "staleness/mask_frac",
    "staleness/kl_k1",
}

# Every rule switched on, with sequence-level weights and per-sequence aggregation.
ALL_ON = LossConfig(
    dual_clip=3.0,
    is_mode="sequence",
    token_mask=(0.5, 2.0),
    seq_mask_mode="geometric",
    seq_mask=(0.5, 2.0),
    catastrophic_thr=0.05,
    aggregation="seq_mean_token_mean",
)
TOKEN_RULES = LossConfig(
    dual_clip=3.0, token_mask=(0.5, 2.0), seq_mask_mode="sum", seq_mask=(0.1, 10.0)
)


def loss_and_grad(logp, prox_logp, behav_logp, advantages, mask, config, old_logp=None):
    """``(loss, metrics, d loss / d logp)``; module level so jit caches are shared."""
    (loss, metrics), grad = jax.value_and_grad(policy_loss, has_aux=True)(
        logp, prox_logp, behav_logp, advantages, mask, config, old_logp
    )
    return loss, metrics, grad


def random_batch(seed, shape=(4, 6), log_r_scale=0.3, log_w_scale=0.4):
    """``(lp, prox, beh, adv, mask)`` float32 ``[B, T]`` with a random loss mask."""
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, shape)
    prox = lp - rng.normal(0, log_r_scale, shape)
    beh = prox - rng.normal(0, log_w_scale, shape)
    adv = rng.normal(0, 1, shape)
    mask = rng.random(shape) < 0.7
    mask[:, 0] = True  # every sequence has a valid token
    return tuple(np.asarray(x, np.float32) for x in (lp, prox, beh, adv)) + (mask,)


class PolicyLossPropertiesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_on_policy_reduces_to_reinforce(self):
        lp, _, _, adv, mask = random_batch(0)
        loss, metrics, grad = self.variant(loss_and_grad, static_argnames="config")(
            lp, lp, lp, adv, mask, LossConfig()
        )
        n = mask.sum()
        np.testing.assert_allclose(loss, -(adv * mask).sum() / n, rtol=1e-6)
        np.testing.assert_allclose(grad, -adv * mask / n, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(metrics["is/ess"], 1.0, rtol=1e-6)
        self.assertEqual(float(metrics["ratio/clip_frac"]), 0.0)
        self.assertEqual(float(metrics["mask/kept_frac"]), 1.0)
        self.assertEqual(set(metrics), METRIC_KEYS)
        for value in metrics.values():
            self.assertEqual(value.shape, ())
            self.assertEqual(value.dtype, jnp.float32)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("all_on", ALL_ON), ("token_rules", TOKEN_RULES))
    def test_gradient_flows_only_through_logp(self, config):
        lp, prox, beh, adv, mask = random_batch(1, log_r_scale=1.0)

        def loss(*args):
            return policy_loss(*args, mask, config)[0]

        grads = self.variant(jax.grad(loss, argnums=(0, 1, 2, 3)))(lp, prox, beh, adv)
        self.assertGreater(float(jnp.abs(grads[0]).sum()), 0.0)
        for grad in grads[1:]:
            np.testing.assert_array_equal(grad, 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("all_on", ALL_ON), ("token_rules", TOKEN_RULES))
    def test_masked_tokens_and_padding_change_nothing(self, config):
        lp, prox, beh, adv, mask = random_batch(2)
        fn = self.variant(loss_and_grad, static_argnames="config")
        loss, metrics, grad = fn(lp, prox, beh, adv, mask, config)

        # Garbage under the mask (non-finite included), plus three padding columns of it.
        garbage = np.array([np.nan, np.inf, -np.inf, 1e30], np.float32)

        def spoil(x, offset):
            x = x.copy()
            x[~mask] = np.resize(np.roll(garbage, offset), (~mask).sum())
            pad = np.resize(np.roll(garbage, offset + 1), (x.shape[0], 3))
            return np.concatenate([x, pad], axis=1)

        padded_mask = np.concatenate([mask, np.zeros((mask.shape[0], 3), bool)], axis=1)
        spoiled = [spoil(x, i) for i, x in enumerate((lp, prox, beh, adv))]
        loss2, metrics2, grad2 = fn(*spoiled, padded_mask, config)
        np.testing.assert_allclose(loss2, loss, rtol=1e-6)
        np.testing.assert_allclose(grad2[:, : lp.shape[1]], grad, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(grad2[~padded_mask], 0.0)
        for key in METRIC_KEYS:
            np.testing.assert_allclose(metrics2[key], metrics[key], rtol=1e-6, err_msg=key)

    def test_no_is_weight_means_weight_one(self):
        # is_mode='none' is w = 1 whatever floor and cap say (here a cap below 1).
        lp, prox, beh, adv, mask = random_batch(10)
        _, metrics = policy_loss(
            lp, prox, beh, adv, mask, LossConfig(is_mode="none", is_floor=0.2, is_cap=0.5)
        )
        self.assertEqual(float(metrics["is/weight_mean"]), 1.0)
        self.assertEqual(float(metrics["is/truncated_frac"]), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_float_mask_equals_bool_mask(self):
        lp, prox, beh, adv, mask = random_batch(3)
        fn = self.variant(policy_loss, static_argnames="config")
        loss, _ = fn(lp, prox, beh, adv, mask, ALL_ON)
        loss_float, _ = fn(lp, prox, beh, adv, mask.astype(np.float32), ALL_ON)
        np.testing.assert_allclose(loss_float, loss, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("sequence", "geometric")
    def test_sequence_weights_constant_along_sequence(self, is_mode):
        lp, prox, beh, adv, mask = random_batch(4, log_w_scale=0.2)
        config = LossConfig(is_mode=is_mode, is_cap=1e6)
        terms = self.variant(policy_loss_terms, static_argnames="config")(
            lp, prox, beh, adv, mask, config
        )
        for b in range(mask.shape[0]):
            log_w = (prox - beh)[b, mask[b]].astype(np.float64)
            expected = np.exp(log_w.sum() if is_mode == "sequence" else log_w.mean())
            np.testing.assert_allclose(terms.weight[b][mask[b]], expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        # Row 0 has one token with ratio 0.01 < 0.05: the whole row goes.
        (
            "catastrophic",
            LossConfig(catastrophic_thr=0.05),
            [np.log(0.01)] + [0.0] * 5,
            "mask/catastrophic_frac",
        ),
        # Row 0 has token ratios e^0.4, each harmless, whose product e^2.4 leaves the band.
        (
            "sequence_band",
            LossConfig(seq_mask_mode="sum", seq_mask=(0.2, 5.0)),
            [0.4] * 6,
            "mask/seq_frac",
        ),
    )
    def test_sequence_rules_drop_whole_sequences(self, config, row0_log_w, metric):
        prox, _, _, adv, _ = random_batch(5, shape=(2, 6))
        lp = prox  # ratio 1: no PPO clipping, so every kept token has a gradient
        log_w = np.array([row0_log_w, [0.1, -0.1, 0.0, 0.2, 0.0, -0.2]], np.float32)
        beh = prox - log_w
        mask = np.ones((2, 6), bool)
        terms = self.variant(policy_loss_terms, static_argnames="config")(
            lp, prox, beh, adv, mask, config
        )
        _, metrics, grad = self.variant(loss_and_grad, static_argnames="config")(
            lp, prox, beh, adv, mask, config
        )
        np.testing.assert_array_equal(terms.per_token[0], 0.0)
        np.testing.assert_array_equal(grad[0], 0.0)
        self.assertTrue(np.all(np.asarray(grad[1]) != 0.0))
        self.assertEqual(float(metrics[metric]), 0.5)
        self.assertEqual(float(metrics["mask/kept_frac"]), 0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dual_clip_bounds_negative_advantage_loss(self):
        c = 3.0
        log_r = np.linspace(-1.0, 4.0, 12, dtype=np.float32).reshape(2, 6)
        lp = np.full((2, 6), -1.0, np.float32)
        prox = lp - log_r
        adv = np.full((2, 6), -0.7, np.float32)
        mask = np.ones((2, 6), bool)
        config = LossConfig(dual_clip=c)
        terms = self.variant(policy_loss_terms, static_argnames="config")(
            lp, prox, prox, adv, mask, config
        )
        _, metrics, grad = self.variant(loss_and_grad, static_argnames="config")(
            lp, prox, prox, adv, mask, config
        )
        bound = -c * adv
        ratio = np.exp(log_r.astype(np.float64))
        self.assertTrue(np.all(np.asarray(terms.per_token) <= bound + 1e-6))
        dual = ratio > c
        np.testing.assert_allclose(np.asarray(terms.per_token)[dual], bound[dual], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(grad)[dual], 0.0)
        self.assertTrue(np.all(np.asarray(grad)[~dual & (ratio > 1 - config.clip_low)] != 0.0))
        np.testing.assert_allclose(metrics["ratio/dual_clip_frac"], dual.mean(), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rejection_keeps_the_denominator(self):
        lp, prox, beh, adv, mask = random_batch(6, log_w_scale=1.0)
        band = LossConfig(token_mask=(0.5, 2.0))
        fn = self.variant(loss_and_grad, static_argnames="config")
        loss, metrics, grad = fn(lp, prox, beh, adv, mask, band)
        ratio = np.exp(prox.astype(np.float64) - beh)
        kept = mask & (ratio >= 0.5) & (ratio <= 2.0)
        self.assertTrue(0 < kept.sum() < mask.sum())  # the band does reject something
        # A rejected token must count like a token with zero advantage: same denominator.
        loss_zeroed, _, grad_zeroed = fn(lp, prox, beh, np.where(kept, adv, 0), mask, LossConfig())
        np.testing.assert_allclose(loss, loss_zeroed, rtol=1e-6)
        np.testing.assert_allclose(grad, grad_zeroed, rtol=1e-6, atol=1e-9)
        terms = policy_loss_terms(lp, prox, beh, adv, mask, band)
        np.testing.assert_allclose(
            loss, np.asarray(terms.per_token)[kept].sum() / mask.sum(), rtol=1e-6
        )
        np.testing.assert_allclose(
            metrics["mask/token_frac"], 1 - kept.sum() / mask.sum(), rtol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*AGGREGATIONS)
    def test_split_batch_combines_to_full_batch(self, aggregation):
        lp, prox, beh, adv, mask = random_batch(7)
        mask[3] = False  # an empty sequence, in the second half
        config = LossConfig(aggregation=aggregation, norm_length=8)
        terms_fn = self.variant(policy_loss_terms, static_argnames="config")
        full, _ = policy_loss(lp, prox, beh, adv, mask, config)
        halves = [
            terms_fn(*(x[rows] for x in (lp, prox, beh, adv, mask)), config)
            for rows in (slice(0, 2), slice(2, 4))
        ]
        numerator = sum(h.numerator for h in halves)
        denominator = sum(h.denominator for h in halves)
        np.testing.assert_allclose(numerator / denominator, full, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_extreme_discrepancy_is_clamped(self):
        lp, prox, _, adv, mask = random_batch(8)
        offsets = np.resize(np.array([1e4, -1e4, 30.0, -30.0, np.inf], np.float32), lp.shape)
        beh = prox - offsets  # prox - beh = offsets, -inf behaviour log-probs included
        for config in (LossConfig(), ALL_ON):
            loss, metrics, grad = self.variant(loss_and_grad, static_argnames="config")(
                lp, prox, beh, adv, mask, config
            )
            self.assertTrue(np.isfinite(loss))
            self.assertTrue(np.all(np.isfinite(grad)))
            for key, value in metrics.items():
                self.assertTrue(np.isfinite(value), key)
        terms = self.variant(policy_loss_terms, static_argnames="config")(
            lp, prox, beh, adv, mask, LossConfig()
        )
        np.testing.assert_array_equal(
            np.asarray(terms.log_w)[mask], np.clip(offsets, -20, 20)[mask]
        )
        np.testing.assert_array_equal(np.asarray(terms.weight)[mask & (offsets > 0)], 2.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_batch_is_zero_not_nan(self):
        # Every denominator is 0 here; the reference test also meets empty batches and rows.
        lp, prox, beh, adv, _ = random_batch(9)
        mask = np.zeros(lp.shape, bool)
        loss, metrics, grad = self.variant(loss_and_grad, static_argnames="config")(
            lp, prox, beh, adv, mask, ALL_ON
        )
        self.assertEqual(float(loss), 0.0)
        np.testing.assert_array_equal(grad, 0.0)
        for key, value in metrics.items():
            self.assertEqual(float(value), 0.0, key)


# ---------------------------------------------------------------------------------------
# Float64 reference: loops over sequences and tokens, straight from docs/design.md section 2.


def _reference_weight(mode, log_ratio, seq_sum, seq_mean, floor, cap):
    """``(raw, w)`` of one token: the truncated IS weight of docs/design.md section 2."""
    if mode == "none":
        return 1.0, 1.0  # no truncation either
    raw = {"token": math.exp(log_ratio), "sequence": math.exp(seq_sum),
           "geometric": math.exp(seq_mean)}[mode]
    return raw, min(max(raw, floor), cap)


def reference_policy_loss(lp, prox, beh, adv, mask, cfg, old=None):
    """Returns ``(loss, metrics, d loss / d lp)``; the gradient from the active branch.

    With ``old`` the three-term form: ``w`` and its masks on ``old - beh``, the staleness
    weight ``s`` and its band on ``prox - old``.
    """
    three_term = old is not None
    if old is None:
        old = prox
    lp, prox, beh, adv, old = (np.asarray(x, np.float64) for x in (lp, prox, beh, adv, old))
    mask = np.asarray(mask, bool)
    B, T = lp.shape
    lower, upper = 1 - cfg.clip_low, 1 + cfg.clip_high
    per_token = np.zeros((B, T))
    dper_token = np.zeros((B, T))  # d per_token / d lp, same position
    stats = {
        k: [] for k in ("r", "w", "trunc", "lw", "clip_low", "clip_high", "dual", "tok_rej", "kept", "cut",
                        "s", "s_trunc", "s_rej", "ls")
    }
    seq_rejected, cat_rejected, n_tokens = [], [], np.zeros(B)
    for b in range(B):
        toks = [t for t in range(T) if mask[b, t]]
        if not toks:
            continue
        n_tokens[b] = len(toks)
        log_ws = {t: min(max(old[b, t] - beh[b, t], -20.0), 20.0) for t in toks}
        seq_sum = sum(log_ws.values())
        seq_mean = seq_sum / len(toks)
        log_ss = {t: min(max(prox[b, t] - old[b, t], -20.0), 20.0) for t in toks}
        s_sum = sum(log_ss.values())
        s_mean = s_sum / len(toks)
        keep_seq = True
        if cfg.seq_mask_mode != "none":
            s = math.exp(seq_sum if cfg.seq_mask_mode == "sum" else seq_mean)
            keep_seq = cfg.seq_mask[0] <= s <= cfg.seq_mask[1]
        keep_cat = cfg.catastrophic_thr is None or all(
            math.exp(v) >= cfg.catastrophic_thr for v in log_ws.values()
        )
        seq_rejected.append(not keep_seq)
        cat_rejected.append(not keep_cat)
        for t in toks:
            lw = log_ws[t]
            raw, w = _reference_weight(cfg.is_mode, lw, seq_sum, seq_mean, cfg.is_floor, cfg.is_cap)
            keep_tok = (
                cfg.token_mask is None or cfg.token_mask[0] <= math.exp(lw) <= cfg.token_mask[1]
            )
            ls = log_ss[t]
            s_raw, s = 1.0, 1.0
            keep_s = True
            if three_term:
                s_raw, s = _reference_weight(cfg.staleness_is_mode, ls, s_sum, s_mean,
                                             cfg.staleness_is_floor, cfg.staleness_is_cap)
                band = cfg.staleness_token_mask
                keep_s = band is None or band[0] <= math.exp(ls) <= band[1]
            k = float(keep_tok and keep_seq and keep_cat and keep_s)
            log_r = lp[b, t] - prox[b, t]
            r, a = math.exp(min(max(log_r, -20.0), 20.0)), adv[b, t]
            dr = r if abs(log_r) < 20 else 0.0  # d r / d lp: the clamp cuts the gradient
            pg = -min(r * a, min(max(r, lower), upper) * a)
            c_low, c_high = a < 0 and r < lower, a > 0 and r > upper
            dpg = 0.0 if (c_low or c_high) else -a * dr
            dual = cfg.dual_clip is not None and a < 0 and pg > -cfg.dual_clip * a
            if dual:
                pg, dpg = -cfg.dual_clip * a, 0.0
            per_token[b, t] = w * s * k * pg
            dper_token[b, t] = w * s * k * dpg
            truncated = raw != w
            for key, value in zip(
                stats, (r, w, truncated, lw, c_low, c_high, dual, not keep_tok, k,
                        c_low or c_high or dual or k == 0, s, s_raw != s, not keep_s, ls)
            ):
                stats[key].append(float(value))
    n_seq = len(seq_rejected)
    if cfg.aggregation == "token_mean":
        scale = np.full(B, 1 / max(n_tokens.sum(), 1))
    elif cfg.aggregation == "seq_mean_token_mean":
        scale = 1 / (np.maximum(n_tokens, 1) * max(n_seq, 1))
    else:
        scale = np.full(B, 1 / max(n_seq * cfg.norm_length, 1e-30))
    loss = float((per_token * scale[:, None]).sum())
    grad = dper_token * scale[:, None]

    def mean(values):
        return float(np.mean(values)) if len(values) else 0.0

    w = np.array(stats["w"])
    lw = np.array(stats["lw"])
    metrics = {
        "loss/policy": loss,
        "ratio/clip_frac": mean(np.array(stats["clip_low"]) + np.array(stats["clip_high"])),
        "ratio/clip_frac_low": mean(stats["clip_low"]),
        "ratio/clip_frac_high": mean(stats["clip_high"]),
        "ratio/dual_clip_frac": mean(stats["dual"]),
        "ratio/effective_clip_frac": mean(stats["cut"]),
        "ratio/mean": mean(stats["r"]),
        "ratio/max": max(stats["r"], default=0.0),
        "is/weight_mean": mean(w),
        "is/weight_max": max(w, default=0.0),
        "is/truncated_frac": mean(stats["trunc"]),
        "is/ess": (
            float(w.sum() ** 2 / (len(w) * (w**2).sum())) if len(w) and (w**2).sum() > 0 else 0.0
        ),
        # Tokens sampled by mu: estimators of KL(mu || pi_X), X = prox (old in the three-term form).
        "mismatch/kl_k1": mean(-lw),  # mean(beh - X)
        "mismatch/kl_k3": mean(np.exp(lw) - 1 - lw),  # mean(exp(X - beh) - 1 - (X - beh))
        "mask/token_frac": mean(stats["tok_rej"]),
        "mask/seq_frac": mean(seq_rejected),
        "mask/catastrophic_frac": mean(cat_rejected),
        "mask/kept_frac": mean(stats["kept"]),
        "mask/valid_tokens": float(n_tokens.sum()),
        "staleness/kl": mean([0.5 * math.log(r) ** 2 for r in stats["r"]]),
    }
    if three_term:
        metrics.update({
            "staleness/is_weight_mean": mean(stats["s"]),
            "staleness/is_weight_max": max(stats["s"], default=0.0),
            "staleness/is_truncated_frac": mean(stats["s_trunc"]),
            "staleness/mask_frac": mean(stats["s_rej"]),
            "staleness/kl_k1": mean(-np.array(stats["ls"])),  # mean(old - prox)
        })
    return loss, metrics, grad


def pairwise_configs():
    """A small set of configs in which every pair of values of any two factors occurs.

    Greedy all-pairs design: one jit compile per config keeps the reference test fast while
    still exercising every mode next to every other mode.
    """
    factors = {
        "is_mode": IS_MODES,
        "seq_mask_mode": SEQ_MASK_MODES,
        "aggregation": AGGREGATIONS,
        "token_mask": (None, (0.5, 2.0)),
        "dual_clip": (None, 3.0),
        "catastrophic_thr": (None, 0.1),
        "clip": ((0.2, 0.2), (0.1, 0.28)),
        "is_bounds": ((0.0, 2.0), (0.5, 5.0)),
    }
    names = list(factors)
    candidates = list(itertools.product(*(range(len(v)) for v in factors.values())))
    index_pairs = list(itertools.combinations(range(len(names)), 2))
    uncovered = {
        (i, j, a, b)
        for i, j in index_pairs
        for a in range(len(factors[names[i]]))
        for b in range(len(factors[names[j]]))
    }
    rows = []
    while uncovered:
        row = max(
            candidates, key=lambda c: sum((i, j, c[i], c[j]) in uncovered for i, j in index_pairs)
        )
        uncovered -= {(i, j, row[i], row[j]) for i, j in index_pairs}
        rows.append(row)
    configs = []
    for row in rows:
        v = {name: factors[name][idx] for name, idx in zip(names, row)}
        configs.append(
            LossConfig(
                clip_low=v["clip"][0],
                clip_high=v["clip"][1],
                dual_clip=v["dual_clip"],
                is_mode=v["is_mode"],
                is_floor=v["is_bounds"][0],
                is_cap=v["is_bounds"][1],
                token_mask=v["token_mask"],
                seq_mask_mode=v["seq_mask_mode"],
                seq_mask=(0.25, 4.0),
                catastrophic_thr=v["catastrophic_thr"],
                aggregation=v["aggregation"],
                norm_length=8.0,
            )
        )
    return configs


REFERENCE_CONFIGS = pairwise_configs()
REF_SHAPE = (4, 7)


def near_a_kink(lp, prox, beh, adv, mask, cfg, margin=1e-3):
    """True if any valid quantity is within ``margin`` (in log space) of a threshold.

    At a threshold a float32 and a float64 computation may take different branches, so
    generated cases stay away from all of them.
    """
    lp, prox, beh = (np.asarray(x, np.float64) for x in (lp, prox, beh))
    log_r = (lp - prox)[mask]
    log_w = np.clip(prox - beh, -20, 20)
    log_w_valid = log_w[mask]
    n = mask.sum(axis=1)
    seq_sum = np.where(mask, log_w, 0).sum(axis=1)[n > 0]
    seq_mean = seq_sum / n[n > 0]

    def close(values, edges):
        edges = [math.log(e) for e in edges if e is not None and 0 < e < math.inf]
        return any(np.any(np.abs(values - e) < margin) for e in edges)

    seq_stat = {"sum": seq_sum, "geometric": seq_mean, "none": np.zeros(0)}
    weight_stat = {
        "none": np.zeros(0),
        "token": log_w_valid,
        "sequence": seq_sum,
        "geometric": seq_mean,
    }
    return (
        close(log_r, [1 - cfg.clip_low, 1 + cfg.clip_high, cfg.dual_clip])
        or close(log_w_valid, list(cfg.token_mask or ()) + [cfg.catastrophic_thr])
        or close(weight_stat[cfg.is_mode], [cfg.is_floor, cfg.is_cap])
        or close(seq_stat[cfg.seq_mask_mode], list(cfg.seq_mask))
    )


def draw_case(seed, densities, cfg):
    """A random ``[4, 7]`` batch with garbage outside the mask, away from every kink."""
    rng = np.random.default_rng(seed)
    shape = REF_SHAPE
    while True:
        mask = rng.random(shape) < np.asarray(densities)[:, None]
        lp = -rng.exponential(1.0, shape)
        prox = lp - rng.normal(0, 0.3, shape)
        log_w = rng.normal(0, 0.5, shape)
        # A few far-off discrepancies exercise the +-20 clamp and the catastrophic rule.
        extreme = rng.random(shape) < 0.05
        log_w = np.where(
            extreme, rng.choice([-1.0, 1.0], shape) * rng.uniform(25, 40, shape), log_w
        )
        beh = prox - log_w
        adv = rng.normal(0, 1, shape)
        arrays = [
            np.where(mask, x, rng.uniform(-1e3, 1e3, shape)).astype(np.float32)
            for x in (lp, prox, beh, adv)
        ]
        if not near_a_kink(*arrays, mask, cfg):
            return (*arrays, mask)


class PolicyLossReferenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        (f"{i:02d}_{c.is_mode}_{c.seq_mask_mode}_{c.aggregation}", c)
        for i, c in enumerate(REFERENCE_CONFIGS)
    )
    @settings(max_examples=6)
    @given(
        seed=st.integers(0, 2**32 - 1),
        densities=st.lists(
            st.sampled_from([0.0, 0.4, 0.8, 1.0]), min_size=REF_SHAPE[0], max_size=REF_SHAPE[0]
        ),
    )
    def test_matches_numpy_reference(self, config, seed, densities):
        lp, prox, beh, adv, mask = draw_case(seed, densities, config)
        loss, metrics, grad = self.variant(loss_and_grad, static_argnames="config")(
            lp, prox, beh, adv, mask, config
        )
        ref_loss, ref_metrics, ref_grad = reference_policy_loss(lp, prox, beh, adv, mask, config)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
        self.assertEqual(set(metrics), set(ref_metrics))
        for key, value in ref_metrics.items():
            np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def test_reference_configs_cover_every_mode():
    for field, options in (
        ("is_mode", IS_MODES),
        ("seq_mask_mode", SEQ_MASK_MODES),
        ("aggregation", AGGREGATIONS),
    ):
        assert {getattr(c, field) for c in REFERENCE_CONFIGS} == set(options)
    assert len(REFERENCE_CONFIGS) <= 16  # one compile each


# ---------------------------------------------------------------------------------------
# The three-term form (old_logp given): reference, reductions to the two-term form, clamps.

# Every staleness mode, with and without the staleness band, beside varied discrepancy rules.
THREE_TERM_CONFIGS = [
    LossConfig(staleness_is_mode="token", staleness_is_floor=0.5, staleness_is_cap=1.5,
               staleness_token_mask=(0.4, 2.5), token_mask=(0.5, 2.0), dual_clip=3.0),
    LossConfig(staleness_is_mode="sequence", staleness_is_cap=3.0, is_mode="geometric",
               seq_mask_mode="sum", seq_mask=(0.25, 4.0), aggregation="seq_mean_token_mean"),
    LossConfig(staleness_is_mode="geometric", staleness_is_floor=0.8, staleness_is_cap=1.2,
               is_mode="sequence", catastrophic_thr=0.1, aggregation="seq_mean_token_sum_norm",
               norm_length=8.0),
    LossConfig(staleness_is_mode="none", staleness_token_mask=(0.5, 2.0), is_mode="none",
               token_mask=(0.5, 2.0), clip_low=0.1, clip_high=0.28),
]


def near_a_staleness_kink(prox, old, mask, cfg, margin=1e-3):
    """As :func:`near_a_kink`, for the staleness weight's thresholds on ``prox - old``."""
    log_s = np.clip(np.asarray(prox, np.float64) - old, -20, 20)
    n = mask.sum(axis=1)
    seq_sum = np.where(mask, log_s, 0).sum(axis=1)[n > 0]
    stat = {"none": np.zeros(0), "token": log_s[mask], "sequence": seq_sum,
            "geometric": seq_sum / n[n > 0]}[cfg.staleness_is_mode]
    edges = [cfg.staleness_is_floor, cfg.staleness_is_cap]
    band_edges = list(cfg.staleness_token_mask or ())
    close = lambda values, es: any(  # noqa: E731
        np.any(np.abs(values - math.log(e)) < margin) for e in es if 0 < e < math.inf)
    return close(stat, edges) or close(log_s[mask], band_edges)


def draw_three_term_case(seed, densities, cfg):
    """``(lp, prox, beh, adv, mask, old)``: :func:`draw_case` with pi_old between pi_prox and mu."""
    rng = np.random.default_rng(seed)
    while True:
        lp, old, beh, adv, mask = draw_case(int(rng.integers(2**32)), densities, cfg)
        # draw_case's prox plays pi_old here (old - beh is the discrepancy log-ratio it drew);
        # the anchor sits a staleness step away, with a few extremes for the +-20 clamp.
        log_s = rng.normal(0, 0.4, mask.shape)
        log_s = np.where(rng.random(mask.shape) < 0.03, rng.choice([-30.0, 30.0], mask.shape), log_s)
        prox = np.where(mask, old + log_s, rng.uniform(-1e3, 1e3, mask.shape)).astype(np.float32)
        lp = np.where(mask, prox + (lp - old), lp).astype(np.float32)  # keep lp - prox small
        if not (near_a_kink(lp, prox, old, adv, mask, cfg) or near_a_staleness_kink(prox, old, mask, cfg)):
            return lp, prox, beh, adv, mask, old


class ThreeTermLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        (f"{i}_{c.staleness_is_mode}", c) for i, c in enumerate(THREE_TERM_CONFIGS))
    @settings(max_examples=6)
    @given(
        seed=st.integers(0, 2**32 - 1),
        densities=st.lists(
            st.sampled_from([0.0, 0.4, 0.8, 1.0]), min_size=REF_SHAPE[0], max_size=REF_SHAPE[0]
        ),
    )
    def test_matches_numpy_reference(self, config, seed, densities):
        lp, prox, beh, adv, mask, old = draw_three_term_case(seed, densities, config)
        loss, metrics, grad = self.variant(loss_and_grad, static_argnames="config")(
            lp, prox, beh, adv, mask, config, old
        )
        ref_loss, ref_metrics, ref_grad = reference_policy_loss(lp, prox, beh, adv, mask, config, old)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
        self.assertEqual(set(metrics), METRIC_KEYS | STALENESS_KEYS)
        self.assertEqual(set(metrics), set(ref_metrics))
        for key, value in ref_metrics.items():
            np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("default", LossConfig()), ("all_on", ALL_ON), ("token_rules", TOKEN_RULES),
        *((f"three_term_{i}", c) for i, c in enumerate(THREE_TERM_CONFIGS) if c.staleness_is_floor <= 1)
    )
    def test_old_equal_to_prox_is_the_two_term_loss(self, config):
        # s = 1 (within [floor, cap] and the band) and pi_old / mu = pi_prox / mu.
        for seed in range(3):
            lp, prox, beh, adv, mask = random_batch(20 + seed, log_r_scale=1.0, log_w_scale=1.0)
            fn = self.variant(loss_and_grad, static_argnames="config")
            loss, metrics, grad = fn(lp, prox, beh, adv, mask, config)
            loss3, metrics3, grad3 = fn(lp, prox, beh, adv, mask, config, prox)
            np.testing.assert_allclose(loss3, loss, rtol=1e-6)
            np.testing.assert_allclose(grad3, grad, rtol=1e-6, atol=1e-9)
            self.assertEqual(set(metrics3), METRIC_KEYS | STALENESS_KEYS)
            for key in METRIC_KEYS:
                np.testing.assert_allclose(metrics3[key], metrics[key], rtol=1e-6, err_msg=key)
            self.assertEqual(float(metrics3["staleness/is_weight_mean"]), 1.0)
            self.assertEqual(float(metrics3["staleness/is_truncated_frac"]), 0.0)
            self.assertEqual(float(metrics3["staleness/mask_frac"]), 0.0)
            self.assertEqual(float(metrics3["staleness/kl_k1"]), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("all_on", ALL_ON), ("three_term_0", THREE_TERM_CONFIGS[0]))
    def test_none_is_the_two_term_loss_bit_for_bit(self, config):
        lp, prox, beh, adv, mask = random_batch(11, log_r_scale=1.0)
        fn = self.variant(loss_and_grad, static_argnames="config")
        loss, metrics, grad = fn(lp, prox, beh, adv, mask, config)
        loss_none, metrics_none, grad_none = fn(lp, prox, beh, adv, mask, config, None)
        np.testing.assert_array_equal(loss_none, loss)
        np.testing.assert_array_equal(grad_none, grad)
        self.assertEqual(set(metrics_none), METRIC_KEYS)  # no staleness/ weight metrics
        for key in METRIC_KEYS:
            np.testing.assert_array_equal(metrics_none[key], metrics[key], err_msg=key)
        # The staleness settings act only in the three-term form.
        other = LossConfig(**{**{f: getattr(config, f) for f in config.__dataclass_fields__},
                              "staleness_is_mode": "sequence", "staleness_is_floor": 0.0, "staleness_is_cap": 0.1,
                              "staleness_token_mask": (5.0, 6.0)})
        np.testing.assert_array_equal(fn(lp, prox, beh, adv, mask, other)[0], loss)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gradient_flows_only_through_logp(self):
        lp, prox, beh, adv, mask = random_batch(12, log_r_scale=1.0)
        old = prox - np.random.default_rng(0).normal(0, 0.3, prox.shape).astype(np.float32)
        config = THREE_TERM_CONFIGS[0]

        def loss(*args):
            return policy_loss(*args[:4], mask, config, args[4])[0]

        grads = self.variant(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(lp, prox, beh, adv, old)
        self.assertGreater(float(jnp.abs(grads[0]).sum()), 0.0)
        for grad in grads[1:]:
            np.testing.assert_array_equal(grad, 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_discrepancy_masks_see_numerics_only(self):
        # A stale batch whose sampler is exact (mu == pi_old): the discrepancy term is 1 and
        # its band keeps every token; the staleness band alone rejects the far-off tokens.
        lp, prox, _, adv, mask = random_batch(13)
        log_s = np.resize(np.array([0.0, 0.3, -0.3, 1.5, -1.5], np.float32), prox.shape)
        old = prox - log_s
        config = LossConfig(token_mask=(0.5, 2.0), catastrophic_thr=0.3,
                            staleness_token_mask=(0.5, 2.0), staleness_is_cap=10.0)
        _, metrics = self.variant(policy_loss, static_argnames="config")(
            lp, prox, old, adv, mask, config, old)
        rejected = mask & (np.abs(log_s) > np.log(2.0))
        self.assertEqual(float(metrics["mask/token_frac"]), 0.0)
        self.assertEqual(float(metrics["mask/catastrophic_frac"]), 0.0)
        self.assertEqual(float(metrics["is/weight_mean"]), 1.0)
        np.testing.assert_allclose(metrics["staleness/mask_frac"], rejected.sum() / mask.sum(), rtol=1e-6)
        np.testing.assert_allclose(metrics["mask/kept_frac"], 1 - rejected.sum() / mask.sum(), rtol=1e-6)
        # The two-term loss with the same anchor would put all of it into the discrepancy term.
        _, two = policy_loss(lp, prox, old, adv, mask, config)
        np.testing.assert_allclose(two["mask/token_frac"], rejected.sum() / mask.sum(), rtol=1e-6)

    def test_old_logp_shape_is_checked(self):
        x = np.zeros((2, 3), np.float32)
        with pytest.raises(AssertionError):
            policy_loss(x, x, x, x, x > 0, LossConfig(), np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("old", [False, True])
def test_extreme_ppo_log_ratio_is_clamped(old):
    # lp - prox far outside +-20 (pi_prox near 0, or -inf): before the clamp, exp() gave an
    # infinite ratio and 0 * inf a NaN gradient.
    lp, prox, beh, adv, mask = random_batch(14)
    offsets = np.resize(np.array([1e4, -1e4, 30.0, -30.0, np.inf, 0.1], np.float32), lp.shape)
    prox = (lp - offsets).astype(np.float32)  # lp - prox = offsets; prox = -inf where offset = inf
    beh = lp.copy()
    old_logp = lp.copy() if old else None
    for config in (LossConfig(), ALL_ON, LossConfig(dual_clip=3.0, is_mode="none")):
        (loss, metrics), grad = jax.jit(jax.value_and_grad(
            lambda x, config=config: policy_loss(x, prox, beh, adv, mask, config, old_logp), has_aux=True))(lp)
        assert np.isfinite(loss)
        assert np.all(np.isfinite(grad))
        for key, value in metrics.items():
            assert np.isfinite(value), key
        terms = policy_loss_terms(lp, prox, beh, adv, mask, config, old_logp)
        np.testing.assert_allclose(np.asarray(terms.log_r)[mask], np.clip(lp - prox, -20, 20)[mask], rtol=1e-6)
        assert np.all(np.abs(np.asarray(terms.log_r)) <= 20)
        # Clamped tokens pass no gradient; the rest do.
        np.testing.assert_array_equal(np.asarray(grad)[mask & (np.abs(offsets) > 20)], 0.0)


def _categorical_samples(seed, shape=(64, 64), vocab=6, spread=1.0):
    """Tokens drawn from mu, and ``(log mu, log pi)`` of them, plus the exact KL(mu || pi)."""
    rng = np.random.default_rng(seed)

    def log_softmax(x):  # float64, so the probabilities sum to 1 for rng.choice
        return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()

    log_mu = log_softmax(rng.normal(0, spread, vocab))
    log_pi = log_softmax(log_mu + rng.normal(0, 0.5, vocab))
    tokens = rng.choice(vocab, size=shape, p=np.exp(log_mu))
    kl = float(np.sum(np.exp(log_mu) * (log_mu - log_pi)))
    return log_mu[tokens].astype(np.float32), log_pi[tokens].astype(np.float32), kl


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("three_term", [False, True])
def test_mismatch_kl_estimates_are_nonnegative_on_samples_from_mu(seed, three_term):
    # Tokens sampled by mu: k1 = mean(beh - X) and k3 = mean(exp(X - beh) - 1 - (X - beh))
    # are unbiased for KL(mu || pi_X) > 0 (X = prox, or old in the three-term form).
    beh, x, kl = _categorical_samples(seed)
    mask = np.ones(beh.shape, bool)
    adv = np.zeros(beh.shape, np.float32)
    if three_term:  # the anchor is elsewhere; the discrepancy term sees old = x
        prox = x + np.float32(0.7)
        _, metrics = policy_loss(prox, prox, beh, adv, mask, LossConfig(), x)
    else:
        _, metrics = policy_loss(x, x, beh, adv, mask, LossConfig())
    n = beh.size
    log_w = (x - beh).astype(np.float64)
    for key, per_token in (("mismatch/kl_k1", -log_w), ("mismatch/kl_k3", np.exp(log_w) - 1 - log_w)):
        stderr = per_token.std() / math.sqrt(n)
        assert float(metrics[key]) > 0, key
        assert abs(float(metrics[key]) - kl) < 5 * stderr + 1e-6, (key, float(metrics[key]), kl, stderr)
    if three_term:  # mean(old - prox) = -0.7 here: the staleness log-ratio, exactly
        np.testing.assert_allclose(metrics["staleness/kl_k1"], -0.7, rtol=1e-5)


def test_staleness_kl_k1_is_nonnegative_when_pi_old_sampled():
    # mu == pi_old (an exact sampler): staleness/kl_k1 = mean(old - prox) estimates KL(pi_old || pi_prox).
    old, prox, kl = _categorical_samples(7)
    mask = np.ones(old.shape, bool)
    _, metrics = policy_loss(prox, prox, old, np.zeros_like(old), mask, LossConfig(), old)
    per_token = (old - prox).astype(np.float64)
    assert float(metrics["staleness/kl_k1"]) > 0
    assert abs(float(metrics["staleness/kl_k1"]) - kl) < 5 * per_token.std() / math.sqrt(old.size)
    assert float(metrics["mismatch/kl_k1"]) == 0.0


# ---------------------------------------------------------------------------------------
# Config validation and helpers.


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"is_mode": "foo"}, "is_mode"),
        ({"seq_mask_mode": "product"}, "seq_mask_mode"),
        ({"aggregation": "mean"}, "aggregation"),
        ({"clip_low": -0.1}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"is_floor": -0.5}, "is_floor"),
        ({"is_floor": 3.0, "is_cap": 2.0}, "is_cap"),
        ({"token_mask": (2.0, 0.5)}, "token_mask"),
        ({"token_mask": (-1.0, 1.0)}, "token_mask"),
        ({"token_mask": (1.0,)}, "token_mask"),
        ({"seq_mask": (3.0, 1.0)}, "seq_mask"),
        ({"catastrophic_thr": 0.0}, "catastrophic_thr"),
        ({"aggregation": "seq_mean_token_sum_norm"}, "norm_length"),
        ({"aggregation": "seq_mean_token_sum_norm", "norm_length": 0}, "norm_length"),
        ({"staleness_is_mode": "tokens"}, "staleness_is_mode"),
        ({"staleness_is_floor": -0.5}, "staleness_is_floor"),
        ({"staleness_is_floor": 3.0, "staleness_is_cap": 2.0}, "staleness_is_cap"),
        ({"staleness_token_mask": (2.0, 0.5)}, "staleness_token_mask"),
        ({"staleness_token_mask": (1.0,)}, "staleness_token_mask"),
    ],
)
def test_config_rejects_invalid_values(kwargs, field):
    with pytest.raises(ValueError, match=f"LossConfig.{field} must"):
        LossConfig(**kwargs)


def test_config_error_lists_allowed_values():
    with pytest.raises(
        ValueError, match="one of 'none', 'token', 'sequence', 'geometric'; got 'foo'"
    ):
        LossConfig(is_mode="foo")


def test_config_bands_become_hashable_tuples():
    config = LossConfig(token_mask=[0.5, 2], seq_mask=[0.1, 10], staleness_token_mask=[0.2, 5])
    assert config.token_mask == (0.5, 2.0) and config.seq_mask == (0.1, 10.0)
    assert config.staleness_token_mask == (0.2, 5.0)
    hash(config)
    config = LossConfig(token_mask=[0.5, 2], seq_mask=[0.1, 10])
    assert hash(config) == hash(LossConfig(token_mask=(0.5, 2.0), seq_mask=(0.1, 10.0)))


def test_masked_mean():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, np.nan, 5.0]])
    mask = np.array([[1, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(masked_mean(x, mask), (1 + 2 + 3 + 5) / 4)
    assert float(masked_mean(x, np.zeros_like(mask))) == 0.0


def test_shape_mismatch_is_rejected():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(AssertionError):
        policy_loss(x, x, x, np.zeros((2, 4), np.float32), x > 0, LossConfig())
