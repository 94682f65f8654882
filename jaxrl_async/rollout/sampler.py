"""Batched multi-turn generation with per-token versions and partial rollouts.

The sampler runs each episode in a KV-cache slot (one per episode, or fewer slots than
episodes: a slot whose episode ends takes the next one, continuous batching) and advances
every slot by one token per decode step. The decode steps run on the device (`_decode_loop`, a `lax.while_loop` over a
fixed-shape batch state: context tokens, lengths, cursors, active flags, the KV cache and the
PRNG key), many per call: the host takes over only when some slot ends its agent turn (the
env must answer), at a chunk boundary (weights may switch) and when every slot is done. A
slot is either *prefilling* (feeding prompt or observation tokens it already knows, inside
the loop; or, when some slot has a long context to (re-)read, all of it in one batched
forward, `model_lib.prefill`, before the loop) or *generating* (sampling the next agent
token from the inference distribution). Agent turns end at the end-of-turn token or at the
env's per-turn budget; the env's observation is then appended as non-trainable context.
`decode_steps` counts decode steps plus, for each prefill, the steps its longest row would
have taken in the loop: the clock of `chunk` and `weight_source` is the same either way.

Weights may change between decode chunks (partial rollouts). After a switch every slot
re-reads its context under the new weights, as inference engines do after a weight
update, so each generated token's `behav_logp` is exactly the inference distribution of
the version recorded for it in `versions`.

Optionally the sampler also fills `Trajectory.old_logp` with the exact `pi_old` (the
learner-numerics, float32 log-prob under each token's version; docs/design.md section 3), so the
learner needs no extra forward pass:

* `exact_route=Route.INTERRUPT` (synchronisation by partial-rollout interruption): the sampler
  keeps the float32 params of its current version beside the inference weights. Before it
  switches weights it pauses and scores every slot's not-yet-scored tokens (all of the
  outgoing version: live slots' partial segments and slots that finished since the last
  switch) in one learner forward over `[B, max_len]`; the rest is scored once at the end.
  Cost: a stall at each switch (`RolloutStats.old_logp_stall_s`).
* `exact_route=Route.DEDICATED` (dedicated old-log-prob model): each segment is submitted to a
  `runtime.scorer.LogProbScorer` process as soon as it ends (the agent turn ends, the episode
  ends, or a weight switch cuts it), all segments ending at one decode step in one
  request; the answers are collected before `generate` returns. Cost: a second model in
  another process; the sampler only blocks in the final collect.

Either way sampling itself is unchanged: same keys, same tokens, same `behav_logp`.

Shared-prefix KV cache (opt-in, `Sampler(prefix_cache=True)`): the longest common prefix of the
contexts the sampler starts (a task's system prompt and tools) is prefilled once per parameter
version into one row, and that row is copied into every slot that starts (or re-reads after a
switch) a context beginning with it, instead of prefilling it again (`_apply_prefix`).

Env steps in a worker pool (opt-in, `Sampler(env_workers=N)`): a slot whose agent turn ended
hands its env step to a thread and leaves the decode batch (its KV cache kept) while the other
slots keep decoding; it rejoins at the next host turn after the answer arrived (`_collect`).

Per-episode sampling (opt-in, `generate(..., episode_sampling=EpisodeSampling(...))`, what a
server needs): each episode brings its own PRNG key, temperature and top-p. The token at
position t of an episode is drawn with `fold_in(episode key, t)`, so what an episode samples
depends on its own key, context and logits only, not on which other episodes share the batch,
their slots or the batch size. Without it the batch shares one key stream (split once per
decode step) and the sampler's temperature, exactly as before. With it a call may also be
open-ended (`generate(feed=..., on_done=...)`, a server's continuous batching across
requests): new episodes join free KV-cache slots at chunk boundaries and each episode is
reported as it ends.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_async import config as config_lib
from jaxrl_async.core.proximal import Route
from jaxrl_async.envs.base import Env
from jaxrl_async.envs.tokenizer import TOKENIZER
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.trajectory import Trajectory


@dataclasses.dataclass
class RolloutStats:
    episodes: int = 0
    slots: int = 0  # KV-cache slots (the decode batch); fewer than episodes: continuous batching
    generated_tokens: int = 0
    decode_steps: int = 0
    weight_switches: int = 0
    wall_s: float = 0.0
    # Old-logit routes (0 without an exact_route). interrupt: seconds generation was paused
    # for learner-numerics scoring; dedicated: seconds blocked collecting the scorer's answers.
    old_logp_stall_s: float = 0.0
    # interrupt: learner forward passes run by the sampler; dedicated: requests to the scorer.
    old_logp_forward_passes: int = 0
    # dedicated only: seconds spent submitting requests (padding, pickling, pipe writes).
    old_logp_submit_s: float = 0.0
    # Device calls of the decode loop (host round trips), batched prefills of known context
    # (prompts, observations, re-reads after a switch) and the tokens they wrote.
    loop_calls: int = 0
    loop_steps: int = 0  # decode steps the device ran (decode_steps also counts prefilled context)
    prefill_calls: int = 0
    prefill_tokens: int = 0
    # Shared-prefix KV cache (`Sampler(prefix_cache=True)`): prefills of the prefix (once per version
    # and prefix), slots that took it instead of prefilling it, and the tokens they did not prefill.
    prefix_computes: int = 0
    prefix_hits: int = 0
    prefix_tokens: int = 0
    # env_workers: decode-loop calls made while some episode waited on its env (decoding overlapped env steps).
    env_overlap_calls: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.wall_s, 1e-9)


def _sample_inverse_cdf(logp, key, temperature: float):
    """One token per row from softmax(logp / temperature), by inverse-CDF sampling.

    The same distribution (and the same `token_logp`) as `model_lib.sample_token`, but one
    uniform draw per row instead of a Gumbel draw per vocabulary entry: on a CPU the
    threefry bits for [B, V] Gumbels cost about as much as the decode step itself.
    """
    sample_logp = jax.nn.log_softmax(logp / temperature, axis=-1)
    # A log-depth scan: XLA:CPU lowers jnp.cumsum over V to a reduce-window, O(V^2) work per row.
    cdf = jax.lax.associative_scan(jnp.add, jnp.exp(sample_logp), axis=1)  # [B, V]
    u = jax.random.uniform(key, (logp.shape[0], 1), jnp.float32) * cdf[:, -1:]
    tokens = jnp.minimum(jnp.sum(cdf <= u, axis=-1), logp.shape[-1] - 1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(sample_logp, tokens[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class EpisodeSampling:
    """Per-episode sampling settings of one `generate` call (one row per episode, N rows).

    keys: [N, 2] uint32, each episode's PRNG key data (`jax.random.key_data` of a threefry key).
    temperature: [N] float32; 0 = greedy (argmax). top_p: [N] float32 in (0, 1]; 1 = no nucleus cut.
    """

    keys: np.ndarray
    temperature: np.ndarray
    top_p: np.ndarray

    def __post_init__(self):
        n = len(self.keys)
        if np.shape(self.keys) != (n, 2) or np.shape(self.temperature) != (n,) or np.shape(self.top_p) != (n,):
            raise ValueError(f"EpisodeSampling: keys [N, 2], temperature [N] and top_p [N] expected; got "
                             f"{np.shape(self.keys)}, {np.shape(self.temperature)}, {np.shape(self.top_p)}")
        if np.any(np.asarray(self.temperature) < 0) or np.any(~(np.asarray(self.top_p) > 0)) or np.any(
                np.asarray(self.top_p) > 1):
            raise ValueError("EpisodeSampling: temperature must be >= 0 and top_p in (0, 1]")


def _sample_rows(logp, u, temperature, top_p):
    """One token per row with per-row settings: logp [B, V] (the inference log-probs), u [B]
    uniforms in [0, 1), temperature [B] (0: greedy), top_p [B] (nucleus mass; 1: all tokens).

    Returns (tokens [B] int32, token_logp [B]): the log-prob of each token under the
    distribution it was drawn from (tempered and nucleus-truncated; for a greedy row, the
    untempered log-prob, as the shared-temperature path reports it).
    """
    v = logp.shape[-1]
    greedy = temperature <= 0
    t = jnp.where(greedy, 1.0, temperature)[:, None]
    p = jnp.exp(jax.nn.log_softmax(logp / t, axis=-1))

    def nucleus(p):
        # Keep the most likely tokens until their mass reaches top_p (ties at the threshold are kept).
        s = -jnp.sort(-p, axis=-1)
        before = jax.lax.associative_scan(jnp.add, s, axis=1) - s  # mass ranked above each token
        thr = jnp.min(jnp.where(before < top_p[:, None], s, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(p >= thr, p, 0.0)

    p = jax.lax.cond(jnp.any(top_p < 1.0), nucleus, lambda p: p, p)
    cdf = jax.lax.associative_scan(jnp.add, p, axis=1)  # [B, V]; a log-depth scan, as in _sample_inverse_cdf
    total = cdf[:, -1]
    drawn = jnp.minimum(jnp.sum(cdf <= (u * total)[:, None], axis=-1), v - 1).astype(jnp.int32)
    best = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    tokens = jnp.where(greedy, best, drawn)
    picked = jnp.take_along_axis(p, tokens[:, None], axis=-1)[:, 0]
    token_logp = jnp.where(greedy, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0],
                           jnp.log(picked) - jnp.log(total))
    return tokens, token_logp


def _decode_loop(graphdef, inf_params, cache, key, ctx, length, cursor, active, turn_start, budget, step, limit,
                 numerics, temperature, model=model_lib, pad=TOKENIZER.PAD, eot=TOKENIZER.EOT, per_slot=None):
    """Many decode steps in one device call, until the host is needed.

    Not jitted here: `Sampler` jits it once per (graphdef, numerics, temperature, model, pad,
    eot) with those bound (`_loop_fn`), so a call hashes no static argument (hashing an NNX
    graphdef costs about 0.25 ms, as much as a quarter of a decode step on a CPU) and passes
    host arrays straight to the compiled function.

    Fixed-shape batch state, one row per slot: ctx [B, max_len] int32 (each slot's known
    context, prompt, generated tokens and observations, PAD after it), length [B] (tokens in
    ctx), cursor [B] (tokens already in the KV cache), active [B] bool (slots that advance;
    the others idle at position max_len: their cache write is dropped, so a slot waiting on its
    env keeps its cache, and their output is ignored), turn_start [B] (where the current agent
    turn began), budget [B] (the env's per-turn token budget), step and limit
    (int32 scalars: decode steps so far and the step to stop at, a chunk boundary).

    Each step feeds every active slot its token at `cursor` (known context not prefilled yet,
    or the last generated token), then appends a sample from the inference distribution to
    the slots whose whole context is now in the cache. A slot stops (goes inactive) when it
    samples the end-of-turn token, spends its turn budget or fills the context: the env (or
    the host's bookkeeping) must answer, so the loop returns after that step. It also returns
    at `limit` and when no slot is active.

    model: the model module (`transformer` or `llama`); pad, eot: the env's padding and end-of-turn ids.
    per_slot: None (one key stream for the batch, the static `temperature`), or per-slot sampling
    (keys [B, 2] uint32 key data, temperature [B], top_p [B]; see `EpisodeSampling`): the token
    at position t of a slot is drawn with `fold_in(its key, t)`, whatever the other slots do.

    Returns (cache, key, ctx, length, cursor, active, behav [B, max_len] float32 (the
    log-prob of each token generated in this call at its position, 0 elsewhere), step).
    The returned key has been split once per decode step the call ran (the split feeds the
    logit noise and, without `per_slot`, the samples), so consecutive calls continue one key
    stream: step n draws from the n-th split whichever call runs it.
    """
    b, max_len = ctx.shape
    rows = jnp.arange(b)

    def cond(st):
        return (st["step"] < limit) & jnp.any(st["active"]) & ~st["stopped"]

    def body(st):
        key, sub = jax.random.split(st["key"])
        noise_key, sample_key = jax.random.split(sub)
        act, cur, ln = st["active"], st["cursor"], st["length"]
        feed = jnp.where(act, st["ctx"][rows, jnp.minimum(cur, max_len - 1)], pad)
        # An inactive slot's write goes out of range and is dropped: a slot waiting on its env keeps its cache.
        pos = jnp.where(act, cur, max_len)
        logp, cache = model.decode_step(graphdef, inf_params, st["cache"], feed, pos, numerics, noise_key)
        if per_slot is not None:
            slot_keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(per_slot[0]), ln)
            u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(slot_keys)
            sampled, sampled_logp = _sample_rows(logp, u, per_slot[1], per_slot[2])
        elif temperature == 0.0:
            sampled = jnp.argmax(logp, axis=-1).astype(jnp.int32)
            sampled_logp = jnp.take_along_axis(logp, sampled[:, None], axis=-1)[:, 0]
        else:
            sampled, sampled_logp = _sample_inverse_cdf(logp, sample_key, temperature)
        gen = act & (cur + 1 >= ln)  # the whole context is in the cache: this sample is the next token
        at = jnp.where(gen, ln, max_len)  # out of range: the write is dropped
        ctx = st["ctx"].at[rows, at].set(sampled)
        behav = st["behav"].at[rows, at].set(sampled_logp)
        ln = ln + gen
        stop = gen & ((sampled == eot) | (ln - turn_start >= budget) | (ln >= max_len))
        return {"cache": cache, "key": key, "ctx": ctx, "behav": behav, "length": ln,
                "cursor": jnp.where(act, cur + 1, cur), "active": act & ~stop, "stopped": jnp.any(stop),
                "step": st["step"] + 1}

    st = {"cache": cache, "key": key, "ctx": ctx, "behav": jnp.zeros(ctx.shape, jnp.float32), "length": length,
          "cursor": cursor, "active": active, "stopped": jnp.asarray(False), "step": step}
    st = jax.lax.while_loop(cond, body, st)
    return st["cache"], st["key"], st["ctx"], st["length"], st["cursor"], st["active"], st["behav"], st["step"]


def _copy_prefix(cache, prefix_kv, take):
    """Copies a prefix's KV (`{"k", "v"}: [L, 1, W, ...]`) into positions 0..W-1 of the cache rows
    where `take` [B] is set (the cache is donated). Positions of the bucket beyond the prefix are
    copied too: a slot's positions at or after its cursor are rewritten before they are attended."""
    def put(c, p):
        w = p.shape[2]
        sel = take.reshape((1, -1) + (1,) * (c.ndim - 2))
        return c.at[:, :, :w].set(jnp.where(sel, p.astype(c.dtype), c[:, :, :w]))

    return jax.tree.map(put, cache, prefix_kv)


def _packed_loop(graphdef, treedef, numerics, temperature, model, pad, eot, leaves, cache, key, state, step, limit,
                 per_slot=None):
    """`_decode_loop` with its inputs and outputs packed, so one call moves few arrays.

    leaves: the inference params' leaves (`treedef` rebuilds them: flattening an NNX State in
    Python on every call costs more than the transfers). state [B, max_len + 5] int32: ctx,
    then the columns length, cursor, turn_start, budget, active. Returns (cache, key, out
    [B, max_len + 4] int32: ctx, then length, cursor, active, step; behav [B, max_len]).
    per_slot: per-slot sampling or None (`_decode_loop`).
    """
    max_len = state.shape[1] - 5
    length, cursor, turn_start, budget, active = (state[:, max_len + j] for j in range(5))
    cache, key, ctx, length, cursor, active, behav, step = _decode_loop(
        graphdef, jax.tree.unflatten(treedef, leaves), cache, key, state[:, :max_len], length, cursor, active > 0,
        turn_start, budget, step, limit, numerics, temperature, model, pad, eot, per_slot)
    cols = jnp.stack([length, cursor, active.astype(jnp.int32), jnp.broadcast_to(step, length.shape)], axis=1)
    return cache, key, jnp.concatenate([ctx, cols], axis=1), behav


def _token_ids(envs: Sequence[Env]) -> tuple[int, int]:
    """(pad, end-of-turn) ids of the envs: a chat env's tokenizer's (`pad_id`, `eot_id`), else the word
    tokenizer's. One generate call serves one vocabulary."""
    ids = {(int(getattr(e, "pad_id", TOKENIZER.PAD)), int(getattr(e, "eot_id", TOKENIZER.EOT))) for e in envs}
    if len(ids) > 1:
        raise ValueError(f"the envs of one generate call disagree on their (pad, end-of-turn) ids: {sorted(ids)}")
    return ids.pop() if ids else (TOKENIZER.PAD, TOKENIZER.EOT)


def _bucket(n: int, cap: int) -> int:
    """The prefill width for `n` tokens: the next power of two (at least 4), at most `cap`."""
    return min(max(4, 1 << max(n - 1, 0).bit_length()), cap)


class _Slots:
    """Host-side state of every episode of a generate call, one row per episode (numpy, fixed
    shape), and which KV-cache slot each episode runs in.

    Episodes are started (their env reset, the prompt appended) when a slot takes them:
    with fewer slots than episodes, a slot whose episode ends takes the next waiting one
    (continuous batching). `slot_ep[s]` is the episode in KV-cache slot s (-1: none left).

    Columns 0..max_len: a forced end-of-turn token can land at index max_len before the
    episode is cut back to the context (it is never fed to the model).
    """

    def __init__(self, envs: Sequence[Env], task_seeds: Sequence[int], group_ids: Sequence[int], max_len: int,
                 old_logp: bool, pad: int = TOKENIZER.PAD, num_slots: Optional[int] = None,
                 open_ended: bool = False):
        """open_ended: `num_slots` slots even with fewer episodes (more are fed later, `extend`)."""
        b = len(envs)
        self.pad = pad
        self.envs, self.task_seeds, self.group_ids = list(envs), list(task_seeds), list(group_ids)
        self.max_len = max_len
        self.tokens = np.full((b, max_len + 1), pad, np.int32)
        self.loss_mask = np.zeros((b, max_len + 1), bool)
        self.behav = np.zeros((b, max_len + 1), np.float32)
        self.versions = np.full((b, max_len + 1), -1, np.int32)
        self.length = np.zeros(b, np.int32)  # tokens in the episode so far
        self.cursor = np.zeros(b, np.int32)  # context tokens already in the KV cache
        self.reread_until = np.zeros(b, np.int32)  # after a weight switch: context the slot must re-read first
        self.credit = np.zeros(b, np.int32)  # prefix tokens copied into the cache, not yet on the step clock
        self.turn_start = np.zeros(b, np.int32)  # index of the current agent turn's first token
        self.budget = np.asarray([e.max_turn_tokens for e in envs], np.int32)
        self.done = np.zeros(b, bool)
        self.waiting = np.zeros(b, bool)  # its env is answering in the worker pool (`env_workers`)
        self.num_turns = np.zeros(b, np.int32)
        self.reward = np.zeros(b, np.float64)
        self.success = np.zeros(b, bool)
        self.latency = np.zeros(b, np.float64)
        self.discarded = [""] * b  # why an episode is no verdict on the agent (Trajectory.discarded)
        # Old-logit bookkeeping (used only when the sampler computes old_logp).
        self.old = np.zeros((b, max_len + 1), np.float32) if old_logp else None
        self.unscored = np.zeros(b, np.int32)  # tokens before this index are scored (or submitted)
        self.segment_ended = np.zeros(b, bool)  # a segment ended at this decode step (dedicated route)
        n = b if num_slots is None else max(1, int(num_slots) if open_ended else min(int(num_slots), b))
        self.slot_ep = np.full(n, -1, np.int64)
        self.next_episode = 0
        for slot in range(n):
            self.start_next(slot)

    def extend(self, envs: Sequence[Env], task_seeds: Sequence[int], group_ids: Sequence[int]) -> None:
        """Appends waiting episodes (rows initialised as in the constructor); free slots take
        them through `start_next`. The open-ended `generate(feed=...)` only."""
        k, m = len(envs), self.max_len
        self.envs += list(envs)
        self.task_seeds += list(task_seeds)
        self.group_ids += list(group_ids)
        self.discarded += [""] * k
        grow = {"tokens": np.full((k, m + 1), self.pad, np.int32), "loss_mask": np.zeros((k, m + 1), bool),
                "behav": np.zeros((k, m + 1), np.float32), "versions": np.full((k, m + 1), -1, np.int32),
                "budget": np.asarray([e.max_turn_tokens for e in envs], np.int32)}
        for name in ("length", "cursor", "reread_until", "turn_start", "num_turns", "unscored", "credit"):
            grow[name] = np.zeros(k, np.int32)
        for name, dtype in (("done", bool), ("waiting", bool), ("success", bool), ("segment_ended", bool),
                            ("reward", np.float64),
                            ("latency", np.float64)):
            grow[name] = np.zeros(k, dtype)
        for name, rows in grow.items():
            setattr(self, name, np.concatenate([getattr(self, name), rows]))

    def start_next(self, slot: int) -> bool:
        """Gives `slot` the next waiting episode (its env is reset now); False when none is left."""
        i = self.next_episode
        if i >= len(self.envs):
            self.slot_ep[slot] = -1
            return False
        self.next_episode += 1
        self.slot_ep[slot] = i
        self.append(i, self.envs[i].reset(self.task_seeds[i]))
        self.turn_start[i] = self.length[i]
        return True

    def running(self) -> np.ndarray:
        """[S] bool: slots whose episode is not done (they advance in the decode loop)."""
        live = self.slot_ep >= 0
        ep = np.where(live, self.slot_ep, 0)
        return live & ~self.done[ep] & ~self.waiting[ep]

    def __len__(self) -> int:
        return len(self.envs)

    def append(self, i: int, tokens: Sequence[int]) -> None:
        """Appends context (not trainable) tokens to slot i; what falls beyond the columns is
        dropped (the episode is then cut to max_len anyway)."""
        lo = int(self.length[i])
        n = len(tokens)
        keep = max(0, min(n, self.max_len + 1 - lo))
        self.tokens[i, lo:lo + keep] = np.asarray(tokens[:keep], np.int32)
        self.length[i] = lo + n

    def context(self, i: int) -> np.ndarray:
        return self.tokens[i, :min(int(self.length[i]), self.max_len)]

    def truncate(self, i: int) -> None:
        """Cuts slot i back to the context: episodes never exceed max_len tokens."""
        ln = int(self.length[i])
        if ln > self.max_len:
            self.length[i] = self.max_len
            self.tokens[i, self.max_len:] = self.pad
            self.loss_mask[i, self.max_len:] = False
            self.behav[i, self.max_len:] = 0.0
            self.versions[i, self.max_len:] = -1

    def has_unscored(self, i: int) -> bool:
        return bool(self.loss_mask[i, self.unscored[i]:self.length[i]].any())

    def to_trajectory(self, i: int) -> Trajectory:
        ln = int(self.length[i])
        return Trajectory(
            tokens=self.tokens[i, :ln].copy(),
            loss_mask=self.loss_mask[i, :ln].copy(),
            behav_logp=self.behav[i, :ln].copy(),
            versions=self.versions[i, :ln].copy(),
            reward=float(self.reward[i]),
            success=bool(self.success[i]),
            num_turns=int(self.num_turns[i]),
            group_id=self.group_ids[i],
            task_seed=self.task_seeds[i],
            old_logp=None if self.old is None else self.old[i, :ln].copy(),
            tool_latency_s=float(self.latency[i]),
            discarded=self.discarded[i],
        )


# Called every `chunk` decode steps with the number of steps so far; returns new
# (params, version) to switch to, or None to keep the current weights.
WeightSource = Callable[[int], Optional[tuple]]


class Sampler:
    """The inference engine: inference numerics, a KV cache, envs, partial rollouts.

    A small interface in the spirit of Tunix's sampler: `update_params` to load a
    version, `generate` to run episodes to completion.
    """

    def __init__(self, graphdef, model_config, numerics: model_lib.Numerics,
                 temperature: float = 1.0, exact_route: Optional[Route] = None, scorer=None,
                 prefill_min: Optional[int] = 16, prefix_cache: bool = False, env_workers: int = 0,
                 mesh: Optional[jax.sharding.Mesh] = None):
        """exact_route: None (no `Trajectory.old_logp`), `Route.INTERRUPT` or `Route.DEDICATED`
        (see the module docstring). scorer: a started `runtime.scorer.LogProbScorer` reading the same
        ring buffer the sampler's versions come from; required by `Route.DEDICATED`.
        prefill_min: known context (prompts, observations, re-reads after a switch) is fed a
        token per decode step inside the device loop, alongside the other slots' generation;
        when some slot has at least `prefill_min` known tokens to (re-)read, all pending context
        is instead written in one batched forward (`model_lib.prefill`) before the loop. Short
        observations are cheaper in the loop; a re-read after a weight switch (every slot, its
        whole context) is much cheaper prefilled. None: never prefill.
        prefix_cache: share the KV cache of the prompts' common prefix (a task's system prompt and
        tools): it is prefilled once per parameter version, into one row, and copied into every
        slot that starts (or re-reads) a context beginning with it (`_apply_prefix`). The prefix
        is the longest common prefix of the contexts seen, at least `prefill_min` tokens; needs
        `prefill_min`. The same tokens and `behav_logp` as without (the step clock counts the
        copied prefix as prefilled), up to the float rounding of a prefill of another shape.
        env_workers: 0 steps the envs on the host between device calls (every slot waits for
        them). N > 0: env steps run in a pool of N threads, and while an episode waits on its env
        (a user simulator, a tool, the reward evaluation) the other slots keep decoding; its slot
        rejoins the decode batch when the answer has arrived. The tokens then depend on when the
        envs answer, unless each episode brings its own key (`episode_sampling`).
        mesh: the sampler's own `(data, fsdp, tensor)` mesh (`learner.mesh.make_mesh`), apart from
        the learner's: the inference weights are split over `tensor` by the family's logical axes
        (heads, MLP hidden, vocabulary), the KV cache over its head axis, and XLA partitions the
        decode loop and the prefill. Its data and fsdp axes must be 1: decoding is tensor-parallel
        or replicated, never FSDP (every decode step would gather every weight). Each version the
        learner hands over is placed on it by `update_params` (a reshard when the learner's
        placement differs; arrays already placed so are kept). None: one device."""
        if exact_route is not None:
            exact_route = Route(exact_route)
            if not exact_route.sampler_side:
                raise ValueError("Sampler exact_route must be None, 'interrupt' or 'dedicated', "
                                 f"got {exact_route.value!r}")
        if exact_route == Route.DEDICATED and scorer is None:
            raise ValueError("Sampler exact_route='dedicated' needs a scorer (a runtime.scorer.LogProbScorer)")
        self.graphdef = graphdef
        self.model_config = model_config
        self.model = config_lib.model_module(model_config)  # transformer or llama: the same functions
        self.pad, self.eot = TOKENIZER.PAD, TOKENIZER.EOT  # set from the envs by each generate call
        self.numerics = numerics
        self.temperature = float(temperature)
        self.exact_route = exact_route
        self.scorer = scorer
        if prefill_min is not None and prefill_min < 2:
            raise ValueError(f"prefill_min must be None or >= 2, got {prefill_min!r}")
        self.prefill_min = prefill_min
        if prefix_cache and prefill_min is None:
            raise ValueError("prefix_cache needs prefill_min (the copied prefix stands for a prefill)")
        self.prefix_cache = bool(prefix_cache)
        if isinstance(env_workers, bool) or not isinstance(env_workers, int) or env_workers < 0:
            raise ValueError(f"env_workers must be an integer >= 0; got {env_workers!r}")
        self.env_workers = env_workers
        if mesh is not None and (mesh.shape.get("data", 1) != 1 or mesh.shape.get("fsdp", 1) != 1):
            raise ValueError(f"the sampler's mesh must have data = fsdp = 1 (tensor-parallel or replicated decoding); "
                             f"got {dict(mesh.shape)}")
        self.mesh = mesh
        self._prefix: Optional[np.ndarray] = None  # the shared prefix's tokens [P]
        self._prefix_kv = None  # its KV cache (one row, `_bucket(P)` positions) under the current version
        self._copy_prefix = jax.jit(_copy_prefix, donate_argnums=(0,))
        self.inf_params = None
        self.learner_params = None  # float32 params of `version` (interrupt route only)
        self.version = -1
        self._loops: dict = {}  # (pad, eot, params treedef) -> the compiled decode loop (`_loop_fn`)

    def update_params(self, params, version: int) -> None:
        """Loads learner params (converted to inference numerics) as `version`.

        With the interrupt route the float32 params are kept as well (they are scored
        with); with the dedicated route the scorer is asked to load `version` from the ring buffer
        now, while it is surely retained."""
        self.inf_params = self.model.inference_params(self._place(params), self.numerics)
        self._inf_leaves = tuple(jax.tree.leaves(self.inf_params))  # what the compiled decode loop takes
        self.version = int(version)
        self._prefix_kv = None  # computed again, lazily, under the new weights
        if self.exact_route == Route.INTERRUPT:
            self.learner_params = params
        elif self.exact_route == Route.DEDICATED:
            self.scorer.prefetch(self.version)

    def _place(self, params):
        """Learner params on the sampler's mesh (split by the family's logical axes), or as they are.
        Split before the cast to inference numerics, so no device ever holds a whole copy."""
        if self.mesh is None:
            return params
        from jaxrl_async.models.sharding import param_shardings
        return jax.device_put(params, param_shardings(self.model.param_axes(params), params, self.mesh))

    def _new_cache(self, rows: int):
        """An empty KV cache {"k", "v": [L, rows, max_len, heads, Dh]}: on the sampler's mesh, split over
        its head axis by `tensor` where that divides the heads (else whole on every device)."""
        cache = self.model.init_cache(self.model_config, rows, self.numerics)
        if self.mesh is None:
            return cache
        from jax.sharding import NamedSharding, PartitionSpec
        heads, tensor = cache["k"].shape[3], self.mesh.shape.get("tensor", 1)
        spec = PartitionSpec(None, None, None, "tensor") if heads % tensor == 0 else PartitionSpec()
        return jax.device_put(cache, NamedSharding(self.mesh, spec))

    def _loop_fn(self, pad: int, eot: int):
        """The decode loop compiled for this sampler and vocabulary (`_packed_loop`): graphdef,
        params treedef, numerics, temperature, model family and token ids bound, the KV cache
        donated. Called as fn(param leaves, cache, key, state, step, limit[, per_slot])."""
        treedef = jax.tree.structure(self.inf_params)
        fn = self._loops.get((pad, eot, treedef))
        if fn is None:
            fn = jax.jit(functools.partial(_packed_loop, self.graphdef, treedef, self.numerics, self.temperature,
                                           self.model, pad, eot), donate_argnums=(1,))
            self._loops[(pad, eot, treedef)] = fn
        return fn

    def generate(self, envs: Sequence[Env], task_seeds: Sequence[int], group_ids: Sequence[int], key,
                 weight_source: Optional[WeightSource] = None, chunk: int = 16,
                 slots: Optional[int] = None,
                 episode_sampling: Optional[EpisodeSampling] = None,
                 feed: Optional[Callable[[], list]] = None,
                 on_done: Optional[Callable[[int, Trajectory], None]] = None) -> tuple[list[Trajectory], RolloutStats]:
        """Runs one episode per env to completion, batched over KV-cache slots.

        envs, task_seeds, group_ids: one entry per episode (N of them).
        weight_source: polled every `chunk` decode steps to switch weights mid-episode.
        slots: KV-cache slots (the decode batch); None or >= N: one per episode. With fewer
          slots than episodes, a slot whose episode ends takes the next one at once
          (continuous batching on fixed shapes): episodes start in input order as slots free
          up, so a long episode does not hold the other slots idle until the batch drains.
        episode_sampling: None (the batch shares `key`'s stream and the sampler's temperature),
          or each episode's own key, temperature and top-p (`EpisodeSampling`, N rows): then
          an episode's tokens do not depend on the rest of the batch (`key` still drives the
          logit noise of `numerics.logit_noise_std`, if any).
        feed: open-ended generation (a server's continuous batching across requests; needs
          `episode_sampling`, no exact_route): called every `chunk` decode steps while some
          slot is free, and when every episode is done; returns new episodes as a list of
          (env, task_seed, group_id, key [2], temperature, top_p), which join in free slots;
          the call returns when every episode is done and `feed` returns none.
        on_done: called with (episode index, its Trajectory) as each episode ends.
        Returns the trajectories in input order (fed ones after them) and rollout statistics.

        The decode steps run on the device (`_decode_loop`), many per call; the host takes
        over only when a slot's agent turn ends (the env answers), at a chunk boundary
        (weights may switch) and at the end. Known context (prompt, observations, the
        re-read after a switch) is fed inside the device loop, or prefilled in one batched
        forward when long (`prefill_min`). The same key, episodes and `slots` give the same
        tokens.
        """
        if self.inf_params is None:
            raise RuntimeError("Sampler.update_params must be called before generate")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if slots is not None and slots < 1:
            raise ValueError(f"slots must be None or >= 1, got {slots}")
        if episode_sampling is not None and len(episode_sampling.keys) != len(envs):
            raise ValueError(f"episode_sampling has {len(episode_sampling.keys)} rows for {len(envs)} episodes")
        if feed is not None and (episode_sampling is None or self.exact_route is not None):
            raise ValueError("generate(feed=...) needs episode_sampling and a sampler without exact_route")
        t0 = time.perf_counter()
        max_len = self.model_config.max_len
        mode = self.exact_route
        self.pad, self.eot = _token_ids(envs)
        loop_fn = self._loop_fn(self.pad, self.eot)
        eps = _Slots(envs, task_seeds, group_ids, max_len, old_logp=mode is not None, pad=self.pad, num_slots=slots,
                     open_ended=feed is not None)
        n, b = len(eps), len(eps.slot_ep)
        cache = self._new_cache(b)
        stats = RolloutStats(episodes=n, slots=b)
        reported = np.zeros(len(eps), bool)  # on_done called
        pool = concurrent.futures.ThreadPoolExecutor(self.env_workers) if self.env_workers else None
        pending: dict = {}  # episode -> (slot, future of its env step), with a worker pool
        try:
            trajs = self._run(eps, cache, key, stats, loop_fn, weight_source, chunk, episode_sampling, feed, on_done,
                              reported, pool, pending)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        stats.wall_s = time.perf_counter() - t0
        return trajs, stats

    def _run(self, eps, cache, key, stats, loop_fn, weight_source, chunk, episode_sampling, feed, on_done, reported,
             pool, pending):
        """The body of `generate` (its arguments, the episodes' state and the env worker pool)."""
        max_len = self.model_config.max_len
        mode = self.exact_route
        n = len(eps)
        if episode_sampling is not None:  # host copies, extended by fed episodes
            samp_keys = np.asarray(episode_sampling.keys, np.uint32)
            samp_temp = np.asarray(episode_sampling.temperature, np.float32)
            samp_top = np.asarray(episode_sampling.top_p, np.float32)
        requests: list[tuple[int, list[tuple[int, int, int]]]] = []  # dedicated: (id, [(episode, lo, hi)] per row)
        cols = np.arange(max_len)[None]
        far = 2**30
        step = 0  # the schedule's clock: decode steps, plus the steps prefilled context would have taken
        next_check = chunk
        while True:
            if pending:  # the env answers that arrived; wait for one when no slot can decode
                self._collect(eps, pending, max_len, block=not eps.running().any())
                self._report(eps, on_done, reported)  # the episodes those answers ended
            if feed is not None and ((eps.slot_ep < 0).any() or eps.done.all()):
                new = feed()
                if new:
                    eps.extend([x[0] for x in new], [x[1] for x in new], [x[2] for x in new])
                    samp_keys = np.concatenate([samp_keys, np.asarray([x[3] for x in new], np.uint32).reshape(-1, 2)])
                    samp_temp = np.concatenate([samp_temp, np.asarray([x[4] for x in new], np.float32)])
                    samp_top = np.concatenate([samp_top, np.asarray([x[5] for x in new], np.float32)])
                    reported = np.concatenate([reported, np.zeros(len(new), bool)])
                    for slot in np.flatnonzero(eps.slot_ep < 0):
                        if not eps.start_next(int(slot)):
                            break
            if eps.done.all():
                break
            if weight_source is not None and step >= next_check:
                # A switch waits until every slot has re-read its context after the last one, so
                # frequent publishing can never stall generation in endless re-reads.
                rereading = bool((~eps.done & (eps.cursor < eps.reread_until)).any())
                update = None if rereading else weight_source(step)
                if update is not None and update[1] != self.version:
                    if mode is not None:  # score what the outgoing version generated, then switch
                        self._score_old(eps, [i for i in range(n) if eps.has_unscored(i)], requests, stats)
                    self.update_params(*update)
                    stats.weight_switches += 1
                    # Re-read the context under the new weights (episodes not started yet have none).
                    eps.cursor[:] = 0
                    eps.reread_until[:] = np.minimum(eps.length, max_len)
                next_check = (step // chunk + 1) * chunk
            if self.prefix_cache:
                cache = self._apply_prefix(eps, cache, stats)
            if self.prefill_min is not None:
                cache, width = self._prefill(eps, cache, stats, self.prefill_min)
                step += width
            limit = max(next_check, step + 1) if weight_source is not None else far
            if feed is not None:  # back to the host every chunk steps: new episodes may join free slots
                limit = min(limit, step + chunk)
            # The slots' rows of the episodes' state: host arrays go straight to the compiled loop.
            active = eps.running()
            ep = np.where(eps.slot_ep >= 0, eps.slot_ep, 0)
            length0 = eps.length[ep]
            columns = [length0, eps.cursor[ep], eps.turn_start[ep], eps.budget[ep], active.astype(np.int32)]
            state = np.concatenate([eps.tokens[ep, :max_len], np.stack(columns, axis=1)], axis=1)
            stats.env_overlap_calls += bool(pending)
            if episode_sampling is None:
                cache, key, out, behav = loop_fn(self._inf_leaves, cache, key, state, np.int32(step), np.int32(limit))
            else:  # the slots' rows of the episodes' own sampling settings
                per_slot = (samp_keys[ep], samp_temp[ep], samp_top[ep])
                cache, key, out, behav = loop_fn(self._inf_leaves, cache, key, state, np.int32(step), np.int32(limit),
                                                 per_slot)
            out, behav = jax.device_get((out, behav))  # the cache and key stay on the device
            ctx, length, cursor, active_out, step_out = (out[:, :max_len], out[:, max_len], out[:, max_len + 1],
                                                         out[:, max_len + 2] > 0, out[0, max_len + 3])
            stats.loop_steps += int(step_out) - step
            step = int(step_out)
            stats.loop_calls += 1
            # The tokens sampled in this call, all of the current version, back into their episodes' rows.
            run = np.flatnonzero(active)
            eps.cursor[ep[run]] = cursor[run]
            eps.length[ep[run]] = length[run]
            rows, at = np.nonzero((cols >= length0[:, None]) & (cols < length[:, None]) & active[:, None])
            e = ep[rows]
            eps.tokens[e, at] = ctx[rows, at]
            eps.loss_mask[e, at] = True
            eps.behav[e, at] = behav[rows, at]
            eps.versions[e, at] = self.version
            stats.generated_tokens += len(rows)
            # The envs answer the slots whose agent turn ended: here, or in the worker pool (`env_workers`) while
            # the other slots decode. (The pool was measured slower on a CPU for envs that answer in
            # microseconds: +38% decode steps, the slots rejoining a call later; it pays for slow envs.)
            self._answer(eps, np.flatnonzero(active & ~active_out).tolist(), max_len, pool, pending)
            self._report(eps, on_done, reported)
            if mode == Route.DEDICATED:
                ended = np.flatnonzero(eps.segment_ended).tolist()
                if ended:
                    self._score_old(eps, ended, requests, stats)
        if mode is not None:
            self._score_old(eps, [i for i in range(n) if eps.has_unscored(i)], requests, stats)
            if mode == Route.DEDICATED:
                self._collect_old(eps, requests, stats)
        stats.decode_steps = step
        stats.episodes = len(eps)
        return [eps.to_trajectory(i) for i in range(len(eps))]

    @staticmethod
    def _report(eps: _Slots, on_done, reported: np.ndarray) -> None:
        """Calls `on_done` for every episode that has ended and was not reported yet."""
        if on_done is not None:
            for i in np.flatnonzero(eps.done & ~reported):
                reported[i] = True
                on_done(int(i), eps.to_trajectory(int(i)))

    def _prefill(self, eps: _Slots, cache, stats: RolloutStats, min_tokens: int):
        """Writes every running slot's known context but its last token into the KV cache in one
        batched forward (the last token is fed by the decode loop, which samples after it).
        Returns the cache and the longest row's prefill: the decode steps it stands for, the
        prefix copied by `_apply_prefix` included (the step clock is the same with or without)."""
        max_len = self.model_config.max_len
        ep = np.where(eps.slot_ep >= 0, eps.slot_ep, 0)
        cursor, length = eps.cursor[ep], eps.length[ep]
        running = eps.running()
        pending = running & (cursor < length - 1)
        n = np.where(pending, length - 1 - cursor, 0)
        clock = n + np.where(running, eps.credit[ep], 0)
        if clock.max(initial=0) + 1 < min_tokens:  # + 1: the last known token, fed by the loop
            return cache, 0
        eps.credit[ep[running]] = 0
        if n.max(initial=0) > 0:
            width = _bucket(int(n.max()), max_len)
            cols = np.arange(width)[None]
            positions = cursor[:, None] + cols
            valid = cols < n[:, None]
            tokens = np.take_along_axis(eps.tokens[ep], np.minimum(positions, max_len), axis=1)
            tokens = np.where(valid, tokens, self.pad).astype(np.int32)
            positions = np.where(valid, positions, max_len).astype(np.int32)  # padding: the cache write is dropped
            cache = self.model.prefill(self.graphdef, self.inf_params, cache, jnp.asarray(tokens),
                                      jnp.asarray(positions), self.numerics)
            eps.cursor[ep[pending]] = length[pending] - 1
            stats.prefill_calls += 1
            stats.prefill_tokens += int(n.sum())
        return cache, int(clock.max())

    def _apply_prefix(self, eps: _Slots, cache, stats: RolloutStats):
        """Copies the shared prefix's KV cache into every running slot that has nothing in the
        cache yet (a new episode, or a re-read after a weight switch) and whose context begins
        with the prefix; their cursor moves past it, and the copied tokens are credited to the
        step clock (`_prefill`). The prefix (`self._prefix`) is the longest common prefix of the
        contexts seen (each but its last token, which the decode loop feeds), kept only while it
        is at least `prefill_min` tokens; its KV is prefilled once per version and prefix."""
        max_len = self.model_config.max_len
        ep = np.where(eps.slot_ep >= 0, eps.slot_ep, 0)
        fresh = np.flatnonzero(eps.running() & (eps.cursor[ep] == 0) & (eps.length[ep] > 1))
        if fresh.size == 0:
            return cache
        prefix = self._prefix
        for slot in fresh:
            ctx = eps.tokens[ep[slot], :min(int(eps.length[ep[slot]]), max_len) - 1]
            if prefix is None:
                common = ctx
            else:
                m = min(len(prefix), len(ctx))
                diff = np.flatnonzero(prefix[:m] != ctx[:m])
                common = prefix[:diff[0] if diff.size else m]
            if len(common) >= self.prefill_min:  # shorter: not worth a prefix; this slot prefills as usual
                prefix = common
        if prefix is None:
            return cache
        if self._prefix is None or len(prefix) != len(self._prefix):
            self._prefix, self._prefix_kv = prefix.copy(), None
        p = len(prefix)
        take = np.zeros(len(eps.slot_ep), bool)
        for slot in fresh:
            i = ep[slot]
            take[slot] = eps.length[i] - 1 >= p and bool((eps.tokens[i, :p] == prefix).all())
        if not take.any():
            return cache
        if self._prefix_kv is None:
            width = _bucket(p, max_len)
            row = self._new_cache(1)
            tokens = np.full((1, width), self.pad, np.int32)
            tokens[0, :p] = prefix
            positions = np.where(np.arange(width) < p, np.arange(width), max_len).astype(np.int32)[None]
            row = self.model.prefill(self.graphdef, self.inf_params, row, jnp.asarray(tokens), jnp.asarray(positions),
                                     self.numerics)
            self._prefix_kv = jax.tree.map(lambda x: x[:, :, :width], row)
            stats.prefix_computes += 1
        cache = self._copy_prefix(cache, self._prefix_kv, jnp.asarray(take))
        i = ep[take]
        eps.cursor[i] = p
        eps.credit[i] = p
        stats.prefix_hits += int(take.sum())
        stats.prefix_tokens += int(take.sum()) * p
        return cache

    def _answer(self, eps: _Slots, slots: list, max_len: int, pool=None, pending=None) -> None:
        """The envs of `slots` (whose agent turns ended) answer; a slot whose episode is done
        takes the next waiting episode, if any. With a worker pool the env steps are submitted
        (`pending[episode] = (slot, future)`) and the slots wait out of the decode batch until
        `_collect` applies their answers."""
        for slot in slots:
            i = int(eps.slot_ep[slot])
            turn = self._close_turn(eps, i, max_len)
            if turn is None:
                eps.start_next(int(slot))
            elif pool is None:
                self._apply_step(eps, i, eps.envs[i].step(turn), max_len)
                if eps.done[i]:
                    eps.start_next(int(slot))
            else:
                eps.waiting[i] = True
                pending[i] = (int(slot), pool.submit(eps.envs[i].step, turn))

    def _collect(self, eps: _Slots, pending: dict, max_len: int, block: bool) -> None:
        """Applies the env answers that have arrived (`block`: waits for at least one first)."""
        if block:
            concurrent.futures.wait([f for _, f in pending.values()], return_when=concurrent.futures.FIRST_COMPLETED)
        for i in [i for i, (_, f) in pending.items() if f.done()]:
            slot, future = pending.pop(i)
            eps.waiting[i] = False
            self._apply_step(eps, i, future.result(), max_len)
            if eps.done[i]:
                eps.start_next(slot)

    def _close_turn(self, slots: _Slots, i: int, max_len: int) -> Optional[list]:
        """Slot i stopped in the decode loop: its turn ended (end-of-turn token or budget) or
        its context is full. Closes the turn; returns its tokens for the env, or None when the
        episode ended out of context."""
        ln = int(slots.length[i])
        if slots.tokens[i, ln - 1] != self.eot:
            if ln - slots.turn_start[i] >= slots.budget[i]:
                # Turn budget spent: the rollout closes the turn. The forced EOT is not a
                # policy sample, so it is context only.
                slots.append(i, [self.eot])
            else:  # out of context mid-turn
                self._finish(slots, i)
                return None
            turn = slots.tokens[i, slots.turn_start[i]:ln]
        else:
            turn = slots.tokens[i, slots.turn_start[i]:ln - 1]
        slots.segment_ended[i] = True  # the agent turn is a segment (old-logit routes)
        return [int(t) for t in turn]

    def _apply_step(self, slots: _Slots, i: int, result, max_len: int) -> None:
        """Episode i's env answered its turn (`result`, a StepResult): the episode ends, or its
        observation is appended."""
        slots.num_turns[i] += 1
        slots.latency[i] += float(result.info.get("latency_s", 0.0))
        if result.done:
            slots.reward[i] = float(result.reward)
            slots.success[i] = bool(result.info.get("success", False))
            slots.done[i] = True
            if result.info.get("user_error"):  # the user simulator failed: no verdict on the agent
                slots.discarded[i] = "user_error"
            # A turn closed by the rollout at position max_len - 1 puts its (context-only)
            # forced EOT at max_len: drop it, episodes never exceed the context.
            slots.truncate(i)
            return
        slots.append(i, result.observation)
        slots.turn_start[i] = slots.length[i]
        if slots.length[i] >= max_len:
            self._finish(slots, i)

    @staticmethod
    def _finish(slots: _Slots, i: int) -> None:
        """Ends an episode that ran out of context: a failure with reward 0. An env with an
        `abandon()` (a τ2 episode: tau2's orchestrator, its simulation record) is told the
        episode ended without it; its answer is not the episode's reward."""
        abandon = getattr(slots.envs[i], "abandon", None)
        if abandon is not None:
            abandon()
        slots.truncate(i)
        slots.done[i] = True
        slots.segment_ended[i] = True
        slots.reward[i] = 0.0
        slots.success[i] = False

    def _score_old(self, slots: _Slots, rows: list[int], requests: list, stats: RolloutStats) -> None:
        """Scores (interrupt) or submits (dedicated) the unscored tokens of `slots[rows]`.

        Every unscored generated token was sampled with the current `self.version`: the
        sampler scores before each switch. Each slot's whole context so far is sent
        (causal attention: later tokens do not change earlier log-probs), left-aligned in
        a row of `max_len` tokens.
        """
        slots.segment_ended[list(rows)] = False
        rows = [i for i in rows if slots.has_unscored(i)]
        if not rows:
            return
        max_len = self.model_config.max_len
        if self.exact_route == Route.INTERRUPT:
            t0 = time.perf_counter()
            # Fixed [B, max_len] whatever the number of rows: one compile per batch size.
            tokens = np.full((len(slots), max_len), self.pad, np.int32)
            for i in rows:
                ctx = slots.context(i)
                tokens[i, :len(ctx)] = ctx
            logp = np.asarray(self.model.token_logprobs(self.graphdef, self.learner_params, jnp.asarray(tokens)))
            for i in rows:
                self._fill_old(slots, i, logp[i])
            stats.old_logp_stall_s += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            tokens = np.full((len(rows), max_len), self.pad, np.int32)
            for r, i in enumerate(rows):
                ctx = slots.context(i)
                tokens[r, :len(ctx)] = ctx
            spans = []
            for i in rows:  # mark the tokens as submitted; their values arrive in _collect_old
                hi = min(int(slots.length[i]), max_len)
                spans.append((i, int(slots.unscored[i]), hi))
                slots.unscored[i] = hi
            requests.append((self.scorer.submit(tokens, self.version), spans))
            stats.old_logp_submit_s += time.perf_counter() - t0
        stats.old_logp_forward_passes += 1

    @staticmethod
    def _fill_old(slots: _Slots, i: int, logp_row: np.ndarray, lo: Optional[int] = None,
                  hi: Optional[int] = None) -> None:
        """Copies the scored log-probs of slot i's generated tokens in [lo, hi)
        (default: from its `unscored` index to the end of its context, which are then scored)."""
        advance = lo is None
        lo = int(slots.unscored[i]) if lo is None else lo
        hi = min(int(slots.length[i]) if hi is None else hi, logp_row.shape[0])
        idx = lo + np.flatnonzero(slots.loss_mask[i, lo:hi])
        slots.old[i, idx] = logp_row[idx]
        if advance:
            slots.unscored[i] = hi

    def _collect_old(self, slots: _Slots, requests: list, stats: RolloutStats) -> None:
        """Dedicated route: waits for every answer and fills the slots' old log-probs."""
        wait0 = self.scorer.stats.collect_wait_s
        answers = self.scorer.collect([rid for rid, _ in requests])
        stats.old_logp_stall_s += self.scorer.stats.collect_wait_s - wait0
        for rid, spans in requests:
            logp = answers[rid]
            for r, (i, lo, hi) in enumerate(spans):
                self._fill_old(slots, i, logp[r], lo, hi)
        requests.clear()
