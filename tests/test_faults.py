"""Fault handling: corrupt checkpoints and ring-buffer versions, hung samplers, the chaos soak."""

import logging
import os
import signal
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_async.learner.checkpoints import MANIFEST, CheckpointCorrupt, Checkpoints
from jaxrl_async.metrics_log import read_metrics
from jaxrl_async.runtime.versions import VersionCorrupt, VersionStore


def _state(v):
    return {"w": jnp.full((64, 64), v, jnp.float32), "b": jnp.full((7,), v, jnp.float32), "step": jnp.int32(v)}


def _largest(directory):
    files = [os.path.join(r, n) for r, _, ns in os.walk(directory) for n in ns if n != MANIFEST]
    return max(files, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(bytes((b + 1) % 256 for b in open(path, "rb").read(size))[:size])


def _corrupt_truncate(d):
    path = _largest(os.path.join(d, "state"))
    _truncate(path)
    return path


def _corrupt_delete(d):
    path = os.path.join(d, "state", "_METADATA")
    os.remove(path)
    return path


def _corrupt_garble(d):
    path = os.path.join(d, "_CHECKPOINT_METADATA")
    _garble(path)
    return path


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_delete, _corrupt_garble])
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, corrupt, caplog):
    ck = Checkpoints(str(tmp_path), keep=3)
    for step in (2, 4, 6):
        ck.save(step, _state(step), {"step": step})
    bad = corrupt(ck.step_dir(6))
    warnings = []
    with caplog.at_level(logging.WARNING):
        step, state, meta = ck.restore_latest(_state(0), warn=warnings.append)
    assert step == 4 and meta == {"step": 4}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_state(4)["w"]))
    assert any("checkpoint at step 6 is corrupt" in w and bad in w for w in warnings), warnings
    assert any("fell back to checkpoint at step 4" in w for w in warnings)
    assert bad in caplog.text
    # The bad checkpoint is set aside, so the resumed run can write step 6 again.
    assert ck.all_steps() == [2, 4]
    assert len(os.listdir(tmp_path / "checkpoints.corrupt")) == 1
    ck.save(6, _state(60), {"step": 60})
    assert ck.restore_latest(_state(0))[0] == 6
    ck.close()


def test_orbax_errors_count_as_corruption_without_a_manifest(tmp_path):
    """A checkpoint from before manifests existed is restored unverified; Orbax's own error on a
    damaged one still makes it fall back."""
    ck = Checkpoints(str(tmp_path), keep=3)
    for step in (2, 4):
        ck.save(step, _state(step), {"step": step})
    for step in (2, 4):
        os.remove(os.path.join(ck.step_dir(step), MANIFEST))
    _garble(os.path.join(ck.step_dir(4), "state", "_METADATA"))
    warnings = []
    step, _, _ = ck.restore_latest(_state(0), warn=warnings.append)
    assert step == 2
    assert any("Orbax could not restore" in w and "step 4" in w for w in warnings), warnings
    ck.close()


def test_no_intact_checkpoint_is_a_clear_error_and_nothing_is_moved(tmp_path):
    ck = Checkpoints(str(tmp_path), keep=2)
    for step in (2, 4):
        ck.save(step, _state(step), {})
    p4 = _corrupt_truncate(ck.step_dir(4))
    p2 = _corrupt_delete(ck.step_dir(2))
    with pytest.raises(CheckpointCorrupt, match="no intact checkpoint") as info:
        ck.restore_latest(_state(0))
    assert p4 in str(info.value) and p2 in str(info.value) and "--noresume" in str(info.value)
    assert ck.all_steps() == [2, 4]  # left in place for inspection; a rerun fails the same way
    assert not os.path.exists(tmp_path / "checkpoints.corrupt")
    assert Checkpoints(str(tmp_path / "empty"), keep=2).restore_latest(_state(0)) is None
    ck.close()


def test_corrupt_version_readers_fall_back_and_writer_removes_it(tmp_path, caplog):
    writer = VersionStore(str(tmp_path), capacity=3, target=_state(0), writer=True, cache_size=0)
    for v in range(3):
        writer.publish(v, _state(v))
    bad = _largest(os.path.join(str(tmp_path), "v_00000002"))
    _truncate(bad)
    reader = VersionStore(str(tmp_path), capacity=3, target=_state(0))
    with caplog.at_level(logging.WARNING):
        with pytest.raises(VersionCorrupt, match="truncated"):
            reader.get(2)
    assert bad in caplog.text and "falling back" in caplog.text
    version, params = reader.get_latest()  # the previous retained version
    assert version == 1 and int(params["step"]) == 1
    assert reader.versions() == [0, 1]
    # A missing manifest (a version written by a writer killed mid-write would never be renamed
    # into place, but a damaged directory might lose it) is corruption too.
    os.remove(os.path.join(str(tmp_path), "v_00000001", MANIFEST))
    assert "missing" in writer.verify(1)
    removed = writer.remove_corrupt()
    assert [v for v, _ in removed] == [1, 2]
    assert writer.versions() == [0]
    writer.publish(1, _state(11))  # the numbers are free again
    assert int(VersionStore(str(tmp_path), 3, _state(0)).get(1)["step"]) == 11


def _corrupt_run_file(workdir, kind, what):
    if kind == "checkpoint":
        return _corrupt_truncate(os.path.join(workdir, "checkpoints", str(what)))
    d = os.path.join(workdir, "versions", f"v_{what:08d}")
    path = _largest(d)
    _truncate(path)
    return path


def test_resume_falls_back_past_a_corrupt_checkpoint_and_version(tmp_path, tiny_config):
    from jaxrl_async.train import train_and_evaluate

    c = tiny_config(4)
    c.warmstart.enabled = False
    c.train.eval_every = 100
    c.train.keep_checkpoints = 2
    c.runtime.ring_capacity = 4  # versions 1..4 retained: the fallback checkpoint's version 2 among them
    workdir = str(tmp_path / "run")
    train_and_evaluate(c, workdir, progress=False)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    bad_ck = _corrupt_run_file(workdir, "checkpoint", 4)
    bad_v = _corrupt_run_file(workdir, "version", 2)  # the fallback checkpoint's own version

    c.train.steps = 6
    lines = []
    from jaxrl_async.cluster import RLCluster

    cluster = RLCluster(c, workdir, log=lines.append)
    try:
        assert cluster.start_step == 2
        assert any("checkpoint at step 4 is corrupt" in m and bad_ck in m for m in lines), lines
        assert any("removed corrupt parameter version 2" in m and bad_v in m for m in lines), lines
        assert cluster.store.latest_version() == 2 and cluster.store.verify(2) is None  # republished
    finally:
        cluster.close()
    summary = train_and_evaluate(c, workdir, progress=False)
    assert summary["steps"] == 6
    assert [r["step"] for r in read_metrics(workdir) if "loss/policy" in r] == list(range(6))

    # No intact checkpoint left: resuming fails with a clear error; resume=False starts fresh.
    for step in (4, 6):
        if os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
            _corrupt_run_file(workdir, "checkpoint", step)
    with pytest.raises(CheckpointCorrupt, match="no intact checkpoint"):
        train_and_evaluate(c, workdir, progress=False)
    c.train.steps = 2
    assert train_and_evaluate(c, workdir, resume=False, progress=False)["steps"] == 2


@pytest.mark.slow
def test_stopped_sampler_is_killed_restarted_and_logged(tmp_path, tiny_config, caplog):
    """A SIGSTOPped sampler (the only one: the learner must wait) is SIGKILLed and restarted after
    `hang_timeout_s`; the wait is logged with every sampler's state; accounting stays exact."""
    import psutil

    from jaxrl_async.runtime.base import queue_dir
    from jaxrl_async.runtime.spool import TrajectoryQueue
    from jaxrl_async.train import train_and_evaluate

    c = tiny_config(8)
    c.runtime.mode = "process"
    c.runtime.max_staleness = 1
    c.runtime.num_samplers = 1
    c.runtime.sampler_groups = 2
    c.runtime.hang_timeout_s = 8.0
    c.runtime.wait_log_s = 2.0
    c.warmstart.enabled = False
    c.train.eval_every = 8
    c.train.checkpoint_every = 4
    workdir = str(tmp_path)
    stopped = []
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    def stopper():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                rows = [r for r in read_metrics(workdir) if "loss/policy" in r]
            except Exception:  # noqa: BLE001 - file being written
                rows = []
            if len(rows) >= 2:
                break
            time.sleep(0.2)
        # The sampler is a spawned child of this process started by this run: not the resource
        # tracker, nor a process an earlier test in this worker left behind.
        kids = [p for p in psutil.Process().children(recursive=False)
                if p.pid not in before and p.pid != _tracker_pid() and p.status() != "zombie"
                and "spawn_main" in " ".join(p.cmdline())]
        if kids:
            os.kill(kids[0].pid, signal.SIGSTOP)
            stopped.append(kids[0].pid)

    t = threading.Thread(target=stopper)
    t.start()
    with caplog.at_level(logging.WARNING):
        summary = train_and_evaluate(c, workdir, progress=False)
    t.join()
    assert stopped, "no sampler was found to stop"
    assert summary["steps"] == 8
    # Killed, not continued: the stopped process is gone.
    assert not psutil.pid_exists(stopped[0]) or psutil.Process(stopped[0]).status() == "zombie"
    rows = [r for r in read_metrics(workdir) if "loss/policy" in r]
    assert rows[-1]["samplers/hung_restarts"] >= 1
    assert "learner waiting" in caplog.text and "loaded version" in caplog.text
    assert "showed no sign of life" in caplog.text
    # Exact accounting: every step trained G distinct groups, none twice, none lost.
    g = c.rl.groups_per_step
    dropped = rows[-1]["queue/dropped_stale_total"]
    consumed = TrajectoryQueue(queue_dir(workdir), 1).consumed_keys()
    assert rows[-1]["queue/taken_total"] == len(consumed) == 8 * g + dropped
    from benchmarks.soak import account

    acc = account(workdir, final_steps=8, groups_per_step=g, bound=1)
    assert acc["duplicates_trained"] == 0 and acc["groups_lost"] == 0
    assert acc["groups_trained"] == 8 * g


def _tracker_pid():
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


@pytest.mark.slow
def test_soak_under_every_fault_kind_keeps_the_invariants(tmp_path):
    """benchmarks/soak.py for 20 s and on until each fault kind (sampler kill, learner kill, version
    truncation, sampler stall) has been injected: every fault recovers, nothing lost or trained twice,
    staleness within the bound (`make soak` runs the 10-minute version)."""
    from benchmarks import soak

    args = ["--seconds=20", "--every_kind", "--seed=0", f"--workdir={tmp_path}", "--model=tiny", "--min_gap=3",
            "--max_gap=6", "--eval_episodes=16"]
    assert soak.main(args) == 0, open(tmp_path / "learner.log").read()[-3000:]
    r = __import__("json").load(open(tmp_path / "soak.json"))
    a = r["accounting"]
    assert a["duplicates_trained"] == 0 and a["groups_lost"] == 0
    assert a["max_staleness_loss"] <= 2 and not a["steps_missing"]
    assert a["groups_trained"] == 4 * a["steps"]
    assert r["unexpected_learner_exits"] == 0
    timeline = [(f["kind"], round(f["at_s"], 1), f.get("recovery_s")) for f in r["faults"]]
    assert {f["kind"] for f in r["faults"]} >= set(soak.KINDS) and not r["kinds_missing"], timeline
    assert all("recovery_s" in f for f in r["faults"]), timeline
    assert r["learner_restarts"] >= 1, timeline


def test_soak_table_cells():
    from benchmarks.soak import format_table

    acc = {k: 0 for k in ("steps", "groups_generated", "groups_regenerated", "groups_trained", "groups_dropped_stale",
                          "groups_retaken_after_learner_restart", "groups_waiting_at_end", "duplicates_trained",
                          "groups_lost", "max_staleness_loss")}
    acc.update(steps=12, groups_trained=48, staleness_bound=2)
    r = {"accounting": acc, "by_kind": {"sampler_kill": {"count": 2, "recovered": 2, "recovery_median_s": 3.25,
                                                         "recovery_max_s": None}},
         "learning": {"curve": {"0": 0.5, "12": 0.75}, "reached": False, "target": 0.95},
         "learner_restarts": 1, "unexpected_learner_exits": 0, "startup_s": 30.0, "total_s": 90.0, "seconds": 60.0,
         "ok": True}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in format_table(r).splitlines()
            if line.startswith("|") and not line.startswith("|:") and not line.startswith("|-")]
    assert rows[:2] == [["fault", "count", "recovered", "recovery median (s)", "recovery max (s)"],
                        ["sampler_kill", "2", "2", "3.2", "-"]]
    assert ["groups trained", "48"] in rows and ["held-out success by step", "0: 0.500, 12: 0.750"] in rows
    assert ["held-out success reached 0.95", "no (best 0.750)"] in rows and rows[-1] == ["invariants hold", "yes"]
