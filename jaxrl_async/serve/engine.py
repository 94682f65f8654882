"""The serving engine: concurrent completion requests decoded together in the project's sampler.

Each request choice is a one-turn episode (`OneTurnEnv`): its prompt is the rendered chat,
the sampler generates the agent turn in a KV-cache slot until the end-of-turn token or the
request's token budget, and the episode ends there. One engine thread runs open-ended
`Sampler.generate` calls (`feed=`): the requests waiting when a call starts begin it, and
requests that arrive while it runs join free KV-cache slots at the next chunk boundary
(continuous batching across requests); each request is answered as soon as its last choice
ends. A call ends when every episode is done and none waits, or after `max_batch` episodes
(which bounds its host arrays).

Every episode samples with its own key, temperature and top-p (`EpisodeSampling`), so a
request's tokens do not depend on which requests share its call or its slot. A call's KV-cache
slots are the next power of two of the episodes that start it (at most `max_slots`), so the
decode loop compiles once per power of two, not once per batch size (`warmup` compiles them
ahead).

The queue is bounded: `submit` raises `QueueFull` when `max_queue` requests wait (the server
answers 429). With a `weights` source (a `runtime.handoff.WeightSource` or a
`runtime.versions.VersionStore`: `latest_version()` and `get(version)`), the engine loads the
newest published version before each call and at chunk boundaries inside it (the sampler
re-reads every slot's context under the new weights); each completion reports its tokens' versions.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_async.envs.base import StepResult
from jaxrl_async.rollout.sampler import EpisodeSampling, Sampler
from jaxrl_async.runtime.versions import VersionEvicted


class QueueFull(Exception):
    """The engine's request queue is full (HTTP 429)."""


@dataclasses.dataclass
class Completion:
    """One generated agent turn.

    token_ids [T]: the sampled tokens (the end-of-turn token included when sampled);
    logprobs [T]: each token's log-prob under the distribution it was drawn from;
    ended: the turn ended with the end-of-turn token (else the token budget or the context ran out);
    version: the newest policy version of the tokens (-1 when none was generated);
    token_versions [T]: each token's version (None: all `version`).
    """

    token_ids: list
    logprobs: list
    ended: bool
    version: int
    token_versions: Optional[list] = None


class OneTurnEnv:
    """A one-turn episode for the sampler: the prompt, then one agent turn of at most
    `max_tokens` tokens, then done (no reward)."""

    name = "serve"

    def __init__(self, prompt: Sequence[int], max_tokens: int, pad_id: int, eot_id: int):
        self.prompt = [int(t) for t in prompt]
        self.max_turn_tokens = int(max_tokens)
        self.pad_id, self.eot_id = int(pad_id), int(eot_id)

    def reset(self, seed: int) -> list[int]:
        return list(self.prompt)

    def step(self, action) -> StepResult:
        return StepResult(observation=[], reward=0.0, done=True, info={"success": False, "latency_s": 0.0})


@dataclasses.dataclass
class _Job:
    prompt: list
    max_tokens: int
    keys: np.ndarray  # [n, 2] uint32 key data, one per choice
    temperature: float
    top_p: float
    future: concurrent.futures.Future


def uncommitted(params):
    """`params` as arrays not committed to a device (as a random init's are). Versions read from
    a ring buffer are committed, and jit compiles separately for committed and uncommitted
    inputs (the params and everything the decode loop derives from them: its KV cache and key
    outputs): without this, the first followed version would compile the decode loop again."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """Decodes submitted prompts in open-ended `sampler.generate` calls on one thread (see the
    module docstring).

    sampler: a `Sampler` with weights loaded (`update_params`); pad_id, eot_id: the chat
    tokenizer's; max_slots: KV-cache slots of a call at most; max_batch: episodes per call
    (default 4 * max_slots); chunk: decode steps between the host's looks for new requests
    (and new weights); max_queue: requests waiting before `submit` raises `QueueFull`; gather_s:
    before a call, the engine waits in steps of gather_s while more requests arrive (at most
    25 steps), so that requests sent together start it (its slots are sized by them).
    """

    def __init__(self, sampler: Sampler, pad_id: int, eot_id: int, *, max_slots: int = 32,
                 max_batch: Optional[int] = None, max_queue: int = 256, weights=None, seed: int = 0,
                 gather_s: float = 0.002, chunk: int = 16):
        if max_slots < 1 or max_queue < 1:
            raise ValueError(f"max_slots and max_queue must be >= 1; got {max_slots}, {max_queue}")
        if sampler.inf_params is None:
            raise ValueError("the sampler has no weights: call Sampler.update_params first")
        self.sampler = sampler
        self.pad_id, self.eot_id = int(pad_id), int(eot_id)
        self.max_slots = int(max_slots)
        self.max_batch = int(max_batch or 4 * max_slots)
        self.max_queue = int(max_queue)
        self.weights = weights
        self.gather_s = float(gather_s)
        self.chunk = int(chunk)
        self._key = jax.random.key(seed)  # drives only the sampler's logit noise, if configured
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._open = threading.Event()  # cleared by pause(): the engine takes no new batch
        self._open.set()
        self._closed = False
        self.stats = {"batches": 0, "episodes": 0, "generated_tokens": 0, "rejected": 0}
        self._thread = threading.Thread(target=self._run, name="serve-engine", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        return int(self.sampler.version)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken into a batch."""
        with self._cv:
            return len(self._queue)

    def pause(self) -> None:
        """Takes no new batch until `resume` (the queue still fills; for tests and maintenance)."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    def submit(self, prompt: Sequence[int], max_tokens: int, keys: np.ndarray, temperature: float,
               top_p: float) -> concurrent.futures.Future:
        """Queues one request of len(keys) choices; the future's result is a list of `Completion`s.

        keys: [n, 2] uint32 key data, one per choice. Raises QueueFull when `max_queue` requests wait.
        """
        job = _Job(list(prompt), int(max_tokens), np.asarray(keys, np.uint32).reshape(-1, 2), float(temperature),
                   float(top_p), concurrent.futures.Future())
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._queue) >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"{len(self._queue)} requests are waiting (the queue holds {self.max_queue})")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def warmup(self, prompt_tokens: Sequence[int] = (32,)) -> None:
        """Compiles the decode loop for every padded batch size (powers of two up to `max_slots`),
        and the batched prefill of prompts of each length in `prompt_tokens` at each size, so
        that no request of those shapes waits for a compilation (a prompt is prefilled in a
        power-of-two width: other lengths in the same width share the compilation). Call
        before serving (the engine thread must be idle)."""
        b = 1
        while True:
            n = min(b, self.max_slots)
            for length in prompt_tokens:
                envs = [OneTurnEnv([self.pad_id] * int(length), 2, self.pad_id, self.eot_id) for _ in range(n)]
                sampling = EpisodeSampling(np.zeros((n, 2), np.uint32), np.ones(n, np.float32),
                                           np.ones(n, np.float32))
                self.sampler.generate(envs, [0] * n, list(range(n)), self._key, slots=n,
                                      episode_sampling=sampling, feed=lambda: [], chunk=self.chunk)
            if n >= self.max_slots:
                return
            b *= 2

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._open.set()
        self._thread.join(timeout=60)
        for job in self._queue:
            job.future.cancel()

    # ---- the engine thread --------------------------------------------------------------------
    def _take(self) -> list[_Job]:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
        self._open.wait()
        # Let requests sent together join one batch: wait while the queue still grows (every
        # gather_s), for at most 25 gather_s.
        t_end = time.monotonic() + 25 * self.gather_s
        while self.gather_s > 0 and time.monotonic() < t_end:
            before = self.waiting
            time.sleep(self.gather_s)
            if self.waiting == before or self.waiting >= self.max_batch:
                break
        jobs, episodes = [], 0
        with self._cv:
            while self._queue and (not jobs or episodes + len(self._queue[0].keys) <= self.max_batch):
                job = self._queue.popleft()
                jobs.append(job)
                episodes += len(job.keys)
        return jobs

    def _follow(self) -> None:
        """Loads the newest published version, if the weights source has a newer one."""
        if self.weights is None:
            return
        latest = self.weights.latest_version()
        if latest is None or latest == self.sampler.version:
            return
        try:
            params = self.weights.get(latest)
        except VersionEvicted:  # already replaced by a newer one: take that next time
            return
        self.sampler.update_params(uncommitted(params), latest)

    def _newer(self, _step):
        """The sampler's weight source inside a call: the newest published version, if newer."""
        if self.weights is None:
            return None
        latest = self.weights.latest_version()
        if latest is None or latest == self.sampler.version:
            return None
        try:
            return uncommitted(self.weights.get(latest)), latest
        except VersionEvicted:
            return None

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                if self._closed:
                    return
                continue
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            calls: list = []
            try:
                self._follow()
                self._serve(jobs, calls)
            except Exception as e:  # noqa: BLE001 - the requests fail, the engine goes on
                for job in calls:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _serve(self, jobs: list[_Job], calls: list) -> None:
        """One open-ended `generate` call: `jobs` start it; requests that arrive while it runs join
        free slots (up to `max_batch` episodes per call, which bounds its host arrays); each
        request is answered as soon as its last choice ends."""
        owner: list[tuple[_Job, int]] = []  # episode -> (job, choice)
        results: dict[int, list] = {}
        prompts: list[int] = []

        def episodes(new_jobs):
            out = []
            for job in new_jobs:
                calls.append(job)
                results[id(job)] = [None] * len(job.keys)
                for c, k in enumerate(job.keys):
                    owner.append((job, c))
                    prompts.append(len(job.prompt))
                    out.append((OneTurnEnv(job.prompt, job.max_tokens, self.pad_id, self.eot_id), 0, len(owner) - 1,
                                k, job.temperature, job.top_p))
            return out

        def feed():
            room = self.max_batch - len(owner)
            if room <= 0 or not self._open.is_set() or self._closed:
                return []
            taken = []
            with self._cv:
                while self._queue and len(self._queue[0].keys) <= room:
                    job = self._queue.popleft()
                    room -= len(job.keys)
                    taken.append(job)
            return episodes([j for j in taken if j.future.set_running_or_notify_cancel()])

        def on_done(i, t):
            job, c = owner[i]
            p = prompts[i]
            gen = np.flatnonzero(t.loss_mask[p:]) + p  # sampled tokens (a forced end-of-turn token is not)
            ids = t.tokens[gen].tolist()
            res = results[id(job)]
            res[c] = Completion(token_ids=ids, logprobs=t.behav_logp[gen].tolist(),
                                ended=bool(ids) and ids[-1] == self.eot_id,
                                version=int(t.versions[gen].max()) if len(gen) else -1,
                                token_versions=t.versions[gen].tolist())
            self.stats["episodes"] += 1
            self.stats["generated_tokens"] += len(ids)
            if all(r is not None for r in res):
                job.future.set_result(res)

        first = episodes(jobs)
        slots = min(_pow2(len(first)), self.max_slots)  # one compile per power of two
        sampling = EpisodeSampling(np.stack([x[3] for x in first]).astype(np.uint32),
                                   np.asarray([x[4] for x in first], np.float32),
                                   np.asarray([x[5] for x in first], np.float32))
        self._key, key = jax.random.split(self._key)
        self.stats["batches"] += 1
        self.sampler.generate([x[0] for x in first], [0] * len(first), list(range(len(first))), key,
                              weight_source=self._newer if self.weights is not None else None, chunk=self.chunk,
                              slots=slots, episode_sampling=sampling, feed=feed, on_done=on_done)
