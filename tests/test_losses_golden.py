"""Golden values of `policy_loss`, computed by hand from the formulas of core/losses.py.

Each case is a tiny batch whose expected loss and metrics are worked out in the comments,
so a reader can check them with pencil and paper (rlax style). Per valid token::

    r  = exp(lp - prox)                               staleness ratio
    pg = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
         (dual clip c: pg = min(pg, -c * A) where A < 0)
    w  = clip(pi_prox / mu, is_floor, is_cap)         token IS weight (or its sequence forms)
    k  = 1 if the token survives the rejection masks else 0
    token_mean:          loss = sum(w * k * pg) / (number of valid tokens)
    seq_mean_token_mean: loss = sum_seq(sum_t(w * k * pg) / n_seq_tokens) / (number of sequences with a token)

The inputs are built from the ratios themselves (``lp = log(p * r)``, ``prox = log p``,
``beh = log(p / w)`` with ``p = 0.1``), so the hand values only need ``r`` and ``w``.
The three-term form adds ``s = pi_prox / pi_old`` (``old = log(p / s)``,
``beh = log(p / (s * w))``, so ``w = pi_old / mu``): ``loss_t = s * w * k * ks * pg``.
"""

import numpy as np
import pytest

from jaxrl_async.core.losses import LossConfig, policy_loss

P = 0.1  # pi_prox of every token; any value works, the loss only sees the ratios


def _inputs(r, w):
    """(logp, prox_logp, behav_logp) ``[B, T]`` float32 with staleness ratios r and discrepancy ratios w."""
    r, w = np.asarray(r, np.float64), np.asarray(w, np.float64)
    prox = np.full(r.shape, np.log(P))
    return (np.log(P * r).astype(np.float32), prox.astype(np.float32), np.log(P / w).astype(np.float32))


def _loss(r, w, adv, mask, config):
    lp, prox, beh = _inputs(r, w)
    loss, metrics = policy_loss(lp, prox, beh, np.asarray(adv, np.float32), np.asarray(mask, bool), config)
    return float(loss), {k: float(v) for k, v in metrics.items()}


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_ppo_clipping_on_the_staleness_term():
    # pi_prox == mu, so w = 1 everywhere: only the PPO term (clip 0.2: band [0.8, 1.2]) acts.
    #   token     r     A    r*A    clip(r)*A   min     pg    flag
    #   (0,0)   1.1   +2    2.2    1.1*2=2.2   2.2   -2.2   inside the band
    #   (0,1)   1.5   +2    3.0    1.2*2=2.4   2.4   -2.4   clip_high (A > 0, r > 1.2)
    #   (0,2)   0.5   +2    1.0    0.8*2=1.6   1.0   -1.0   outside, but on the side A does not push: no clip
    #   (1,0)   0.9   -1   -0.9    0.9*-1     -0.9    0.9   inside the band
    #   (1,1)   0.5   -1   -0.5    0.8*-1=-0.8 -0.8   0.8   clip_low (A < 0, r < 0.8)
    #   (1,2)   1.5   -1   -1.5    1.2*-1=-1.2 -1.5   1.5   outside, on the side A does not push: no clip
    # loss = (-2.2 - 2.4 - 1.0 + 0.9 + 0.8 + 1.5) / 6 = -2.4 / 6 = -0.4
    r = [[1.1, 1.5, 0.5], [0.9, 0.5, 1.5]]
    adv = [[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]
    loss, m = _loss(r, np.ones((2, 3)), adv, np.ones((2, 3)), LossConfig())
    _close(loss, -0.4)
    _close(m["loss/policy"], -0.4)
    _close(m["ratio/clip_frac_high"], 1 / 6)
    _close(m["ratio/clip_frac_low"], 1 / 6)
    _close(m["ratio/clip_frac"], 2 / 6)
    # mean r = (1.1 + 1.5 + 0.5 + 0.9 + 0.5 + 1.5) / 6 = 6.0 / 6 = 1.0; max r = 1.5
    _close(m["ratio/mean"], 1.0)
    _close(m["ratio/max"], 1.5)
    _close(m["is/weight_mean"], 1.0)
    _close(m["is/truncated_frac"], 0.0)


def test_asymmetric_clip_band():
    # clip_low = 0.2, clip_high = 0.28: band [0.8, 1.28]; pi_prox == mu (w = 1).
    #   r = 1.25, A = +1: inside (1.25 < 1.28), pg = -1.25        (with the symmetric 0.2: -1.2, clipped)
    #   r = 1.5,  A = +1: clip_high, pg = -1.28
    #   r = 0.7,  A = -2: clip_low,  pg = -min(-1.4, 0.8*-2 = -1.6) = 1.6
    # loss = (-1.25 - 1.28 + 1.6) / 3 = -0.93 / 3 = -0.31
    loss, m = _loss([[1.25, 1.5, 0.7]], np.ones((1, 3)), [[1.0, 1.0, -2.0]], np.ones((1, 3)),
                    LossConfig(clip_low=0.2, clip_high=0.28))
    _close(loss, -0.31)
    _close(m["ratio/clip_frac_high"], 1 / 3)
    _close(m["ratio/clip_frac_low"], 1 / 3)


def test_truncated_token_is_weight_on_the_discrepancy_term():
    # lp == prox, so r = 1 and pg = -A; token IS weights w = clip(pi_prox / mu, 0, 2) (cap active).
    #   pi_prox/mu   w              A     w * pg
    #   0.5          0.5            +1    0.5 * -1   = -0.5
    #   1.5          1.5            -2    1.5 * 2    =  3.0
    #   4.0          2.0 (capped)   +0.5  2.0 * -0.5 = -1.0
    # loss = (-0.5 + 3.0 - 1.0) / 3 = 1.5 / 3 = 0.5
    loss, m = _loss(np.ones((1, 3)), [[0.5, 1.5, 4.0]], [[1.0, -2.0, 0.5]], np.ones((1, 3)),
                    LossConfig(is_mode="token", is_cap=2.0))
    _close(loss, 0.5)
    # weight_mean = (0.5 + 1.5 + 2) / 3 = 4/3; weight_max = 2; one of three truncated
    _close(m["is/weight_mean"], 4 / 3)
    _close(m["is/weight_max"], 2.0)
    _close(m["is/truncated_frac"], 1 / 3)
    # ess = (sum w)^2 / (n * sum w^2) = 4^2 / (3 * (0.25 + 2.25 + 4)) = 16 / 19.5 = 32/39
    _close(m["is/ess"], 32 / 39)
    # The tokens were sampled by mu, so both estimate KL(mu || pi_prox); with x = pi_prox/mu:
    # kl_k1 = mean(beh - prox) = mean(-ln x) = -(ln 0.5 + ln 1.5 + ln 4) / 3 = -ln(0.5 * 1.5 * 4) / 3 = -ln(3) / 3
    #   (negative here: three tokens are far too few for the estimate to reach its expectation >= 0)
    _close(m["mismatch/kl_k1"], -np.log(3.0) / 3)
    # kl_k3 = mean(exp(prox - beh) - 1 - (prox - beh)) = mean(x - 1 - ln x), each term >= 0:
    #       = [(0.5 - 1 - ln 0.5) + (1.5 - 1 - ln 1.5) + (4 - 1 - ln 4)] / 3
    #       = [(0.5 + 1.5 + 4) - 3 - ln(0.5 * 1.5 * 4)] / 3 = (3 - ln 3) / 3 = 1 - ln(3) / 3
    #       (terms: 0.1931 + 0.0945 + 1.6137 = 1.9014; / 3 = 0.6338)
    _close(m["mismatch/kl_k3"], 1 - np.log(3.0) / 3)
    # The PPO ratio is exactly 1: no clipping anywhere.
    _close(m["ratio/clip_frac"], 0.0)
    _close(m["ratio/mean"], 1.0)


def test_truncated_is_weight_floor():
    # Same tokens with is_floor = 0.6, is_cap = 2: w = (0.6, 1.5, 2.0), two of three truncated.
    # loss = (0.6 * -1 + 1.5 * 2 + 2.0 * -0.5) / 3 = (-0.6 + 3.0 - 1.0) / 3 = 1.4 / 3
    loss, m = _loss(np.ones((1, 3)), [[0.5, 1.5, 4.0]], [[1.0, -2.0, 0.5]], np.ones((1, 3)),
                    LossConfig(is_mode="token", is_floor=0.6, is_cap=2.0))
    _close(loss, 1.4 / 3)
    _close(m["is/truncated_frac"], 2 / 3)
    _close(m["is/weight_mean"], (0.6 + 1.5 + 2.0) / 3)  # = 4.1 / 3


@pytest.mark.parametrize("is_mode, weight, truncated", [
    # Two tokens with pi_prox/mu = 2 and 8 (r = 1, A = +1, so pg = -1 each), is_cap = 10:
    ("token", (2.0, 8.0), 0.0),  # each its own weight, both under the cap: loss = (-2 - 8) / 2 = -5
    ("sequence", (10.0, 10.0), 1.0),  # product 2 * 8 = 16, capped at 10: loss = (-10 - 10) / 2 = -10
    ("geometric", (4.0, 4.0), 0.0),  # geometric mean sqrt(2 * 8) = 4: loss = (-4 - 4) / 2 = -4
    ("none", (1.0, 1.0), 0.0),  # w = 1: loss = -1
])
def test_sequence_level_is_weights(is_mode, weight, truncated):
    loss, m = _loss(np.ones((1, 2)), [[2.0, 8.0]], [[1.0, 1.0]], np.ones((1, 2)),
                    LossConfig(is_mode=is_mode, is_cap=10.0))
    _close(loss, -(weight[0] + weight[1]) / 2)
    _close(m["is/weight_mean"], (weight[0] + weight[1]) / 2)
    _close(m["is/truncated_frac"], truncated)


def test_token_mask_rejects_a_token_but_keeps_the_denominator():
    # is_mode none (w = 1), token band [0.5, 2] on pi_prox/mu; r = 1 so pg = -A.
    #   pi_prox/mu   A    pg    kept?
    #   1.0          +2   -2    yes
    #   3.0          +1   -1    no (3 > 2): contributes 0
    #   0.8          -1   +1    yes
    #   100 (pad)    +5    -    not a valid token (mask 0): ignored entirely
    # loss = (-2 + 0 + 1) / 3 valid tokens = -1/3 (the rejected token still counts in the denominator)
    mask = [[1, 1, 1, 0]]
    loss, m = _loss(np.ones((1, 4)), [[1.0, 3.0, 0.8, 100.0]], [[2.0, 1.0, -1.0, 5.0]], mask,
                    LossConfig(is_mode="none", token_mask=(0.5, 2.0)))
    _close(loss, -1 / 3)
    _close(m["mask/valid_tokens"], 3.0)
    _close(m["mask/token_frac"], 1 / 3)
    _close(m["mask/kept_frac"], 2 / 3)
    _close(m["ratio/effective_clip_frac"], 1 / 3)  # the rejected token gives no gradient
    _close(m["ratio/clip_frac"], 0.0)
    # Without the band: (-2 - 1 + 1) / 3 = -2/3
    loss_off, _ = _loss(np.ones((1, 4)), [[1.0, 3.0, 0.8, 100.0]], [[2.0, 1.0, -1.0, 5.0]], mask,
                        LossConfig(is_mode="none"))
    _close(loss_off, -2 / 3)


def test_dual_clip_bounds_a_negative_advantage():
    # w = 1 (pi_prox == mu), clip 0.2 (band [0.8, 1.2]), dual_clip c = 3.
    #   r    A    r*A   clip(r)*A     PPO pg              bound -c*A   final pg   flags
    #   5    -1   -5    1.2*-1=-1.2   -min(-5,-1.2) = 5   3            3          dual clip (5 > 3)
    #   2    -1   -2    -1.2          2                   3            2          none (2 < 3)
    #   5    +1    5    1.2           -1.2                -            -1.2       clip_high
    #   0.5  -2   -1    0.8*-2=-1.6   1.6                 6            1.6        clip_low
    # loss = (3 + 2 - 1.2 + 1.6) / 4 = 5.4 / 4 = 1.35
    r, adv = [[5.0, 2.0, 5.0, 0.5]], [[-1.0, -1.0, 1.0, -2.0]]
    loss, m = _loss(r, np.ones((1, 4)), adv, np.ones((1, 4)), LossConfig(dual_clip=3.0))
    _close(loss, 1.35)
    _close(m["ratio/dual_clip_frac"], 1 / 4)
    _close(m["ratio/clip_frac_low"], 1 / 4)
    _close(m["ratio/clip_frac_high"], 1 / 4)
    _close(m["ratio/clip_frac"], 2 / 4)
    _close(m["ratio/effective_clip_frac"], 3 / 4)  # clip_low | clip_high | dual clip
    _close(m["ratio/max"], 5.0)
    # Without the dual clip the first token keeps pg = 5: (5 + 2 - 1.2 + 1.6) / 4 = 7.4 / 4 = 1.85
    loss_off, m_off = _loss(r, np.ones((1, 4)), adv, np.ones((1, 4)), LossConfig())
    _close(loss_off, 1.85)
    _close(m_off["ratio/dual_clip_frac"], 0.0)


@pytest.mark.parametrize("aggregation, norm_length, expected", [
    # Ragged rows, r = 1 and w = 1, so pg = -A:
    #   row 0: one valid token,    A = 4        -> pg sum -4, 1 token
    #   row 1: three valid tokens, A = 1, 2, 3  -> pg sum -6, 3 tokens
    #   row 2: no valid token (padding row)     -> counts nowhere
    ("token_mean", None, -2.5),  # (-4 - 6) / 4 tokens = -2.5
    ("seq_mean_token_mean", None, -3.0),  # (-4/1 + -6/3) / 2 sequences = (-4 - 2) / 2 = -3
    ("seq_mean_token_sum_norm", 4.0, -1.25),  # (-4 - 6) / (2 sequences * 4) = -1.25
])
def test_aggregation_modes_on_ragged_masks(aggregation, norm_length, expected):
    adv = [[4.0, 7.0, 7.0], [1.0, 2.0, 3.0], [9.0, 9.0, 9.0]]  # 7 and 9 sit on masked tokens
    mask = [[1, 0, 0], [1, 1, 1], [0, 0, 0]]
    loss, m = _loss(np.ones((3, 3)), np.ones((3, 3)), adv, mask,
                    LossConfig(aggregation=aggregation, norm_length=norm_length))
    _close(loss, expected)
    _close(m["loss/policy"], expected)
    _close(m["mask/valid_tokens"], 4.0)


def test_sequence_mask_and_catastrophic_rule_drop_whole_sequences():
    # is_mode none (w = 1), r = 1 so pg = -A = -1 on every valid token; seq_mean_token_mean.
    #   row 0: pi_prox/mu = (2, 2): geometric mean 2 > 1.5     -> dropped by the sequence band [0.5, 1.5]
    #   row 1: pi_prox/mu = (1, 0.01): 0.01 < 0.05              -> dropped by the catastrophic rule
    #          (geometric mean sqrt(0.01) = 0.1 < 0.5 also falls outside the band)
    #   row 2: pi_prox/mu = (1.2, 1/1.2): geometric mean 1      -> kept, token mean -1
    # loss = (0 + 0 + -1) / 3 sequences = -1/3
    w = [[2.0, 2.0], [1.0, 0.01], [1.2, 1 / 1.2]]
    loss, m = _loss(np.ones((3, 2)), w, np.ones((3, 2)), np.ones((3, 2)),
                    LossConfig(is_mode="none", seq_mask_mode="geometric", seq_mask=(0.5, 1.5),
                               catastrophic_thr=0.05, aggregation="seq_mean_token_mean"))
    _close(loss, -1 / 3)
    _close(m["mask/seq_frac"], 2 / 3)  # rows 0 and 1
    _close(m["mask/catastrophic_frac"], 1 / 3)  # row 1
    _close(m["mask/kept_frac"], 2 / 6)  # the two tokens of row 2


def _loss3(r, s, w, adv, mask, config):
    """The three-term loss on ratios r = pi_theta/pi_prox, s = pi_prox/pi_old, w = pi_old/mu."""
    r, s, w = (np.asarray(x, np.float64) for x in (r, s, w))
    lp, prox = np.log(P * r), np.full(r.shape, np.log(P))
    old, beh = np.log(P / s), np.log(P / (s * w))
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    loss, metrics = policy_loss(f32(lp), f32(prox), f32(beh), f32(adv), np.asarray(mask, bool), config, f32(old))
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_three_term_staleness_weight_and_band():
    # token IS on w = pi_old/mu (cap 2); token IS on s = pi_prox/pi_old (cap 1.5) with band [0.2, 3]; clip 0.2.
    #   token   r    A    s                    w              PPO pg                      s * w * ks * pg
    #   0       1.0  +1   1.2                  0.5            -1                          1.2 * 0.5 * -1  = -0.6
    #   1       1.5  +1   2.0 -> 1.5 (capped)  1.0            -min(1.5, 1.2) = -1.2       1.5 * 1 * -1.2  = -1.8
    #   2       0.9  -2   4.0 -> rejected      1.0            -(0.9 * -2) = 1.8           0 (4 > 3: outside the band)
    #   3       1.0  -1   0.5                  4.0 -> 2.0     +1                          0.5 * 2 * 1     =  1.0
    # loss = (-0.6 - 1.8 + 0 + 1.0) / 4 = -1.4 / 4 = -0.35 (the rejected token still counts)
    config = LossConfig(is_mode="token", is_cap=2.0, staleness_is_mode="token", staleness_is_cap=1.5,
                        staleness_token_mask=(0.2, 3.0))
    r, s, w = [[1.0, 1.5, 0.9, 1.0]], [[1.2, 2.0, 4.0, 0.5]], [[0.5, 1.0, 1.0, 4.0]]
    adv = [[1.0, 1.0, -2.0, -1.0]]
    loss, m = _loss3(r, s, w, adv, np.ones((1, 4)), config)
    _close(loss, -0.35)
    # staleness weights (1.2, 1.5, 1.5, 0.5): mean 4.7 / 4 = 1.175, max 1.5; tokens 1 and 2 truncated
    _close(m["staleness/is_weight_mean"], 1.175)
    _close(m["staleness/is_weight_max"], 1.5)
    _close(m["staleness/is_truncated_frac"], 2 / 4)
    _close(m["staleness/mask_frac"], 1 / 4)  # token 2
    # staleness/kl_k1 = mean(old - prox) = mean(-ln s) = -ln(1.2 * 2 * 4 * 0.5) / 4 = -ln(4.8) / 4
    _close(m["staleness/kl_k1"], -np.log(4.8) / 4)
    # discrepancy weights (0.5, 1, 1, 2): mean 4.5 / 4 = 1.125; token 3 truncated
    _close(m["is/weight_mean"], 1.125)
    _close(m["is/truncated_frac"], 1 / 4)
    # The mismatch KLs see pi_old / mu only: kl_k1 = mean(-ln w) = -(ln 0.5 + ln 4) / 4 = -ln(2) / 4
    _close(m["mismatch/kl_k1"], -np.log(2.0) / 4)
    # kl_k3 = mean(w - 1 - ln w) = [(0.5 - 1 + ln 2) + 0 + 0 + (4 - 1 - 2 ln 2)] / 4 = (2.5 - ln 2) / 4
    _close(m["mismatch/kl_k3"], (2.5 - np.log(2.0)) / 4)
    _close(m["mask/token_frac"], 0.0)  # no discrepancy band
    _close(m["mask/kept_frac"], 3 / 4)  # the staleness band rejected token 2
    _close(m["ratio/clip_frac_high"], 1 / 4)  # token 1 (A > 0, r = 1.5 > 1.2)
    _close(m["ratio/effective_clip_frac"], 2 / 4)  # token 1 clipped, token 2 rejected


def test_three_term_with_old_equal_to_prox_is_the_two_term_loss():
    # s = 1 on every token: the golden case of the truncated discrepancy weight above, loss 0.5.
    loss, m = _loss3(np.ones((1, 3)), np.ones((1, 3)), [[0.5, 1.5, 4.0]], [[1.0, -2.0, 0.5]], np.ones((1, 3)),
                     LossConfig(is_mode="token", is_cap=2.0))
    _close(loss, 0.5)
    _close(m["staleness/is_weight_mean"], 1.0)
    _close(m["mismatch/kl_k3"], 1 - np.log(3.0) / 3)
