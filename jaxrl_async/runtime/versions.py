"""The parameter-version ring buffer on Orbax (docs/design.md section 4).

One writer (the learner) publishes every new parameter version; readers in other
processes (samplers) poll for the newest one between decode chunks (weight sync), and the
learner reads older retained versions back to recompute the exact `pi_old` (the
"snapshot" route of docs/design.md section 3).

On-disk layout under `directory`:

    v_00000012/              a finished version (an Orbax StandardCheckpointHandler dir)
    .tmp-v_00000013-<id>/    being written; ignored by readers
    .evicting-v_00000009-<id>/  being deleted; ignored by readers

Consistency rests on two atomic renames on one local filesystem: a version appears
under its final name only after Orbax has written all of it (tmp -> final), and it
disappears by being renamed away before its files are deleted (final -> evicting).
A finished directory is never modified in place, so a reader that sees the same
directory (same inode and ctime) at `v_XXXXXXXX` before and after its read has read one
whole version; otherwise the read raises `VersionEvicted`.

Integrity: the writer records the size and SHA-256 of every file of a version in its
`integrity.json` (inside the temp directory, before the rename). A disk read verifies it
first and also treats an Orbax error on an unchanged directory as corruption; a corrupt
version raises `VersionCorrupt` (a `VersionEvicted`, so callers "choose again") and is
left out of `versions()` from then on in that process, so readers fall back to the
previous retained version. The writer's `remove_corrupt()` (run by a resuming learner)
deletes corrupt versions.

Background writes (`background=True`, the learner's store): `publish` validates and copies
the params (one jitted copy of the whole tree), hands them to a long-lived writer thread and
returns; the thread saves, hashes, renames and evicts, one version at a time (a publish
waits for the previous write first, so at most one is in flight). The thread is started at
the first publish and kept: starting one per version made every publish wait for the GIL
while the new thread began its save. Until
its write lands, the version is served from memory by this instance's `get` (the learner's
snapshot route) but is not yet in `versions()` or visible to readers in other processes,
which get new versions through the shared-memory hand-off (`runtime.handoff`) instead. A
failed background write is retried once from scratch (`stats["write_retries"]`); a second
failure is raised by the next `publish`, `flush` or `close`.
"""

from __future__ import annotations

import collections
import logging
import os
import queue as queue_lib
import re
import shutil
import threading
import time
import uuid
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_async.learner.checkpoints import check_manifest, write_manifest

_log = logging.getLogger(__name__)
_FINAL = re.compile(r"^v_(\d+)$")
_TMP_PREFIX = ".tmp-"
_EVICT_PREFIX = ".evicting-"


class VersionEvicted(KeyError):
    """Asked for a version that is not retained (evicted, or never published)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class VersionCorrupt(VersionEvicted):
    """A retained version whose files fail the integrity check (or that Orbax cannot read)."""


def _abstract(target) -> Any:
    """The restore target as ShapeDtypeStructs with a sharding, so restores always
    give jax.Arrays of the target's dtypes (Orbax would otherwise return numpy for
    leaves published as numpy) and no copy of the target's values is kept alive."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        sharding = getattr(x, "sharding", None) or default
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(leaf, target)


@jax.jit
def _copy_tree(tree):
    """A copy of every leaf in one dispatch (one `jnp.array(copy=True)` per leaf costs a dispatch each)."""
    return jax.tree.map(jnp.copy, tree)


def _nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree)))


class VersionStore:
    """Keeps the newest `capacity` parameter versions on disk, plus an in-memory LRU.

    directory: where versions live (created if missing); a local filesystem (the
      atomicity relies on os.rename).
    capacity: K >= 1 versions kept on disk; publishing v evicts versions <= v - K.
    target: a params pytree (arrays or jax.ShapeDtypeStruct leaves) fixing the tree
      structure, shapes and dtypes of restores (and of what may be published).
    cache_size: versions kept in memory after a publish or a restore (default: capacity;
      0 disables the cache).
    writer: only the writer may publish or truncate, and only it removes temp/evicting
      dirs left by a crashed writer (a reader must not delete a live writer's temp dir).
      Run one writer per directory.
    background: the writer saves on a background thread (see the module docstring); call
      `close()` (or `flush()`) to wait for the last write and see its error, if any.

    Returned params are jax.Arrays shared with the cache: do not donate them to a jitted
    function (copy first). Not thread-safe apart from the background writer's own thread:
    use one instance per thread.
    """

    def __init__(self, directory: str, capacity: int, target, cache_size: Optional[int] = None,
                 writer: bool = False, background: bool = False):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        cache_size = capacity if cache_size is None else cache_size
        if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        self.directory = os.path.abspath(directory)
        self.capacity = capacity
        self.cache_size = cache_size
        self.writer = writer
        if background and not writer:
            raise ValueError("background writes need writer=True")
        self.background = background
        # Guards the cache, the corrupt set and the stats against the background writer thread.
        self._lock = threading.RLock()
        self._thread: Optional[threading.Thread] = None  # the writer thread (background), once started
        self._jobs: Optional[queue_lib.SimpleQueue] = None  # (version, params) to write; None stops the thread
        self._idle = threading.Event()  # set while no background write is in flight
        self._idle.set()
        self._pending: Optional[tuple[int, Any]] = None  # (version, params) being written in the background
        self._error: Optional[BaseException] = None
        self._target = _abstract(target)
        self._treedef = jax.tree.structure(self._target)
        # version -> (directory identity, params); see _identity for why the identity.
        self._cache: collections.OrderedDict[int, tuple[tuple[int, int], Any]] = collections.OrderedDict()
        self._checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())  # synchronous
        # version -> directory identity of versions found corrupt (skipped by `versions()`).
        self._corrupt: dict[int, tuple[int, int]] = {}
        self.stats = {"disk_reads": 0, "cache_hits": 0, "bytes_read": 0, "bytes_written": 0, "evictions": 0,
                      "corrupt": 0, "publish_wait_s": 0.0, "write_retries": 0}
        os.makedirs(self.directory, exist_ok=True)
        if writer:
            for name in os.listdir(self.directory):
                if name.startswith((_TMP_PREFIX, _EVICT_PREFIX)):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    # -- listing -------------------------------------------------------------------

    def _path(self, version: int) -> str:
        return os.path.join(self.directory, f"v_{version:08d}")

    def _all_versions(self) -> list[int]:
        found = (_FINAL.match(name) for name in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    def versions(self) -> list[int]:
        """Retained, fully written versions on disk, ascending (re-lists the directory); versions
        this instance found corrupt are left out."""
        vs = self._all_versions()
        with self._lock:
            corrupt = dict(self._corrupt)
        if corrupt:
            vs = [v for v in vs if v not in corrupt or self._identity_or_none(v) != corrupt[v]]
        return vs

    def latest_version(self) -> Optional[int]:
        vs = self.versions()
        return vs[-1] if vs else None

    def _evicted(self, version: int) -> VersionEvicted:
        vs = self.versions()
        held = f"{vs[0]}..{vs[-1]}" if vs else "none"
        return VersionEvicted(f"parameter version {version} is not retained in {self.directory} "
                              f"(retained versions: {held}; capacity {self.capacity})")

    def _identity(self, version: int) -> tuple[int, int]:
        """(inode, ctime) of the version's directory; VersionEvicted if it is gone.

        A finished directory is never changed in place, so an unchanged identity means
        the same publication: it guards reads against a concurrent eviction, and cache
        entries against a version number re-published after `truncate_after`."""
        try:
            st = os.stat(self._path(version))
        except FileNotFoundError:
            raise self._evicted(version) from None
        return st.st_ino, st.st_ctime_ns

    # -- reading -------------------------------------------------------------------

    def get(self, version: int):
        """Params of `version`, from the cache or else from disk.

        Raises VersionEvicted if the version is not retained, including when the writer
        evicts it while it is being read. A version this (background) writer is still
        writing comes from memory."""
        pending = self._pending
        if pending is not None and pending[0] == version:
            with self._lock:
                self.stats["cache_hits"] += 1
            return pending[1]
        ident = self._identity(version)
        with self._lock:
            hit = self._cache.get(version)
            if hit is not None:
                if hit[0] == ident:
                    self._cache.move_to_end(version)
                    self.stats["cache_hits"] += 1
                    return hit[1]
                del self._cache[version]  # a different publication under the same number
            corrupt = self._corrupt.get(version) == ident
        if corrupt:
            raise VersionCorrupt(f"parameter version {version} in {self.directory} is corrupt (found earlier)")
        problem = check_manifest(self._path(version))
        if problem is not None:
            if self._identity_or_none(version) != ident:
                raise self._evicted(version)
            raise self._mark_corrupt(version, ident, problem)
        try:
            params = self._checkpointer.restore(self._path(version), args=ocp.args.StandardRestore(self._target))
        except Exception as e:
            # Orbax/TensorStore errors on vanished files vary; translate only if the
            # directory really went away (or was replaced) under us.
            if self._identity_or_none(version) != ident:
                raise self._evicted(version) from e
            raise self._mark_corrupt(version, ident, f"Orbax could not read {self._path(version)}: "
                                                     f"{type(e).__name__}: {e}") from e
        if self._identity_or_none(version) != ident:
            raise self._evicted(version)  # renamed away mid-read: the tree may mix files
        with self._lock:
            self.stats["disk_reads"] += 1
            self.stats["bytes_read"] += _nbytes(params)
            self._remember(version, ident, params)
        return params

    def _mark_corrupt(self, version: int, ident, problem: str) -> VersionCorrupt:
        with self._lock:
            return self._mark_corrupt_locked(version, ident, problem)

    def _mark_corrupt_locked(self, version: int, ident, problem: str) -> VersionCorrupt:
        if self._corrupt.get(version) != ident:
            self._corrupt[version] = ident
            self.stats["corrupt"] += 1
            _log.warning("parameter version %d is corrupt, falling back to an older retained version: %s",
                         version, problem)
        return VersionCorrupt(f"parameter version {version} in {self.directory} is corrupt: {problem}")

    def verify(self, version: int) -> Optional[str]:
        """None if `version`'s files match its integrity manifest, else what is wrong (naming the file)."""
        return check_manifest(self._path(version))

    def remove_corrupt(self) -> list[tuple[int, str]]:
        """Writer only: deletes every retained version that fails verification; returns
        [(version, problem)] for them."""
        self._check_writer("remove_corrupt")
        self.flush()
        bad = []
        for v in self._all_versions():
            problem = self.verify(v)
            if problem is not None:
                bad.append((v, problem))
                self._remove(v)
        with self._lock:
            self._corrupt.clear()
        return bad

    def _identity_or_none(self, version: int):
        try:
            return self._identity(version)
        except VersionEvicted:
            return None

    def get_latest(self) -> tuple[int, Any]:
        """(version, params) of the newest retained version; LookupError if there is none."""
        while True:
            version = self.latest_version()
            if version is None:
                raise LookupError(f"no parameter version published in {self.directory}")
            try:
                return version, self.get(version)
            except VersionEvicted:
                continue  # evicted between listing and reading: a newer one exists now

    def _remember(self, version: int, ident, params) -> None:
        """Caller holds self._lock."""
        if self.cache_size == 0:
            return
        self._cache[version] = (ident, params)
        self._cache.move_to_end(version)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    # -- writing -------------------------------------------------------------------

    def _check_writer(self, what: str) -> None:
        if not self.writer:
            raise PermissionError(f"{what} needs a VersionStore opened with writer=True ({self.directory})")

    def publish(self, version: int, params) -> None:
        """Writes `version` atomically, caches it, then evicts versions <= version - capacity.

        Versions must be ints that strictly increase (ValueError otherwise). With
        `background`, returns once the params are copied and the write is handed to the
        writer thread (after the previous write finished); raises the previous background
        write's error, if it failed."""
        self._check_writer("publish")
        t0 = time.perf_counter()
        self.flush()  # at most one background write in flight; surfaces its error
        self.stats["publish_wait_s"] += time.perf_counter() - t0
        if not isinstance(version, (int, np.integer)) or isinstance(version, bool) or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        version = int(version)
        every = self._all_versions()  # corrupt ones included: their names are taken
        latest = every[-1] if every else None
        if latest is not None and version <= latest:
            raise ValueError(f"versions must strictly increase: got {version} after {latest}")
        if jax.tree.structure(params) != self._treedef:
            raise ValueError(f"params structure {jax.tree.structure(params)} does not match "
                             f"the target's {self._treedef}")
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(self._target)):
            if np.shape(p) != t.shape or p.dtype != t.dtype:
                raise ValueError(f"params leaf {np.shape(p)} {p.dtype} does not match the target's {t.shape} {t.dtype}")
        # The learner donates its buffers to the next update: write (and cache) our own copy.
        if self.cache_size or self.background:
            params = _copy_tree(params)
        if not self.background:
            self._write(version, params)
            return
        self._pending = (version, params)
        self._idle.clear()
        if self._thread is None:
            self._jobs = queue_lib.SimpleQueue()
            self._thread = threading.Thread(target=self._writer_loop, args=(self._jobs,), name="versions-writer",
                                            daemon=True)
            self._thread.start()
        self._jobs.put((version, params))

    def _writer_loop(self, jobs: queue_lib.SimpleQueue) -> None:
        """The background writer thread: one write per job until it gets None."""
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                self._write(*job)
            except BaseException as e:  # noqa: BLE001 - handed to the next publish/flush/close
                self._error = e
            finally:
                self._pending = None
                self._idle.set()

    def _write(self, version: int, params) -> None:
        """Save, manifest, rename (the version appears), cache, evict. Runs on the writer thread
        with `background`: touches the shared state only under the lock."""
        tmp = os.path.join(self.directory, f"{_TMP_PREFIX}v_{version:08d}-{uuid.uuid4().hex[:8]}")
        # A checkpointer of its own: the reading thread may be restoring with self._checkpointer.
        checkpointer = self._checkpointer if not self.background else self._writer_checkpointer()
        # A background write is retried once from scratch: a transient failure (a file
        # truncated or removed under Orbax mid-write, as the chaos soak does) must not stop
        # the learner; a persistent one (disk full) fails twice and is raised.
        attempts = 2 if self.background else 1
        for attempt in range(1, attempts + 1):
            try:
                checkpointer.save(tmp, args=ocp.args.StandardSave(params))
                write_manifest(tmp)  # before the rename: a version appears with its manifest
                os.rename(tmp, self._path(version))  # the one step that makes the version visible
                break
            except Exception as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if attempt == attempts:
                    raise
                _log.warning("writing parameter version %d to %s failed (%s: %s); retrying once",
                             version, tmp, type(e).__name__, e)
                with self._lock:
                    self.stats["write_retries"] += 1
                tmp = os.path.join(self.directory, f"{_TMP_PREFIX}v_{version:08d}-{uuid.uuid4().hex[:8]}")
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        with self._lock:
            self.stats["bytes_written"] += _nbytes(params)
            self._remember(version, self._identity(version), params)
        for old in self._all_versions():
            if old <= version - self.capacity:
                self._remove(old)
                with self._lock:
                    self.stats["evictions"] += 1

    def _writer_checkpointer(self):
        if getattr(self, "_bg_checkpointer", None) is None:
            self._bg_checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
        return self._bg_checkpointer

    def pending_version(self) -> Optional[int]:
        """The version being written in the background, or None."""
        pending = self._pending
        return None if pending is None else pending[0]

    def flush(self) -> None:
        """Waits for the background write in flight, if any; raises its error if it failed
        (once: the error is cleared, the version is not on disk)."""
        self._idle.wait()
        err, self._error = self._error, None
        if err is not None:
            raise RuntimeError(f"the background write of a parameter version to {self.directory} failed: "
                               f"{type(err).__name__}: {err}") from err

    def close(self) -> None:
        """Waits for the last background write (raising its error, if any) and stops the writer thread."""
        try:
            self.flush()
        finally:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
                thread.join()

    def truncate_after(self, version: int) -> None:
        """Removes retained versions > `version` (a learner resuming from an older
        checkpoint discards the future it is about to recompute)."""
        self._check_writer("truncate_after")
        self.flush()
        for v in self._all_versions():
            if v > version:
                self._remove(v)

    def _remove(self, version: int) -> None:
        with self._lock:
            self._cache.pop(version, None)
            self._corrupt.pop(version, None)
        gone = os.path.join(self.directory, f"{_EVICT_PREFIX}v_{version:08d}-{uuid.uuid4().hex[:8]}")
        os.rename(self._path(version), gone)  # atomic: readers see all of it or none
        # A failed delete (e.g. NFS busy files) leaves a hidden dir the next writer cleans.
        shutil.rmtree(gone, ignore_errors=True)
