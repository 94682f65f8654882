"""Chaos soak of the process and Ray runtimes: train for N seconds under seeded, randomly timed faults.

    python -m benchmarks.soak --seconds=600 --workdir=runs/soak                 (make soak)
    python -m benchmarks.soak --seconds=300 --runtime=ray --workdir=runs/soak_ray
    python -m benchmarks.soak --seconds=20 --every_kind --model=tiny --workdir=runs/soak_tiny (the slow test)

The learner runs as a subprocess (`python -m jaxrl_async.train`). `--model=default` (the
default) trains configs/default.py's model on its task with its batch (16 x 8 episodes per
step) and its warm start, cached in `--warmstart_cache` (the first run computes it), with
`max_staleness=2`, 2 samplers, a checkpoint every 5 steps and a held-out evaluation (256
episodes) every 25, so the learning curve under faults can be compared with `make train`'s
(held-out success 0.98 after 200 steps); the report says whether and when it reached
`--target`. `--model=tiny` (1 layer, width 32, `search_easy`, 4 x 4 episodes, no warm start)
takes a step a second: many faults a minute, no learning to speak of.

After the first training step, a seeded injector, at random intervals (`--min_gap`..`--max_gap`
seconds, one fault at a time: the next waits until training has progressed again), does
one of (in a seeded random order that goes through every kind before it repeats one; with
`--every_kind` the soak goes on past `--seconds` until each kind has been injected once):

- `sampler_kill` (process runtime): SIGKILL a sampler process (the learner restarts it);
- `scorer_kill` (with `--proximal=dedicated`): SIGKILL an old-log-prob scorer process;
- `actor_kill` (Ray): `ray.kill` a sampler actor (Ray restarts it, the learner resubmits its loop);
- `worker_kill` (Ray): SIGKILL a sampler actor's worker process;
- `learner_kill`: SIGKILL the learner; the driver starts it again, and it resumes from its
  checkpoint (its orphaned samplers exit by themselves; Ray reaps the actors it owned);
- `version_truncate`: truncate the largest file of the newest parameter version in the
  ring buffer, while it is being written (`mid_write`, if a temp directory shows up within
  two seconds) or after (`after_write`);
- `sampler_stall`: SIGSTOP a sampler process (Ray: an actor's worker), SIGCONT it after a
  random 2 s .. 1.5 x `runtime.hang_timeout_s` (if it is still there: the learner kills it
  once the hang timeout passes while it waits).

With `--runtime=ray` the driver starts a local Ray cluster itself and the learners join it
(`runtime.ray_address`), so the cluster outlives a killed learner and the driver can kill
actors. Recovery time of a fault: from the injection to the next training step written to
`metrics.jsonl`. At the end the driver stops the learner (SIGINT), runs it once more from
its checkpoint for one more checkpoint interval so the run ends on a whole checkpoint with
a final held-out evaluation, and computes the accounting from the ledgers
(`WORKDIR/queue/ledger/`: groups queued by every sampler, group keys taken at every learner
step) and `metrics.jsonl`: groups generated / trained / dropped as stale / regenerated,
duplicates trained (must be 0), groups lost (must be 0), the largest staleness the loss
saw (must be <= runtime.max_staleness), and the held-out learning curve of the surviving
timeline. The table goes to stdout and everything to WORKDIR/soak.json. Exit status 1 if
an invariant fails (not reaching the target is reported, not an invariant).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
import types
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("sampler_kill", "learner_kill", "version_truncate", "sampler_stall")


def learner_cmd(workdir: str, steps: int, args, fresh: bool = False) -> list[str]:
    if args.model == "tiny":  # seconds per step: many faults per minute, no learning to speak of
        model = ["--config=configs/default.py", "--config.task.name=search_easy", "--config.model.d_model=32",
                 "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.d_ff=64",
                 "--config.rl.groups_per_step=4", "--config.rl.group_size=4", "--config.warmstart.enabled=False",
                 "--config.runtime.sampler_groups=2"]
    else:  # the default config's model, task, batch and warm start (cached: restarts before a checkpoint reuse it)
        model = ["--config=configs/default.py", f"--config.warmstart.cache_dir={os.path.abspath(args.warmstart_cache)}",
                 "--config.runtime.sampler_groups=4"]
    runtime = [f"--config.runtime.mode={args.runtime}"]
    if args.proximal:
        runtime.append(f"--config.proximal.source={args.proximal}")
    if args.runtime == "ray":
        runtime.append(f"--config.runtime.ray_address={args.ray_address}")
    return [sys.executable, "-m", "jaxrl_async.train", f"--workdir={workdir}", *model, *runtime,
            f"--config.eval.episodes={args.eval_episodes}", f"--config.runtime.num_samplers={args.samplers}",
            f"--config.runtime.max_staleness={args.bound}",
            f"--config.runtime.hang_timeout_s={args.hang_timeout}", f"--config.runtime.wait_log_s={args.wait_log}",
            f"--config.train.steps={steps}", f"--config.train.checkpoint_every={args.checkpoint_every}",
            "--config.train.keep_checkpoints=2", f"--config.train.eval_every={args.eval_every or max(steps, 1)}",
            *(["--noresume"] if fresh else [])]


def groups_per_step(args) -> int:
    return 4 if args.model == "tiny" else 16


# ----------------------------------------------------------------------------- accounting


def _jsonl(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # a line cut short by a SIGKILL
    except FileNotFoundError:
        pass
    return out


def _surviving_timeline(ldir: str, final_steps: int):
    """(every take record, {step: the surviving take}, keys trained, keys dropped as stale) from the
    learner's ledger: for each step < final_steps, the take of the newest learner epoch (a resumed
    learner redoes the steps after its checkpoint under a higher epoch)."""
    takes = _jsonl(os.path.join(ldir, "learner.jsonl"))
    surviving: dict[int, dict] = {}
    for e in takes:
        if e["step"] < final_steps and (e["step"] not in surviving or e["epoch"] >= surviving[e["step"]]["epoch"]):
            surviving[e["step"]] = e
    trained = [k for s in sorted(surviving) for k, _ in surviving[s]["trained"]]
    dropped = [k for s in sorted(surviving) for k, _ in surviving[s]["dropped"]]
    return takes, surviving, trained, dropped


def _timeline_counts(workdir: str, takes: list, surviving: dict, trained: list, dropped: list, final_steps: int,
                     groups_per_step: int, bound: int) -> dict:
    """The accounting both runtimes compute the same way from the surviving timeline
    (`_surviving_timeline`) and metrics.jsonl: missing or short steps, groups trained, dropped,
    retaken and duplicated, staleness against the bound, hung restarts."""
    taken_count = collections.Counter(k for e in takes for k, _ in e["trained"] + e["dropped"])
    staleness = [e["version"] - sv for e in takes for _, sv in e["trained"]]
    rows = [r for r in _jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss/policy" in r]
    return {
        "steps": final_steps,
        "steps_missing": sorted(set(range(final_steps)) - set(surviving)),
        "steps_short": sorted(s for s, e in surviving.items() if len(e["trained"]) != groups_per_step),
        "groups_trained": len(trained),
        "groups_dropped_stale": len(dropped),
        "groups_dropped_stale_all_epochs": sum(len(e["dropped"]) for e in takes),
        "groups_retaken_after_learner_restart": sum(c > 1 for c in taken_count.values()),
        "duplicates_trained": len(trained) - len(set(trained)),
        "max_staleness_loss": max(staleness, default=0),
        "max_staleness_metrics": max((r["staleness/max"] for r in rows), default=0),
        "staleness_bound": bound,
        "hung_restarts_last_epoch": max((r.get("samplers/hung_restarts", 0) for r in rows), default=0),
    }


def account(workdir: str, final_steps: int, groups_per_step: int, bound: int) -> dict:
    """Exactly-once accounting of a finished run from the queue's ledgers and metrics.jsonl.

    The surviving timeline is, for every step < final_steps, the ledger entry of the newest
    learner epoch that took a batch for it (a resumed learner redoes the steps after its
    checkpoint under a higher epoch)."""
    from jaxrl_async.runtime.base import queue_dir
    from jaxrl_async.runtime.sampler_process import ledger_dir
    from jaxrl_async.runtime.spool import TrajectoryQueue

    ldir = ledger_dir(workdir)
    takes, surviving, trained, dropped = _surviving_timeline(ldir, final_steps)
    puts = [p for name in sorted(os.listdir(ldir)) if name.startswith("put-")
            for p in _jsonl(os.path.join(ldir, name))] if os.path.isdir(ldir) else []
    queue = TrajectoryQueue(queue_dir(workdir), 1)
    waiting, consumed = set(queue.waiting_keys()), queue.consumed_keys()
    every = {p["key"] for p in puts} | consumed | waiting
    accounted = set(trained) | set(dropped) | waiting
    lost = sorted(every - accounted)
    return {
        **_timeline_counts(workdir, takes, surviving, trained, dropped, final_steps, groups_per_step, bound),
        "groups_generated": len(puts),
        "groups_unique": len({p["key"] for p in puts}),
        "groups_regenerated": sum(not p["new"] for p in puts),
        "groups_waiting_at_end": len(waiting),
        "groups_lost": len(lost),
        "lost_keys": lost[:20],
    }


def account_ray(workdir: str, final_steps: int, groups_per_step: int, bound: int) -> dict:
    """The same accounting for the Ray runtime. Its group buffer lives in the coordinator actor's
    memory and dies with a killed learner; the resumed learner restarts every sampler at its first
    batch not wholly taken at the checkpoint (`WORKDIR/queue/ray/state-<v>.json`), so the groups
    the lost coordinator held or the rolled-back steps took are generated again under the same
    keys. A group is lost when its key is neither trained nor dropped as stale in the surviving
    timeline and lies behind the final taken-key state (its sampler's `next_batch`, or among the
    `consumed` keys beyond it): no resume would generate it again. Keys at or past that frontier
    (waiting in the last coordinator at the end, or generated by an earlier learner after the final
    checkpoint) are the next resume's work, counted apart."""
    from jaxrl_async.runtime.groups import GroupKey
    from jaxrl_async.runtime.ray_runtime import ledger_dir, state_path

    ldir = ledger_dir(workdir)
    takes, surviving, trained, dropped = _surviving_timeline(ldir, final_steps)
    names = sorted(os.listdir(ldir)) if os.path.isdir(ldir) else []
    puts: dict[int, list] = collections.defaultdict(list)  # learner epoch -> its put records
    closes: dict[int, dict] = {}
    for name in names:
        if name.startswith("put-ray-e") and name.endswith(".jsonl"):
            puts[int(name[len("put-ray-e"):-len(".jsonl")])] += _jsonl(os.path.join(ldir, name))
        elif name.startswith("ray-close-e") and name.endswith(".json"):
            with open(os.path.join(ldir, name)) as f:
                closes[int(name[len("ray-close-e"):-len(".json")])] = json.load(f)
    try:
        with open(state_path(workdir, final_steps)) as f:
            state = json.load(f)
    except FileNotFoundError:
        state = {"key_epoch": -1, "next_batch": [], "consumed": []}
    all_puts = [p for ep in sorted(puts) for p in puts[ep]]
    every = {p["key"] for p in all_puts}
    accounted = set(trained) | set(dropped)
    consumed_beyond = set(state["consumed"])

    def pending(key: str) -> bool:  # at or past the final frontier: the next resume generates it again
        gk = GroupKey.parse(key)
        return (gk.epoch == state["key_epoch"] and gk.sampler < len(state["next_batch"])
                and gk.batch >= state["next_batch"][gk.sampler] and key not in consumed_beyond)

    rest = every - accounted
    lost = sorted(k for k in rest if not pending(k))
    last = max(closes) if closes else None
    waiting = {k for k, _ in closes[last]["waiting"]} if last is not None and last == max(puts, default=-1) else set()
    epochs_of = collections.defaultdict(set)
    for ep, ps in puts.items():
        for p in ps:
            if p["new"]:
                epochs_of[p["key"]].add(ep)
    return {
        **_timeline_counts(workdir, takes, surviving, trained, dropped, final_steps, groups_per_step, bound),
        "groups_generated": len(all_puts),
        "groups_unique": len(every),
        "groups_regenerated": sum(not p["new"] for p in all_puts),
        "groups_regenerated_after_learner_restart": sum(len(eps) - 1 for eps in epochs_of.values()),
        "groups_waiting_at_end": len(waiting),
        "groups_past_final_frontier": len(rest) - len(lost),
        "groups_lost": len(lost),
        "lost_keys": lost[:20],
        "learner_epochs": len(puts),
        "learner_epochs_closed_in_order": len(closes),
    }


def learning(workdir: str, eval_seen: dict, t_begin: float, t0: float, target: float) -> dict:
    """The held-out learning curve of the surviving timeline (metrics.jsonl's evaluation rows) and
    where it first reached `target`: the step, and the driver's clock when that evaluation was
    written (seconds since the soak's start, warm start and compilation included, and since the
    first training step)."""
    curve = {int(r["step"]): float(r["eval/success_rate"])
             for r in _jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/success_rate" in r}
    steps = sorted(curve)
    hit = next((s for s in steps if curve[s] >= target), None)
    t = eval_seen.get(hit)
    return {"target": target, "curve": {str(s): curve[s] for s in steps}, "reached": hit is not None,
            "step": hit, "success": curve.get(hit),
            "s_since_start": None if t is None else t - t_begin, "s_since_first_step": None if t is None else t - t0,
            "final_step": steps[-1] if steps else None, "final_success": curve[steps[-1]] if steps else None}


# ----------------------------------------------------------------------------- the driver


class Progress:
    """Watches metrics.jsonl for new training rows (appends; a resume's truncation is not progress)
    and notes when each evaluation row (re)appeared (`eval_seen`: step -> driver clock)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.count = 0
        self.last_step = -1
        self.eval_seen: dict[int, float] = {}
        self._evals: set[int] = set()
        self._stat = None

    def poll(self) -> bool:
        try:
            st = os.stat(self.path)
            stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stat = None
        if stat == self._stat:  # unchanged: no need to parse it again
            return False
        self._stat = stat
        lines = _jsonl(self.path)
        rows = [r for r in lines if "loss/policy" in r]
        grew = len(rows) > self.count
        self.count = len(rows)
        if rows:
            self.last_step = rows[-1]["step"]
        evals = {int(r["step"]) for r in lines if "eval/success_rate" in r}
        now = time.monotonic()
        for s in evals - self._evals:  # new, or written again after a resume truncated it
            self.eval_seen[s] = now
        self._evals = evals
        return grew


def _descendants_running(pid: int, marker: str) -> list[int]:
    """Live (not zombie) processes under `pid` whose command line contains `marker`."""
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and marker in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _children(pid: int) -> list[int]:
    """The sampler processes (multiprocessing spawn children) under `pid`."""
    return _descendants_running(pid, "spawn_main")


def _scorers(pid: int) -> list[int]:
    """The dedicated old-log-prob scorer processes (`python -m jaxrl_async.runtime.scorer`) under `pid`."""
    return _descendants_running(pid, "jaxrl_async.runtime.scorer")


def _truncate_newest_version(workdir: str, rng, mid_write: bool) -> Optional[str]:
    from jaxrl_async.learner.checkpoints import MANIFEST

    vdir = os.path.join(workdir, "versions")
    deadline = time.monotonic() + (2.0 if mid_write else 0.0)
    while True:
        names = os.listdir(vdir) if os.path.isdir(vdir) else []
        tmp = [n for n in names if n.startswith(".tmp-")]
        if mid_write and tmp:
            target = os.path.join(vdir, tmp[0])
            break
        if time.monotonic() >= deadline:
            final = sorted(n for n in names if n.startswith("v_"))
            if not final:
                return None
            target, mid_write = os.path.join(vdir, final[-1]), False
            break
        time.sleep(0.005)
    try:
        files = [os.path.join(r, n) for r, _, ns in os.walk(target) for n in ns if n != MANIFEST]
        path = max(files, key=os.path.getsize)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return ("mid_write:" if mid_write else "after_write:") + path
    except (OSError, ValueError):
        return None  # renamed or evicted under us


KINDS_RAY = ("actor_kill", "worker_kill", "learner_kill", "version_truncate", "sampler_stall")


def _ray_workers() -> list[int]:
    """Worker processes of the sampler actors on the driver's local Ray cluster (the raylet is this
    process's child, its workers the raylet's; Ray titles an actor's worker `ray::SamplerActor...`).
    Only one learner runs at a time, so these are its actors (a killed learner's are waited out)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "SamplerActor" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _ray_actor_names(learner_pid: int) -> list[str]:
    import ray

    from jaxrl_async.runtime.ray_runtime import NAMESPACE

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == NAMESPACE]
    return sorted(n for n in names if n.startswith("sampler-") and f"-{learner_pid}-" in n)


def _start_ray(args, env: dict) -> str:
    """A local Ray cluster owned by this driver (the learners connect to it, so a killed learner does
    not take the cluster with it, and the driver can `ray.kill` its actors). Returns its address."""
    import logging

    import ray

    from jaxrl_async.runtime.ray_runtime import NAMESPACE

    os.environ.update({k: env[k] for k in ("JAX_COMPILATION_CACHE_DIR",)})  # the actors inherit it
    # CPUs for two learners' actors at once: a killed learner's actors are reaped a little later.
    ctx = ray.init(num_cpus=2 * args.samplers, include_dashboard=False, namespace=NAMESPACE,
                   logging_level=logging.WARNING)
    return ctx.address_info["gcs_address"]


def soak(args) -> dict:
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    log_path = os.path.join(workdir, "learner.log")
    logf = open(log_path, "a")
    ray_mode = args.runtime == "ray"
    kinds = KINDS_RAY if ray_mode else KINDS
    if args.proximal == "dedicated":  # a scorer process beside every sampler: kill those too
        kinds = kinds + ("scorer_kill",)

    # A persistent compilation cache: restarted learners and samplers skip most of their compile time.
    cache_dir = os.path.abspath(args.compile_cache or os.path.join(workdir, "jax_cache"))
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
    if ray_mode:
        args.ray_address = _start_ray(args, env)
        if "RAY_AUTH_MODE" in os.environ:  # ray.init turned token auth on for its cluster: the learners follow
            env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]

    def start_learner(fresh=False, steps=10**6):
        return subprocess.Popen(learner_cmd(workdir, steps, args, fresh), cwd=REPO, stdout=logf, stderr=logf, env=env)

    def sampler_pids(learner_pid):
        return _ray_workers() if ray_mode else _children(learner_pid)

    try:
        t_begin = time.monotonic()
        learner = start_learner(fresh=True)
        progress = Progress(workdir)
        while not progress.poll():
            if learner.poll() is not None:
                raise SystemExit(f"the learner exited during startup (status {learner.returncode}); see {log_path}")
            if time.monotonic() - t_begin > 900:
                raise SystemExit(f"no training step within 900 s; see {log_path}")
            time.sleep(0.2)
        startup_s = time.monotonic() - t_begin
        t0 = time.monotonic()
        end = t0 + args.seconds
        # --every_kind: past --seconds, go on until every fault kind has been injected (not missed), up to
        # --max_seconds after the first step.
        hard_end = t0 + max(args.seconds, args.max_seconds) if args.every_kind else end
        faults: list[dict] = []
        pending: Optional[dict] = None  # the fault waiting for recovery
        stopped: dict[int, float] = {}  # pid -> when to SIGCONT
        order = list(rng.permutation(kinds))
        next_fault = t0 + rng.uniform(args.min_gap, args.max_gap)
        learner_restarts = unexpected_exits = 0
        while time.monotonic() < end or (time.monotonic() < hard_end and set(kinds) - {f["kind"] for f in faults}):
            now = time.monotonic()
            if progress.poll() and pending is not None:
                _recovered(pending, now)
                pending = None
            for pid, when in list(stopped.items()):
                if now >= when:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass  # the learner killed it as hung
                    del stopped[pid]
            if learner.poll() is not None:  # died by itself (a fault we injected kills it only via learner_kill)
                unexpected_exits += 1
                exit_fault = {"kind": "learner_exit", "t": now, "at_s": now - t0, "step": progress.last_step,
                              "detail": f"status {learner.returncode}"
                                        + (f" after {pending['kind']}" if pending else ""),
                              "log_tail": _tail(log_path, 600)}
                faults.append(exit_fault)
                learner = start_learner()
                learner_restarts += 1
                if pending is None:
                    pending = exit_fault
                else:
                    pending.setdefault("also", []).append(exit_fault)
            if pending is None and now >= next_fault:
                if not order:
                    order = list(rng.permutation(kinds))
                kind = str(order.pop())
                fault = {"kind": kind, "t": now, "at_s": now - t0, "step": progress.last_step}
                samplers = sampler_pids(learner.pid)
                if kind in ("sampler_kill", "sampler_stall", "worker_kill"):
                    running = [p for p in samplers if p not in stopped]
                    if not running:
                        kind = fault["kind"] = "learner_kill"
                    else:
                        pid = int(rng.choice(running))
                        fault["detail"] = f"pid {pid}"
                        if kind in ("sampler_kill", "worker_kill"):
                            os.kill(pid, signal.SIGKILL)
                        else:
                            os.kill(pid, signal.SIGSTOP)
                            stopped[pid] = now + rng.uniform(2.0, 1.5 * args.hang_timeout)
                            fault["stall_s"] = stopped[pid] - now
                if kind == "scorer_kill":
                    scorers = [p for p in (_scorers(os.getpid()) if ray_mode else _scorers(learner.pid))
                               if not any(_is_ancestor(q, p) for q in stopped)]
                    if not scorers:
                        kind = fault["kind"] = "scorer_kill_missed"
                    else:
                        pid = int(rng.choice(scorers))
                        fault["detail"] = f"pid {pid}"
                        os.kill(pid, signal.SIGKILL)
                if kind == "actor_kill":
                    import ray

                    names = _ray_actor_names(learner.pid)
                    if not names:
                        kind = fault["kind"] = "learner_kill"
                    else:
                        name = str(rng.choice(names))
                        from jaxrl_async.runtime.ray_runtime import NAMESPACE

                        try:
                            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=False)  # Ray restarts it
                            fault["detail"] = name
                        except ValueError:  # gone between the listing and the kill
                            fault["kind"] = "actor_kill_missed"
                if kind == "learner_kill":
                    learner.send_signal(signal.SIGKILL)
                    learner.wait()
                    for pid in list(stopped):  # its samplers go too; a stopped one must be continued to exit
                        os.kill(pid, signal.SIGKILL) if _alive(pid) else None
                        stopped.pop(pid, None)
                    _wait_gone(samplers, 30)
                    learner = start_learner()
                    learner_restarts += 1
                if kind == "version_truncate":
                    fault["detail"] = _truncate_newest_version(workdir, rng, mid_write=bool(rng.integers(2)))
                    if fault["detail"] is None:
                        fault["kind"] = "version_truncate_missed"
                faults.append(fault)
                pending = fault
                next_fault = time.monotonic() + rng.uniform(args.min_gap, args.max_gap)
            time.sleep(0.05)
        # Wind down: continue stalled samplers, give the last fault a chance to recover, stop the learner.
        for pid in stopped:
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 180
        while pending is not None and time.monotonic() < deadline and learner.poll() is None:
            if progress.poll():
                _recovered(pending, time.monotonic())
                pending = None
            time.sleep(0.1)
        soak_s = time.monotonic() - t0
        samplers = sampler_pids(learner.pid)
        learner.send_signal(signal.SIGINT)
        try:
            learner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            learner.kill()
            learner.wait()
        _wait_gone(samplers, 30)
        # One more checkpoint interval from the last checkpoint: a clean end and a final evaluation.
        ckdir = os.path.join(workdir, "checkpoints")
        last = max((int(d) for d in os.listdir(ckdir) if d.isdigit()), default=0)
        final = start_learner(steps=last + args.checkpoint_every)
        while final.poll() is None:
            progress.poll()
            if time.monotonic() - t0 > soak_s + 900:
                final.kill()
            time.sleep(0.5)
        progress.poll()
        if final.returncode != 0:
            raise SystemExit(f"the final learner run failed (status {final.returncode}); see {log_path}")
        t_end = time.monotonic()
    finally:
        logf.close()
        if ray_mode:
            import ray

            ray.shutdown()
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    acc = (account_ray if ray_mode else account)(workdir, summary["steps"], groups_per_step(args), args.bound)
    learn = learning(workdir, progress.eval_seen, t_begin, t0, args.target)
    by_kind = collections.defaultdict(list)
    for f in faults:
        by_kind[f["kind"]].append(f.get("recovery_s"))

    def recovered(v):
        return [x for x in v if x is not None]

    table = {k: {"count": len(v), "recovered": len(recovered(v)),
                 "recovery_median_s": float(np.median(recovered(v))) if recovered(v) else None,
                 "recovery_max_s": max(recovered(v), default=None)}
             for k, v in sorted(by_kind.items())}
    kinds_missing = sorted(set(kinds) - {f["kind"] for f in faults})
    ok = (acc["duplicates_trained"] == 0 and acc["groups_lost"] == 0 and not acc["steps_missing"]
          and not acc["steps_short"] and acc["max_staleness_loss"] <= args.bound
          and all(f.get("recovery_s") is not None for f in faults)
          and not (args.every_kind and kinds_missing))
    result = {"runtime": args.runtime, "model": args.model, "seconds": soak_s, "startup_s": startup_s,
              "total_s": t_end - t_begin, "seed": args.seed, "faults": faults, "by_kind": table,
              "kinds": list(kinds), "kinds_missing": kinds_missing, "learner_restarts": learner_restarts,
              "unexpected_learner_exits": unexpected_exits,
              "accounting": acc, "learning": learn, "final_success_rate": summary["final_success_rate"],
              "initial_success_rate": summary["initial_success_rate"], "ok": ok,
              "target_reached": learn["reached"]}
    with open(os.path.join(workdir, "soak.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result


def _recovered(fault: dict, now: float) -> None:
    fault["recovery_s"] = now - fault["t"]
    for f in fault.pop("also", []):  # learner exits while it was pending
        f["recovery_s"] = now - f["t"]


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _is_ancestor(pid: int, child: int) -> bool:
    import psutil

    try:
        return any(p.pid == pid for p in psutil.Process(child).parents())
    except psutil.NoSuchProcess:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(pids, timeout: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        time.sleep(0.2)


def _markdown(rows: list, columns: list[str]) -> str:
    """A markdown table, the first column left-aligned and the others right-aligned, cells as given."""
    import pandas as pd

    return pd.DataFrame(rows, columns=columns).to_markdown(
        index=False, disable_numparse=True, colalign=["left"] + ["right"] * (len(columns) - 1))


def format_table(r: dict) -> str:
    a, learn = r["accounting"], r["learning"]
    faults = []
    for k, v in r["by_kind"].items():
        med = "-" if v["recovery_median_s"] is None else f"{v['recovery_median_s']:.1f}"
        mx = "-" if v["recovery_max_s"] is None else f"{v['recovery_max_s']:.1f}"
        faults.append([k, str(v["count"]), str(v["recovered"]), med, mx])
    quantities = []
    rows = [("steps", "learner steps (surviving timeline)"), ("groups_generated", "groups generated"),
            ("groups_regenerated", "groups regenerated by restarted samplers (dropped as duplicates)"),
            ("groups_trained", "groups trained"), ("groups_dropped_stale", "groups dropped as stale")]
    rows += [("groups_retaken_after_learner_restart", "groups taken again after a learner restart")]
    if r.get("runtime") == "ray":
        rows += [("groups_regenerated_after_learner_restart",
                  "groups generated again under their key after a learner restart"),
                 ("groups_past_final_frontier", "groups past the final taken-key frontier (the next resume's)")]
    rows += [("groups_waiting_at_end", "groups still queued at the end"),
             ("duplicates_trained", "duplicates trained (must be 0)"), ("groups_lost", "groups lost (must be 0)"),
             ("max_staleness_loss", f"max staleness seen by the loss (bound {a['staleness_bound']})")]
    for key, label in rows:
        quantities.append([label, str(a[key])])
    quantities.append(["learner restarts (unexpected exits among them)",
                  f"{r['learner_restarts']} ({r['unexpected_learner_exits']})"])
    curve = ", ".join(f"{s}: {v:.3f}" for s, v in learn["curve"].items())
    quantities.append(["held-out success by step", curve])
    if learn["reached"]:
        reach = (f"yes: {learn['success']:.3f} at step {learn['step']}, {learn['s_since_start']:.0f} s after the "
                 f"start ({learn['s_since_first_step']:.0f} s after the first step)")
    else:
        reach = f"no (best {max(learn['curve'].values(), default=0):.3f})"
    quantities.append([f"held-out success reached {learn['target']:g}", reach])
    quantities.append([f"soak seconds (after {r['startup_s']:.0f} s startup; {r['total_s']:.0f} s in all)",
                  f"{r['seconds']:.0f}"])
    if r.get("kinds_missing"):
        quantities.append(["fault kinds never injected", ", ".join(r["kinds_missing"])])
    quantities.append(["invariants hold", "yes" if r["ok"] else "NO"])
    return (_markdown(faults, ["fault", "count", "recovered", "recovery median (s)", "recovery max (s)"]) + "\n\n"
            + _markdown(quantities, ["quantity", "value"]))


def define_flags(fv) -> None:
    """The soak's flags, defined on the absl FlagValues `fv` (`flags.FLAGS` from the command line)."""
    from absl import flags

    flags.DEFINE_float("seconds", 60.0, "Seconds of faults after the first training step.", flag_values=fv)
    flags.DEFINE_bool("every_kind", False, "After --seconds, keep injecting until every fault kind has been injected "
                      "at least once (at most --max_seconds after the first step); a kind still missing fails the "
                      "invariants.", flag_values=fv)
    flags.DEFINE_float("max_seconds", 300.0, "The limit of --every_kind.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the fault injector.", flag_values=fv)
    flags.DEFINE_string("workdir", "runs/soak", "The learner's workdir; soak.json goes there.", flag_values=fv)
    flags.DEFINE_enum("runtime", "process", ["process", "ray"], "runtime.mode of the learner.", flag_values=fv)
    flags.DEFINE_enum("model", "default", ["default", "tiny"], "default: configs/default.py's model, task, batch and "
                      "cached warm start; tiny: a 1-layer width-32 model on search_easy, 4 x 4 episodes per step, no "
                      "warm start (many faults a minute).", flag_values=fv)
    flags.DEFINE_float("target", 0.95, "Held-out success the learning curve should reach.", flag_values=fv)
    flags.DEFINE_string("warmstart_cache", os.path.join(REPO, "runs", "warmstart_cache"),
                        "warmstart.cache_dir of --model=default.", flag_values=fv)
    flags.DEFINE_float("min_gap", None, "Seconds between faults, at least (default 4; 10 for --model=default).",
                       flag_values=fv)
    flags.DEFINE_float("max_gap", None, "Seconds between faults, at most (default 10; 25).", flag_values=fv)
    flags.DEFINE_string("proximal", "", "proximal.source (default: the config's, recompute); dedicated adds "
                        "scorer_kill: SIGKILL of a scorer process.", flag_values=fv)
    flags.DEFINE_integer("samplers", 2, "runtime.num_samplers.", flag_values=fv)
    flags.DEFINE_integer("bound", 2, "runtime.max_staleness.", flag_values=fv)
    flags.DEFINE_float("hang_timeout", None, "runtime.hang_timeout_s (default 10; 60 with --proximal=dedicated: a "
                       "sampler waits for its scorer's start-up without a heartbeat, and a loaded machine takes more "
                       "than 10 s).", flag_values=fv)
    flags.DEFINE_float("wait_log", 5.0, "runtime.wait_log_s.", flag_values=fv)
    flags.DEFINE_integer("checkpoint_every", None, "train.checkpoint_every (default 2; 5).", flag_values=fv)
    flags.DEFINE_integer("eval_every", None, "train.eval_every (default: only at the start and the end; 25 for "
                         "--model=default).", flag_values=fv)
    flags.DEFINE_integer("eval_episodes", None, "eval.episodes (default 64; 256).", flag_values=fv)
    flags.DEFINE_string("compile_cache", "", "JAX compilation cache dir (default WORKDIR/jax_cache).", flag_values=fv)


def run(fv) -> int:
    """The soak with the parsed flags `fv`; prints the table, returns the exit status."""
    args = types.SimpleNamespace(**{name: fv[name].value for name in _FLAG_NAMES})
    default = args.model == "default"
    if args.hang_timeout is None:
        args.hang_timeout = 60.0 if args.proximal == "dedicated" else 10.0
    for name, tiny, dflt in [("min_gap", 4.0, 10.0), ("max_gap", 10.0, 25.0), ("checkpoint_every", 2, 5),
                             ("eval_every", 0, 25), ("eval_episodes", 64, 256)]:
        if getattr(args, name) is None:
            setattr(args, name, dflt if default else tiny)
    r = soak(args)
    print(format_table(r))
    print(f"details: {os.path.join(os.path.abspath(args.workdir), 'soak.json')}")
    return 0 if r["ok"] else 1


def main(argv: Optional[list[str]] = None) -> int:
    """The soak with command-line style `argv` (without the program name), parsed on flags of its own."""
    from absl import flags

    fv = flags.FlagValues()
    define_flags(fv)
    fv(["soak", *(sys.argv[1:] if argv is None else argv)])
    return run(fv)


def _flag_names() -> tuple[str, ...]:
    from absl import flags

    fv = flags.FlagValues()
    define_flags(fv)
    return tuple(fv)


_FLAG_NAMES = _flag_names()


def _app_main(argv) -> int:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return run(flags.FLAGS)


if __name__ == "__main__":
    from absl import app, flags

    define_flags(flags.FLAGS)
    app.run(_app_main)  # exits with run()'s status
