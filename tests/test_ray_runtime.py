"""The Ray runtime (`runtime.mode="ray"`): metrics, the staleness bound, an actor killed mid-run, shutdown.

Skipped when `ray` is not installed (`pip install -e '.[ray]'`). Each test starts a local Ray
cluster of its own and the runtime shuts it down again.
"""

import json
import os
import threading
import time

import psutil
import pytest

ray = pytest.importorskip("ray")

from jaxrl_async.learner import update as learner_lib  # noqa: E402
from jaxrl_async.metrics_log import read_metrics  # noqa: E402
from jaxrl_async.runtime import ray_runtime  # noqa: E402
from jaxrl_async.train import train_and_evaluate  # noqa: E402

pytestmark = pytest.mark.slow

RUNTIME_KEYS = ("staleness/mean", "staleness/max", "staleness/hist", "queue/depth", "queue/dropped_stale",
                "queue/taken_total", "samplers/restarts_total", "rollout/tokens_per_s", "rollout/weight_switches",
                "perf/learner_wait_s")


@pytest.fixture
def ray_config(tiny_config):
    """Factory: ``ray_config(steps, bound, samplers)``, the tiny run on sampler actors of one CPU each."""

    def make(steps=4, bound=1, samplers=1):
        c = tiny_config(steps)
        c.runtime.mode = "ray"
        c.runtime.ray_num_cpus = 1
        c.runtime.max_staleness = bound
        c.runtime.num_samplers = samplers
        c.runtime.sampler_groups = 2
        c.warmstart.enabled = False
        c.train.eval_every = steps
        c.train.checkpoint_every = steps
        return c

    return make


def test_ray_fields_are_validated(ray_config):
    from jaxrl_async import config as config_lib

    config_lib.validate(ray_config())
    for field, value in (("ray_num_cpus", -1.0), ("ray_num_gpus", float("inf"))):
        c = ray_config()
        c.runtime[field] = value
        with pytest.raises(ValueError, match=rf"runtime\.{field}"):
            config_lib.validate(c)
    c = ray_config()
    c.runtime.sampler_groups = c.rl.groups_per_step + 1
    with pytest.raises(ValueError, match="sampler_groups"):
        config_lib.validate(c)


def _training_rows(workdir):
    return [r for r in read_metrics(workdir) if "loss/policy" in r]


def _safe_rows(workdir):
    try:
        return _training_rows(workdir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _no_children_left(timeout=30.0):
    """True once this process has no live children (Ray's raylet, GCS and workers are gone)."""
    from multiprocessing import resource_tracker

    tracker = getattr(resource_tracker._resource_tracker, "_pid", None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [p for p in psutil.Process().children(recursive=True)
                if p.pid != tracker and p.is_running() and p.status() != "zombie"]
        if not kids:
            return True
        time.sleep(0.5)
    return False


def test_ray_run_has_runtime_metrics_respects_the_bound_and_shuts_down(tmp_path, monkeypatch, ray_config):
    real = learner_lib.make_rl_update

    def slow_update(*args, **kwargs):
        update = real(*args, **kwargs)

        def wrapped(*a, **k):
            time.sleep(0.3)  # the sampler outruns this learner: only the gate keeps it in bounds
            return update(*a, **k)

        return wrapped

    monkeypatch.setattr(learner_lib, "make_rl_update", slow_update)
    c = ray_config(steps=5, bound=1)
    workdir = str(tmp_path)
    summary = train_and_evaluate(c, workdir, progress=False)
    assert summary["steps"] == 5
    rows = _training_rows(workdir)
    assert len(rows) == 5
    for r in rows:
        assert all(k in r for k in RUNTIME_KEYS), sorted(set(RUNTIME_KEYS) - set(r))
        assert len(r["staleness/hist"]) == 2
    assert max(r["staleness/max"] for r in rows) <= 1
    g = c.rl.groups_per_step
    assert rows[-1]["queue/taken_total"] == 5 * g + rows[-1]["queue/dropped_stale_total"]
    assert rows[-1]["samplers/restarts_total"] == 0
    # Everything stopped: no actors, no cluster, no Ray processes left behind.
    assert not ray.is_initialized()
    assert _no_children_left()


def test_killed_sampler_actor_is_restarted_with_exact_accounting(tmp_path, monkeypatch, ray_config):
    c = ray_config(steps=8, bound=2, samplers=2)
    workdir = str(tmp_path)
    runtimes, killed = [], []
    real_start = ray_runtime.RayRuntime.start

    def start(self, version):
        runtimes.append(self)
        return real_start(self, version)

    monkeypatch.setattr(ray_runtime.RayRuntime, "start", start)
    real_update = learner_lib.make_rl_update

    def slow_update(*args, **kwargs):
        update = real_update(*args, **kwargs)

        def wrapped(*a, **k):
            # Seconds of training left after the kill: Ray must have reported the dead actor (and the
            # driver restarted it) before the last step, or restarts_total could still read 0.
            time.sleep(0.5)
            return update(*a, **k)

        return wrapped

    monkeypatch.setattr(learner_lib, "make_rl_update", slow_update)

    def killer():
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and len(_safe_rows(workdir)) < 2:
            time.sleep(0.2)
        if runtimes and runtimes[0].slots:
            ray.kill(runtimes[0].slots[0].actor, no_restart=False)  # Ray restarts it (max_restarts=-1)
            killed.append(len(_safe_rows(workdir)))

    t = threading.Thread(target=killer)
    t.start()
    summary = train_and_evaluate(c, workdir, progress=False)
    t.join()
    assert killed and killed[0] < 8, "the sampler actor was not killed mid-run"
    assert summary["steps"] == 8
    rows = _training_rows(workdir)
    assert rows[-1]["samplers/restarts_total"] >= 1
    assert max(r["staleness/max"] for r in rows) <= 2
    assert all(r["mask/valid_tokens"] > 0 for r in rows)

    g, k = c.rl.groups_per_step, c.runtime.sampler_groups
    ledger = os.path.join(workdir, "queue", "ledger")
    steps = _jsonl(os.path.join(ledger, "learner.jsonl"))
    assert [s["step"] for s in steps] == list(range(8))
    trained = [key for s in steps for key, _ in s["trained"]]
    dropped = [key for s in steps for key, _ in s["dropped"]]
    assert all(len(s["trained"]) == g for s in steps)
    # Every trained group key is unique, and none is trained and dropped.
    assert len(set(trained)) == len(trained) == 8 * g
    assert not set(trained) & set(dropped)
    assert rows[-1]["queue/taken_total"] == len(trained) + len(dropped)
    # Nothing lost: every group the samplers handed over was trained, dropped as stale or still waiting.
    puts = _jsonl(os.path.join(ledger, "put-ray-e0.jsonl"))
    accepted = [p["key"] for p in puts if p["new"]]
    assert len(set(accepted)) == len(accepted)
    final = json.load(open(os.path.join(ledger, "ray-close-e0.json")))
    waiting = [key for key, _ in final["waiting"]]
    assert set(accepted) == set(trained) | set(dropped) | set(waiting)
    # ... and no gap in what each sampler generated: every batch below its newest is complete.
    for sid in range(2):
        batches = {}
        for key in accepted:
            e, s, b, grp = key.split("-")
            if s == f"s{sid}":
                batches.setdefault(int(b[1:]), set()).add(int(grp[1:]))
        assert batches, f"sampler {sid} handed over nothing"
        newest = max(batches)
        assert sorted(batches) == list(range(newest + 1))
        assert all(batches[b] == set(range(k)) for b in range(newest))
    assert not ray.is_initialized()
