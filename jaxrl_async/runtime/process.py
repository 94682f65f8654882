"""The process runtime: sampler processes generate continuously; the learner takes from the queue.

Sampler processes (`sampler_process`) write complete groups into the spool queue
(`spool`); the learner takes the oldest `G` per step, dropping (and counting) any older
than `max_staleness`, which the samplers' staleness gate should make impossible.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxrl_async.runtime import sampler_process
from jaxrl_async.runtime.base import queue_dir, ring_capacity
from jaxrl_async.runtime.spool import TrajectoryQueue


class ProcessRuntime:
    """`Runtime` of sampler processes on this host, a spool queue between them and the learner."""

    def __init__(self, config, workdir: str, epoch: int, resume_step: int | None):
        """epoch: (re)starts of the run in this workdir (keeps queue keys unique); resume_step:
        the checkpoint step a resumed run continues from (the queue recovers what it held)."""
        self.config = config
        self.bound = config.runtime.max_staleness
        g = config.rl.groups_per_step
        capacity = config.runtime.queue_capacity or (self.bound + 1) * g
        self.queue = TrajectoryQueue(queue_dir(workdir), capacity)
        self.recovered = self.queue.recover(resume_step) if resume_step is not None else 0
        self.pool = sampler_process.SamplerPool(config, workdir, epoch, ring_capacity(config), capacity)
        self.dropped_stale = 0

    def start(self, version: int) -> None:
        self.pool.shared.next_version.value = int(version)
        self.pool.start()

    def next_groups(self, step: int, version: int):
        """Takes the oldest `G` groups within the staleness bound; returns (trajectories, info)."""
        g = self.config.rl.groups_per_step
        self.queue.set_step(step)
        t0 = time.perf_counter()
        items, dropped = [], 0
        shared = self.pool.shared
        while len(items) < g:
            self.pool.check()
            want = min(g - len(items), self.queue.depth())
            if want == 0:
                time.sleep(0.01)
                continue
            # Counted as taken before they leave the queue, so the samplers' gate never under-counts.
            shared.taken.value = len(items) + want
            for item in self.queue.take(want, timeout=0):
                if version - item.start_version > self.bound:
                    dropped += 1  # should not happen under the gate; never trained on
                else:
                    items.append(item)
            shared.taken.value = len(items)
        # The next batch is for version + 1 (set before `taken` is reset: see Shared).
        shared.next_version.value = version + 1
        shared.taken.value = 0
        self.dropped_stale += dropped
        wait = time.perf_counter() - t0
        # Groups are numbered 0..G-1 within the batch (a sampler numbers them within its own call).
        trajs = [dataclasses.replace(t, group_id=j) for j, item in enumerate(items) for t in item.trajectories]
        metas = [item.meta for item in items]
        return trajs, {
            "rollout/tokens_per_s": float(np.mean([m["tokens_per_s"] for m in metas])),
            "rollout/weight_switches": float(np.mean([m["weight_switches"] for m in metas])),
            "perf/learner_wait_s": wait,
            "perf/sampler_gate_wait_s": float(np.mean([m["gate_wait_s"] for m in metas])),
            "perf/sample_s": wait,
            "queue/depth": float(self.queue.depth()),
            "queue/dropped_stale": float(dropped),
            "queue/dropped_stale_total": float(self.dropped_stale),
            "queue/taken_total": float(self.queue.stats["taken"]),
            "queue/recovered": float(self.recovered),
            "samplers/restarts_total": float(self.pool.restarts),
            **{k: float(np.mean([m[k] for m in metas])) for k in metas[0] if k.startswith("proximal/")},
        }

    def published(self, version: int) -> None:
        del version  # samplers poll the ring buffer themselves

    def checkpointed(self, step: int) -> None:
        self.queue.release(step)

    def close(self) -> None:
        self.pool.close()
