"""Batched multi-turn generation with per-token versions and partial rollouts.

The sampler keeps one KV-cache slot per episode and advances every slot by one token per
decode step (a single compiled function for the whole rollout). A slot is either
*prefilling* (feeding prompt or observation tokens it already knows) or *generating*
(sampling the next agent token from the inference distribution). Agent turns end at the
end-of-turn token or at the env's per-turn budget; the env's observation is then appended
as non-trainable context.

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
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_async.core.proximal import Route
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.envs.base import Env
from jaxrl_async.envs.tokenizer import TOKENIZER
from jaxrl_async.rollout.trajectory import Trajectory



@dataclasses.dataclass
class RolloutStats:
    episodes: int = 0
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

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.wall_s, 1e-9)


@functools.partial(jax.jit, static_argnames=("graphdef", "numerics", "temperature"), donate_argnames=("cache",))
def _decode_and_sample(graphdef, inf_params, cache, tokens, positions, key, numerics, temperature):
    """One decode step for every slot, then a sample from the inference distribution.

    tokens, positions: `[B]`. Returns (cache, the next key, sampled `[B]` float32 token
    ids and their logp, stacked as `[2, B]` so they reach the host in one transfer).
    The key is split here rather than on the host: on an accelerator every host-side
    dispatch costs about as much as this whole step (benchmarks/kernels.py).
    """
    key, sub = jax.random.split(key)
    noise_key, sample_key = jax.random.split(sub)
    logp, cache = model_lib.decode_step(graphdef, inf_params, cache, tokens, positions, numerics, noise_key)
    if temperature == 0.0:
        sampled = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        sampled_logp = jnp.take_along_axis(logp, sampled[:, None], axis=-1)[:, 0]
    else:
        sampled, sampled_logp = model_lib.sample_token(logp, sample_key, temperature)
    # Token ids < 2**24 are exact in float32.
    return cache, key, jnp.stack([sampled.astype(jnp.float32), sampled_logp])


class _Slot:
    """Host-side state of one episode in a KV-cache slot."""

    def __init__(self, env: Env, task_seed: int, group_id: int):
        self.env = env
        self.task_seed = task_seed
        self.group_id = group_id
        prompt = env.reset(task_seed)
        self.tokens: list[int] = list(prompt)
        self.loss_mask: list[bool] = [False] * len(prompt)
        self.behav: list[float] = [0.0] * len(prompt)
        self.versions: list[int] = [-1] * len(prompt)
        self.cursor = 0  # number of context tokens already in the KV cache
        self.reread_until = 0  # after a weight switch: context length the slot must re-read first
        self.turn_tokens: list[int] = []
        self.num_turns = 0
        self.reward = 0.0
        self.success = False
        self.done = False
        self.latency = 0.0
        # Old-logit bookkeeping (used only when the sampler computes old_logp).
        self.old: Optional[np.ndarray] = None  # [max_len + 1] float32 once enabled
        self.unscored = 0  # tokens before this index are scored (or submitted)
        self.segment_ended = False  # a segment ended at this decode step (dedicated route)

    def append(self, token: int, generated: bool, logp: float = 0.0, version: int = -1):
        self.tokens.append(int(token))
        self.loss_mask.append(generated)
        self.behav.append(float(logp) if generated else 0.0)
        self.versions.append(int(version) if generated else -1)

    def to_trajectory(self) -> Trajectory:
        return Trajectory(
            tokens=np.asarray(self.tokens, np.int32),
            loss_mask=np.asarray(self.loss_mask, bool),
            behav_logp=np.asarray(self.behav, np.float32),
            versions=np.asarray(self.versions, np.int32),
            reward=float(self.reward),
            success=bool(self.success),
            num_turns=self.num_turns,
            group_id=self.group_id,
            task_seed=self.task_seed,
            old_logp=None if self.old is None else self.old[:len(self.tokens)].copy(),
            tool_latency_s=self.latency,
        )

    def has_unscored(self) -> bool:
        return any(self.loss_mask[self.unscored:])


# Called every `chunk` decode steps with the number of steps so far; returns new
# (params, version) to switch to, or None to keep the current weights.
WeightSource = Callable[[int], Optional[tuple]]


class Sampler:
    """The inference engine: inference numerics, a KV cache, envs, partial rollouts.

    A small interface in the spirit of Tunix's sampler: `update_params` to load a
    version, `generate` to run episodes to completion.
    """

    def __init__(self, graphdef, model_config: model_lib.ModelConfig, numerics: model_lib.Numerics,
                 temperature: float = 1.0, exact_route: Optional[Route] = None, scorer=None):
        """exact_route: None (no `Trajectory.old_logp`), `Route.INTERRUPT` or `Route.DEDICATED`
        (see the module docstring). scorer: a started `runtime.scorer.LogProbScorer` reading the same
        ring buffer the sampler's versions come from; required by `Route.DEDICATED`."""
        if exact_route is not None:
            exact_route = Route(exact_route)
            if not exact_route.sampler_side:
                raise ValueError(f"Sampler exact_route must be None, 'interrupt' or 'dedicated', got {exact_route.value!r}")
        if exact_route == Route.DEDICATED and scorer is None:
            raise ValueError("Sampler exact_route='dedicated' needs a scorer (a runtime.scorer.LogProbScorer)")
        self.graphdef = graphdef
        self.model_config = model_config
        self.numerics = numerics
        self.temperature = float(temperature)
        self.exact_route = exact_route
        self.scorer = scorer
        self.inf_params = None
        self.learner_params = None  # float32 params of `version` (interrupt route only)
        self.version = -1

    def update_params(self, params, version: int) -> None:
        """Loads learner params (converted to inference numerics) as `version`.

        With the interrupt route the float32 params are kept as well (they are scored
        with); with the dedicated route the scorer is asked to load `version` from the ring buffer
        now, while it is surely retained."""
        self.inf_params = model_lib.inference_params(params, self.numerics)
        self.version = int(version)
        if self.exact_route == Route.INTERRUPT:
            self.learner_params = params
        elif self.exact_route == Route.DEDICATED:
            self.scorer.prefetch(self.version)

    def generate(self, envs: Sequence[Env], task_seeds: Sequence[int], group_ids: Sequence[int], key,
                 weight_source: Optional[WeightSource] = None, chunk: int = 16) -> tuple[list[Trajectory], RolloutStats]:
        """Runs one episode per env to completion, all slots batched together.

        envs, task_seeds, group_ids: one entry per episode (B of them).
        weight_source: polled every `chunk` decode steps to switch weights mid-episode.
        Returns the trajectories in input order and rollout statistics.
        """
        if self.inf_params is None:
            raise RuntimeError("Sampler.update_params must be called before generate")
        t0 = time.perf_counter()
        max_len = self.model_config.max_len
        slots = [_Slot(e, s, g) for e, s, g in zip(envs, task_seeds, group_ids)]
        b = len(slots)
        cache = model_lib.init_cache(self.model_config, b, self.numerics)
        stats = RolloutStats(episodes=b)
        mode = self.exact_route
        if mode is not None:
            for s in slots:
                s.old = np.zeros(max_len + 1, np.float32)
        requests: list[tuple[int, list[tuple[int, int, int]]]] = []  # dedicated: (id, [(slot, lo, hi)] per row)
        feed = np.zeros(b, np.int32)
        pos = np.zeros(b, np.int32)
        step = 0
        while not all(s.done for s in slots):
            # A switch waits until every slot has re-read its context after the last one, so
            # frequent publishing can never stall generation in endless re-reads.
            rereading = any(not s.done and s.cursor < s.reread_until for s in slots)
            if weight_source is not None and step > 0 and step % chunk == 0 and not rereading:
                update = weight_source(step)
                if update is not None and update[1] != self.version:
                    if mode is not None:  # score what the outgoing version generated, then switch
                        self._score_old(slots, [i for i, s in enumerate(slots) if s.has_unscored()],
                                        requests, stats)
                    self.update_params(*update)
                    stats.weight_switches += 1
                    for s in slots:  # re-read the context under the new weights
                        s.cursor, s.reread_until = 0, len(s.tokens)
            for i, s in enumerate(slots):
                if s.done:  # finished slots idle at position 0; their output is ignored
                    feed[i], pos[i] = TOKENIZER.PAD, 0
                else:
                    feed[i], pos[i] = s.tokens[s.cursor], s.cursor
            cache, key, out = _decode_and_sample(
                self.graphdef, self.inf_params, cache, jnp.asarray(feed), jnp.asarray(pos), key,
                self.numerics, self.temperature)
            out = np.asarray(out)
            sampled, sampled_logp = out[0].astype(np.int32), out[1]
            step += 1
            for i, s in enumerate(slots):
                if s.done:
                    continue
                s.cursor += 1
                if s.cursor < len(s.tokens):
                    continue  # still prefilling known context
                self._advance(s, int(sampled[i]), float(sampled_logp[i]), max_len, stats)
            if mode == Route.DEDICATED:
                ended = [i for i, s in enumerate(slots) if s.segment_ended]
                if ended:
                    self._score_old(slots, ended, requests, stats)
        if mode is not None:
            self._score_old(slots, [i for i, s in enumerate(slots) if s.has_unscored()], requests, stats)
            if mode == Route.DEDICATED:
                self._collect_old(slots, requests, stats)
        stats.decode_steps = step
        stats.wall_s = time.perf_counter() - t0
        return [s.to_trajectory() for s in slots], stats

    def _score_old(self, slots: list[_Slot], rows: list[int], requests: list, stats: RolloutStats) -> None:
        """Scores (interrupt) or submits (dedicated) the unscored tokens of `slots[rows]`.

        Every unscored generated token was sampled with the current `self.version`: the
        sampler scores before each switch. Each slot's whole context so far is sent
        (causal attention: later tokens do not change earlier log-probs), left-aligned in
        a row of `max_len` tokens.
        """
        rows = [i for i in rows if slots[i].has_unscored()]
        for i in rows:
            slots[i].segment_ended = False
        if not rows:
            return
        max_len = self.model_config.max_len
        if self.exact_route == Route.INTERRUPT:
            t0 = time.perf_counter()
            # Fixed [B, max_len] whatever the number of rows: one compile per batch size.
            tokens = np.full((len(slots), max_len), TOKENIZER.PAD, np.int32)
            for i in rows:
                ctx = slots[i].tokens[:max_len]
                tokens[i, :len(ctx)] = ctx
            logp = np.asarray(model_lib.token_logprobs(self.graphdef, self.learner_params, jnp.asarray(tokens)))
            for i in rows:
                self._fill_old(slots[i], logp[i])
            stats.old_logp_stall_s += time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            tokens = np.full((len(rows), max_len), TOKENIZER.PAD, np.int32)
            for r, i in enumerate(rows):
                ctx = slots[i].tokens[:max_len]
                tokens[r, :len(ctx)] = ctx
            spans = []
            for i in rows:  # mark the tokens as submitted; their values arrive in _collect_old
                hi = min(len(slots[i].tokens), max_len)
                spans.append((i, slots[i].unscored, hi))
                slots[i].unscored = hi
            requests.append((self.scorer.submit(tokens, self.version), spans))
            stats.old_logp_submit_s += time.perf_counter() - t0
        stats.old_logp_forward_passes += 1

    @staticmethod
    def _fill_old(s: _Slot, logp_row: np.ndarray, lo: Optional[int] = None, hi: Optional[int] = None) -> None:
        """Copies the scored log-probs of slot `s`'s generated tokens in [lo, hi)
        (default: from `s.unscored` to the end of its context, which are then scored)."""
        advance = lo is None
        lo = s.unscored if lo is None else lo
        hi = min(len(s.tokens) if hi is None else hi, logp_row.shape[0])
        idx = lo + np.flatnonzero(np.asarray(s.loss_mask[lo:hi], bool))
        s.old[idx] = logp_row[idx]
        if advance:
            s.unscored = hi

    def _collect_old(self, slots: list[_Slot], requests: list, stats: RolloutStats) -> None:
        """Dedicated route: waits for every answer and fills the slots' old log-probs."""
        wait0 = self.scorer.stats.collect_wait_s
        answers = self.scorer.collect([rid for rid, _ in requests])
        stats.old_logp_stall_s += self.scorer.stats.collect_wait_s - wait0
        for rid, spans in requests:
            logp = answers[rid]
            for r, (i, lo, hi) in enumerate(spans):
                self._fill_old(slots[i], logp[r], lo, hi)
        requests.clear()

    def _advance(self, s: _Slot, token: int, logp: float, max_len: int, stats: RolloutStats) -> None:
        """Appends a sampled token to slot `s`; ends the turn and steps the env when due."""
        s.append(token, True, logp, self.version)
        stats.generated_tokens += 1
        end_turn = token == TOKENIZER.EOT
        if not end_turn:
            s.turn_tokens.append(token)
            if len(s.turn_tokens) >= s.env.max_turn_tokens:
                # Turn budget spent: the rollout closes the turn. The forced EOT is not a
                # policy sample, so it is context only.
                s.append(TOKENIZER.EOT, False)
                end_turn = True
        if not end_turn:
            if len(s.tokens) >= max_len:
                self._finish(s, max_len)
            return
        s.segment_ended = True  # the agent turn is a segment (old-logit routes)
        result = s.env.step(s.turn_tokens)
        s.turn_tokens = []
        s.num_turns += 1
        s.latency += float(result.info.get("latency_s", 0.0))
        if result.done:
            s.reward = float(result.reward)
            s.success = bool(result.info.get("success", False))
            s.done = True
            # A turn closed by the rollout at position max_len - 1 puts its (context-only)
            # forced EOT at max_len: drop it, episodes never exceed the context.
            for seq in (s.tokens, s.loss_mask, s.behav, s.versions):
                del seq[max_len:]
            return
        for t in result.observation:
            s.append(t, False)
        if len(s.tokens) >= max_len:
            self._finish(s, max_len)

    @staticmethod
    def _finish(s: _Slot, max_len: int) -> None:
        """Ends an episode that ran out of context: a failure with reward 0."""
        for seq in (s.tokens, s.loss_mask, s.behav, s.versions):
            del seq[max_len:]
        s.done = True
        s.segment_ended = True
        s.reward = 0.0
        s.success = False
