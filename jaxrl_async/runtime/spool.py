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
    consumed.json                        compacted markers: whole released sampler batches
    consumed.json.tmp.<pid>              a compaction in progress

A key's life: waiting -> accepted (``take``: one rename, the commit point) -> released
(``release``: marker written, then the accepted file deleted) -> compacted. ``recover``
moves accepted items back to waiting. The consumed set is ``accepted ∪ consumed markers ∪
compacted``; all are on disk, so dedup survives restarts of either side. Each transition is a
single atomic file operation or is ordered so that a crash between two steps leaves the key
counted as consumed (never lost, never duplicated); re-running the operation finishes the job.

Compaction (``compact``) keeps the consumed set small however long the run: for group keys
(``groups.GroupKey``, ``e<epoch>-s<sampler>-b<batch>-g<group>``) of a key epoch whose batch
size is recorded, the markers of every batch whose groups are all released, up to the
sampler's first batch that is not, are folded into ``consumed.json`` (per key epoch: the
batch size, and per sampler that first batch), written whole and renamed into place before
the markers it covers are deleted. A batch with a key still accepted is never compacted (a
``recover`` may yet move it back). Any other key keeps its marker.

Concurrency model: many producers, one consumer (the learner). Only the consumer moves or
deletes item files. A key is produced by one live producer at a time (a restarted sampler
regenerates the keys of its dead predecessor).

Waking the consumer: with a ``doorbell`` (a ``multiprocessing.Semaphore`` shared by every
instance on the directory) a producer posts it after each rename, and a waiting consumer
wakes at once instead of at its next poll. A semaphore, not an ``Event``: posting and
waiting are single atomic operations, so a producer SIGKILLed at any point leaves nothing
half-done (an ``Event`` takes a lock that a killed holder would keep forever). The
directory stays the truth: the doorbell only says "look again", a post without an item (or
an item whose producer died before posting) costs one extra look, and the consumer still
polls every ``_DOORBELL_POLL_S`` (``_POLL_S`` without a doorbell).

Durability (``fsync``): a process crash, SIGKILL included, needs no fsync at all (the page
cache survives it, and the rename is atomic). fsync is for a crash of the machine: item
files are flushed before their rename, and directory entries after it. The consumer flushes
its renames into ``accepted/`` once per learner step (``sync``), before any checkpoint can
include the step, rather than after every ``take``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
import time
import urllib.parse
import uuid
from typing import Optional

from jaxrl_async.runtime.groups import GroupKey

_ITEM = ".item"
_TMP = ".tmp."
_COMPACTED = "consumed.json"
_POLL_S = 0.01
_DOORBELL_POLL_S = 0.1  # with a doorbell: the fallback poll (a producer killed between rename and post)
_STALE_TMP_S = 60.0


@dataclasses.dataclass
class Item:
    """One group of trajectories (the n samples of one task instance)."""

    key: str  # unique, chosen deterministically by the producer (the runtimes: a `groups.GroupKey`)
    trajectories: list  # list[rollout.Trajectory]
    start_version: int  # parameter version the episodes started with (oldest token version)
    meta: dict = dataclasses.field(default_factory=dict)  # free-form, JSON-able


_TIMING = (
    # producer: looking the key up and waiting for room; pickling; writing the temp file;
    # fsyncing it and the directory; the rename (the commit); posting the doorbell
    "put_check_s", "put_pickle_s", "put_write_s", "put_fsync_s", "put_rename_s",
    # consumer: listing and dedup; waiting for items; the renames (the commit); reading the
    # files; unpickling; fsyncing directories
    "take_scan_s", "take_wait_s", "take_rename_s", "take_read_s", "take_unpickle_s", "take_sync_s")


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
      doorbell: a ``multiprocessing.Semaphore`` (anything with ``release()`` and
        ``acquire(block, timeout)``) shared by producers and consumer: `put` posts it, a
        waiting `take` / `wait` wakes on it. None: the consumer polls every ``_POLL_S``.

    ``timing`` accumulates the seconds each part of `put` and `take` took in this instance
    (the benchmarks and the process runtime's ``perf/queue_*`` metrics read it).
    """

    def __init__(self, directory: str, capacity: int, *, fsync: bool = True, doorbell=None):
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
        self.doorbell = doorbell
        self._unsynced = False  # renames into accepted/ not yet flushed (fsync only)
        self.stats = dict(put=0, duplicates_dropped=0, taken=0, recovered=0, released=0,
                          stale_tmp_removed=0, compacted=0)
        self.timing = dict.fromkeys(_TIMING, 0.0)

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
        """Keys taken and not recovered: accepted (not yet released) or released (compacted included)."""
        q = {e[3] for e in self._listing(self._accepted, True)}
        q.update(n for n in os.listdir(self._consumed) if not n.startswith("."))
        keys = {urllib.parse.unquote(k) for k in q}
        for e, (k, frontier) in self._load_compacted().items():
            keys.update(GroupKey(e, s, b, g).format() for s, f in frontier.items() for b in range(f) for g in range(k))
        return keys

    def _load_compacted(self) -> dict[int, tuple[int, dict[int, int]]]:
        """consumed.json: {key epoch: (groups per batch, {sampler: its first batch not compacted})}."""
        path = os.path.join(self.directory, _COMPACTED)
        try:
            with open(path) as f:
                raw = json.load(f)
            return {int(e): (int(v["k"]), {int(s): int(b) for s, b in v["next_batch"].items()})
                    for e, v in raw["epochs"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"the queue's compacted consumed set {path} is unreadable ({e}); it is "
                             f"written whole and renamed into place, so the disk has corrupted it") from e

    @staticmethod
    def _covered(qkey: str, table: dict) -> bool:
        gk = GroupKey.try_parse(urllib.parse.unquote(qkey))
        if gk is None or gk.epoch not in table:
            return False
        k, frontier = table[gk.epoch]
        return gk.group < k and gk.batch < frontier.get(gk.sampler, 0)

    def _state(self, qkey: str) -> Optional[str]:
        # Checked in the direction keys move (spool -> accepted -> marker), so a key that
        # the consumer moves on while we look is still seen at its next stop.
        if any(e[3] == qkey for e in self._listing(self._spool, False)):
            return "waiting"
        if any(e[3] == qkey for e in self._listing(self._accepted, True)):
            return "consumed"
        if os.path.exists(os.path.join(self._consumed, qkey)):
            return "consumed"
        # Read after the marker: compaction renames consumed.json into place before it deletes markers.
        if self._covered(qkey, self._load_compacted()):
            return "consumed"
        return None

    # ------------------------------------------------------------------ producer

    def put(self, item: Item, timeout: Optional[float] = None) -> bool:
        """Atomically add `item`; False if the spool stayed full for `timeout` seconds.

        A key already waiting or consumed is a no-op returning True: a restarted producer
        regenerating a group it had already handed over. Posts the doorbell after the rename.
        """
        t = self.timing
        t0 = time.perf_counter()
        qkey = _quote(item.key)
        if self._state(qkey) is not None:
            self.stats["duplicates_dropped"] += 1
            t["put_check_s"] += time.perf_counter() - t0
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.depth() >= self.capacity:
            if deadline is not None and time.monotonic() >= deadline:
                t["put_check_s"] += time.perf_counter() - t0
                return False
            time.sleep(_POLL_S)
        t1 = time.perf_counter()
        t["put_check_s"] += t1 - t0
        data = pickle.dumps(item, protocol=5)
        t2 = time.perf_counter()
        t["put_pickle_s"] += t2 - t1
        while True:
            # The put time orders equal start_versions across producers (FIFO).
            name = f"{int(item.start_version)}.{time.time_ns()}.{qkey}{_ITEM}"
            tmp = os.path.join(self._spool, f"{_TMP}{os.getpid()}.{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                t3 = time.perf_counter()
                if self.fsync:
                    os.fsync(f.fileno())
                t4 = time.perf_counter()
            t["put_write_s"] += (t3 - t2) + (time.perf_counter() - t4)
            t["put_fsync_s"] += t4 - t3
            t2 = time.perf_counter()
            try:
                os.replace(tmp, os.path.join(self._spool, name))
                break
            except FileNotFoundError:
                # The consumer took our temp file for a dead producer's leftover (we were
                # stalled > a minute between write and rename): write it again.
                continue
        t5 = time.perf_counter()
        t["put_rename_s"] += t5 - t2
        self._sync_dir(self._spool)
        if self.doorbell is not None:
            self.doorbell.release()
        t["put_fsync_s"] += time.perf_counter() - t5
        self.stats["put"] += 1
        return True

    # ------------------------------------------------------------------ consumer

    def set_step(self, step: int) -> None:
        """The learner step that the next `take` belongs to (tags accepted items)."""
        self._step = int(step)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until a producer posts the doorbell or `timeout` seconds pass; True if woken.

        timeout: at most this long (default: the fallback poll, ``_DOORBELL_POLL_S``). Without
        a doorbell: sleeps ``min(timeout, _POLL_S)`` and returns False. Posts that piled up are
        drained, so one wait answers every put that came before it; call it only after looking
        at the spool (a put that lands after the look posts after it, and wakes this wait).
        """
        t0 = time.perf_counter()
        try:
            if self.doorbell is None:
                time.sleep(_POLL_S if timeout is None else max(0.0, min(timeout, _POLL_S)))
                return False
            woken = self.doorbell.acquire(True, _DOORBELL_POLL_S if timeout is None else max(0.0, timeout))
            if woken:
                while self.doorbell.acquire(False):  # drain: the next look sees all of their items
                    pass
            return woken
        finally:
            self.timing["take_wait_s"] += time.perf_counter() - t0

    def take(self, n: int, timeout: Optional[float] = None, *, sync: bool = True) -> list[Item]:
        """Up to `n` waiting items, oldest start_version first (ties: put order).

        Waits until `n` are waiting (so that the oldest of them are chosen) or `timeout`
        runs out, then takes what there is. Taken items are renamed into ``accepted/``
        with the current step and are never returned again unless `recover`-ed.

        sync: with ``fsync``, flush the renames before returning; False leaves that to a
        later `sync()` (the process runtime syncs once per learner step, not per take).
        """
        t = self.timing
        t0 = time.perf_counter()
        self._remove_stale_tmp()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            waiting = self._dedup_waiting()
            if len(waiting) >= n or (deadline is not None and time.monotonic() >= deadline):
                break
            t["take_scan_s"] += time.perf_counter() - t0
            self.wait(None if deadline is None else deadline - time.monotonic())
            t0 = time.perf_counter()
        t1 = time.perf_counter()
        t["take_scan_s"] += t1 - t0
        out = []
        for _, _sv, _ns, _qkey, name in waiting[:n]:
            dst = os.path.join(self._accepted, f"{self._step}.{name}")
            # The rename is the commit: from here the key is consumed. A crash before the
            # read below leaves it accepted at this step, which `recover` brings back.
            os.replace(os.path.join(self._spool, name), dst)
            t2 = time.perf_counter()
            with open(dst, "rb") as f:
                data = f.read()
            t3 = time.perf_counter()
            out.append(pickle.loads(data))
            t4 = time.perf_counter()
            t["take_rename_s"] += t2 - t1
            t["take_read_s"] += t3 - t2
            t["take_unpickle_s"] += t4 - t3
            t1 = t4
        if out:
            self._unsynced = True
            if sync:
                self.sync()
        self.stats["taken"] += len(out)
        return out

    def sync(self) -> None:
        """With ``fsync``: makes the renames of earlier `take`s durable (a no-op otherwise, or if
        nothing was taken since the last sync). Call it before a checkpoint can include them:
        a machine crash that lost a rename would otherwise bring a trained key back."""
        if not self._unsynced:
            return
        self._unsynced = False
        if not self.fsync:
            return
        t0 = time.perf_counter()
        self._sync_dir(self._spool)
        self._sync_dir(self._accepted)
        self.timing["take_sync_s"] += time.perf_counter() - t0

    def _dedup_waiting(self) -> list[tuple]:
        """Sorted waiting items, deleting files whose key is consumed or waiting twice.

        Producers already skip known keys, but a put racing with `recover` (which moves
        keys backwards) can slip through; the consumer's check is the authoritative one.
        """
        waiting = sorted(self._listing(self._spool, False), key=lambda e: (e[1], e[2], e[4]))
        consumed = compacted = None
        seen, out = set(), []
        for e in waiting:
            qkey = e[3]
            if qkey not in seen:
                if consumed is None:
                    consumed = {a[3] for a in self._listing(self._accepted, True)}
                    compacted = self._load_compacted()
                if qkey not in consumed and not os.path.exists(
                        os.path.join(self._consumed, qkey)) and not self._covered(qkey, compacted):
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

    def compact(self, groups_per_batch: Optional[dict[int, int]] = None) -> int:
        """Folds the markers of wholly released batches into ``consumed.json``; returns how many
        markers it removed. Consumer only (the learner calls it after each `release`).

        groups_per_batch: {key epoch: groups per batch} to record, for key epochs not recorded yet
        (the learner records its own epoch when it starts, before any of its keys exists); only
        group keys of recorded epochs are compacted. Crash-safe: the new ``consumed.json`` is
        renamed into place (after an fsync, with ``fsync``) before the markers it covers are
        deleted, so a crash at any point leaves every released key consumed; the next call
        deletes markers an earlier one left behind.
        """
        table = self._load_compacted()
        changed = False
        for e, k in (groups_per_batch or {}).items():
            if int(e) not in table:
                table[int(e)] = (int(k), {})
                changed = True
            elif table[int(e)][0] != int(k):
                raise ValueError(f"key epoch {e} has {table[int(e)][0]} groups per batch on record, not {k}")
        markers = [n for n in os.listdir(self._consumed) if not n.startswith(".")]
        released = collections.defaultdict(set)  # (epoch, sampler, batch) -> groups released
        for name in markers:
            gk = GroupKey.try_parse(urllib.parse.unquote(name))
            if gk is not None and gk.epoch in table and gk.group < table[gk.epoch][0]:
                released[gk.epoch, gk.sampler, gk.batch].add(gk.group)
        # A key still accepted may yet be recovered (moved back to waiting): its batch stays as it is.
        busy = {(gk.epoch, gk.sampler, gk.batch) for gk in
                (GroupKey.try_parse(urllib.parse.unquote(a[3])) for a in self._listing(self._accepted, True))
                if gk is not None}
        for e, s in sorted({(e, s) for e, s, _ in released}):
            k, frontier = table[e]
            b = frontier.get(s, 0)
            while len(released.get((e, s, b), ())) >= k and (e, s, b) not in busy:
                b += 1
            if b != frontier.get(s, 0):
                frontier[s] = b
                changed = True
        if changed:
            self._write_compacted(table)
        removed = 0
        for name in markers:
            if self._covered(name, table):
                os.unlink(os.path.join(self._consumed, name))
                removed += 1
        if removed:
            self._sync_dir(self._consumed)
        self.stats["compacted"] += removed
        return removed

    def _write_compacted(self, table: dict) -> None:
        for name in os.listdir(self.directory):
            if name.startswith(_COMPACTED + ".tmp."):  # left by a crashed compaction (one consumer)
                os.unlink(os.path.join(self.directory, name))
        path = os.path.join(self.directory, _COMPACTED)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"epochs": {str(e): {"k": k, "next_batch": {str(s): b for s, b in sorted(fr.items())}}
                                  for e, (k, fr) in sorted(table.items())}}, f)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._sync_dir(self.directory)

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
