"""Host-side async queue between sampler processes and the learner: a spool directory.

Samplers (separate processes, any of which may be SIGKILLed at any moment) hand finished
trajectory *groups* to the learner. A ``multiprocessing.Queue`` can be left corrupt by a
producer killed in the middle of a put, so the queue lives on the file system, where a
rename is atomic: a producer writes a temp file and ``os.replace``-s it into place, so an
item file either does not exist or is whole.

Layout under ``directory``::

    spool/<sv>.<ns>.<qkey>.item          waiting: start_version, put time (ns), quoted key
    spool/.tmp.<pid>.<rand>              a put in progress (never matches *.item)
    accepted/<step>.<sv>.<ns>.<qkey>.item  taken by the learner at consumer step <step>
    consumed/<qkey>                      released: its effect is in a checkpoint

A key's life: waiting -> accepted (``take``: one rename, the commit point) -> released
(``release``: marker written, then the accepted file deleted). ``recover`` moves accepted
items back to waiting. The consumed set is ``accepted ∪ consumed markers``; both are on
disk, so dedup survives restarts of either side. Each transition is a single atomic file
operation or is ordered so that a crash between two steps leaves the key counted as
consumed (never lost, never duplicated); re-running the operation finishes the job.

Concurrency model: many producers, one consumer (the learner). Only the consumer moves or
deletes item files. A key is produced by one live producer at a time (a restarted sampler
regenerates the keys of its dead predecessor).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
import urllib.parse
import uuid
from typing import Optional

_ITEM = ".item"
_TMP = ".tmp."
_POLL_S = 0.01
_STALE_TMP_S = 60.0


@dataclasses.dataclass
class Item:
    """One group of trajectories (the n samples of one task instance)."""

    key: str  # unique, chosen deterministically by the producer (e.g. f"s{sid}-b{b}-g{g}")
    trajectories: list  # list[rollout.Trajectory]
    start_version: int  # parameter version the episodes started with (oldest token version)
    meta: dict = dataclasses.field(default_factory=dict)  # free-form, JSON-able


def _quote(key: str) -> str:
    # '.' separates the fields of a file name, '/' would escape the directory and a leading
    # '.' could give '..': escape all of them, so the quoted key is a plain, dot-free name.
    q = urllib.parse.quote(key, safe="").replace(".", "%2E")
    if not q or len(q) > 200:
        raise ValueError(f"item key must be non-empty and short, got {key!r}")
    return q


def _parse(name: str, accepted: bool) -> Optional[tuple]:
    """(step, start_version, put_ns, qkey) of an item file name, None for anything else."""
    if name.startswith(".") or not name.endswith(_ITEM):
        return None
    parts = name[: -len(_ITEM)].split(".")
    if len(parts) != (4 if accepted else 3):
        return None
    try:
        nums = [int(p) for p in parts[:-1]]
    except ValueError:
        return None
    if not accepted:
        nums = [None] + nums
    return (*nums, parts[-1])


class TrajectoryQueue:
    """Bounded, crash-safe, deduplicating queue of `Item`s in a spool directory.

    Every process opens its own instance on the same directory. `put`/`depth` are the
    producer side; `take`/`set_step`/`release`/`recover` belong to the single consumer.

    Args:
      directory: the spool root (created if missing). Keep it on a local file system.
      capacity: max items waiting; `put` blocks while the spool is full. Several
        producers racing for the last slot can overshoot it by at most one item each.
      fsync: flush item files and directory entries to disk, so the queue also survives a
        machine crash; a process crash alone needs no fsync (the page cache survives it).
    """

    def __init__(self, directory: str, capacity: int, *, fsync: bool = True):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.directory = directory
        self.capacity = capacity
        self.fsync = fsync
        self._spool = os.path.join(directory, "spool")
        self._accepted = os.path.join(directory, "accepted")
        self._consumed = os.path.join(directory, "consumed")
        for d in (self._spool, self._accepted, self._consumed):
            os.makedirs(d, exist_ok=True)
        self._step = 0
        self.stats = dict(put=0, duplicates_dropped=0, taken=0, recovered=0, released=0,
                          stale_tmp_removed=0)

    # ---------------------------------------------------------------- inspection

    def _listing(self, directory: str, accepted: bool) -> list[tuple]:
        out = []
        for name in os.listdir(directory):
            parsed = _parse(name, accepted)
            if parsed is not None:
                out.append((*parsed, name))
        return out

    def depth(self) -> int:
        """Items waiting in the spool."""
        return len(self._listing(self._spool, accepted=False))

    def waiting_keys(self) -> list[str]:
        return [urllib.parse.unquote(e[3]) for e in self._listing(self._spool, False)]

    def consumed_keys(self) -> set[str]:
        """Keys taken and not recovered: accepted (not yet released) or released."""
        q = {e[3] for e in self._listing(self._accepted, True)}
        q.update(n for n in os.listdir(self._consumed) if not n.startswith("."))
        return {urllib.parse.unquote(k) for k in q}

    def _state(self, qkey: str) -> Optional[str]:
        # Checked in the direction keys move (spool -> accepted -> marker), so a key that
        # the consumer moves on while we look is still seen at its next stop.
        if any(e[3] == qkey for e in self._listing(self._spool, False)):
            return "waiting"
        if any(e[3] == qkey for e in self._listing(self._accepted, True)):
            return "consumed"
        if os.path.exists(os.path.join(self._consumed, qkey)):
            return "consumed"
        return None

    # ------------------------------------------------------------------ producer

    def put(self, item: Item, timeout: Optional[float] = None) -> bool:
        """Atomically add `item`; False if the spool stayed full for `timeout` seconds.

        A key already waiting or consumed is a no-op returning True: a restarted producer
        regenerating a group it had already handed over.
        """
        qkey = _quote(item.key)
        if self._state(qkey) is not None:
            self.stats["duplicates_dropped"] += 1
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.depth() >= self.capacity:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)
        data = pickle.dumps(item, protocol=5)
        while True:
            # The put time orders equal start_versions across producers (FIFO).
            name = f"{int(item.start_version)}.{time.time_ns()}.{qkey}{_ITEM}"
            tmp = os.path.join(self._spool, f"{_TMP}{os.getpid()}.{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            try:
                os.replace(tmp, os.path.join(self._spool, name))
                break
            except FileNotFoundError:
                # The consumer took our temp file for a dead producer's leftover (we were
                # stalled > a minute between write and rename): write it again.
                continue
        self._sync_dir(self._spool)
        self.stats["put"] += 1
        return True

    # ------------------------------------------------------------------ consumer

    def set_step(self, step: int) -> None:
        """The learner step that the next `take` belongs to (tags accepted items)."""
        self._step = int(step)

    def take(self, n: int, timeout: Optional[float] = None) -> list[Item]:
        """Up to `n` waiting items, oldest start_version first (ties: put order).

        Waits until `n` are waiting (so that the oldest of them are chosen) or `timeout`
        runs out, then takes what there is. Taken items are renamed into ``accepted/``
        with the current step and are never returned again unless `recover`-ed.
        """
        self._remove_stale_tmp()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            waiting = self._dedup_waiting()
            if len(waiting) >= n or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(_POLL_S)
        out = []
        for _, sv, ns, qkey, name in waiting[:n]:
            dst = os.path.join(self._accepted, f"{self._step}.{name}")
            # The rename is the commit: from here the key is consumed. A crash before the
            # read below leaves it accepted at this step, which `recover` brings back.
            os.replace(os.path.join(self._spool, name), dst)
            with open(dst, "rb") as f:
                out.append(pickle.load(f))
        if out:
            self._sync_dir(self._spool)
            self._sync_dir(self._accepted)
        self.stats["taken"] += len(out)
        return out

    def _dedup_waiting(self) -> list[tuple]:
        """Sorted waiting items, deleting files whose key is consumed or waiting twice.

        Producers already skip known keys, but a put racing with `recover` (which moves
        keys backwards) can slip through; the consumer's check is the authoritative one.
        """
        waiting = sorted(self._listing(self._spool, False), key=lambda e: (e[1], e[2], e[4]))
        consumed = None
        seen, out = set(), []
        for e in waiting:
            qkey = e[3]
            if qkey not in seen:
                if consumed is None:
                    consumed = {a[3] for a in self._listing(self._accepted, True)}
                if qkey not in consumed and not os.path.exists(
                        os.path.join(self._consumed, qkey)):
                    seen.add(qkey)
                    out.append(e)
                    continue
            os.unlink(os.path.join(self._spool, e[4]))
            self.stats["duplicates_dropped"] += 1
        return out

    def release(self, before_step: int) -> None:
        """A checkpoint at `before_step` is written: forget the data of earlier steps.

        The marker is written before the file is deleted, so the key stays consumed at
        every instant.
        """
        count = 0
        for step, _, _, qkey, name in self._listing(self._accepted, True):
            if step < before_step:
                marker = os.path.join(self._consumed, qkey)
                with open(marker, "wb") as f:
                    if self.fsync:
                        os.fsync(f.fileno())
                os.unlink(os.path.join(self._accepted, name))
                count += 1
        if count:
            self._sync_dir(self._consumed)
            self._sync_dir(self._accepted)
        self.stats["released"] += count

    def recover(self, checkpoint_step: int) -> int:
        """Learner resumed from the checkpoint at `checkpoint_step`: put back what it lost.

        Items accepted at steps >= checkpoint_step return to the spool (the resumed learner
        trains on them again) and leave the consumed set; items from earlier steps are in
        the checkpoint's effect and are released. Returns the number put back.
        """
        self.release(checkpoint_step)
        count = 0
        for step, _, _, qkey, name in self._listing(self._accepted, True):
            if step >= checkpoint_step:
                # A marker here means a `release` past this checkpoint was interrupted.
                # Drop it first: a crash before the rename then leaves the key accepted,
                # and a rerun of `recover` finishes the move.
                marker = os.path.join(self._consumed, qkey)
                if os.path.exists(marker):
                    os.unlink(marker)
                spool_name = name.split(".", 1)[1]  # drop the step tag: original name
                os.replace(os.path.join(self._accepted, name),
                           os.path.join(self._spool, spool_name))
                count += 1
        if count:
            self._sync_dir(self._spool)
            self._sync_dir(self._accepted)
        self.stats["recovered"] += count
        return count

    def _remove_stale_tmp(self) -> None:
        """Delete temp files left by killed producers (older than a minute)."""
        now = time.time()
        for name in os.listdir(self._spool):
            if name.startswith(_TMP):
                path = os.path.join(self._spool, name)
                try:
                    if now - os.stat(path).st_mtime > _STALE_TMP_S:
                        os.unlink(path)
                        self.stats["stale_tmp_removed"] += 1
                except FileNotFoundError:  # renamed into place meanwhile
                    pass

    def _sync_dir(self, directory: str) -> None:
        # Makes the renames / creations / deletions in `directory` durable.
        if not self.fsync:
            return
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
