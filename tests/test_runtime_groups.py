"""The asynchronous runtimes' shared core (`runtime.groups`) and the Ray coordinator's logic, without
starting a sampler or Ray: group keys, the staleness gate, taken keys, the learner's loop, the
coordinator and its taken-key state, a sampler that cannot start, and the queue's compaction."""

import dataclasses
import json
import os
import random
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxrl_async.runtime import groups, ray_runtime, sampler_process
from jaxrl_async.runtime.groups import GroupKey, TakenKeys, gate_admits
from jaxrl_async.runtime.spool import Item, TrajectoryQueue

META = {"tokens_per_s": 1.0, "weight_switches": 0.0, "gate_wait_s": 0.0}

# ----------------------------------------------------------------------------- keys and the gate

ints = st.integers(0, 10**12)


@given(ints, ints, ints, ints)
def test_group_key_format_and_parse_round_trip(e, s, b, g):
    key = GroupKey(e, s, b, g)
    assert GroupKey.parse(key.format()) == key
    assert str(key) == f"e{e}-s{s}-b{b}-g{g}"


@given(st.text(alphabet="esbg-0123456789١x ", max_size=24))
def test_group_key_parse_accepts_only_canonical_keys(text):
    key = GroupKey.try_parse(text)
    assert key is None or key.format() == text  # anything parsed formats back to itself


@pytest.mark.parametrize("bad", ["", "e0-s0-b0", "e01-s0-b0-g0", "e0-s0-b0-g0-", "E0-s0-b0-g0", "e-1-s0-b0-g0",
                                 "e١-s0-b0-g0", " e0-s0-b0-g0", "k00"])
def test_group_key_rejects_other_strings(bad):
    with pytest.raises(ValueError, match="not a group key"):
        GroupKey.parse(bad)
    with pytest.raises(ValueError, match="GroupKey.batch"):
        GroupKey(0, 0, -1, 0)


@given(bound=st.integers(0, 5), g=st.integers(1, 8), data=st.data())
def test_a_batch_the_gate_admits_is_never_trained_beyond_the_bound(bound, g, data):
    """The learner takes G groups per version, oldest first; the batch's groups are last in line (its
    start version is the newest). Admitted: each of its groups is trained within the bound. Refused:
    the last one would not be (the gate is exact, not merely safe)."""
    k = data.draw(st.integers(1, g), "k")
    taken = data.draw(st.integers(0, g - 1), "taken for the batch being assembled")
    ahead = data.draw(st.integers(0, (bound + 3) * g), "waiting and in flight elsewhere")
    v_next = data.draw(st.integers(0, 50), "v_next")
    v_s = data.draw(st.integers(max(0, v_next - bound - 2), v_next), "v_s")
    outstanding = taken + ahead + k
    trained_at = [v_next + p // g for p in range(taken + ahead, outstanding)]  # the batch's groups
    if gate_admits(outstanding, v_next, v_s, bound, g):
        assert all(v - v_s <= bound for v in trained_at)
    else:
        assert trained_at[-1] - v_s > bound


def test_too_stale_and_hung():
    assert not groups.too_stale(5, 3, 2) and groups.too_stale(6, 3, 2)
    assert groups.hung(True, 11, 11, 10, 300) and not groups.hung(True, 11, 9, 10, 300)
    assert not groups.hung(True, 5, 400, 10, 300)
    assert groups.hung(False, 0, 301, 10, 300) and not groups.hung(False, 500, 299, 10, 300)


# ----------------------------------------------------------------------------- taken keys


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 5), st.integers(0, 3)), max_size=60))
def test_taken_keys_is_a_set_held_by_frontier(keys):
    """Whatever order keys arrive in (epochs, samplers and groups out of range included), TakenKeys
    answers like a set, and holds no key of a batch below a sampler's frontier."""
    tk = TakenKeys(key_epoch=1, num_samplers=2, groups_per_batch=3)
    ref = set()
    for e, s, b, g in keys:
        key = GroupKey(e, s, b, g).format()
        tk.add(key)
        ref.add(key)
    universe = {GroupKey(e, s, b, g).format() for e in range(3) for s in range(3) for b in range(6) for g in range(4)}
    assert {k for k in universe if k in tk} == ref
    assert len(tk) == len(ref)
    assert all(b >= tk.next_batch[s] for s, batches in enumerate(tk.partial) for b in batches)
    again = TakenKeys(1, 2, 3, tk.next_batch, tk.beyond())
    assert {k for k in universe if k in again} == ref


def test_taken_keys_stay_small_over_a_long_run():
    tk = TakenKeys(0, 2, 4)
    for b in range(1000):
        for s in range(2):
            for g in (3, 1, 0, 2):
                tk.add(GroupKey(0, s, b, g).format())
    tk.add("e0-s1-b1000-g2")
    assert tk.next_batch == [1000, 1000] and tk.beyond() == ["e0-s1-b1000-g2"]
    assert len(tk) == 8001 and "e0-s0-b17-g3" in tk and "e0-s0-b1000-g0" not in tk


# ----------------------------------------------------------------------------- the Ray coordinator


def _coord(num=2, g=4, bound=1, capacity=8, taken=None, k=2):
    c = ray_runtime.Coordinator(num, g, bound, capacity, taken or TakenKeys(0, num, k))
    c.publish(0, ["ref0"])
    return c


def test_coordinator_gate_claims_and_counts_exactly():
    c = ray_runtime.Coordinator(2, 4, 1, 8, TakenKeys(0, 2, 2))
    inc0, b0 = c.sampler_started(0, pid=11)
    inc1, _ = c.sampler_started(1, pid=12)
    assert b0 == 0 and c.open_batch(0, inc0, 2) is None  # nothing published yet
    c.publish(0, ["ref0"])
    # bound 1, G 4, learner at version 0: (1 + 1) * 4 = 8 groups may be outstanding.
    assert c.open_batch(0, inc0, 2) == (0, ["ref0"])
    assert c.open_batch(1, inc1, 2) == (0, ["ref0"])
    assert c.inflight == [2, 2]
    for g in range(2):
        assert c.put(0, inc0, 0, g == 1, f"e0-s0-b0-g{g}", 0, b"x", META) == "ok"
    assert c.batches_done == [1, 0] and c.inflight == [0, 2]
    assert c.open_batch(0, inc0, 2) == (0, ["ref0"])  # 2 waiting + 2 + 2 in flight = 6 <= 8
    assert c.open_batch(0, inc0, 5) is None and c.inflight[0] == 0  # 2 + 2 + 5 = 9: refused, claim released
    assert c.open_batch(0, inc0, 4) is not None and c.inflight[0] == 4  # 2 + 2 + 4 = 8
    c.set_next_version(1)  # the learner moved on without taking: now only (1 + 1 - 1) * 4 = 4 fit at version 0
    assert c.open_batch(1, inc1, 2) is None and c.inflight == [4, 0]
    st = c.status()
    assert st["depth"] == 2 and [s["pid"] for s in st["samplers"]] == [11, 12]


def test_coordinator_put_dedups_taken_and_waiting_keys_and_bounds_the_buffer():
    c = _coord(capacity=2)
    inc, _ = c.sampler_started(0)
    assert c.put(0, inc, 0, False, "e0-s0-b0-g0", 0, b"a", META) == "ok"
    assert c.put(0, inc, 0, False, "e0-s0-b0-g0", 0, b"a", META) == "dup"  # waiting
    assert c.put(0, inc, 0, True, "e0-s0-b0-g1", 0, b"b", META) == "ok"
    assert c.put(0, inc, 1, False, "e0-s0-b1-g0", 0, b"c", META) == "full"
    got, dropped, puts, depth = c.take(1, 0)
    assert [k for k, *_ in got] == ["e0-s0-b0-g0"] and dropped == [] and depth == 1
    assert [(k, new) for k, _, new, _ in puts] == [("e0-s0-b0-g0", True), ("e0-s0-b0-g0", False),
                                                   ("e0-s0-b0-g1", True)]
    assert c.put(0, inc, 0, False, "e0-s0-b0-g0", 0, b"a", META) == "dup"  # taken
    assert c.stats == {"put": 2, "duplicates_dropped": 2, "taken": 1, "dropped_stale": 0}
    c.stop()
    assert c.put(0, inc, 1, False, "e0-s0-b1-g0", 0, b"c", META) == "stop"
    assert c.open_batch(0, inc, 2) == "stop"


def test_coordinator_takes_oldest_first_drops_stale_and_ignores_a_dead_incarnation():
    c = _coord(bound=1)
    old, _ = c.sampler_started(0)
    assert c.open_batch(0, old, 2) is not None
    new, start = c.sampler_started(0)  # restarted: the old incarnation's late calls change no count
    assert start == 0 and c.inflight[0] == 0
    assert c.open_batch(0, old, 2) == "stop"
    assert c.put(0, old, 0, True, "e0-s0-b0-g1", 0, b"late", META) == "ok"  # kept: nothing is lost
    assert c.batches_done[0] == 0  # ... but its successor's accounting is untouched
    inc1, _ = c.sampler_started(1)
    c.put(1, inc1, 0, False, "e0-s1-b0-g0", 2, b"newer", META)
    c.put(0, new, 0, False, "e0-s0-b0-g0", 0, b"older, put later", META)
    got, dropped, _, _ = c.take(3, 1)
    assert [k for k, *_ in got] == ["e0-s0-b0-g1", "e0-s0-b0-g0", "e0-s1-b0-g0"]
    got, dropped, _, _ = c.take(3, 1)
    assert got == [] and dropped == []
    c.put(1, inc1, 0, True, "e0-s1-b0-g1", 0, b"stale at 2", META)
    got, dropped, _, _ = c.take(1, 2)
    assert got == [] and dropped == [("e0-s1-b0-g1", 0)] and c.stats["dropped_stale"] == 1
    assert c.taken == 3
    c.end_batch(2)
    assert c.next_version == 3 and c.taken == 0


def test_a_restored_coordinator_never_accepts_a_key_the_checkpoint_includes():
    taken = TakenKeys(3, 2, 2, next_batch=[5, 0], taken=["e3-s1-b0-g1"])
    c = _coord(taken=taken)
    assert c.batches_done == [5, 0]
    inc0, start0 = c.sampler_started(0)
    inc1, start1 = c.sampler_started(1)
    assert (start0, start1) == (5, 0)
    assert c.put(0, inc0, 4, False, "e3-s0-b4-g0", 0, b"", META) == "dup"  # below the frontier
    assert c.put(1, inc1, 0, False, "e3-s1-b0-g1", 0, b"", META) == "dup"  # taken beyond it
    assert c.put(1, inc1, 0, False, "e3-s1-b0-g0", 0, b"", META) == "ok"


@pytest.mark.parametrize("seed", range(3))
def test_coordinator_simulated_run_trains_every_key_once_within_the_bound(seed):
    """Two samplers (killed and restarted at random) and a learner interleaved at random against the
    coordinator: every key handed over is taken once, none is trained beyond the bound, no batch has a
    gap. (A sampler starved for long enough can still hand over a group the learner must drop: the gate
    counts its claim, but others may open batches at newer versions meanwhile.)"""
    rng = random.Random(seed)
    num, g, k, bound = 2, 4, 2, 1
    c = ray_runtime.Coordinator(num, g, bound, 6, TakenKeys(0, num, k))
    version = 0
    c.publish(version, ["r"])
    samplers = []  # per sampler: [incarnation, batch, claimed (v_s) or None, groups put of this batch]
    for i in range(num):
        inc, b = c.sampler_started(i)
        samplers.append([inc, b, None, 0])
    trained, have, dropped, new = [], [], [], []
    while version < 40:
        i = rng.randrange(num + 2)
        if i >= num:  # the learner
            got, drop, puts, _ = c.take(g - len(have), version)
            dropped += [key for key, _ in drop]
            new += [key for key, _, is_new, _ in puts if is_new]
            have += got
            if len(have) == g:
                trained += [(key, version - sv) for key, sv, _, _ in have]
                c.end_batch(version)
                version += 1
                c.publish(version, ["r"])
                have = []
            continue
        s = samplers[i]
        if rng.random() < 0.05:  # killed: the restarted one regenerates its unfinished batch
            inc, b = c.sampler_started(i)
            samplers[i] = [inc, b, None, 0]
        elif s[2] is None:
            opened = c.open_batch(i, s[0], k)
            if opened is not None:
                s[2] = opened[0]
        else:
            st = c.put(i, s[0], s[1], s[3] == k - 1, f"e0-s{i}-b{s[1]}-g{s[3]}", s[2], b"", META)
            if st != "full":
                s[3] += 1
                if s[3] == k:
                    s[1], s[2], s[3] = s[1] + 1, None, 0
    keys = [key for key, _ in trained]
    assert len(keys) == len(set(keys)) == 40 * g
    assert max(lag for _, lag in trained) <= bound
    assert len(new) == len(set(new)) and set(new) == set(keys) | set(dropped) | set(c.buffer)
    assert not set(keys) & set(dropped) and len(dropped) == c.stats["dropped_stale"]
    for i in range(num):
        batches = sorted({GroupKey.parse(key).batch for key in new if GroupKey.parse(key).sampler == i})
        assert batches == list(range(len(batches)))


def test_taken_key_state_round_trips_through_its_file_and_warns_when_unusable(tmp_path):
    workdir = str(tmp_path)
    os.makedirs(ray_runtime.state_dir(workdir))
    taken = TakenKeys(2, 2, 2)
    for key in ["e2-s0-b0-g0", "e2-s0-b0-g1", "e2-s0-b2-g1", "e2-s1-b0-g1"]:
        taken.add(key)
    ray_runtime._write_json_atomic(ray_runtime.state_path(workdir, 7), ray_runtime.taken_state(taken, 7, epoch=4))
    state = json.load(open(ray_runtime.state_path(workdir, 7)))
    assert state == {"version": 7, "epoch": 4, "key_epoch": 2, "sampler_groups": 2, "next_batch": [1, 0],
                     "consumed": ["e2-s0-b2-g1", "e2-s1-b0-g1"]}
    back, warnings = ray_runtime.restore_taken(workdir, 7, 2, 2, epoch=5)
    assert warnings == [] and back.key_epoch == 2 and back.next_batch == [1, 0]
    assert back.beyond() == taken.beyond()
    fewer, warnings = ray_runtime.restore_taken(workdir, 7, 1, 2, epoch=5)
    assert fewer.next_batch == [1] and fewer.beyond() == ["e2-s0-b2-g1"] and "2 samplers before" in warnings[0]
    for version, k, match in ((7, 3, "sampler_groups changed from 2 to 3"), (9, 2, "no taken-key state")):
        fresh, warnings = ray_runtime.restore_taken(workdir, version, 2, k, epoch=5)
        assert fresh.key_epoch == 5 and fresh.next_batch == [0, 0] and match in warnings[0]
    assert ray_runtime.restore_taken(workdir, 0, 2, 2, epoch=5)[1] == []
    assert dataclasses.astuple(GroupKey.parse("e2-s0-b2-g1")) == (2, 0, 2, 1)


# ----------------------------------------------------------------------------- the learner's loop


class FakeSource:
    """A GroupSource over a list: groups arrive when `wait` is called, samplers die and hang on cue."""

    name = "sampler"

    def __init__(self, arrivals, dead=(), hung_at=()):
        self.arrivals, self.waiting = list(arrivals), []
        self.dead, self.hung_at = list(dead), set(hung_at)
        self.restarts = self.hung_restarts = self.recovered = self.waits = 0
        self.ended = None

    def begin(self, step):
        self.step = step

    def take(self, want, version, have):
        out, self.waiting = self.waiting[:want], self.waiting[want:]
        return ([g for g in out if not groups.too_stale(version, g.start_version, 1)],
                [g for g in out if groups.too_stale(version, g.start_version, 1)])

    def wait(self):
        self.waits += 1
        if self.arrivals:
            self.waiting.append(self.arrivals.pop(0))

    def end(self, version, taken):
        self.ended = (version, [g.key for g in taken])

    def depth(self):
        return len(self.waiting)

    def status(self):
        return groups.SourceStatus(len(self.waiting), 3, [groups.SamplerState(0, 42, True, False, 2, 5, 1, 3.25)])

    def restart_dead(self):
        out = [(self.dead.pop(0), "exited with code 1")] if self.dead else []
        self.restarts += len(out)
        return out

    def restart_hung(self, timeout_s, startup_s):
        if self.waits in self.hung_at:
            self.hung_restarts += 1
            return [0]
        return []

    def metrics(self):
        return {"perf/source_s": 0.5}


def _group(key, sv, n=2):
    import numpy as np

    from jaxrl_async.rollout.trajectory import Trajectory

    t = Trajectory(tokens=np.zeros(3, np.int32), loss_mask=np.ones(3, bool), behav_logp=np.zeros(3, np.float32),
                   versions=np.zeros(3, np.int32), reward=0.0, success=False, num_turns=1, group_id=7, task_seed=0)
    return groups.Group(key, sv, [t] * n, dict(META, tokens_per_s=float(sv)))


def test_loop_takes_within_the_bound_and_writes_ledger_warnings_and_metrics(tmp_path, tiny_config):
    c = tiny_config()
    c.rl.groups_per_step, c.runtime.max_staleness, c.runtime.wait_log_s = 2, 1, 0.0
    src = FakeSource([_group("e0-s0-b0-g0", 0), _group("e0-s0-b0-g1", 2), _group("e0-s0-b1-g0", 3)],
                     dead=[1], hung_at={1})
    logged = []
    loop = groups.GroupLoop(src, c, str(tmp_path), epoch=4, log=logged.append)
    trajs, info = loop.next_groups(step=6, version=3)
    assert src.step == 6 and src.ended == (3, ["e0-s0-b0-g1", "e0-s0-b1-g0", "e0-s0-b0-g0"])
    assert [t.group_id for t in trajs] == [0, 0, 1, 1]
    assert info["queue/dropped_stale"] == 1 and info["queue/taken_total"] == 3 and info["perf/source_s"] == 0.5
    assert info["rollout/tokens_per_s"] == 2.5 and info["samplers/restarts_total"] == 1
    assert info["samplers/hung_restarts"] == 1 and info["queue/depth"] == 0
    text = "\n".join(logged)
    assert "sampler 1 exited with code 1 while the learner waited for step 6: restarted" in text
    assert "sampler 0 showed no sign of life" in text
    assert ("learner waiting 0 s for step 6: 0/2 groups, queue depth 0, next version 3; sampler 0 (pid 42): "
            "alive, starting, 2 groups in flight, 5 batches done, loaded version 1, last heartbeat 3.2 s ago") in text
    loop.close()
    (line,) = open(os.path.join(groups.ledger_dir(str(tmp_path)), "learner.jsonl")).read().splitlines()
    rec = json.loads(line)
    assert (rec["epoch"], rec["step"], rec["version"]) == (4, 6, 3)
    assert rec["trained"] == [["e0-s0-b0-g1", 2], ["e0-s0-b1-g0", 3]] and rec["dropped"] == [["e0-s0-b0-g0", 0]]


# ----------------------------------------------------------------------------- defect: a sampler that cannot start


class _DiesAtStartup:
    """Stands in for a spawned sampler that dies before its set-up finishes (as a script without a
    `__main__` guard does under spawn), or is killed from outside (`code` < 0)."""

    code = 1
    started = 0

    def __init__(self, target=None, args=(), name=None, daemon=None):
        self.pid = 4242

    def start(self):
        type(self).started += 1
        self.exitcode = self.code

    def join(self, timeout=None):
        pass

    def is_alive(self):
        return False

    def kill(self):
        pass

    terminate = kill


def _process_runtime(tmp_path, tiny_config, log=None):
    from jaxrl_async.runtime.process import ProcessRuntime

    c = tiny_config()
    c.runtime.mode, c.runtime.sampler_groups, c.runtime.max_staleness = "process", 2, 1
    c.runtime.queue_fsync = False
    return ProcessRuntime(c, str(tmp_path), epoch=0, resume_step=None, log=log or (lambda m: None))


@pytest.fixture
def alarm():
    """Fails a test that would hang (the behaviour this defect had) instead of hanging the suite."""
    def ring(*_):
        raise TimeoutError("still waiting after 20 s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_sampler_that_keeps_dying_at_startup_fails_the_run_fast(tmp_path, tiny_config, monkeypatch, alarm):
    monkeypatch.setattr(_DiesAtStartup, "started", 0)
    monkeypatch.setattr(sampler_process._CTX, "Process", _DiesAtStartup)
    logged = []
    rt = _process_runtime(tmp_path, tiny_config, logged.append)
    try:
        rt.start(0)
        with pytest.raises(RuntimeError, match=r"sampler 0 exited with code 1 during its start-up 3 times in a "
                                               r"row(.|\n)*if __name__ == \"__main__\":"):
            rt.next_groups(0, 0)
    finally:
        rt.close()
    assert _DiesAtStartup.started == 3  # the first start and two restarts, each logged
    assert sum("exited with code 1" in m and "restarted" in m for m in logged) == 2


def test_samplers_killed_from_outside_are_restarted_however_often(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setattr(_DiesAtStartup, "code", -signal.SIGKILL)
    monkeypatch.setattr(sampler_process._CTX, "Process", _DiesAtStartup)
    rt = _process_runtime(tmp_path, tiny_config)
    try:
        rt.start(0)
        for _ in range(10):
            assert rt.source.restart_dead() == [(0, "was killed by SIGKILL")]
        assert rt.pool.restarts == 10
    finally:
        rt.close()


def test_a_run_refuses_to_start_while_a_spawned_child_imports_the_main_script(tmp_path, tiny_config, monkeypatch):
    """What such a sampler does first: it fails before it touches the workdir (a fresh run would remove
    the learner's queue and versions under it)."""
    import multiprocessing

    from jaxrl_async.cluster import RLCluster

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(RuntimeError, match='under `if __name__ == "__main__":`'):
        RLCluster(tiny_config(), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- defect: the queue's record grows


def _markers(workdir):
    return os.listdir(os.path.join(workdir, "queue", "consumed"))


def test_released_keys_are_compacted_and_stay_consumed(tmp_path, tiny_config):
    """60 steps of 4 groups (2 batches of 2 from one sampler): the queue keeps O(1) markers, and every
    released key stays consumed (a regenerated one is dropped)."""
    workdir = str(tmp_path)
    rt = _process_runtime(tmp_path, tiny_config)
    steps, g = 60, rt.config.rl.groups_per_step
    try:
        for step in range(steps):
            for j in range(g):
                b, grp = divmod(step * g + j, 2)
                assert rt.queue.put(Item(GroupKey(0, 0, b, grp).format(), [], step, META), timeout=0)
            rt.next_groups(step, step)
            rt.checkpointed(step + 1)
    finally:
        rt.close()
    assert len(_markers(workdir)) <= g
    queue = TrajectoryQueue(groups.queue_dir(workdir), 8, fsync=False)
    assert queue.consumed_keys() == {GroupKey(0, 0, b, grp).format() for b in range(steps * g // 2) for grp in (0, 1)}
    assert queue.put(Item("e0-s0-b3-g1", [], 0, META)) and queue.stats["duplicates_dropped"] == 1 and queue.depth() == 0


def _released(d, keys, step=0):
    tq = TrajectoryQueue(d, 100, fsync=True)
    for key in keys:
        tq.put(Item(key, [], 0, {}))
    tq.set_step(step)
    tq.take(len(keys), timeout=0)
    tq.release(step + 1)
    return tq


def test_compaction_is_crash_safe(tmp_path, monkeypatch):
    d = str(tmp_path)
    keys = [GroupKey(1, s, b, g).format() for s in range(2) for b in range(3) for g in range(2)] + ["odd key"]
    tq = _released(d, keys)
    tq.compact({1: 2})
    # A crash after consumed.json is in place, before the markers are deleted: everything is consumed twice
    # over, and the next compaction finishes the job.
    tq = _released(d, [GroupKey(1, 0, 3, g).format() for g in range(2)], step=1)
    real_unlink = os.unlink

    def crash(path, *a, **k):
        if os.path.dirname(path).endswith("consumed"):
            raise KeyboardInterrupt("killed")
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        tq.compact()
    monkeypatch.setattr(os, "unlink", real_unlink)
    every = set(keys) | {"e1-s0-b3-g0", "e1-s0-b3-g1"}
    fresh = TrajectoryQueue(d, 100, fsync=True)
    assert fresh.consumed_keys() == every
    assert fresh.compact() == 2 and sorted(os.listdir(os.path.join(d, "consumed"))) == ["odd%20key"]
    # A crash while the new consumed.json is written leaves the old one, and the markers, as they were.
    fresh = _released(d, [GroupKey(1, 1, 3, g).format() for g in range(2)], step=2)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        fresh.compact()
    monkeypatch.undo()
    every |= {"e1-s1-b3-g0", "e1-s1-b3-g1"}
    again = TrajectoryQueue(d, 100, fsync=True)
    assert again.consumed_keys() == every
    assert again.compact() == 2 and json.load(open(os.path.join(d, "consumed.json")))["epochs"] == {
        "1": {"k": 2, "next_batch": {"0": 4, "1": 4}}}
    assert not [n for n in os.listdir(d) if ".tmp." in n]
    for key in every:  # a producer regenerating every key adds none
        again.put(Item(key, [], 0, {}))
    assert again.depth() == 0 and again.consumed_keys() == every


def test_compaction_leaves_keys_a_resume_can_recover_and_unrecorded_epochs(tmp_path):
    d = str(tmp_path)
    tq = TrajectoryQueue(d, 100, fsync=False)
    tq.compact({0: 2})
    for key in ["e0-s0-b0-g0", "e0-s0-b0-g1", "e0-s0-b1-g0", "e0-s0-b1-g1", "e9-s0-b0-g0", "e9-s0-b0-g1"]:
        tq.put(Item(key, [], 0, {}))
    tq.set_step(0)
    tq.take(2, timeout=0)  # b0
    tq.set_step(1)
    tq.take(4, timeout=0)  # b1 and epoch 9's batch
    # A release interrupted after writing b1-g0's marker: b1 is still accepted, so it is not compacted.
    open(os.path.join(d, "consumed", "e0-s0-b1-g0"), "w").close()
    open(os.path.join(d, "consumed", "e0-s0-b1-g1"), "w").close()
    tq.release(1)
    assert tq.compact() == 2
    assert sorted(os.listdir(os.path.join(d, "consumed"))) == ["e0-s0-b1-g0", "e0-s0-b1-g1"]
    resumed = TrajectoryQueue(d, 100, fsync=False)
    assert resumed.recover(1) == 4
    assert sorted(resumed.waiting_keys()) == ["e0-s0-b1-g0", "e0-s0-b1-g1", "e9-s0-b0-g0", "e9-s0-b0-g1"]
    assert resumed.consumed_keys() == {"e0-s0-b0-g0", "e0-s0-b0-g1"}
    resumed.set_step(1)
    assert len(resumed.take(4, timeout=0)) == 4
    resumed.release(2)
    assert resumed.compact() == 2  # epoch 9's batch size was never recorded: its markers stay
    assert sorted(os.listdir(os.path.join(d, "consumed"))) == ["e9-s0-b0-g0", "e9-s0-b0-g1"]
    with pytest.raises(ValueError, match="key epoch 0 has 2 groups per batch on record, not 3"):
        resumed.compact({0: 3})
