"""The serving engine: concurrent completion requests batched into the project's sampler.

Each request choice is a one-turn episode (`OneTurnEnv`): its prompt is the rendered chat,
the sampler generates the agent turn in a KV-cache slot until the end-of-turn token or the
request's token budget, and the episode ends there. One engine thread takes every waiting
request (up to `max_batch` episodes) and runs them in one `Sampler.generate` call, with
`max_slots` KV-cache slots (continuous batching inside the call: a slot whose episode ends
takes the next waiting one). Requests arriving during a call wait for the next one.

Every episode samples with its own key, temperature and top-p (`EpisodeSampling`), so a
request's tokens do not depend on which requests share its batch. The decode batch is
padded to a power of two (at most `max_slots`) with one-token dummy episodes, so the decode
loop compiles once per power of two, not once per batch size.

The queue is bounded: `submit` raises `QueueFull` when `max_queue` requests wait (the server
answers 429). With a `weights` source (a `runtime.handoff.WeightSource` or a
`runtime.versions.VersionStore`: `latest_version()` and `get(version)`), the engine loads the
newest published version before each batch; each completion reports the version of its tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Optional, Sequence

import jax
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
    version: the policy version of the tokens (-1 when none was generated).
    """

    token_ids: list
    logprobs: list
    ended: bool
    version: int


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


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """Batches submitted prompts into `sampler.generate` calls on one thread (see the module docstring).

    sampler: a `Sampler` with weights loaded (`update_params`); pad_id, eot_id: the chat
    tokenizer's; max_slots: KV-cache slots of a call; max_batch: episodes per call (default
    4 * max_slots); max_queue: requests waiting before `submit` raises `QueueFull`; gather_s:
    before a batch, the engine waits in steps of gather_s while more requests arrive (at most
    25 steps), so requests sent together share a batch (requests that arrive during a
    generate call wait for the next one).
    """

    def __init__(self, sampler: Sampler, pad_id: int, eot_id: int, *, max_slots: int = 32,
                 max_batch: Optional[int] = None, max_queue: int = 256, weights=None, seed: int = 0,
                 gather_s: float = 0.002):
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
                self.sampler.generate(envs, [0] * n, list(range(n)), self._key, slots=n, episode_sampling=sampling)
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
        self.sampler.update_params(params, latest)

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                if self._closed:
                    return
                continue
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            try:
                self._follow()
                results = self._generate(jobs)
            except Exception as e:  # noqa: BLE001 - the requests fail, the engine goes on
                for job in jobs:
                    job.future.set_exception(e)
                continue
            for job, res in zip(jobs, results):
                job.future.set_result(res)

    def _generate(self, jobs: list[_Job]) -> list[list[Completion]]:
        envs, keys, temps, top_ps, owner = [], [], [], [], []
        for j, job in enumerate(jobs):
            for k in job.keys:
                envs.append(OneTurnEnv(job.prompt, job.max_tokens, self.pad_id, self.eot_id))
                keys.append(k)
                temps.append(job.temperature)
                top_ps.append(job.top_p)
                owner.append(j)
        n = len(envs)
        slots = min(n, self.max_slots)
        # Pad the decode batch to a power of two with one-token greedy dummies: one compile per size.
        for _ in range(min(_pow2(n), self.max_slots) - slots if n < self.max_slots else 0):
            envs.append(OneTurnEnv([self.pad_id], 1, self.pad_id, self.eot_id))
            keys.append(np.zeros(2, np.uint32))
            temps.append(0.0)
            top_ps.append(1.0)
        slots = min(len(envs), self.max_slots)
        sampling = EpisodeSampling(np.stack(keys).astype(np.uint32), np.asarray(temps, np.float32),
                                   np.asarray(top_ps, np.float32))
        self._key, key = jax.random.split(self._key)
        trajs, stats = self.sampler.generate(envs, [0] * len(envs), list(range(len(envs))), key, slots=slots,
                                             episode_sampling=sampling)
        out: list[list[Completion]] = [[] for _ in jobs]
        for i in range(n):
            t = trajs[i]
            p = len(envs[i].prompt)
            gen = np.flatnonzero(t.loss_mask[p:]) + p  # sampled tokens (a forced end-of-turn token is not)
            ids = t.tokens[gen].tolist()
            out[owner[i]].append(Completion(
                token_ids=ids, logprobs=t.behav_logp[gen].tolist(),
                ended=bool(ids) and ids[-1] == self.eot_id,
                version=int(t.versions[gen].max()) if len(gen) else -1))
        self.stats["batches"] += 1
        self.stats["episodes"] += n
        self.stats["generated_tokens"] += stats.generated_tokens
        return out
