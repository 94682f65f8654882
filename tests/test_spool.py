"""The spool-directory trajectory queue: order, bound, dedup, crash safety, exact accounting."""

import multiprocessing
import os
import signal
import threading
import time
import zlib

import numpy as np
import pytest

from jaxrl_async.rollout.trajectory import Trajectory
from jaxrl_async.runtime import spool as q


def _traj(key: str, i: int, length: int = 8) -> Trajectory:
    """A tiny trajectory whose contents are a pure function of (key, i): checkable."""
    rng = np.random.default_rng(zlib.crc32(f"{key}/{i}".encode()))
    return Trajectory(
        tokens=rng.integers(0, 1000, length).astype(np.int32),
        loss_mask=rng.random(length) < 0.5,
        behav_logp=-rng.random(length).astype(np.float32),
        versions=rng.integers(-1, 5, length).astype(np.int32),
        reward=float(rng.random()), success=True, num_turns=1, group_id=i, task_seed=7)


def _item(key: str, start_version: int = 0, n: int = 2, length: int = 8) -> q.Item:
    return q.Item(key=key, trajectories=[_traj(key, i, length) for i in range(n)],
                  start_version=start_version, meta={"sampler": 0})


def _assert_intact(item: q.Item, length: int = 8):
    for i, t in enumerate(item.trajectories):
        ref = _traj(item.key, i, length)
        for field in ("tokens", "loss_mask", "behav_logp", "versions"):
            np.testing.assert_array_equal(getattr(t, field), getattr(ref, field))
        assert t.reward == ref.reward and t.group_id == i


def test_order_by_start_version_then_put_order(tmp_path):
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False)
    for key, sv in [("a", 3), ("b", 1), ("c", 3), ("d", 0), ("e", 1)]:
        assert tq.put(_item(key, sv))
    assert tq.depth() == 5
    got = tq.take(5, timeout=0)
    assert [it.key for it in got] == ["d", "b", "e", "a", "c"]
    assert [it.start_version for it in got] == [0, 1, 1, 3, 3]
    assert got[0].meta == {"sampler": 0}
    for it in got:
        _assert_intact(it)
    assert tq.depth() == 0 and tq.stats["taken"] == 5 and tq.stats["put"] == 5


def test_bounded_put_blocks_and_times_out(tmp_path):
    tq = q.TrajectoryQueue(str(tmp_path), capacity=2, fsync=False)
    assert tq.put(_item("a")) and tq.put(_item("b"))
    t0 = time.monotonic()
    assert tq.put(_item("c"), timeout=0.2) is False
    assert time.monotonic() - t0 >= 0.2
    assert tq.depth() == 2 and tq.stats["put"] == 2
    assert [it.key for it in tq.take(1, timeout=0)] == ["a"]
    assert tq.put(_item("c"), timeout=0.2) is True
    assert [it.key for it in tq.take(5, timeout=0)] == ["b", "c"]


def test_take_timeout_returns_partial_and_ignores_temp_files(tmp_path):
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False)
    tq.put(_item("a"))
    spool = tmp_path / "spool"
    # What a producer killed mid-write leaves: a truncated temp file, plus other junk.
    (spool / ".tmp.123.deadbeef").write_bytes(b"\x80\x05truncated")
    (spool / "notes.txt").write_text("x")
    assert tq.depth() == 1
    t0 = time.monotonic()
    got = tq.take(3, timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    assert [it.key for it in got] == ["a"]
    assert tq.take(3, timeout=0.05) == []
    # Fresh temp files stay (a producer may still be writing); stale ones get cleaned.
    assert (spool / ".tmp.123.deadbeef").exists()
    old = time.time() - 120
    os.utime(spool / ".tmp.123.deadbeef", (old, old))
    tq.take(1, timeout=0)
    assert not (spool / ".tmp.123.deadbeef").exists()
    assert tq.stats["stale_tmp_removed"] == 1


def test_take_waits_for_late_items(tmp_path):
    import threading

    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False)
    tq.put(_item("a"))
    threading.Timer(0.1, lambda: q.TrajectoryQueue(str(tmp_path), 10).put(_item("b"))).start()
    got = tq.take(2, timeout=5)
    assert sorted(it.key for it in got) == ["a", "b"]


def test_dedup_waiting_and_consumed_keys_persisted(tmp_path):
    d = str(tmp_path)
    prod = q.TrajectoryQueue(d, capacity=10, fsync=False)
    assert prod.put(_item("a")) and prod.put(_item("b"))
    assert prod.put(_item("a"))  # already waiting: no-op, still True
    assert prod.depth() == 2 and prod.stats == dict(
        put=2, duplicates_dropped=1, taken=0, recovered=0, released=0, stale_tmp_removed=0, compacted=0)

    cons = q.TrajectoryQueue(d, capacity=10, fsync=False)
    cons.set_step(0)
    assert [it.key for it in cons.take(1, timeout=0)] == ["a"]

    # A restarted producer (new instance) regenerates both groups: 'a' is consumed
    # (accepted), 'b' is waiting; neither is added.
    prod2 = q.TrajectoryQueue(d, capacity=10, fsync=False)
    assert prod2.put(_item("a")) and prod2.put(_item("b"))
    assert prod2.stats["put"] == 0 and prod2.stats["duplicates_dropped"] == 2
    assert prod2.depth() == 1

    # Still consumed after release (file gone, marker stays) and for a new consumer.
    cons.set_step(1)
    cons.release(1)
    assert cons.stats["released"] == 1 and not os.listdir(tmp_path / "accepted")
    prod3 = q.TrajectoryQueue(d, capacity=10, fsync=False)
    assert prod3.put(_item("a")) and prod3.stats["duplicates_dropped"] == 1
    assert prod3.consumed_keys() == {"a"} and prod3.waiting_keys() == ["b"]
    assert [it.key for it in q.TrajectoryQueue(d, 10).take(5, timeout=0)] == ["b"]


def test_consumer_drops_duplicates_that_slipped_past_producers(tmp_path):
    # A put racing with recover can land a second copy of a key; take must not return
    # a key twice nor one that is consumed.
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False)
    tq.put(_item("a", 1))
    tq.take(1, timeout=0)
    spool = tmp_path / "spool"
    (spool / "0.1.a.item").write_bytes(b"")   # consumed key (accepted at step 0)
    (spool / "0.2.b.item").write_bytes(q.pickle.dumps(_item("b"), protocol=5))
    (spool / "0.3.b.item").write_bytes(b"")   # second copy of a waiting key
    got = tq.take(5, timeout=0)
    assert [it.key for it in got] == ["b"]
    assert tq.stats["duplicates_dropped"] == 2 and tq.depth() == 0


def test_keys_with_odd_characters(tmp_path):
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False)
    keys = ["s0/b1.g2", "..", "a b%c", "ü.x"]
    for k in keys:
        tq.put(_item(k))
    assert sorted(tq.waiting_keys()) == sorted(keys)
    assert sorted(it.key for it in tq.take(10, timeout=0)) == sorted(keys)
    assert tq.consumed_keys() == set(keys)
    with pytest.raises(ValueError):
        tq.put(_item(""))


def _producer(directory: str, length: int, fsync: bool = False, doorbell=None):
    """Puts items forever (until killed): keys p-0, p-1, ... with key-derived contents."""
    tq = q.TrajectoryQueue(directory, capacity=10**6, fsync=fsync, doorbell=doorbell)
    i = 0
    while True:
        tq.put(_item(f"p-{i}", start_version=i // 10, n=2, length=length))
        i += 1


@pytest.mark.parametrize("fsync_and_doorbell", [False, True], ids=["plain", "fsync+doorbell"])
def test_producer_sigkilled_mid_stream_leaves_only_whole_items(tmp_path, fsync_and_doorbell):
    d = str(tmp_path)
    length = 20_000  # big enough that a kill often lands inside a write
    ctx = multiprocessing.get_context("spawn")
    doorbell = ctx.Semaphore(0) if fsync_and_doorbell else None
    proc = ctx.Process(target=_producer, args=(d, length, fsync_and_doorbell, doorbell), daemon=True)
    proc.start()
    tq = q.TrajectoryQueue(d, capacity=10**6, fsync=False, doorbell=doorbell)
    deadline = time.monotonic() + 60
    while tq.depth() < 30:
        assert time.monotonic() < deadline and proc.is_alive()
        tq.wait(0.05) if doorbell is not None else time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    if doorbell is not None:
        # The kill left the doorbell usable: a new producer's put still wakes a waiting consumer.
        tq.wait(0)  # drain the dead producer's posts
        threading.Timer(0.2, lambda: q.TrajectoryQueue(d, 10**6, doorbell=doorbell).put(_item("late"))).start()
        assert tq.wait(30.0)
    got = [it for it in tq.take(10**6, timeout=0) if it.key != "late"]
    keys = [it.key for it in got]
    assert len(got) >= 30 and len(set(keys)) == len(keys)
    # Puts are sequential, so the whole items are exactly a prefix of the stream.
    assert sorted(keys, key=lambda k: int(k[2:])) == [f"p-{i}" for i in range(len(got))]
    for it in got:
        _assert_intact(it, length)
    # Only temp files (if the kill hit a write) may remain; they never count as items.
    assert all(n.startswith(".tmp.") for n in os.listdir(tmp_path / "spool"))


def test_exact_accounting_across_learner_crash(tmp_path):
    d = str(tmp_path)
    prod = q.TrajectoryQueue(d, capacity=100, fsync=False)
    for i in range(20):
        prod.put(_item(f"k{i:02d}", start_version=i // 4))
    learner = q.TrajectoryQueue(d, capacity=100, fsync=False)
    taken_at = {}
    for step in range(5):  # 3 items per step
        learner.set_step(step)
        taken_at[step] = [it.key for it in learner.take(3, timeout=0)]
        if step == 3:
            learner.release(3)  # the checkpoint at step 3 (= after steps 0..2) is written
    assert learner.stats["released"] == 9
    assert learner.depth() == 5
    # The learner dies after step 4; a new one resumes from the checkpoint at 3.
    resumed = q.TrajectoryQueue(d, capacity=100, fsync=False)
    assert resumed.recover(3) == 6
    back = set(taken_at[3] + taken_at[4])
    assert back <= set(resumed.waiting_keys()) and resumed.depth() == 11
    trained_before = {k for s in range(3) for k in taken_at[s]}
    assert resumed.consumed_keys() == trained_before
    # A producer regenerating everything adds nothing: all keys are waiting or consumed.
    again = q.TrajectoryQueue(d, capacity=100, fsync=False)
    for i in range(20):
        again.put(_item(f"k{i:02d}", start_version=i // 4))
    assert again.stats["put"] == 0 and again.stats["duplicates_dropped"] == 20
    # Resumed training drains the rest; recovered items keep their original order.
    resumed.set_step(3)
    redo = [it.key for it in resumed.take(6, timeout=0)]
    assert redo == taken_at[3] + taken_at[4]
    resumed.set_step(4)
    rest = [it.key for it in resumed.take(100, timeout=0)]
    # Over the checkpointed history, every key is trained on exactly once.
    final = [k for s in range(3) for k in taken_at[s]] + redo + rest
    assert sorted(final) == [f"k{i:02d}" for i in range(20)]
    assert resumed.consumed_keys() == set(final) and resumed.depth() == 0


def test_doorbell_wakes_a_waiting_take_at_once(tmp_path, monkeypatch):
    # The fallback poll is made so long that only the doorbell can end the wait in time.
    monkeypatch.setattr(q, "_DOORBELL_POLL_S", 60.0)
    bell = multiprocessing.get_context("spawn").Semaphore(0)
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False, doorbell=bell)
    producer = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False, doorbell=bell)
    threading.Timer(0.2, lambda: producer.put(_item("a"))).start()
    t0 = time.monotonic()
    got = tq.take(1, timeout=30)
    assert [it.key for it in got] == ["a"] and time.monotonic() - t0 < 10
    assert tq.timing["take_wait_s"] > 0.1


def test_doorbell_wait_drains_posts_and_polls_without_them(tmp_path, monkeypatch):
    bell = multiprocessing.get_context("spawn").Semaphore(0)
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False, doorbell=bell)
    for key in "abc":
        tq.put(_item(key))
    assert tq.wait(0) is True  # the three posts are answered by one wait ...
    assert tq.wait(0) is False  # ... and drained
    # A producer that died between its rename and its post (or has no doorbell): the consumer
    # still finds the item at its fallback poll.
    monkeypatch.setattr(q, "_DOORBELL_POLL_S", 0.05)
    threading.Timer(0.1, lambda: q.TrajectoryQueue(str(tmp_path), 10).put(_item("d"))).start()
    tq.take(3, timeout=0)
    assert [it.key for it in tq.take(1, timeout=10)] == ["d"]


def test_take_can_leave_the_fsync_to_one_sync_per_step(tmp_path, monkeypatch):
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=True)
    for key in "abcd":
        tq.put(_item(key))
    calls = []
    real = os.fsync
    monkeypatch.setattr(q.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    tq.take(2, timeout=0, sync=False)
    tq.take(2, timeout=0, sync=False)
    assert calls == []
    tq.sync()
    assert len(calls) == 2  # the spool and accepted/ directories, once for both takes
    tq.sync()
    assert len(calls) == 2  # nothing taken since
    tq.put(_item("e"))
    calls.clear()
    tq.take(1, timeout=0)  # the default syncs at once
    assert len(calls) == 2
    assert tq.timing["take_sync_s"] > 0 and tq.timing["put_fsync_s"] > 0


def test_timing_accounts_for_put_and_take(tmp_path):
    tq = q.TrajectoryQueue(str(tmp_path), capacity=10, fsync=False)
    tq.put(_item("a", length=1000))
    tq.take(1, timeout=0)
    t = tq.timing
    assert set(t) == set(q._TIMING)
    for key in ("put_check_s", "put_pickle_s", "put_write_s", "put_rename_s", "take_scan_s", "take_rename_s",
                "take_read_s", "take_unpickle_s"):
        assert t[key] > 0, key
    assert t["put_fsync_s"] < 0.05 and t["take_sync_s"] == 0  # no fsync asked for


def test_queue_fsync_config_is_validated():
    from ml_collections import config_dict

    from jaxrl_async import config as config_lib

    assert config_lib.base_config().runtime.queue_fsync is True
    d = config_lib.base_config().to_dict()
    d["runtime"]["queue_fsync"] = "no"  # e.g. from a JSON config: ConfigDict's own type check never saw it
    with pytest.raises(ValueError, match=r"runtime\.queue_fsync"):
        config_lib.validate(config_dict.ConfigDict(d))
