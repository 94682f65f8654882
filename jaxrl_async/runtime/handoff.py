"""In-memory weight hand-off: the learner's newest version reaches samplers through shared memory.

The Orbax ring buffer (`runtime.versions`) is the durable record of every version, but a
disk round trip (Orbax save, integrity manifest, rename, then every sampler's Orbax
restore) is slow next to a memory copy. `WeightSlot` is a shared-memory segment (one
host) holding the newest published version of the params, double-buffered:

    header (4 KiB, int64 words)          buffer 0 (params bytes)   buffer 1 (params bytes)
    [fingerprint, current, seq0, ver0, seq1, ver1]

Each buffer has a seqlock: the one writer makes `seq` odd, copies the leaves, stores the
version number, makes `seq` even again, and only then points `current` at the buffer (the
next write goes to the other buffer, so a reader of the current one is disturbed only if
two versions are published during its copy). A reader reads `seq`, the version and the
bytes, then `seq` again, and keeps the copy only if `seq` was even and unchanged: it never
sees a half-written or mixed version. The version numbers are the ring buffer's, so a
version read here and one read from disk under the same number are the same params.

Ordering: the writer's and readers' header words are single aligned 8-byte numpy stores
and loads, and CPython issues them in program order; on x86-64 (total store order) that
orders them against the payload copy. A weaker memory model (ARM, POWER) would need fences,
which numpy cannot issue, so the slot refuses to run there (`check_platform`).

No lock is held across processes, so a SIGKILLed reader or writer can block nobody. The
learner creates the segment (`WeightSlot.create`) and unlinks it at the end
(`close(unlink=True)`); samplers attach by name (`WeightSlot.attach`). An empty slot
(version -1, before the first write of a learner) sends readers to the ring buffer:
`WeightSource` puts the two together behind the ring buffer's `latest_version` / `get`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
import uuid
from multiprocessing import shared_memory
from typing import Any, Optional

import jax
import numpy as np

from jaxrl_async.runtime.versions import VersionEvicted

_HEADER = 4096
_ALIGN = 64
# Header words (int64).
_FINGERPRINT, _CURRENT, _SEQ, _VER = 0, 1, 2, 3  # seq/ver of buffer b at _SEQ + 2b, _VER + 2b
_READ_RETRIES = 1000
# Machines with total store order, which the seqlock's fence-free ordering relies on.
_TSO_MACHINES = ("x86_64", "amd64")


def check_platform() -> None:
    """Raises RuntimeError on a machine without x86-64 store ordering, where the seqlock is unsound."""
    machine = platform.machine()
    if machine.lower() not in _TSO_MACHINES:
        raise RuntimeError(
            f"the shared-memory weight hand-off (runtime.handoff) relies on x86-64 store ordering, and this "
            f"machine is {machine!r}: a sampler could read a half-written version. Use runtime.mode='inline' "
            f"or runtime.mode='ray' here.")


def _layout(target) -> tuple[list[tuple[int, tuple, np.dtype]], int, int]:
    """([(offset, shape, dtype)] per leaf, payload bytes per buffer, fingerprint of the layout)."""
    leaves, offset, out = jax.tree.leaves(target), 0, []
    for x in leaves:
        dtype = np.dtype(x.dtype)
        out.append((offset, tuple(np.shape(x)), dtype))
        offset += -(-dtype.itemsize * int(np.prod(np.shape(x), dtype=np.int64)) // _ALIGN) * _ALIGN
    desc = repr([(o, s, d.str, d.name) for o, s, d in out]) + repr(jax.tree.structure(target))
    # A stable 63-bit fingerprint (Python's hash() is salted per process).
    fp = int.from_bytes(hashlib.sha256(desc.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return out, max(offset, _ALIGN), fp


class WeightSlot:
    """A double-buffered shared-memory slot of one params pytree. One writer, any readers.

    target: a params pytree (arrays or ShapeDtypeStructs) fixing the structure, shapes and
    dtypes; writer and readers must pass the same (checked by a fingerprint of the layout).
    """

    def __init__(self, shm: shared_memory.SharedMemory, target, owner: bool):
        self.shm = shm
        self.name = shm.name
        self.owner = owner
        self._treedef = jax.tree.structure(target)
        self._leaves, self._size, fp = _layout(target)
        self._header = np.ndarray((8,), np.int64, buffer=shm.buf, offset=0)
        if owner:
            self._header[:] = 0
            self._header[_CURRENT] = -1
            self._header[_VER] = self._header[_VER + 2] = -1
            self._header[_FINGERPRINT] = fp
        elif int(self._header[_FINGERPRINT]) != fp:
            raise ValueError(f"shared weight slot {self.name} holds a different params layout than the target")
        self._bufs = [np.ndarray((self._size,), np.uint8, buffer=shm.buf, offset=_HEADER + b * self._size)
                      for b in (0, 1)]
        self.stats = {"writes": 0, "reads": 0, "read_retries": 0, "write_s": 0.0}

    @classmethod
    def create(cls, target, name: Optional[str] = None) -> WeightSlot:
        """A new, empty slot (the learner's); `name` defaults to a unique one."""
        check_platform()
        _, size, _ = _layout(target)
        name = name or f"jaxrl-w-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return cls(shared_memory.SharedMemory(name=name, create=True, size=_HEADER + 2 * size), target, owner=True)

    @classmethod
    def attach(cls, name: str, target) -> WeightSlot:
        """The slot `name` created by a learner (FileNotFoundError if it is gone)."""
        check_platform()
        return cls(shared_memory.SharedMemory(name=name), target, owner=False)

    # -- writer ----------------------------------------------------------------------

    def write(self, version: int, params) -> None:
        """Publishes `params` as `version` (a copy: the caller may donate its buffers afterwards).

        Versions must strictly increase (ValueError otherwise)."""
        if not self.owner:
            raise PermissionError(f"only the creator of shared weight slot {self.name} may write it")
        version = int(version)
        cur = int(self._header[_CURRENT])
        if cur >= 0 and version <= int(self._header[_VER + 2 * cur]):
            last = int(self._header[_VER + 2 * cur])
            raise ValueError(f"versions must strictly increase: got {version} after {last}")
        if jax.tree.structure(params) != self._treedef:
            raise ValueError(f"params structure {jax.tree.structure(params)} does not match the slot's {self._treedef}")
        t0 = time.perf_counter()
        host = jax.device_get(jax.tree.leaves(params))  # one transfer for all leaves
        for x, (_, shape, dtype) in zip(host, self._leaves):
            if np.shape(x) != shape or np.dtype(x.dtype) != dtype:
                raise ValueError(f"params leaf {np.shape(x)} {x.dtype} does not match the slot's {shape} {dtype}")
        b = 1 - cur if cur >= 0 else 0
        h = self._header
        h[_SEQ + 2 * b] += 1  # odd: being written
        buf = self._bufs[b]
        for x, (off, shape, dtype) in zip(host, self._leaves):
            n = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            buf[off:off + n] = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
        h[_VER + 2 * b] = version
        h[_SEQ + 2 * b] += 1  # even: whole
        h[_CURRENT] = b
        self.stats["writes"] += 1
        self.stats["write_s"] += time.perf_counter() - t0

    # -- readers ---------------------------------------------------------------------

    def version(self) -> int:
        """The newest version in the slot, -1 if it is empty (a hint: read() decides)."""
        cur = int(self._header[_CURRENT])
        return -1 if cur < 0 else int(self._header[_VER + 2 * cur])

    def read(self, version: Optional[int] = None) -> Optional[tuple[int, Any]]:
        """(version, params) copied out of the slot: the newest, or `version` if either buffer
        holds it whole; None if it holds no such version. Params are jax.Arrays of the target's
        shapes and dtypes, never a view of the shared memory."""
        h = self._header
        found = None
        for _ in range(_READ_RETRIES):
            cur = int(h[_CURRENT])
            if cur < 0:
                return None
            changed = False
            for b in (cur, 1 - cur):
                s1 = int(h[_SEQ + 2 * b])
                v = int(h[_VER + 2 * b])
                if s1 % 2 or v < 0 or (version is not None and v != version):
                    continue  # being overwritten, never written, or another version
                data = self._bufs[b].copy()
                if int(h[_SEQ + 2 * b]) == s1:
                    found = (v, data)
                else:
                    changed = True  # overwritten during the copy: look again
                    self.stats["read_retries"] += 1
                break
            if found is not None:
                break
            if not changed and version is not None:
                return None  # neither buffer holds it whole: not published yet, or already overwritten
        if found is None:
            raise RuntimeError(f"shared weight slot {self.name}: no consistent read after {_READ_RETRIES} tries")
        v, data = found
        host = [data[off:off + dtype.itemsize * int(np.prod(shape, dtype=np.int64))].view(dtype).reshape(shape)
                for off, shape, dtype in self._leaves]
        leaves = jax.device_put(host)  # one call for all leaves (one per leaf costs ~0.1 ms each)
        self.stats["reads"] += 1
        return v, jax.tree.unflatten(self._treedef, leaves)

    def close(self, unlink: Optional[bool] = None) -> None:
        """Detaches; the owner also removes the segment (unless `unlink=False`). Idempotent."""
        if self.shm is None:
            return
        shm, self.shm = self.shm, None
        self._header = None
        self._bufs = []
        try:
            shm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if self.owner if unlink is None else unlink:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


class WeightSource:
    """What a sampler reads weights through: the shared slot first, the ring buffer otherwise.

    store: a `VersionStore` (the ring buffer, read-only); slot: an attached `WeightSlot`, or
    None (ring buffer only: a sampler started without a slot, or whose learner had closed it).
    `latest_version()` and `get(version)` behave like the store's: `get` raises
    `VersionEvicted` for a version neither holds (the caller chooses again). The last version
    read is kept, so asking again for it costs nothing. The process runtime's samplers read
    through it; the Ray runtime's take weights from Ray's object store instead.
    """

    def __init__(self, store, slot: Optional[WeightSlot] = None):
        self.store = store
        self.slot = slot
        self._last: Optional[tuple[int, Any]] = None
        self.stats = {"slot_reads": 0, "disk_reads": 0}

    def latest_version(self) -> Optional[int]:
        if self.slot is not None:
            v = self.slot.version()
            if v >= 0:  # the learner writes the slot before the ring buffer: it is never older
                return v
        return self.store.latest_version()

    def get(self, version: int):
        if self._last is not None and self._last[0] == version:
            return self._last[1]
        got = self.slot.read(version) if self.slot is not None else None
        if got is not None:
            self.stats["slot_reads"] += 1
            params = got[1]
        else:
            params = self.store.get(version)  # VersionEvicted if not (yet, or any more) on disk
            self.stats["disk_reads"] += 1
        self._last = (version, params)
        return params

    def close(self) -> None:
        if self.slot is not None:
            self.slot.close(unlink=False)


__all__ = ["WeightSlot", "WeightSource", "VersionEvicted"]
