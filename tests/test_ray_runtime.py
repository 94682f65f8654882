"""The Ray runtime (`runtime.mode="ray"`): metrics, the staleness bound, a learner SIGKILLed and
resumed, sampler actors killed mid-run (`ray.kill` and SIGKILL of the worker process), shutdown.

Skipped when `ray` is not installed (`pip install -e '.[ray]'`). Each run starts a local Ray
cluster of its own and the runtime shuts it down again.
"""

import json
import os
import signal
import subprocess
import sys
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


def _tracker_pid():
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None)


def _record_ray_processes(monkeypatch):
    """Every process below this one just before each `RayRuntime.close` (Ray's GCS, raylet, agents and
    actor workers): a list for `_live` after the run, which also catches a worker that the raylet's
    exit left to the init process (no longer our child, so `_no_children_left` cannot see it)."""
    seen = []
    real = ray_runtime.RayRuntime.close

    def close(self, *a, **k):
        seen.extend(p for p in psutil.Process().children(recursive=True) if p.pid != _tracker_pid())
        return real(self, *a, **k)

    monkeypatch.setattr(ray_runtime.RayRuntime, "close", close)
    return seen


def _no_children_left(timeout=30.0):
    """True once this process has no live children (Ray's raylet, GCS and workers are gone)."""
    tracker = _tracker_pid()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = [p for p in psutil.Process().children(recursive=True)
                if p.pid != tracker and p.is_running() and p.status() != "zombie"]
        if not kids:
            return True
        time.sleep(0.5)
    return False


def _steps(ledger):
    return _jsonl(os.path.join(ledger, "learner.jsonl"))


def _taken(entry):
    return [key for key, _ in entry["trained"] + entry["dropped"]]


def _assert_no_gaps(keys, samplers, k):
    """Every batch below each sampler's newest has all `k` groups among `keys`."""
    for sid in range(samplers):
        batches = {}
        for key in keys:
            e, s, b, grp = key.split("-")
            if s == f"s{sid}":
                batches.setdefault(int(b[1:]), set()).add(int(grp[1:]))
        assert batches, f"sampler {sid} handed over nothing"
        newest = max(batches)
        assert sorted(batches) == list(range(newest + 1)), (sid, sorted(batches))
        assert all(batches[b] == set(range(k)) for b in range(newest)), (sid, batches)


def _live(procs, timeout):
    """The processes of `procs` still running (zombies count as gone: their reaper is not ours to
    wait for) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


# The learner of the first half of the resume test, run as a subprocess so that it can be SIGKILLed:
# it trains until update number `block_at` (steps 0..block_at-1 trained, the checkpoint at block_at
# saved, step block_at's groups taken) and then waits there for the test's SIGKILL.
_LEARNER = r"""
import json, os, sys, time
from ml_collections import config_dict
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.train import train_and_evaluate

config = config_dict.ConfigDict(json.loads(sys.argv[1]))
workdir, block_at = sys.argv[2], int(sys.argv[3])
real = learner_lib.make_rl_update


def make(*a, **k):
    update, calls = real(*a, **k), []

    def wrapped(*x, **y):
        calls.append(1)
        if len(calls) == block_at + 1:
            open(os.path.join(workdir, "learner-blocked"), "w").close()
            time.sleep(3600)
        return update(*x, **y)

    return wrapped


learner_lib.make_rl_update = make
train_and_evaluate(config, workdir, progress=False)
"""


def _sigkill_learner_at(config, workdir, block_at, timeout=300.0):
    """Runs `config` in a learner subprocess until it blocks in update `block_at`, SIGKILLs it, and
    checks that its Ray cluster (GCS, raylet, actor workers) dies with it at once. Returns
    (Ray's dashboard and runtime-env agents, when the learner was killed): those exit about 60 s
    later (each times out reporting the raylet's death to the dead GCS), so the caller checks them
    later (`killed_learners_agents`)."""
    log = open(os.path.join(workdir, "learner-subprocess.log"), "w")
    proc = subprocess.Popen([sys.executable, "-c", _LEARNER, config.to_json(), workdir, str(block_at)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        marker = os.path.join(workdir, "learner-blocked")
        while not os.path.exists(marker):
            assert proc.poll() is None, f"the learner exited with {proc.returncode} before step {block_at}"
            assert time.monotonic() < deadline, f"the learner did not reach step {block_at} in {timeout:g} s"
            time.sleep(0.2)
        kids = {}
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                kids[p] = p.name()
            except psutil.NoSuchProcess:
                pass
        assert "raylet" in kids.values(), kids
        agents = [p for p, name in kids.items() if "Agent" in name]
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(30)
        alive = _live([p for p in kids if p not in agents], timeout=30)
        for p in alive:
            p.kill()
        assert not alive, f"Ray processes outlived their SIGKILLed learner: {alive}"
        return agents, killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def killed_learners_agents():
    """`(agents, killed_at)` of the SIGKILLed learners of this module's tests: Ray's dashboard and
    runtime-env agents exit about 60 s after the kill (each times out reporting the raylet's death
    to the dead GCS). They are checked once this module's tests are done, so that the wait overlaps
    the tests that run after the kill instead of idling: each must be gone 2 minutes after its kill."""
    killed = []
    yield killed
    for agents, killed_at in killed:
        alive = _live(agents, timeout=max(0.0, killed_at + 120 - time.monotonic()))
        for p in alive:
            p.kill()
        assert not alive, f"Ray agents outlived their SIGKILLed learner by 2 minutes: {alive}"


def test_ray_learner_sigkill_resume_metrics_bound_and_shutdown(tmp_path, monkeypatch, ray_config,
                                                                killed_learners_agents):
    """A learner SIGKILLed after its checkpoint at step 2, with step 2's groups taken but not trained,
    resumes from that checkpoint: its sampler regenerates those groups under the same keys and the
    surviving timeline trains every key once, with no gap. The resumed half runs under a slow
    learner (the gate alone keeps the samplers within the bound) and checks the runtime metrics
    and the shutdown. The killed learner's Ray agents, which take a minute to exit, are checked at
    the end of the module (`killed_learners_agents`)."""
    c = ray_config(steps=5, bound=1)
    c.train.checkpoint_every = 2
    workdir = str(tmp_path)
    agents, killed_at = _sigkill_learner_at(c, workdir, block_at=2)
    killed_learners_agents.append((agents, killed_at))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]

    ray_processes = _record_ray_processes(monkeypatch)
    real = learner_lib.make_rl_update

    def slow_update(*args, **kwargs):
        update = real(*args, **kwargs)

        def wrapped(*a, **k):
            time.sleep(0.3)  # the sampler outruns this learner: only the gate keeps it in bounds
            return update(*a, **k)

        return wrapped

    monkeypatch.setattr(learner_lib, "make_rl_update", slow_update)
    summary = train_and_evaluate(c, workdir, progress=False)
    assert summary["steps"] == 5
    rows = _training_rows(workdir)
    assert [r["step"] for r in rows] == list(range(5))  # steps 0, 1 of the killed learner, 2..4 resumed
    for r in rows:
        assert all(k in r for k in RUNTIME_KEYS), sorted(set(RUNTIME_KEYS) - set(r))
        assert len(r["staleness/hist"]) == 2
    assert max(r["staleness/max"] for r in rows) <= 1
    g, k = c.rl.groups_per_step, c.runtime.sampler_groups
    assert rows[-1]["queue/taken_total"] == 3 * g + rows[-1]["queue/dropped_stale_total"]
    assert rows[-1]["samplers/restarts_total"] == 0

    ledger = os.path.join(workdir, "queue", "ledger")
    steps = _steps(ledger)
    assert [(s["epoch"], s["step"]) for s in steps] == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (1, 4)]
    before = [key for s in steps[:2] for key in _taken(s)]  # in the checkpoint
    lost_future = _taken(steps[2])  # taken by the killed learner after its checkpoint, never trained
    timeline = before + [key for s in steps[3:] for key in _taken(s)]
    assert len(set(timeline)) == len(timeline) == 5 * g
    assert all(key.startswith("e0-") for key in timeline)  # the resumed run kept the key epoch
    # The one sampler regenerated the untrained batch under the same keys, and the resumed learner took
    # exactly those groups at step 2 again; nothing the checkpoint includes was generated again.
    assert _taken(steps[3]) == lost_future
    puts_resumed = [p["key"] for p in _jsonl(os.path.join(ledger, "put-ray-e1.jsonl"))]
    assert not set(puts_resumed) & set(before)
    final = json.load(open(os.path.join(ledger, "ray-close-e1.json")))
    _assert_no_gaps(timeline + [key for key, _ in final["waiting"]], 1, k)
    # Everything stopped: no actors, no cluster, no Ray processes left behind.
    assert not ray.is_initialized()
    assert _no_children_left()
    assert ray_processes and not _live(ray_processes, timeout=30)


def test_killed_sampler_actors_are_restarted_with_exact_accounting(tmp_path, monkeypatch, ray_config):
    """Sampler 0 is killed with `ray.kill`, sampler 1's worker process with SIGKILL (preferably while
    it generates a batch), both mid-run: Ray restarts both actors, the learner resubmits their runs,
    and every group key is trained once or still waiting, with no gap in what each sampler made."""
    c = ray_config(steps=8, bound=2, samplers=2)
    workdir = str(tmp_path)
    runtimes, killed = [], {}
    kills_done, learner_blocked = threading.Event(), threading.Event()
    real_start = ray_runtime.RayRuntime.start

    def start(self, version):
        runtimes.append(self)
        return real_start(self, version)

    monkeypatch.setattr(ray_runtime.RayRuntime, "start", start)
    ray_processes = _record_ray_processes(monkeypatch)
    real_update = learner_lib.make_rl_update

    def slow_update(*args, **kwargs):
        update, calls = real_update(*args, **kwargs), []

        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == 5:
                # Update of step 4: wait for both kills and until Ray has failed both killed `run`
                # calls, so that the next steps' checks count both restarts (no race with the run's end).
                learner_blocked.at = time.monotonic()
                learner_blocked.set()
                assert kills_done.wait(240), "the sampler actors were not killed"
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    if all(ray.wait([ref], timeout=0)[0] for ref, _, _ in killed.values()):
                        break
                    time.sleep(0.1)
            time.sleep(0.5)  # a slow learner: the samplers outrun it
            return update(*a, **k)

        return wrapped

    monkeypatch.setattr(learner_lib, "make_rl_update", slow_update)

    def killer():
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and len(_safe_rows(workdir)) < 1:
                time.sleep(0.1)
            rt = runtimes[0]
            # SIGKILL of sampler 1's worker process (its pid: the coordinator's record of its `run`; the
            # actor's own `ping` waits behind that `run`), preferably while it has a batch in flight: the
            # learner still trains (the samplers refill what it takes) until it blocks in step 4's update,
            # after which a gated sampler may start no batch, so then it is killed whatever it does.
            deadline = time.monotonic() + 60
            while True:
                st = ray.get(rt.coord.status.remote())["samplers"][1]
                late = learner_blocked.is_set() and time.monotonic() > learner_blocked.at + 2
                if st["pid"] and (st["inflight"] > 0 or late or time.monotonic() > deadline):
                    break
                time.sleep(0.01)
            ref = rt.slots[1].run_ref  # read first: once the kill is seen the learner resubmits a new `run`
            os.kill(st["pid"], signal.SIGKILL)
            killed[1] = (ref, len(_safe_rows(workdir)), st["inflight"])
            slot = rt.slots[0]
            ref = slot.run_ref
            ray.kill(slot.actor, no_restart=False)  # Ray restarts it (max_restarts=-1)
            killed[0] = (ref, len(_safe_rows(workdir)), None)
        finally:
            kills_done.set()

    t = threading.Thread(target=killer)
    t.start()
    summary = train_and_evaluate(c, workdir, progress=False)
    t.join()
    with open(os.path.join(workdir, "kills.json"), "w") as f:  # rows at each kill, sampler 1's groups in flight
        json.dump({i: [n, inflight] for i, (_, n, inflight) in killed.items()}, f)
    assert sorted(killed) == [0, 1] and all(n < 5 for _, n, _ in killed.values()), killed
    assert summary["steps"] == 8
    rows = _training_rows(workdir)
    assert rows[-1]["samplers/restarts_total"] >= 2
    assert max(r["staleness/max"] for r in rows) <= 2
    assert all(r["mask/valid_tokens"] > 0 for r in rows)

    g, k = c.rl.groups_per_step, c.runtime.sampler_groups
    ledger = os.path.join(workdir, "queue", "ledger")
    steps = _steps(ledger)
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
    _assert_no_gaps(accepted, 2, k)
    assert not ray.is_initialized()
    assert _no_children_left()
    assert ray_processes and not _live(ray_processes, timeout=30)
