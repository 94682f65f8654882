"""The process runtime: sampler processes generate continuously; the learner takes from the queue.

Sampler processes (`sampler_process`) write complete groups into the spool queue
(`spool`); the learner takes the oldest `G` per step, dropping (and counting) any older
than `max_staleness`, which the samplers' staleness gate should make impossible. While it
needs groups the spool does not hold, it waits on the samplers' doorbell (a semaphore each
put posts, `spool.TrajectoryQueue.wait`), so it wakes as a group lands; with
`runtime.queue_fsync` its renames are flushed once per step, not per take.

While it waits for groups the learner restarts samplers that died or hung (no heartbeat for
`runtime.hang_timeout_s`) and logs a status line every `runtime.wait_log_s` (queue depth, and
per sampler: alive, groups in flight, batches done, newest version loaded). Each batch's
group keys are appended to `WORKDIR/queue/ledger/learner.jsonl` (for the soak accounting).
Queue items are released only once the oldest retained checkpoint includes them, so a
resume that falls back past a corrupt newest checkpoint still gets its groups back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable

from jaxrl_async.runtime import sampler_process
from jaxrl_async.runtime.base import queue_dir, ring_capacity, sampler_batch_metrics
from jaxrl_async.runtime.spool import TrajectoryQueue

_log = logging.getLogger(__name__)


class ProcessRuntime:
    """`Runtime` of sampler processes on this host, a spool queue between them and the learner."""

    def __init__(self, config, workdir: str, epoch: int, resume_step: int | None, log: Callable = print,
                 handoff: str | None = None):
        """epoch: (re)starts of the run in this workdir (keeps queue keys unique); resume_step:
        the checkpoint step a resumed run continues from (the queue recovers what it held);
        log: where wait-status and hang lines go (also sent to `logging` as warnings);
        handoff: the name of the learner's shared-memory weight slot (`handoff.WeightSlot`) the
        samplers take new versions from (None: they poll the ring buffer on disk)."""
        self.config = config
        self.workdir = workdir
        self.epoch = epoch
        self.log = log
        self.bound = config.runtime.max_staleness
        g = config.rl.groups_per_step
        capacity = config.runtime.queue_capacity or (self.bound + 1) * g
        self.pool = sampler_process.SamplerPool(config, workdir, epoch, ring_capacity(config), capacity,
                                                handoff)
        # The samplers post the shared doorbell after each put: a waiting learner wakes at once.
        self.queue = TrajectoryQueue(queue_dir(workdir), capacity, fsync=config.runtime.queue_fsync,
                                     doorbell=self.pool.shared.doorbell)
        self.recovered = self.queue.recover(resume_step) if resume_step is not None else 0
        self.dropped_stale = 0
        os.makedirs(sampler_process.ledger_dir(workdir), exist_ok=True)
        self._ledger = open(os.path.join(sampler_process.ledger_dir(workdir), "learner.jsonl"), "a")

    def _warn(self, msg: str) -> None:
        _log.warning(msg)
        self.log(msg)

    def wait_status(self, step: int, waited_s: float, have: int) -> str:
        """One line on why the learner is waiting: queue depth and every sampler's state."""
        parts = []
        for st in self.pool.status():
            state = ("DEAD" if not st["alive"] else "alive, starting" if st["starting"] else "alive")
            parts.append(f"sampler {st['id']} (pid {st['pid']}): {state}, "
                         f"{st['inflight']} groups in flight, {st['batches_done']} batches done, "
                         f"loaded version {st['loaded_version']}, last heartbeat {st['silent_s']:.1f} s ago")
        return (f"learner waiting {waited_s:.0f} s for step {step}: {have}/{self.config.rl.groups_per_step} groups, "
                f"queue depth {self.queue.depth()}, newest version wanted {self.pool.shared.next_version.value}; "
                + "; ".join(parts))

    def start(self, version: int) -> None:
        self.pool.shared.next_version.value = int(version)
        self.pool.start()

    def next_groups(self, step: int, version: int):
        """Takes the oldest `G` groups within the staleness bound; returns (trajectories, info)."""
        g = self.config.rl.groups_per_step
        queue = self.queue
        queue.set_step(step)
        t0 = time.perf_counter()
        timing0 = dict(queue.timing)
        items, dropped, dropped_items = [], 0, []
        shared = self.pool.shared
        rt = self.config.runtime
        next_log = t0 + rt.wait_log_s
        while len(items) < g:
            self.pool.check()
            want = min(g - len(items), queue.depth())
            if want == 0:
                for i in self.pool.check_hung(rt.hang_timeout_s, rt.sampler_startup_s):
                    self._warn(f"sampler {i} showed no sign of life for more than runtime.hang_timeout_s = "
                               f"{rt.hang_timeout_s:g} s while the learner waited for step {step}: killed and "
                               f"restarted ({self.pool.hung_restarts} hung restarts so far)")
                now = time.perf_counter()
                if now >= next_log:
                    self._warn(self.wait_status(step, now - t0, len(items)))
                    next_log = now + rt.wait_log_s
                # Until a sampler posts the doorbell (after its put), or the fallback poll: the
                # pool and hang checks above still run at least that often.
                queue.wait()
                continue
            # Counted as taken before they leave the queue, so the samplers' gate never under-counts.
            shared.taken.value = len(items) + want
            for item in queue.take(want, timeout=0, sync=False):
                if version - item.start_version > self.bound:
                    dropped += 1  # should not happen under the gate; never trained on
                    dropped_items.append(item)
                else:
                    items.append(item)
            shared.taken.value = len(items)
        # One flush of this step's renames (with fsync), before a checkpoint can include the step.
        queue.sync()
        # The next batch is for version + 1 (set before `taken` is reset: see Shared).
        shared.next_version.value = version + 1
        shared.taken.value = 0
        self.dropped_stale += dropped
        self._ledger.write(json.dumps({
            "epoch": self.epoch, "step": int(step), "version": int(version), "t": time.time(),
            "trained": [[it.key, int(it.start_version)] for it in items],
            "dropped": [[it.key, int(it.start_version)] for it in dropped_items]}) + "\n")
        self._ledger.flush()
        wait = time.perf_counter() - t0
        # Groups are numbered 0..G-1 within the batch (a sampler numbers them within its own call).
        trajs = [dataclasses.replace(t, group_id=j) for j, item in enumerate(items) for t in item.trajectories]
        metas = [item.meta for item in items]
        spent = {k: queue.timing[k] - timing0[k] for k in timing0}
        return trajs, {
            **sampler_batch_metrics(metas, wait),
            # The learner's share of the hand-off: blocked waiting for a group, and its own work
            # (listing, renames, reading, unpickling, fsync); the rest of the wait is checks.
            "perf/queue_wait_s": spent["take_wait_s"],
            "perf/queue_take_s": sum(v for k, v in spent.items() if k != "take_wait_s"),
            "perf/queue_read_s": spent["take_read_s"] + spent["take_unpickle_s"],
            "perf/queue_sync_s": spent["take_sync_s"],
            "queue/depth": float(self.queue.depth()),
            "queue/dropped_stale": float(dropped),
            "queue/dropped_stale_total": float(self.dropped_stale),
            "queue/taken_total": float(self.queue.stats["taken"]),
            "queue/recovered": float(self.recovered),
            "samplers/restarts_total": float(self.pool.restarts),
            "samplers/hung_restarts": float(self.pool.hung_restarts),
        }

    def published(self, version: int) -> None:
        del version  # samplers poll the weight slot (or the ring buffer) themselves

    def checkpointed(self, step: int) -> None:
        # Release only what the oldest retained checkpoint includes: if the newest turns out corrupt
        # on resume, the learner falls back to an older one and `recover` must still find its groups.
        ckdir = os.path.join(self.workdir, "checkpoints")
        retained = [int(d) for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
        self.queue.release(min(retained + [step]))

    def close(self) -> None:
        try:
            self.pool.close()
        finally:
            self._ledger.close()
