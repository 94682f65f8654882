"""Tests for jaxrl_async.versions: retention, cross-process atomic reads, cache, truncation."""

import itertools
import multiprocessing
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_async.models import transformer as M
from jaxrl_async.runtime.versions import VersionCorrupt, VersionEvicted, VersionStore


def _tree(v: float):
    """A small params tree with every value equal to `v` (so a read shows which version it is)."""
    return {
        "w": jnp.full((32, 64), v, jnp.float32),
        "b": {"x": jnp.full((5,), v, jnp.bfloat16), "n": np.full((3,), v, np.int32)},
        "s": jnp.float32(v),
    }


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, jax.Array)
        assert g.dtype == w.dtype and g.shape == np.shape(w)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_retention_and_evicted_message(tmp_path):
    store = VersionStore(str(tmp_path), capacity=3, target=_tree(0), writer=True)
    for v in range(7):
        store.publish(v, _tree(v))
    assert store.versions() == [4, 5, 6]
    assert sorted(os.listdir(tmp_path)) == ["v_00000004", "v_00000005", "v_00000006"]
    assert store.latest_version() == 6
    assert store.stats["evictions"] == 4
    with pytest.raises(VersionEvicted, match=r"version 3 is not retained.*4\.\.6") as info:
        store.get(3)
    assert isinstance(info.value, KeyError)
    with pytest.raises(VersionEvicted, match="version 99"):
        store.get(99)
    _assert_same(store.get(5), _tree(5))
    # Bit-exact from disk too, through a fresh instance with no cache.
    fresh = VersionStore(str(tmp_path), capacity=3, target=_tree(0), cache_size=0)
    _assert_same(fresh.get(5), _tree(5))
    assert fresh.stats["disk_reads"] == 1


def test_reader_sees_new_versions_and_cannot_write(tmp_path):
    writer = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), _tree(0))
    reader = VersionStore(str(tmp_path), capacity=2, target=abstract)  # a target without values
    assert reader.latest_version() is None
    with pytest.raises(LookupError):
        reader.get_latest()
    writer.publish(0, _tree(0))
    v, params = reader.get_latest()
    assert v == 0
    _assert_same(params, _tree(0))
    writer.publish(3, _tree(3))
    v, params = reader.get_latest()
    assert v == 3
    _assert_same(params, _tree(3))
    assert reader.versions() == [3]  # publishing 3 evicts versions <= 3 - capacity
    with pytest.raises(PermissionError):
        reader.publish(4, _tree(4))
    with pytest.raises(PermissionError):
        reader.truncate_after(0)
    assert writer.versions() == [3]


def test_nnx_state_round_trip(tmp_path):
    cfg = M.ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
    graphdef, params = M.init_model(cfg, seed=0)
    writer = VersionStore(str(tmp_path), capacity=2, target=params, writer=True)
    writer.publish(1, params)
    reader = VersionStore(str(tmp_path), capacity=2, target=M.init_model(cfg, seed=1)[1], cache_size=0)
    got = reader.get(1)
    assert isinstance(got, nnx.State)
    _assert_same(got, params)
    tokens = jnp.arange(8, dtype=jnp.int32)[None] % cfg.vocab_size
    np.testing.assert_array_equal(M.forward_logits(graphdef, got, tokens), M.forward_logits(graphdef, params, tokens))


def _reader_loop(directory, ready, stop, results):
    """Runs in a spawned process: reads until told to stop, alternating the newest
    version (weight sync) and the oldest retained one (next to be evicted: the race)."""
    store = VersionStore(directory, capacity=2, target=_tree(0), cache_size=0)
    ok = evicted = 0
    bad = []
    ready.set()
    for i in itertools.count():
        stopping = stop.is_set()  # read once more after the writer is done
        retained = store.versions()
        v = (retained[-1] if i % 2 == 0 or stopping else retained[0]) if retained else None
        if v is not None:
            try:
                params = store.get(v)
            except VersionEvicted:
                evicted += 1
            except Exception as e:  # anything else is a failure: report it, don't hang the test
                bad.append((v, repr(e)[:300]))
            else:
                values = {float(np.asarray(x, np.float32).min()) for x in jax.tree.leaves(params)}
                values |= {float(np.asarray(x, np.float32).max()) for x in jax.tree.leaves(params)}
                if values == {float(v)}:
                    ok += 1
                else:
                    bad.append((v, sorted(values)))
        if stopping:
            break
    results.put((ok, evicted, bad))


def test_atomic_reads_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    writer = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    writer.publish(0, _tree(0))
    proc = ctx.Process(target=_reader_loop, args=(str(tmp_path), ready, stop, results))
    proc.start()
    try:
        assert ready.wait(120), "reader process did not start"
        for v in range(1, 21):
            writer.publish(v, _tree(v))
        stop.set()
        ok, evicted, bad = results.get(timeout=120)
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
    assert bad == []
    assert ok > 0
    print(f"reads ok {ok}, evicted {evicted}")
    assert writer.versions() == [19, 20]


def test_eviction_during_read_is_translated(tmp_path, monkeypatch):
    """Both windows of the race, made deterministic: the version vanishes before the
    files are opened (Orbax fails), or after they were read (the identity check)."""
    writer = VersionStore(str(tmp_path), capacity=1, target=_tree(0), writer=True)
    reader = VersionStore(str(tmp_path), capacity=1, target=_tree(0), cache_size=0)
    writer.publish(0, _tree(0))
    real = reader._checkpointer.restore

    def evict_then_restore(path, *args, **kwargs):
        writer.publish(1, _tree(1))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(reader._checkpointer, "restore", evict_then_restore)
    with pytest.raises(VersionEvicted, match="version 0 is not retained"):
        reader.get(0)

    def restore_then_evict(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        writer.publish(2, _tree(2))
        return out

    monkeypatch.setattr(reader._checkpointer, "restore", restore_then_evict)
    with pytest.raises(VersionEvicted, match="version 1 is not retained"):
        reader.get(1)

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(reader._checkpointer, "restore", broken)
    # A retained version Orbax cannot read is reported as corrupt (a VersionEvicted, so callers fall
    # back to an older version), with the real error in the message and as the cause.
    with pytest.raises(VersionCorrupt, match="disk on fire") as info:
        reader.get(2)
    assert isinstance(info.value.__cause__, OSError)
    assert reader.stats["disk_reads"] == 0 and reader.stats["corrupt"] == 1
    assert reader.versions() == []  # skipped from now on by this reader


def test_stale_temp_dirs_ignored_and_cleaned_by_writer(tmp_path):
    first = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    first.publish(5, _tree(5))
    # What a writer that crashed mid-publish / mid-eviction leaves behind.
    for name in (".tmp-v_00000006-dead", ".evicting-v_00000004-dead"):
        os.makedirs(tmp_path / name / "d")
        (tmp_path / name / "d" / "junk").write_bytes(b"partial")
    reader = VersionStore(str(tmp_path), capacity=2, target=_tree(0))
    assert reader.versions() == [5]
    assert (tmp_path / ".tmp-v_00000006-dead").exists()  # a reader never deletes
    assert (tmp_path / ".evicting-v_00000004-dead").exists()
    VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    assert sorted(os.listdir(tmp_path)) == ["v_00000005"]
    _assert_same(reader.get(5), _tree(5))


def test_cache_avoids_disk_reads(tmp_path):
    store = VersionStore(str(tmp_path), capacity=3, target=_tree(0), cache_size=1, writer=True)
    for v in range(3):
        store.publish(v, _tree(v))
    _assert_same(store.get(2), _tree(2))
    assert store.stats["disk_reads"] == 0 and store.stats["cache_hits"] == 1
    _assert_same(store.get(0), _tree(0))
    assert store.stats["disk_reads"] == 1
    nbytes = 32 * 64 * 4 + 5 * 2 + 3 * 4 + 4
    assert store.stats["bytes_read"] == nbytes
    assert store.stats["bytes_written"] == 3 * nbytes
    _assert_same(store.get(0), _tree(0))
    assert store.stats["disk_reads"] == 1 and store.stats["cache_hits"] == 2
    store.get(2)  # the LRU of size 1 now holds 0 only: 2 comes from disk
    assert store.stats["disk_reads"] == 2


def test_published_params_are_copied(tmp_path):
    # The learner donates its buffers after publishing; the cache must not share them.
    store = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    params = _tree(1)
    store.publish(1, params)
    jax.tree.map(lambda x: x.delete() if isinstance(x, jax.Array) else None, params)
    _assert_same(store.get(1), _tree(1))
    assert store.stats["cache_hits"] == 1


def test_truncate_after_and_republish(tmp_path):
    writer = VersionStore(str(tmp_path), capacity=5, target=_tree(0), writer=True)
    reader = VersionStore(str(tmp_path), capacity=5, target=_tree(0))
    for v in range(5):
        writer.publish(v, _tree(v))
    _assert_same(reader.get(3), _tree(3))  # now in the reader's cache
    writer.truncate_after(2)
    assert writer.versions() == [0, 1, 2] and reader.versions() == [0, 1, 2]
    for store in (writer, reader):
        with pytest.raises(VersionEvicted):
            store.get(3)
    writer.publish(3, _tree(30))  # the recomputed future differs from the discarded one
    _assert_same(reader.get(3), _tree(30))
    _assert_same(writer.get(3), _tree(30))
    writer.truncate_after(10)  # nothing above 10: a no-op
    assert writer.versions() == [0, 1, 2, 3]


def test_publish_validation(tmp_path):
    store = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    store.publish(4, _tree(4))
    for v in (4, 3):
        with pytest.raises(ValueError, match="strictly increase"):
            store.publish(v, _tree(v))
    with pytest.raises(ValueError, match="structure"):
        store.publish(5, {"w": jnp.zeros((32, 64))})
    with pytest.raises(ValueError, match="does not match"):
        store.publish(5, {**_tree(5), "w": jnp.zeros((32, 64), jnp.bfloat16)})
    with pytest.raises(ValueError, match="capacity"):
        VersionStore(str(tmp_path), capacity=0, target=_tree(0))
    assert store.versions() == [4]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no temp dir left behind


def test_eviction_while_checking_the_manifest_reads_as_evicted(tmp_path, monkeypatch):
    """The race CI once hit: the writer evicts a version between the manifest check's size
    test and its digest of the same file. The reader must see VersionEvicted (choose again),
    not a FileNotFoundError and not a corrupt version."""
    from jaxrl_async.learner import checkpoints

    writer = VersionStore(str(tmp_path), capacity=2, target=_tree(0), writer=True)
    writer.publish(0, _tree(0))
    reader = VersionStore(str(tmp_path), capacity=2, target=_tree(0), cache_size=0)
    real_digest = checkpoints._digest

    fired = []

    def evict_then_digest(path):
        if not fired:  # once: the writer's own manifests digest files too
            fired.append(path)
            writer.publish(1, _tree(1))
            writer.publish(2, _tree(2))  # evicts 0 (capacity 2)
        return real_digest(path)

    monkeypatch.setattr(checkpoints, "_digest", evict_then_digest)
    with pytest.raises(VersionEvicted) as info:
        reader.get(0)
    assert fired and "v_00000000" in fired[0]
    assert not isinstance(info.value, VersionCorrupt)
    assert reader.stats["corrupt"] == 0
