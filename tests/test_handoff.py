"""Tests for the in-memory weight hand-off (runtime.handoff) and the ring buffer's background writes."""

import multiprocessing
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_async.runtime.handoff import WeightSlot, WeightSource
from jaxrl_async.runtime.versions import VersionEvicted, VersionStore

_CTX = multiprocessing.get_context("spawn")


def _tree(v: float):
    """Every value of every leaf equals `v`, so a read shows which version each leaf came from."""
    return {
        "w": jnp.full((256, 256), v, jnp.float32),  # 256 KiB: a copy long enough to race with a write
        "b": {"x": jnp.full((5,), v, jnp.bfloat16), "n": np.full((3,), v, np.int32)},
        "s": jnp.float32(v),
    }


def _version_of(params) -> int:
    """The one version every leaf encodes; AssertionError on a mixed read."""
    values = {float(np.asarray(x, np.float32).reshape(-1)[i]) for x in jax.tree.leaves(params)
              for i in (0, -1)}
    assert len(values) == 1, f"mixed versions in one read: {sorted(values)}"
    return int(values.pop())


def test_write_read_and_numbering():
    slot = WeightSlot.create(_tree(0))
    try:
        reader = WeightSlot.attach(slot.name, _tree(0))
        assert reader.version() == -1 and reader.read() is None  # empty
        slot.write(3, _tree(3))
        v, params = reader.read()
        assert v == 3 and _version_of(params) == 3
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(_tree(3))):
            assert isinstance(got, jax.Array) and got.dtype == want.dtype and got.shape == np.shape(want)
        slot.write(4, _tree(4))
        assert reader.version() == 4
        # Double-buffered: the previous version stays readable by number until the next write.
        assert reader.read(3)[0] == 3 and _version_of(reader.read(3)[1]) == 3
        assert reader.read(4)[0] == 4
        slot.write(5, _tree(5))
        assert reader.read(3) is None and reader.read(4)[0] == 4
        with pytest.raises(ValueError, match="strictly increase"):
            slot.write(5, _tree(6))
        with pytest.raises(PermissionError):
            reader.write(6, _tree(6))
        with pytest.raises(ValueError, match="does not match"):
            slot.write(6, {**_tree(6), "w": jnp.zeros((2, 2))})
        with pytest.raises(ValueError, match="different params layout"):
            WeightSlot.attach(slot.name, {"w": jnp.zeros((3,))})
        reader.close()
    finally:
        slot.close()
    with pytest.raises(FileNotFoundError):
        WeightSlot.attach(slot.name, _tree(0))  # the owner's close removed it


def _race_tree(v: int):
    """Host leaves that hold `v` exactly (float32 and int32: no bfloat16, which rounds odd v > 256)."""
    return {"w": np.full((512, 512), v, np.float32),  # 1 MiB: a copy long enough to overlap writes
            "b": {"n": np.full((3,), v, np.int32)}, "s": np.float32(v)}


def _reader_main(name: str, ready, stop, out) -> None:
    slot = WeightSlot.attach(name, _race_tree(0))
    slot.read()  # warm up (JAX's first device_put) before the writer starts
    ready.set()
    seen, mixed, reads, tries = [], 0, 0, 0
    while not stop.is_set():
        # Every other read asks for the version before the newest: it sits in the buffer the writer
        # overwrites next, so those reads race the writer most of the time.
        tries += 1
        got = slot.read() if tries % 2 or not seen else slot.read(seen[-1] - 1)
        if got is None:
            continue
        v, params = got
        reads += 1
        try:
            if _version_of(params) != v:
                mixed += 1
        except AssertionError:
            mixed += 1
        if not seen or seen[-1] < v:
            seen.append(v)
    out.put({"seen": seen, "mixed": mixed, "reads": reads, "retries": slot.stats["read_retries"]})
    slot.close()


def test_reader_in_another_process_never_sees_a_mixed_version():
    slot = WeightSlot.create(_race_tree(0))
    ready, stop, out = _CTX.Event(), _CTX.Event(), _CTX.Queue()
    try:
        slot.write(0, _race_tree(0))
        proc = _CTX.Process(target=_reader_main, args=(slot.name, ready, stop, out))
        proc.start()
        assert ready.wait(120), "reader did not start"
        v, deadline = 0, time.monotonic() + 3.0
        while time.monotonic() < deadline:  # the writer goes flat out while the reader reads
            v += 1
            slot.write(v, _race_tree(v))
        stop.set()
        res = out.get(timeout=60)
        proc.join(30)
    finally:
        slot.close()
    assert res["mixed"] == 0
    assert res["reads"] > 20 and len(res["seen"]) > 10, res  # the reads really overlapped many writes
    assert res["seen"] == sorted(res["seen"])  # versions only move forward


def test_source_prefers_the_slot_and_falls_back_to_disk(tmp_path):
    store = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    store.publish(0, _tree(0))
    slot = WeightSlot.create(_tree(0))
    try:
        source = WeightSource(VersionStore(str(tmp_path), 2, _tree(0)), WeightSlot.attach(slot.name, _tree(0)))
        # Empty slot (a learner that has not written it yet): the ring buffer's newest version.
        assert source.latest_version() == 0
        assert _version_of(source.get(0)) == 0 and source.stats == {"slot_reads": 0, "disk_reads": 1}
        slot.write(1, _tree(1))  # on no disk at all: only the slot has it
        assert source.latest_version() == 1
        assert _version_of(source.get(1)) == 1 and source.stats["slot_reads"] == 1
        source.get(1)  # the last read is kept
        assert source.stats["slot_reads"] == 1
        with pytest.raises(VersionEvicted):
            source.get(7)  # neither holds it
        source.close()
    finally:
        slot.close()


def test_background_write_is_durable_after_close(tmp_path):
    store = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True, background=True)
    for v in range(4):
        store.publish(v, _tree(v))
        # Served from memory while (or after) it is written: the learner's snapshot route.
        assert _version_of(store.get(v)) == v
    store.close()
    assert store.versions() == [2, 3] and store.pending_version() is None
    fresh = VersionStore(str(tmp_path), capacity=2, target=_tree(0), cache_size=0)
    assert _version_of(fresh.get(3)) == 3 and fresh.verify(3) is None


def test_background_write_does_not_wait_for_the_disk(tmp_path, monkeypatch):
    store = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True, background=True)
    store.publish(0, _tree(0))
    store.flush()
    import jaxrl_async.runtime.versions as versions_lib

    slow = versions_lib.write_manifest

    def slow_manifest(directory):
        time.sleep(1.0)
        slow(directory)

    monkeypatch.setattr(versions_lib, "write_manifest", slow_manifest)
    t0 = time.perf_counter()
    store.publish(1, _tree(1))
    assert time.perf_counter() - t0 < 0.9  # returned before the write finished
    assert store.pending_version() == 1 and store.versions() == [0]  # not on disk yet
    assert _version_of(store.get(1)) == 1  # but readable by the writer
    store.close()
    assert store.versions() == [0, 1]


def test_background_write_error_surfaces(tmp_path, monkeypatch):
    store = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True, background=True)
    store.publish(0, _tree(0))
    store.flush()  # version 0 lands before the disk "breaks"
    import jaxrl_async.runtime.versions as versions_lib

    def broken(directory):
        raise OSError("disk full")

    monkeypatch.setattr(versions_lib, "write_manifest", broken)
    store.publish(1, _tree(1))  # fails on the writer thread
    with pytest.raises(RuntimeError, match="background write.*disk full"):
        store.publish(2, _tree(2))  # the next publish raises it
    monkeypatch.setattr(versions_lib, "write_manifest", lambda d: None)
    store.publish(3, _tree(3))
    store.flush()
    monkeypatch.setattr(versions_lib, "write_manifest", broken)
    store.publish(4, _tree(4))
    with pytest.raises(RuntimeError, match="disk full"):
        store.close()  # and so does close
    assert 1 not in store.versions() and 4 not in store.versions()
    assert not [n for n in os.listdir(tmp_path) if not n.startswith("v_") and not n.startswith(".")]


def test_a_transient_background_write_failure_is_retried(tmp_path, monkeypatch):
    """The soak's mid-write truncation: one failed save is retried from scratch, the version
    lands on disk and the learner goes on (a persistent failure is raised: the test above)."""
    import jaxrl_async.runtime.versions as versions_lib

    store = VersionStore(str(tmp_path), capacity=3, target=_tree(0), writer=True, background=True)
    real, calls = versions_lib.write_manifest, []

    def flaky(directory):
        calls.append(directory)
        if len(calls) == 2:  # version 1's first attempt
            raise OSError("file truncated under the writer")
        real(directory)

    monkeypatch.setattr(versions_lib, "write_manifest", flaky)
    store.publish(0, _tree(0))
    store.publish(1, _tree(1))
    store.publish(2, _tree(2))  # no error from version 1
    store.close()
    assert store.versions() == [0, 1, 2]
    assert store.stats["write_retries"] == 1
    reader = VersionStore(str(tmp_path), capacity=3, target=_tree(0), cache_size=0)
    assert float(reader.get(1)["s"]) == 1.0
    assert not [n for n in os.listdir(tmp_path) if not n.startswith("v_")]


def test_cluster_publishes_to_the_slot_and_the_ring_buffer(tmp_path, tiny_config):
    from jaxrl_async.cluster import RLCluster

    c = tiny_config(2)
    c.runtime.mode = "process"
    c.warmstart.enabled = False
    cluster = RLCluster(c, str(tmp_path), log=lambda *a: None)
    try:
        target = jax.tree.map(np.asarray, cluster.state.params)
        reader = WeightSlot.attach(cluster.handoff.name, target)
        assert reader.version() == 0 and cluster.store.versions() == [0]  # the start version: in both
        cluster.publish(1)
        v, params = reader.read()
        assert v == 1
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(target)):
            np.testing.assert_array_equal(np.asarray(got), want)
        reader.close()
    finally:
        cluster.close()
    assert cluster.store.versions() == [0, 1]  # close waited for the background write
    with pytest.raises(FileNotFoundError):
        WeightSlot.attach(cluster.handoff.name, target)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le"])
def test_slot_refuses_weakly_ordered_machines(monkeypatch, tiny_config, tmp_path, machine):
    # The seqlock relies on x86-64's store order (no fences): elsewhere it must refuse clearly, at
    # startup for the process runtime, and in WeightSlot itself for any other caller.
    import platform

    from jaxrl_async.cluster import ConfigError, check_startup

    monkeypatch.setattr(platform, "machine", lambda: machine)
    with pytest.raises(RuntimeError, match=machine):
        WeightSlot.create(_tree(0))
    c = tiny_config()
    c.runtime.mode = "process"
    with pytest.raises(ConfigError, match=rf"{machine}.*runtime\.mode"):
        check_startup(c, str(tmp_path / "run"))
    c.runtime.mode = "inline"
    check_startup(c, str(tmp_path / "run"))  # the other runtimes do not use the slot
