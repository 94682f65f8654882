"""The process runtime: sampler processes, the staleness bound, faults, resume and shutdown."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from jaxrl_async.learner import update as learner_lib
from jaxrl_async.metrics_log import read_metrics
from jaxrl_async.runtime.base import queue_dir
from jaxrl_async.runtime.spool import TrajectoryQueue
from jaxrl_async.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture
def process_config(tiny_config):
    """Factory: ``process_config(steps, bound, samplers)``, the tiny run in the process runtime."""

    def make(steps=6, bound=1, samplers=1):
        c = tiny_config(steps)
        c.runtime.mode = "process"
        c.runtime.max_staleness = bound
        c.runtime.num_samplers = samplers
        c.runtime.sampler_groups = 2
        c.warmstart.enabled = False
        c.train.eval_every = steps
        c.train.checkpoint_every = 2
        return c

    return make


def _training_rows(workdir):
    return [r for r in read_metrics(workdir) if "loss/policy" in r]


def _consumed(workdir):
    return TrajectoryQueue(queue_dir(workdir), 1).consumed_keys()


def _alive_children(before=()):
    """Live child processes, less multiprocessing's resource tracker (it lives as long as this process)
    and those in `before` (started by an earlier test in this worker, not by the run under test)."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    return [p for p in psutil.Process().children(recursive=True)
            if p.pid != tracker and p.pid not in before and p.is_running() and p.status() != "zombie"]


def _children_now():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_slow_learner_respects_the_staleness_bound_and_leaves_no_children(tmp_path, monkeypatch, process_config):
    real = learner_lib.make_rl_update

    def slow_update(*args, **kwargs):
        update = real(*args, **kwargs)

        def wrapped(*a, **k):
            time.sleep(0.5)  # the samplers outrun this learner: only the gate keeps them in bounds
            return update(*a, **k)

        return wrapped

    monkeypatch.setattr(learner_lib, "make_rl_update", slow_update)
    c = process_config(steps=8, bound=1, samplers=2)
    workdir = str(tmp_path)
    before = _children_now()
    summary = train_and_evaluate(c, workdir, progress=False)
    assert summary["steps"] == 8
    rows = _training_rows(workdir)
    assert len(rows) == 8
    assert max(r["staleness/max"] for r in rows) <= 1
    assert sum(r["staleness/hist"][1] for r in rows) > 0  # the learner really was behind
    assert max(r["perf/sampler_gate_wait_s"] for r in rows) > 0
    assert all(len(r["staleness/hist"]) == 2 for r in rows)
    # Exactly one batch of G groups per step, every group once.
    g = c.rl.groups_per_step
    dropped = rows[-1]["queue/dropped_stale_total"]
    assert len(_consumed(workdir)) == 8 * g + dropped
    assert rows[-1]["queue/taken_total"] == 8 * g + dropped
    assert not _alive_children(before)


def test_sampler_sigkill_is_restarted_with_exact_accounting(tmp_path, process_config):
    c = process_config(steps=8, bound=2, samplers=2)
    workdir = str(tmp_path)
    killed = []
    before = _children_now()

    def killer():
        deadline = time.monotonic() + 120
        # Wait until the learner has consumed a couple of batches, then kill a sampler mid-generation.
        while time.monotonic() < deadline and len(_safe_rows(workdir)) < 2:
            time.sleep(0.2)
        kids = _alive_children(before)
        if kids:
            os.kill(kids[0].pid, signal.SIGKILL)
            killed.append(kids[0].pid)

    t = threading.Thread(target=killer)
    t.start()
    summary = train_and_evaluate(c, workdir, progress=False)
    t.join()
    assert killed, "no sampler was found to kill"
    assert summary["steps"] == 8
    rows = _training_rows(workdir)
    assert rows[-1]["samplers/restarts_total"] >= 1
    g = c.rl.groups_per_step
    dropped = rows[-1]["queue/dropped_stale_total"]
    consumed = _consumed(workdir)
    # No accepted group lost or counted twice: every take is a distinct key, one batch per step.
    assert rows[-1]["queue/taken_total"] == len(consumed) == 8 * g + dropped
    assert all(r["mask/valid_tokens"] > 0 for r in rows)
    assert max(r["staleness/max"] for r in rows) <= 2
    assert not _alive_children(before)


def _safe_rows(workdir):
    try:
        return _training_rows(workdir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _cli(workdir, steps, extra=()):
    return [sys.executable, "-m", "jaxrl_async.train", "--config=configs/default.py", f"--workdir={workdir}",
            "--config.task.name=search_easy", "--config.model.d_model=32", "--config.model.n_layers=1",
            "--config.model.n_heads=2", "--config.model.d_ff=64", "--config.rl.groups_per_step=4",
            "--config.rl.group_size=4", "--config.warmstart.enabled=False", "--config.eval.episodes=16",
            "--config.runtime.mode=process", "--config.runtime.sampler_groups=2", "--config.runtime.max_staleness=1",
            f"--config.train.steps={steps}", "--config.train.checkpoint_every=2", f"--config.train.eval_every={steps}",
            *extra]


def _wait_for_checkpoint(workdir, proc, timeout=180):
    ckdir = os.path.join(workdir, "checkpoints")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"learner exited early: {proc.stderr.read()}")
        steps = [d for d in os.listdir(ckdir) if d.isdigit()] if os.path.isdir(ckdir) else []
        if steps:
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def _wait_gone(pids, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def test_learner_sigkill_then_resume_and_ctrl_c_shutdown(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_cli(workdir, 40), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(workdir, proc)
    samplers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    assert samplers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Orphaned samplers notice that their learner is gone and exit.
    assert _wait_gone(samplers) == []

    # Resume: the ring buffer and the queue are intact; training continues to the end.
    r = subprocess.run(_cli(workdir, 12), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint" in r.stdout
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["steps"] == 12
    steps = [row["step"] for row in _training_rows(workdir)]
    assert steps == list(range(12))

    # Ctrl-C mid-run: everything shuts down, no orphans, and the checkpoint still restores. The child gets
    # SIGINT's default action back first: an ignored SIGINT is inherited across exec (and Python then never
    # raises KeyboardInterrupt), and a library an earlier test in this worker ran may have left it ignored.
    proc = subprocess.Popen(_cli(workdir, 40), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_safe_rows(workdir)) < 15:
        time.sleep(0.2)
    samplers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert _wait_gone(samplers, timeout=30) == []
    r = subprocess.run(_cli(workdir, 20), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(workdir, "summary.json")))["steps"] == 20
