"""An external producer of a process-mode run's groups: the queue side of the agent proxy.

A process-mode run with `runtime.num_samplers = 0` starts no sampler processes; its learner
takes the groups other programs put into `WORKDIR/queue` (`process.ExternalSource`). The agent
proxy (`serve.episodes.EpisodeRecorder`, with `python -m jaxrl_async.serve --workdir=WORKDIR`)
hands each complete group to `QueueProducer.put`, which queues it exactly as a sampler process
does: an `Item` under a `groups.GroupKey`, its start version the oldest version that generated
one of its tokens, one ledger line per put (`WORKDIR/queue/ledger/put-e<epoch>-s<id>.jsonl`).

Keys: `e<epoch>-s<producer id>-b<n>-g0`, one group per "batch". The epoch is the learner's
current (re)start count (`WORKDIR/epoch`, re-read at each put, so a restarted learner's keys stay
unique); `n` counts this producer's groups in that epoch, continuing past every key of it the
queue holds (waiting, taken or released), so a restarted producer never reuses a key (the
queue would drop the group as a duplicate). Two producers on one run need distinct ids.

The staleness bound: sampler processes wait at the gate before starting a batch; an outside
program starts its episodes when it likes, so here the bound is kept by the queue's capacity
(a put blocks while `runtime.queue_capacity` groups wait, which holds the program back) and by
the learner, which drops (and counts, `queue/dropped_stale`) any group older than
`runtime.max_staleness` versions: no token beyond the bound reaches the loss.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Optional

import numpy as np

from jaxrl_async.runtime.groups import GroupKey, ledger_dir, queue_capacity, queue_dir, read_epoch
from jaxrl_async.runtime.spool import Item, TrajectoryQueue


def start_version(trajectories: list) -> int:
    """The oldest version that generated a token of the group (context tokens carry -1)."""
    versions = [int(v) for t in trajectories for v, m in zip(t.versions, t.loss_mask) if m and v >= 0]
    if not versions:
        raise ValueError("the group has no generated token with a version: nothing to train on")
    return min(versions)


class QueueProducer:
    """Puts groups of trajectories into a process-mode run's queue (see the module docstring).

    workdir: the training run's directory (its learner must have started: `WORKDIR/epoch`);
    config: the run's config (`runtime.queue_capacity`, `runtime.max_staleness`,
    `rl.groups_per_step`, `rl.group_size`, `runtime.queue_fsync`); producer_id: this producer's
    number in the keys. Raises ValueError naming the path or field when the run cannot take
    groups from outside. Thread-safe.
    """

    def __init__(self, workdir: str, config, producer_id: int = 0):
        if config.runtime.mode != "process" or config.runtime.num_samplers != 0:
            raise ValueError(f"the run's config must have runtime.mode = 'process' and runtime.num_samplers = 0 "
                             f"to take groups from the agent proxy; got {config.runtime.mode!r} and "
                             f"{config.runtime.num_samplers!r}")
        if isinstance(producer_id, bool) or not isinstance(producer_id, int) or producer_id < 0:
            raise ValueError(f"producer_id must be an integer >= 0; got {producer_id!r}")
        if read_epoch(workdir) is None:
            raise ValueError(f"--workdir {workdir!r}: no learner has started there ({workdir}/epoch is missing)")
        self.workdir, self.id, self.group_size = workdir, producer_id, config.rl.group_size
        self.queue = TrajectoryQueue(queue_dir(workdir), queue_capacity(config), fsync=config.runtime.queue_fsync)
        self._epoch: Optional[int] = None
        self._next = 0
        self._lock = threading.Lock()
        self._last_put = time.perf_counter()
        os.makedirs(ledger_dir(workdir), exist_ok=True)

    def _next_key(self) -> GroupKey:
        epoch = read_epoch(self.workdir)
        if epoch != self._epoch:  # first put, or the learner restarted: continue past the queue's keys
            used = [GroupKey.try_parse(k) for k in self.queue.waiting_keys() + sorted(self.queue.consumed_keys())]
            ours = [k.batch for k in used if k is not None and k.epoch == epoch and k.sampler == self.id]
            self._epoch, self._next = epoch, max(ours, default=-1) + 1
        key = GroupKey(self._epoch, self.id, self._next, 0)
        self._next += 1
        return key

    def put(self, trajectories: list, meta: Optional[dict] = None) -> str:
        """Queues one group (blocks while the queue is full); returns its key."""
        if len(trajectories) != self.group_size:
            raise ValueError(f"a group has rl.group_size = {self.group_size} trajectories; got {len(trajectories)}")
        sv = start_version(trajectories)
        switches = [len({int(v) for v in t.versions[t.loss_mask]}) - 1 for t in trajectories]
        generated = sum(int(t.loss_mask.sum()) for t in trajectories)
        with self._lock:
            # The producer's rate: generated tokens per second since its previous put (the
            # sampler's metadata has the same keys; there is no gate to wait at).
            now = time.perf_counter()
            meta = {"producer": "proxy", "tokens_per_s": generated / max(now - self._last_put, 1e-6),
                    "weight_switches": float(np.mean(switches)), "gate_wait_s": 0.0, **(meta or {})}
            self._last_put = now
            key = self._next_key().format()
            dups = self.queue.stats["duplicates_dropped"]
            self.queue.put(Item(key, list(trajectories), sv, meta))
            new = self.queue.stats["duplicates_dropped"] == dups
            with open(os.path.join(ledger_dir(self.workdir), f"put-e{self._epoch}-s{self.id}.jsonl"), "a") as f:
                f.write(json.dumps({"key": key, "sv": int(sv), "new": new, "t": time.time()}) + "\n")
        return key
