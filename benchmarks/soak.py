"""Chaos soak of the process runtime: train for N seconds under seeded, randomly timed faults.

    python -m benchmarks.soak --seconds=60 --seed=0 --workdir=runs/soak      (make soak)

The learner runs as a subprocess (`python -m jaxrl_async.train`, process runtime). After
its first training step, a seeded injector, at random intervals (`--min_gap`..`--max_gap`
seconds, one fault at a time: the next waits until training has progressed again), does
one of:

- `sampler_kill`: SIGKILL a sampler process (the learner restarts it);
- `learner_kill`: SIGKILL the learner; the driver starts it again, and it resumes from its
  checkpoint (its orphaned samplers exit by themselves);
- `version_truncate`: truncate the largest file of the newest parameter version in the
  ring buffer, while it is being written (`mid_write`, if a temp directory shows up within
  two seconds) or after (`after_write`);
- `sampler_stall`: SIGSTOP a sampler, SIGCONT it after a random 2 s .. 1.5 x
  `runtime.hang_timeout_s` (if it is still there: the learner SIGKILLs it once the hang
  timeout passes while it waits).

Recovery time of a fault: from the injection to the next training step written to
`metrics.jsonl`. At the end the driver stops the learner (SIGINT), runs it once more from
its checkpoint for one more checkpoint interval so the run ends on a whole checkpoint with
a final held-out evaluation, and computes the accounting from the queue's ledgers
(`WORKDIR/queue/ledger/`: groups queued by every sampler, group keys taken at every learner
step) and `metrics.jsonl`: groups generated / trained / dropped as stale / regenerated,
duplicates trained (must be 0), groups lost (must be 0), the largest staleness the loss
saw (must be <= runtime.max_staleness). The table goes to stdout and everything to
WORKDIR/soak.json. Exit status 1 if an invariant fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("sampler_kill", "learner_kill", "version_truncate", "sampler_stall")


def learner_cmd(workdir: str, steps: int, args, fresh: bool = False) -> list[str]:
    return [sys.executable, "-m", "jaxrl_async.train", "--config=configs/default.py", f"--workdir={workdir}",
            "--config.task.name=search_easy", "--config.model.d_model=32", "--config.model.n_layers=1",
            "--config.model.n_heads=2", "--config.model.d_ff=64", "--config.rl.groups_per_step=4",
            "--config.rl.group_size=4", "--config.warmstart.enabled=False", f"--config.eval.episodes={args.eval_episodes}",
            "--config.runtime.mode=process", f"--config.runtime.num_samplers={args.samplers}",
            "--config.runtime.sampler_groups=2", f"--config.runtime.max_staleness={args.bound}",
            f"--config.runtime.hang_timeout_s={args.hang_timeout}", f"--config.runtime.wait_log_s={args.wait_log}",
            f"--config.train.steps={steps}", f"--config.train.checkpoint_every={args.checkpoint_every}",
            "--config.train.keep_checkpoints=2", f"--config.train.eval_every={max(steps, 1)}",
            *(["--noresume"] if fresh else [])]


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


def account(workdir: str, final_steps: int, groups_per_step: int, bound: int) -> dict:
    """Exactly-once accounting of a finished run from the queue's ledgers and metrics.jsonl.

    The surviving timeline is, for every step < final_steps, the ledger entry of the newest
    learner epoch that took a batch for it (a resumed learner redoes the steps after its
    checkpoint under a higher epoch)."""
    from jaxrl_async.runtime.base import queue_dir
    from jaxrl_async.runtime.sampler_process import ledger_dir
    from jaxrl_async.runtime.spool import TrajectoryQueue

    ldir = ledger_dir(workdir)
    takes = _jsonl(os.path.join(ldir, "learner.jsonl"))
    surviving: dict[int, dict] = {}
    for e in takes:
        if e["step"] < final_steps and (e["step"] not in surviving or e["epoch"] >= surviving[e["step"]]["epoch"]):
            surviving[e["step"]] = e
    trained = [k for s in sorted(surviving) for k, _ in surviving[s]["trained"]]
    dropped = [k for s in sorted(surviving) for k, _ in surviving[s]["dropped"]]
    puts = [p for name in sorted(os.listdir(ldir)) if name.startswith("put-")
            for p in _jsonl(os.path.join(ldir, name))] if os.path.isdir(ldir) else []
    queue = TrajectoryQueue(queue_dir(workdir), 1)
    waiting, consumed = set(queue.waiting_keys()), queue.consumed_keys()
    every = {p["key"] for p in puts} | consumed | waiting
    accounted = set(trained) | set(dropped) | waiting
    lost = sorted(every - accounted)
    taken_count = collections.Counter(k for e in takes for k, _ in e["trained"] + e["dropped"])
    staleness = [e["version"] - sv for e in takes for _, sv in e["trained"]]
    rows = [r for r in _jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss/policy" in r]
    return {
        "steps": final_steps,
        "steps_missing": sorted(set(range(final_steps)) - set(surviving)),
        "steps_short": sorted(s for s, e in surviving.items() if len(e["trained"]) != groups_per_step),
        "groups_generated": len(puts),
        "groups_unique": len({p["key"] for p in puts}),
        "groups_regenerated": sum(not p["new"] for p in puts),
        "groups_trained": len(trained),
        "groups_dropped_stale": len(dropped),
        "groups_dropped_stale_all_epochs": sum(len(e["dropped"]) for e in takes),
        "groups_retaken_after_learner_restart": sum(c > 1 for c in taken_count.values()),
        "groups_waiting_at_end": len(waiting),
        "duplicates_trained": len(trained) - len(set(trained)),
        "groups_lost": len(lost),
        "lost_keys": lost[:20],
        "max_staleness_loss": max(staleness, default=0),
        "max_staleness_metrics": max((r["staleness/max"] for r in rows), default=0),
        "staleness_bound": bound,
        "hung_restarts_last_epoch": max((r.get("samplers/hung_restarts", 0) for r in rows), default=0),
    }


# ----------------------------------------------------------------------------- the driver


class Progress:
    """Watches metrics.jsonl for new training rows (appends; a resume's truncation is not progress)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.count = 0
        self.last_step = -1

    def poll(self) -> bool:
        rows = [r for r in _jsonl(self.path) if "loss/policy" in r]
        grew = len(rows) > self.count
        self.count = len(rows)
        if rows:
            self.last_step = rows[-1]["step"]
        return grew


def _children(pid: int) -> list[int]:
    import psutil

    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in kids:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


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


def soak(args) -> dict:
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    log_path = os.path.join(workdir, "learner.log")
    logf = open(log_path, "a")

    # A persistent compilation cache: restarted learners and samplers skip most of their compile time.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=args.compile_cache or os.path.join(workdir, "jax_cache"))

    def start_learner(fresh=False, steps=10**6):
        return subprocess.Popen(learner_cmd(workdir, steps, args, fresh), cwd=REPO, stdout=logf, stderr=logf, env=env)

    t_begin = time.monotonic()
    learner = start_learner(fresh=True)
    progress = Progress(workdir)
    while not progress.poll():
        if learner.poll() is not None:
            raise SystemExit(f"the learner exited during startup (status {learner.returncode}); see {log_path}")
        if time.monotonic() - t_begin > 600:
            raise SystemExit(f"no training step within 600 s; see {log_path}")
        time.sleep(0.2)
    startup_s = time.monotonic() - t_begin
    t0 = time.monotonic()
    end = t0 + args.seconds
    faults: list[dict] = []
    pending: Optional[dict] = None  # the fault waiting for recovery
    stopped: dict[int, float] = {}  # pid -> when to SIGCONT
    order = list(rng.permutation(KINDS))
    next_fault = t0 + rng.uniform(args.min_gap, args.max_gap)
    learner_restarts = unexpected_exits = 0
    while time.monotonic() < end:
        now = time.monotonic()
        if progress.poll() and pending is not None:
            pending["recovery_s"] = now - pending["t"]
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
            faults.append({"kind": "learner_exit", "t": now, "detail": f"status {learner.returncode}"})
            learner = start_learner()
            learner_restarts += 1
        if pending is None and now >= next_fault:
            if not order:
                order = list(rng.permutation(KINDS))
            kind = str(order.pop())
            fault = {"kind": kind, "t": now, "at_s": now - t0, "step": progress.last_step}
            samplers = _children(learner.pid)
            if kind in ("sampler_kill", "sampler_stall"):
                running = [p for p in samplers if p not in stopped]
                if not running:
                    kind = fault["kind"] = "learner_kill"
                else:
                    pid = int(rng.choice(running))
                    fault["detail"] = f"pid {pid}"
                    if kind == "sampler_kill":
                        os.kill(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGSTOP)
                        stopped[pid] = now + rng.uniform(2.0, 1.5 * args.hang_timeout)
                        fault["stall_s"] = stopped[pid] - now
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
    deadline = time.monotonic() + 120
    while pending is not None and time.monotonic() < deadline and learner.poll() is None:
        if progress.poll():
            pending["recovery_s"] = time.monotonic() - pending["t"]
            pending = None
        time.sleep(0.1)
    soak_s = time.monotonic() - t0
    samplers = _children(learner.pid)
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
    if final.wait(timeout=600) != 0:
        raise SystemExit(f"the final learner run failed (status {final.returncode}); see {log_path}")
    logf.close()
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    acc = account(workdir, summary["steps"], 4, args.bound)
    by_kind = collections.defaultdict(list)
    for f in faults:
        by_kind[f["kind"]].append(f.get("recovery_s"))
    table = {k: {"count": len(v), "recovered": sum(x is not None for x in v),
                 "recovery_median_s": float(np.median([x for x in v if x is not None])) if any(x is not None for x in v) else None,
                 "recovery_max_s": max((x for x in v if x is not None), default=None)}
             for k, v in sorted(by_kind.items())}
    ok = (acc["duplicates_trained"] == 0 and acc["groups_lost"] == 0 and not acc["steps_missing"]
          and not acc["steps_short"] and acc["max_staleness_loss"] <= args.bound
          and all(f.get("recovery_s") is not None for f in faults))
    result = {"seconds": soak_s, "startup_s": startup_s, "seed": args.seed, "faults": faults, "by_kind": table,
              "learner_restarts": learner_restarts, "unexpected_learner_exits": unexpected_exits,
              "accounting": acc, "final_success_rate": summary["final_success_rate"],
              "initial_success_rate": summary["initial_success_rate"], "ok": ok}
    with open(os.path.join(workdir, "soak.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result


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


def format_table(r: dict) -> str:
    a = r["accounting"]
    lines = ["| fault | count | recovered | recovery median (s) | recovery max (s) |", "|---|---:|---:|---:|---:|"]
    for k, v in r["by_kind"].items():
        med = "-" if v["recovery_median_s"] is None else f"{v['recovery_median_s']:.1f}"
        mx = "-" if v["recovery_max_s"] is None else f"{v['recovery_max_s']:.1f}"
        lines.append(f"| {k} | {v['count']} | {v['recovered']} | {med} | {mx} |")
    lines += ["", "| quantity | value |", "|---|---:|"]
    for key, label in [("steps", "learner steps (surviving timeline)"), ("groups_generated", "groups generated"),
                       ("groups_regenerated", "groups regenerated by restarted samplers (dropped by the queue)"),
                       ("groups_trained", "groups trained"), ("groups_dropped_stale", "groups dropped as stale"),
                       ("groups_retaken_after_learner_restart", "groups taken again after a learner restart"),
                       ("groups_waiting_at_end", "groups still queued at the end"),
                       ("duplicates_trained", "duplicates trained (must be 0)"),
                       ("groups_lost", "groups lost (must be 0)"),
                       ("max_staleness_loss", f"max staleness seen by the loss (bound {a['staleness_bound']})")]:
        lines.append(f"| {label} | {a[key]} |")
    lines.append(f"| learner restarts | {r['learner_restarts']} |")
    lines.append(f"| held-out success (initial -> final) | {r['initial_success_rate']:.3f} -> "
                 f"{r['final_success_rate']:.3f} |")
    lines.append(f"| soak seconds (after {r['startup_s']:.0f} s startup) | {r['seconds']:.0f} |")
    lines.append(f"| invariants hold | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/soak")
    p.add_argument("--min_gap", type=float, default=4.0, help="seconds between faults, at least")
    p.add_argument("--max_gap", type=float, default=10.0, help="seconds between faults, at most")
    p.add_argument("--samplers", type=int, default=2)
    p.add_argument("--bound", type=int, default=2, help="runtime.max_staleness")
    p.add_argument("--hang_timeout", type=float, default=10.0, help="runtime.hang_timeout_s")
    p.add_argument("--wait_log", type=float, default=5.0, help="runtime.wait_log_s")
    p.add_argument("--checkpoint_every", type=int, default=2)
    p.add_argument("--eval_episodes", type=int, default=64)
    p.add_argument("--compile_cache", default="", help="JAX compilation cache dir (default WORKDIR/jax_cache)")
    args = p.parse_args(argv)
    r = soak(args)
    print(format_table(r))
    print(f"details: {os.path.join(os.path.abspath(args.workdir), 'soak.json')}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
