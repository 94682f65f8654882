"""The process runtime: sampler processes generate continuously; the learner takes from the queue.

Sampler processes (`sampler_process`) write complete groups into the spool queue
(`spool`); the learner takes the oldest `G` per step, dropping (and counting) any older
than `max_staleness`, which the samplers' staleness gate should make impossible. While it
needs groups the spool does not hold, it waits on the samplers' doorbell (a semaphore each
put posts, `spool.TrajectoryQueue.wait`), so it wakes as a group lands; with
`runtime.queue_fsync` its renames are flushed once per step, not per take.

`SpoolSource` is the queue with its sampler pool as a `groups.GroupSource`; the learner's loop
over it (`groups.GroupLoop`, shared with the Ray runtime) restarts samplers that died or hung
(no heartbeat for `runtime.hang_timeout_s`) while it waits, logs a status line every
`runtime.wait_log_s` (queue depth, and per sampler: alive, groups in flight, batches done,
newest version loaded) and appends each batch's group keys to
`WORKDIR/queue/ledger/learner.jsonl` (for the soak accounting). Queue items are released
only once the oldest retained checkpoint includes them, so a resume that falls back past a
corrupt newest checkpoint still gets its groups back; the released keys' markers are then
compacted (`spool.TrajectoryQueue.compact`), so the queue's record of them stays small.

With `runtime.num_samplers = 0` there are no sampler processes: `ExternalSource` is the queue
alone, filled by external producers (the agent proxy, `runtime.producer.QueueProducer`), with
the same takes, staleness drops, ledger and release; the learner polls the queue and its status
line says it waits for outside groups.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxrl_async.runtime import sampler_process
from jaxrl_async.runtime.base import queue_dir, ring_capacity
from jaxrl_async.runtime.groups import Group, GroupLoop, SourceStatus, queue_capacity, retained_checkpoints, too_stale
from jaxrl_async.runtime.spool import TrajectoryQueue


class SpoolSource:
    """The spool queue and its sampler processes as a `groups.GroupSource`."""

    name = "sampler"

    def __init__(self, queue: TrajectoryQueue, pool: sampler_process.SamplerPool, bound: int, recovered: int = 0):
        self.queue, self.pool, self.bound, self.recovered = queue, pool, bound, recovered
        self._timing0 = dict(queue.timing)

    @property
    def restarts(self) -> int:
        return self.pool.restarts

    @property
    def hung_restarts(self) -> int:
        return self.pool.hung_restarts

    def begin(self, step: int) -> None:
        self.queue.set_step(step)
        self._timing0 = dict(self.queue.timing)

    def take(self, want: int, version: int, have: int) -> tuple[list[Group], list[Group]]:
        want = min(want, self.queue.depth())
        if want == 0:
            return [], []
        taken = self.pool.shared.taken
        # Counted as taken before they leave the queue, so the samplers' gate never under-counts.
        taken.value = have + want
        got, dropped = [], []
        for item in self.queue.take(want, timeout=0, sync=False):
            group = Group(item.key, int(item.start_version), item.trajectories, item.meta)
            # A stale group should not happen under the gate; it is never trained on.
            (dropped if too_stale(version, group.start_version, self.bound) else got).append(group)
        taken.value = have + len(got)
        return got, dropped

    def wait(self) -> None:
        # Until a sampler posts the doorbell (after its put), or the fallback poll: the loop's
        # restart and hang checks still run at least that often.
        self.queue.wait()

    def end(self, version: int, taken: list[Group]) -> None:
        del taken
        # One flush of this step's renames (with fsync), before a checkpoint can include the step.
        self.queue.sync()
        shared = self.pool.shared
        # The next batch is for version + 1 (set before `taken` is reset: see Shared).
        shared.next_version.value = version + 1
        shared.taken.value = 0

    def depth(self) -> int:
        return self.queue.depth()

    def status(self) -> SourceStatus:
        return SourceStatus(self.queue.depth(), int(self.pool.shared.next_version.value), self.pool.status())

    def restart_dead(self) -> list[tuple[int, str]]:
        return self.pool.restart_dead()

    def restart_hung(self, timeout_s: float, startup_s: float) -> list[int]:
        return self.pool.check_hung(timeout_s, startup_s)

    def metrics(self) -> dict:
        spent = {k: self.queue.timing[k] - self._timing0[k] for k in self._timing0}
        # The learner's share of the hand-off: blocked waiting for a group, and its own work
        # (listing, renames, reading, unpickling, fsync); the rest of the wait is checks.
        return {"perf/queue_wait_s": spent["take_wait_s"],
                "perf/queue_take_s": sum(v for k, v in spent.items() if k != "take_wait_s"),
                "perf/queue_read_s": spent["take_read_s"] + spent["take_unpickle_s"],
                "perf/queue_sync_s": spent["take_sync_s"]}


class ExternalSource:
    """The spool queue filled by external producers (no sampler processes) as a `groups.GroupSource`."""

    name = "producer"
    restarts = 0
    hung_restarts = 0

    def __init__(self, queue: TrajectoryQueue, bound: int, recovered: int = 0):
        self.queue, self.bound, self.recovered = queue, bound, recovered
        self.next_version = 0
        self._timing0 = dict(queue.timing)

    def begin(self, step: int) -> None:
        self.queue.set_step(step)
        self._timing0 = dict(self.queue.timing)

    def take(self, want: int, version: int, have: int) -> tuple[list[Group], list[Group]]:
        del have  # no gate reads it: producers are held back by the queue's capacity alone
        want = min(want, self.queue.depth())
        if want == 0:
            return [], []
        got, dropped = [], []
        for item in self.queue.take(want, timeout=0, sync=False):
            group = Group(item.key, int(item.start_version), item.trajectories, item.meta)
            # An outside producer has no gate: a group beyond the bound is dropped (and counted) here.
            (dropped if too_stale(version, group.start_version, self.bound) else got).append(group)
        return got, dropped

    def wait(self) -> None:
        self.queue.wait()  # no doorbell: a short poll

    def end(self, version: int, taken: list[Group]) -> None:
        del taken
        self.queue.sync()
        self.next_version = version + 1

    def depth(self) -> int:
        return self.queue.depth()

    def status(self) -> SourceStatus:
        return SourceStatus(self.queue.depth(), self.next_version, [])

    def restart_dead(self) -> list[tuple[int, str]]:
        return []

    def restart_hung(self, timeout_s: float, startup_s: float) -> list[int]:
        return []

    metrics = SpoolSource.metrics


class ProcessRuntime:
    """`Runtime` of sampler processes on this host, a spool queue between them and the learner."""

    def __init__(self, config, workdir: str, epoch: int, resume_step: int | None, log: Callable = print,
                 handoff: str | None = None):
        """epoch: (re)starts of the run in this workdir (keeps queue keys unique); resume_step:
        the checkpoint step a resumed run continues from (the queue recovers what it held);
        log: where wait-status, restart and hang lines go (also sent to `logging` as warnings);
        handoff: the name of the learner's shared-memory weight slot (`handoff.WeightSlot`) the
        samplers take new versions from (None: they poll the ring buffer on disk)."""
        self.config = config
        self.workdir = workdir
        self.epoch = epoch
        self.bound = config.runtime.max_staleness
        capacity = queue_capacity(config)
        external = config.runtime.num_samplers == 0
        self.pool = None if external else sampler_process.SamplerPool(config, workdir, epoch, ring_capacity(config),
                                                                      capacity, handoff)
        # The samplers post the shared doorbell after each put: a waiting learner wakes at once.
        self.queue = TrajectoryQueue(queue_dir(workdir), capacity, fsync=config.runtime.queue_fsync,
                                     doorbell=None if external else self.pool.shared.doorbell)
        recovered = self.queue.recover(resume_step) if resume_step is not None else 0
        # This epoch's keys are compactable from now on (a batch is `sampler_groups` groups; an
        # external producer's "batch" is one group: `producer.QueueProducer`).
        self.queue.compact({epoch: 1 if external else config.runtime.sampler_groups})
        self.source = (ExternalSource(self.queue, self.bound, recovered) if external
                       else SpoolSource(self.queue, self.pool, self.bound, recovered))
        self.loop = GroupLoop(self.source, config, workdir, epoch, log)

    @property
    def recovered(self) -> int:
        return self.source.recovered

    def start(self, version: int) -> None:
        if self.pool is None:
            self.source.next_version = int(version)
            return
        self.pool.shared.next_version.value = int(version)
        self.pool.start()

    def next_groups(self, step: int, version: int):
        """Takes the oldest `G` groups within the staleness bound; returns (trajectories, info)."""
        return self.loop.next_groups(step, version)

    def published(self, version: int) -> None:
        del version  # samplers poll the weight slot (or the ring buffer) themselves

    def checkpointed(self, step: int) -> None:
        # Release only what the oldest retained checkpoint includes: if the newest turns out corrupt
        # on resume, the learner falls back to an older one and `recover` must still find its groups.
        self.queue.release(min(retained_checkpoints(self.workdir) | {step}))
        self.queue.compact()

    def close(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
        finally:
            self.loop.close()
