"""The core the asynchronous runtimes share: group keys, the staleness gate, the learner's wait.

The process runtime (`process`: sampler processes, the spool queue) and the Ray runtime
(`ray_runtime`: sampler actors, a coordinator actor) differ only in where a finished group
waits and how a sampler is started and watched. Each implements `GroupSource`, and
`GroupLoop.next_groups` is the one learner-side loop over it: it takes groups within the
staleness bound, restarts samplers that died or hung, logs why it waits, appends each batch's
keys to the ledger (`ledger_dir`) and returns the runtime's metrics.

The pieces both sides of a runtime use are here too, as plain functions and classes:

- `GroupKey`: a group's key `e<epoch>-s<sampler>-b<batch>-g<group>`, unique per learner key
  epoch, sampler, generate call and group within it, so a restarted sampler that regenerates
  its unfinished batch produces the same keys (and the queue drops the groups it has).
- `gate_admits`: the staleness gate a sampler passes before it starts a batch.
- `TakenKeys`: a set of taken keys held per sampler as a frontier (the first batch not wholly
  taken) and the groups taken beyond it, so it stays small however long the run.
- `hung`, `DeathStreak`: when a silent sampler is killed; when restarting a dying one is futile.

This module imports nothing heavy (no JAX): the Ray coordinator actor imports it and starts fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Optional, Protocol

import numpy as np

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- directories


def queue_dir(workdir: str) -> str:
    """The spool queue of trajectory groups (process runtime), and the Ray runtime's state."""
    return os.path.join(workdir, "queue")


def ledger_dir(workdir: str) -> str:
    """Append-only records of groups queued (per sampler) and taken (by the learner, `learner.jsonl`),
    which the soak's accounting reads."""
    return os.path.join(queue_dir(workdir), "ledger")


def read_epoch(workdir: str) -> Optional[int]:
    """The run's key epoch, how many times its learner has (re)started (`WORKDIR/epoch`); None if absent."""
    try:
        with open(os.path.join(workdir, "epoch")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def write_epoch(workdir: str, epoch: int) -> None:
    """Writes `WORKDIR/epoch` atomically (the learner, at each (re)start)."""
    path = os.path.join(workdir, "epoch")
    with open(path + ".tmp", "w") as f:
        f.write(str(epoch))
    os.replace(path + ".tmp", path)


def queue_capacity(config) -> int:
    """Groups a process or Ray run's queue holds: `runtime.queue_capacity`, or by default a
    step's groups for each version a token may lag, plus the current one."""
    return config.runtime.queue_capacity or (config.runtime.max_staleness + 1) * config.rl.groups_per_step


def retained_checkpoints(workdir: str) -> set[int]:
    """The steps of the checkpoints kept in `WORKDIR/checkpoints` (a resume may fall back to any)."""
    ckdir = os.path.join(workdir, "checkpoints")
    return {int(d) for d in os.listdir(ckdir) if d.isdigit()} if os.path.isdir(ckdir) else set()


# ----------------------------------------------------------------------------- group keys

_NUM = "(0|[1-9][0-9]*)"  # canonical decimal: parse(format(k)) == k and format(parse(s)) == s
_KEY = re.compile(f"e{_NUM}-s{_NUM}-b{_NUM}-g{_NUM}")


@dataclasses.dataclass(frozen=True, order=True)
class GroupKey:
    """The key of one group: `e<epoch>-s<sampler>-b<batch>-g<group>`.

    epoch: the learner's key epoch (its (re)start count; a resumed Ray learner keeps the epoch of
    its checkpoint); sampler: the sampler's id; batch: the sampler's generate call; group: the
    group within that call (0..runtime.sampler_groups-1). Task seeds and sampling keys derive from
    the same numbers, so a group regenerated under its key is the same task.
    """

    epoch: int
    sampler: int
    batch: int
    group: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"GroupKey.{f.name} must be an int >= 0, got {v!r}")

    def format(self) -> str:
        return f"e{self.epoch}-s{self.sampler}-b{self.batch}-g{self.group}"

    __str__ = format

    @classmethod
    def parse(cls, key: str) -> GroupKey:
        """The inverse of `format`; ValueError for anything else."""
        m = _KEY.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(f"not a group key (e<epoch>-s<sampler>-b<batch>-g<group>): {key!r}")
        return cls(*(int(x) for x in m.groups()))

    @classmethod
    def try_parse(cls, key: str) -> Optional[GroupKey]:
        try:
            return cls.parse(key)
        except ValueError:
            return None


# ----------------------------------------------------------------------------- the staleness gate


def gate_admits(outstanding: int, next_version: int, start_version: int, bound: int, groups_per_step: int) -> bool:
    """The staleness gate (AReaL's off-policyness bound): may a sampler start a batch at `start_version`?

    outstanding: the groups ahead of the batch's last group, itself included: groups waiting,
    groups other samplers generate, the batch's own groups, and those the learner has taken for
    the batch it assembles now (for learner version `next_version`). The learner takes `G =
    groups_per_step` groups per version, oldest start version first, so the group at position `p`
    (0-based) of that line is trained at version `next_version + p // G` at the latest. The batch
    is admitted iff its last group, at `p = outstanding - 1`, is then at most `bound` versions
    older than its learner: `(outstanding - 1) // G <= bound - (next_version - start_version)`,
    which is `outstanding <= (bound + 1 - (next_version - start_version)) * G`.
    """
    return outstanding <= (bound + 1 - (next_version - start_version)) * groups_per_step


def too_stale(version: int, start_version: int, bound: int) -> bool:
    """A group started at `start_version` may not be trained at learner `version` (dropped, counted)."""
    return version - start_version > bound


# ----------------------------------------------------------------------------- taken keys


class TakenKeys:
    """A set of group keys the learner has taken (trained or dropped), held compactly.

    Keys of `key_epoch` from samplers `0..num_samplers-1` are kept per sampler as its frontier
    (`next_batch[i]`: every group of every earlier batch is in the set) and the groups taken of
    later batches (`beyond()`); a batch whose `groups_per_batch` groups are all in moves the
    frontier on and is forgotten. Its size is therefore the groups taken out of order, not the
    run's length. Any other key (another epoch, an unknown sampler) is kept as it is.
    """

    def __init__(self, key_epoch: int, num_samplers: int, groups_per_batch: int,
                 next_batch: Optional[Iterable[int]] = None, taken: Iterable[str] = ()):
        self.key_epoch, self.k = int(key_epoch), int(groups_per_batch)
        self.next_batch = [int(b) for b in next_batch] if next_batch is not None else [0] * num_samplers
        if len(self.next_batch) != num_samplers:
            raise ValueError(f"next_batch has {len(self.next_batch)} entries for {num_samplers} samplers")
        self.partial: list[dict[int, set[int]]] = [{} for _ in range(num_samplers)]
        self.other: set[str] = set()
        for key in taken:
            self.add(key)

    def _ours(self, key: str) -> Optional[GroupKey]:
        gk = GroupKey.try_parse(key)
        if gk is None or gk.epoch != self.key_epoch or gk.sampler >= len(self.next_batch) or gk.group >= self.k:
            return None
        return gk

    def add(self, key: str) -> None:
        gk = self._ours(key)
        if gk is None:
            self.other.add(key)
            return
        i = gk.sampler
        if gk.batch < self.next_batch[i]:
            return
        self.partial[i].setdefault(gk.batch, set()).add(gk.group)
        while len(self.partial[i].get(self.next_batch[i], ())) >= self.k:
            del self.partial[i][self.next_batch[i]]
            self.next_batch[i] += 1

    def __contains__(self, key: str) -> bool:
        gk = self._ours(key)
        if gk is None:
            return key in self.other
        return gk.batch < self.next_batch[gk.sampler] or gk.group in self.partial[gk.sampler].get(gk.batch, ())

    def beyond(self) -> list[str]:
        """The keys of the set past each sampler's frontier (and any foreign key), sorted."""
        return sorted([GroupKey(self.key_epoch, i, b, g).format() for i, batches in enumerate(self.partial)
                       for b, groups in batches.items() for g in groups] + list(self.other))

    def __len__(self) -> int:
        return sum(self.next_batch) * self.k + sum(len(g) for p in self.partial for g in p.values()) + len(self.other)


# ----------------------------------------------------------------------------- supervision


def hung(ready: bool, silent_s: float, since_start_s: float, timeout_s: float, startup_s: float) -> bool:
    """Is a live sampler hung? Once it has decoded its first chunk (`ready`): no sign of life
    (`silent_s`) for `timeout_s` and started more than `timeout_s` ago; before that (imports,
    set-up, compilation): started more than `startup_s` ago."""
    return (silent_s > timeout_s and since_start_s > timeout_s) if ready else since_start_s > startup_s


class DeathStreak:
    """Deaths in a row of each sampler without progress: restarting one that dies again and again
    before it gets anywhere is futile, so the runtime fails with a clear error after `limit`."""

    def __init__(self, num_samplers: int, limit: int):
        self.limit = limit
        self.count = [0] * num_samplers
        self._mark: list = [None] * num_samplers

    def died(self, i: int, progress) -> int:
        """A death of sampler `i` at `progress` (anything comparable: batches done, say): the
        streak grows if it equals that of the previous death, else restarts at 1. Returns it."""
        self.count[i] = self.count[i] + 1 if self.count[i] and progress == self._mark[i] else 1
        self._mark[i] = progress
        return self.count[i]

    def reset(self, i: int) -> None:
        self.count[i], self._mark[i] = 0, None

    def exceeded(self, i: int) -> bool:
        return self.count[i] >= self.limit


# ----------------------------------------------------------------------------- the learner's loop


@dataclasses.dataclass
class Group:
    """One finished group as the learner takes it: its `n` trajectories, numbered within its batch."""

    key: str
    start_version: int  # the version its episodes started with: every token is at least as new
    trajectories: list  # list[rollout.Trajectory]
    meta: dict  # the sampler's metadata of the generate call (`base.sampler_batch_metrics` reads it)


@dataclasses.dataclass
class SamplerState:
    """One sampler in the wait-status line."""

    id: int
    pid: Optional[int]
    alive: bool
    ready: bool  # has decoded its first chunk (before: starting)
    inflight: int  # groups claimed at the gate and not yet handed over
    batches_done: int
    loaded_version: int
    silent_s: float  # seconds since its last heartbeat (or its start, if later)


@dataclasses.dataclass
class SourceStatus:
    depth: int  # groups waiting
    next_version: int  # the learner version the next batch is for
    samplers: list[SamplerState]


class GroupSource(Protocol):
    """Where an asynchronous runtime's finished groups wait, and its samplers.

    Implemented by the spool queue with its sampler processes (`process.SpoolSource`) and by the
    Ray coordinator with its sampler actors (`ray_runtime.RaySource`). The learner is the only
    caller, from `GroupLoop.next_groups`; none of these calls blocks for long.
    """

    name: str  # a sampler in log lines: "sampler", "sampler actor"
    restarts: int  # samplers restarted (dead or hung) so far
    hung_restarts: int  # of those, hung ones
    recovered: int  # groups a resumed learner got back

    def begin(self, step: int) -> None:
        """A batch for learner step `step` begins."""

    def take(self, want: int, version: int, have: int) -> tuple[list[Group], list[Group]]:
        """At most `want` waiting groups, oldest start version first, without waiting:
        (within the bound for learner `version`, dropped as too stale). `have`: groups already
        taken for this batch (the gate counts them)."""

    def wait(self) -> None:
        """Until a group may have arrived (a doorbell, or a short poll)."""

    def end(self, version: int, taken: list[Group]) -> None:
        """The batch for `version` is complete (`taken`: every group taken for it, dropped ones
        included): make the takes durable; samplers now gate against `version + 1`."""

    def depth(self) -> int: ...

    def status(self) -> SourceStatus: ...

    def restart_dead(self) -> list[tuple[int, str]]:
        """Restarts samplers that died: (id, what happened) each. Raises RuntimeError when one
        keeps dying without progress (`DeathStreak`)."""

    def restart_hung(self, timeout_s: float, startup_s: float) -> list[int]:
        """Kills and restarts samplers that are `hung`; their ids."""

    def metrics(self) -> dict:
        """The source's own metrics for the batch since `begin`."""


def sampler_batch_metrics(metas: list[dict], wait_s: float) -> dict:
    """Runtime metrics of one batch assembled from sampler groups (process and Ray runtimes).

    metas: the sampler metadata of each group (tokens_per_s, weight_switches, gate_wait_s and
    the `proximal/` costs of the generate call it came from); wait_s: seconds the learner
    waited for the batch. Returns means over the groups, and the wait.
    """
    def mean(key):
        return float(np.mean([m[key] for m in metas]))

    return {
        "rollout/tokens_per_s": mean("tokens_per_s"),
        "rollout/weight_switches": mean("weight_switches"),
        "perf/learner_wait_s": wait_s,
        "perf/sampler_gate_wait_s": mean("gate_wait_s"),
        "perf/sample_s": wait_s,
        **{k: mean(k) for k in metas[0] if k.startswith("proximal/")},
    }


class GroupLoop:
    """The learner's side of an asynchronous runtime: `next_groups` over a `GroupSource`.

    Each batch's keys are appended to `ledger_dir(workdir)/learner.jsonl` (epoch, step, version,
    time, the keys trained and dropped with their start versions).
    """

    def __init__(self, source: GroupSource, config, workdir: str, epoch: int, log: Callable = print):
        """log: where wait-status, restart and hang lines go (also sent to `logging` as warnings)."""
        self.source, self.config, self.epoch, self.log = source, config, epoch, log
        self.dropped_stale = 0
        self.taken_total = 0
        os.makedirs(ledger_dir(workdir), exist_ok=True)
        self._ledger = open(os.path.join(ledger_dir(workdir), "learner.jsonl"), "a")

    def warn(self, msg: str) -> None:
        _log.warning(msg)
        self.log(msg)

    def wait_status(self, step: int, waited_s: float, have: int, status: SourceStatus) -> str:
        """One line on why the learner is waiting: queue depth and every sampler's state."""
        parts = []
        for s in status.samplers:
            state = "DEAD" if not s.alive else "alive" if s.ready else "alive, starting"
            parts.append(f"{self.source.name} {s.id} (pid {s.pid}): {state}, {s.inflight} groups in flight, "
                         f"{s.batches_done} batches done, loaded version {s.loaded_version}, "
                         f"last heartbeat {s.silent_s:.1f} s ago")
        if not status.samplers:
            parts.append("no sampler processes (runtime.num_samplers = 0): waiting for groups from external "
                         "producers such as the agent proxy (python -m jaxrl_async.serve --workdir=WORKDIR)")
        return (f"learner waiting {waited_s:.0f} s for step {step}: {have}/{self.config.rl.groups_per_step} "
                f"groups, queue depth {status.depth}, next version {status.next_version}; " + "; ".join(parts))

    def next_groups(self, step: int, version: int):
        """`G` groups within the staleness bound for learner `version`; returns (trajectories, info)."""
        src, rt, g = self.source, self.config.runtime, self.config.rl.groups_per_step
        src.begin(step)
        t0 = time.perf_counter()
        next_log = t0 + rt.wait_log_s
        items: list[Group] = []
        dropped: list[Group] = []
        while True:
            for i, what in src.restart_dead():
                self.warn(f"{src.name} {i} {what} while the learner waited for step {step}: restarted "
                          f"({src.restarts} restarts so far)")
            got, drop = src.take(g - len(items), version, len(items))
            items += got
            dropped += drop
            if len(items) >= g:
                break
            if got or drop:
                continue
            for i in src.restart_hung(rt.hang_timeout_s, rt.sampler_startup_s):
                self.warn(f"{src.name} {i} showed no sign of life for more than runtime.hang_timeout_s = "
                          f"{rt.hang_timeout_s:g} s while the learner waited for step {step}: killed and "
                          f"restarted ({src.hung_restarts} hung restarts so far)")
            now = time.perf_counter()
            if now >= next_log:
                self.warn(self.wait_status(step, now - t0, len(items), src.status()))
                next_log = now + rt.wait_log_s
            src.wait()
        src.end(version, items + dropped)
        self.dropped_stale += len(dropped)
        self.taken_total += len(items) + len(dropped)
        self._ledger.write(json.dumps({
            "epoch": self.epoch, "step": int(step), "version": int(version), "t": time.time(),
            "trained": [[it.key, int(it.start_version)] for it in items],
            "dropped": [[it.key, int(it.start_version)] for it in dropped]}) + "\n")
        self._ledger.flush()
        wait = time.perf_counter() - t0
        # Groups are numbered 0..G-1 within the batch (a sampler numbers them within its own call).
        trajs = [dataclasses.replace(t, group_id=j) for j, it in enumerate(items) for t in it.trajectories]
        return trajs, {
            **sampler_batch_metrics([it.meta for it in items], wait),
            **src.metrics(),
            "queue/depth": float(src.depth()),
            "queue/dropped_stale": float(len(dropped)),
            "queue/dropped_stale_total": float(self.dropped_stale),
            "queue/taken_total": float(self.taken_total),
            "queue/recovered": float(src.recovered),
            "samplers/restarts_total": float(src.restarts),
            "samplers/hung_restarts": float(src.hung_restarts),
        }

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
