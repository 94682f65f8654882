"""What the sampler hands the learner: trajectories, and the padded batch they collate into.

A `Trajectory` is one finished episode on the host; `collate` pads a list of them into
a `Batch` of `[B, T]` arrays, the one type the learner's proximal route and update read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import flax.struct
import numpy as np

from jaxrl_async.envs.tokenizer import TOKENIZER


@dataclasses.dataclass
class Trajectory:
    """One finished episode, host side (numpy). Per-token arrays are `[L]`.

    `tokens[t]` is the t-th context token; for generated tokens (`loss_mask[t]`),
    `behav_logp[t] = log mu(tokens[t] | tokens[:t])` under the version `versions[t]`.
    Prompt and environment tokens have `loss_mask=False`, `behav_logp=0`, `versions=-1`.
    `old_logp` (when the sampler computes it) is `log pi_old(tokens[t] | tokens[:t])`, the
    learner-numerics log-prob under `versions[t]`, for generated tokens, and 0 elsewhere.
    `discarded` names why the episode is no verdict on the agent ("" when it is one): "user_error",
    the env's user simulator failed (`info['user_error']` on its last step). A discarded episode
    is counted in the rollout metrics and never reaches the loss (`cluster.batch_from`).
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    behav_logp: np.ndarray
    versions: np.ndarray
    reward: float
    success: bool
    num_turns: int
    group_id: int
    task_seed: int
    old_logp: Optional[np.ndarray] = None
    tool_latency_s: float = 0.0
    discarded: str = ""

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_partial(self) -> bool:
        """True when the generated tokens come from more than one parameter version."""
        v = self.versions[self.loss_mask]
        return bool(v.size and v.min() != v.max())


@flax.struct.dataclass
class Batch:
    """One RL batch, `[B, T]` arrays (numpy on the host, jax arrays once on the learner's mesh).

    tokens: int32 context tokens (PAD after each episode).
    loss_mask: bool, True on generated (agent) tokens that train.
    behav_logp: float32 `log mu` of each generated token under the sampler's numerics.
    versions: int32 parameter version each generated token was sampled with; -1 elsewhere.
    advantages: float32 per-token advantages (the episode's, broadcast over its tokens);
      None until the learner fills them.
    old_logp: float32 exact `log pi_old` from the sampler side (the `interrupt` and
      `dedicated` routes); None otherwise.
    prox_logp: float32 `log pi_prox` chosen by the proximal route; None until the route
      fills it (`learner.route.ProximalRoute` returns a new Batch with it set).
    """

    tokens: Any
    loss_mask: Any
    behav_logp: Any
    versions: Any
    advantages: Any = None
    old_logp: Any = None
    prox_logp: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)


def bucket_length(longest: int, max_len: int, buckets: int) -> int:
    """The padded length `T` of a batch whose longest episode has `longest` tokens.

    buckets = 0: `max_len` (one shape for every batch). buckets = N > 0: the shortest of the N
    lengths `ceil(k * max_len / N)`, k = 1..N, that is at least `longest`: a batch of short
    episodes pays for fewer columns, and the learner's jitted functions see at most N lengths
    (one compile each). Evenly spaced rather than powers of two: the padding a batch pays is at
    most `max_len / N` columns whatever its length, where halvings would waste up to half of the
    longest (costliest) batches.
    """
    if not 0 < longest <= max_len:
        raise ValueError(f"the longest episode has {longest} tokens; expected 1..{max_len} (model.max_len)")
    if buckets <= 0:
        return max_len
    k = -(-longest * buckets // max_len)  # the first k with k * max_len / N >= longest
    return -(-k * max_len // buckets)


def collate(trajs: Sequence[Trajectory], length: int) -> Batch:
    """Pads trajectories into a `Batch` of `[B, length]` arrays (`old_logp` set when every trajectory has it)."""
    b = len(trajs)
    tokens = np.full((b, length), TOKENIZER.PAD, np.int32)
    loss_mask = np.zeros((b, length), bool)
    behav_logp = np.zeros((b, length), np.float32)
    versions = np.full((b, length), -1, np.int32)
    with_old = all(t.old_logp is not None for t in trajs) and b > 0
    old_logp = np.zeros((b, length), np.float32) if with_old else None
    for i, t in enumerate(trajs):
        if t.length > length:
            raise ValueError(f"trajectory of {t.length} tokens exceeds the padded length {length}")
        n = t.length
        tokens[i, :n] = t.tokens
        loss_mask[i, :n] = t.loss_mask
        behav_logp[i, :n] = t.behav_logp
        versions[i, :n] = t.versions
        if with_old:
            old_logp[i, :n] = t.old_logp
    return Batch(tokens=tokens, loss_mask=loss_mask, behav_logp=behav_logp, versions=versions, old_logp=old_logp)
