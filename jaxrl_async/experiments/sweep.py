"""Experiment sweeps: expand a grid of configs, run every cell once, collect tidy tables.

    python -m jaxrl_async.experiments.sweep --sweep=configs/experiments/routes.py \
        --out=runs/experiments/routes --workers=2

A sweep file (see `configs/experiments/`) defines `get_config()`, the base config, and
`get_sweep()`, a list of blocks; each block maps an axis to its values and the block's
cells are the product of its axes (duplicate cells across blocks run once). An axis is a
config field (`"proximal.source"`, `"loss.is_cap"`, ...) or `"staleness"`, which sets the
inline schedule (see `set_staleness`).

Each cell runs `train.train_and_evaluate` in its own subprocess and workdir under
`<out>/cells/<cell id>`, so one crashed cell never takes the sweep down (its log is in
`<cell>/log.txt`), and a rerun skips finished cells (those with a `summary.json`) and
resumes unfinished ones from their last checkpoint. `--workers` threads each run one cell
process at a time, pinned to a core of its own. Warm starts are shared through
`warmstart.cache_dir` and computed once per distinct setting before the cells start,
and XLA compilations are shared through JAX's persistent compilation cache.

Outputs in `<out>`: `runs.csv` (one row per run: its axes, summary results, per-step
means of the loss and cost metrics, and the full config as JSON), `curves.csv` (one row
per run and evaluation: held-out success against step and against cumulative learner
wall-clock), and `sweep.json` (the cells and settings).
"""

# numpy, pandas, flax and jax are imported inside the functions that use them: a cell
# process pins itself to its core (`--core`) before anything starts a thread pool.
from __future__ import annotations

import concurrent.futures
import importlib.util
import itertools
import json
import os
import queue
import subprocess
import sys
import time

# Per-step metrics whose mean over the run (compile step excluded) goes into runs.csv.
MEAN_METRICS = (
    "ratio/clip_frac", "ratio/effective_clip_frac", "is/truncated_frac", "is/weight_max", "is/ess",
    "mask/token_frac", "mask/kept_frac", "mismatch/kl_k1", "staleness/kl", "staleness/mean",
    "audit/exact/is/truncated_frac", "audit/exact/mask/token_frac",
    "audit/recompute/is/truncated_frac", "audit/recompute/mask/token_frac",
    "proximal/forward_passes", "proximal/param_copies", "proximal/sampler_stall_s", "proximal/ewma_beta",
    "rollout/success_rate", "rollout/partial_frac",
    "perf/step_s", "perf/sample_s", "perf/train_s",
    # the three-term loss's staleness weight pi_prox / pi_old, and the gradient norm (before clipping)
    "staleness/is_weight_mean", "staleness/is_weight_max", "staleness/is_truncated_frac", "staleness/mask_frac",
    "staleness/kl_k1", "perf/grad_norm",
)

# A gradient-norm spike: an RL step whose (pre-clip) gradient norm exceeds this multiple of the run's median.
GRAD_SPIKE_FACTOR = 3.0

DEFAULT_WARMSTART_CACHE = "runs/experiments/warmstart_cache"


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def load_sweep(path: str):
    """The sweep module at `path` (a file with `get_config()` and `get_sweep()`)."""
    spec = importlib.util.spec_from_file_location(f"sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fn in ("get_config", "get_sweep"):
        if not hasattr(module, fn):
            raise ValueError(f"sweep file {path!r} must define {fn}()")
    return module


def set_staleness(config, s: int) -> None:
    """Staleness `s` of the inline schedule: `s = 0` is on-policy; `s > 0` samples with the
    weights of `s` versions ago and switches weights mid-episode (partial rollouts), so a
    batch holds tokens `s` and `s + 1` versions old, as an asynchronous sampler would."""
    if not (isinstance(s, int) and s >= 0):
        raise ValueError(f"sweep axis 'staleness' takes integers >= 0; got {s!r}")
    config.runtime.lag = s
    config.runtime.partial_rollout = s > 0


def _set(config, axis: str, value) -> None:
    from flax import traverse_util

    if axis == "staleness":
        set_staleness(config, value)
        return
    # The config's leaves by dotted name (an empty `task.kwargs` counts as a leaf).
    fields = traverse_util.flatten_dict(config.to_dict(), keep_empty_nodes=True, sep=".")
    if axis not in fields:
        raise ValueError(f"sweep axis {axis!r} is not a config field")
    *parents, leaf = axis.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value


def _fmt(value) -> str:
    if isinstance(value, (tuple, list)):
        return "-".join(_fmt(v) for v in value)
    return str(value)


def cell_id(overrides: dict) -> str:
    """A readable, filesystem-safe name of a cell, e.g. `source=snapshot__staleness=4__dtype=bf16__seed=0`."""
    return "__".join(f"{axis.split('.')[-1]}={_fmt(v)}" for axis, v in overrides.items())


def expand(sweep) -> list[tuple[str, dict]]:
    """[(cell id, {axis: value})] over the blocks of `sweep.get_sweep()`, duplicates removed."""
    cells, seen = [], set()
    for block in sweep.get_sweep():
        axes = list(block)
        for values in itertools.product(*(block[a] for a in axes)):
            overrides = dict(zip(axes, values))
            cid = cell_id(overrides)
            if cid not in seen:
                seen.add(cid)
                cells.append((cid, overrides))
    return cells


def cell_config(sweep, overrides: dict, warmstart_cache: str):
    """The validated config of one cell."""
    from jaxrl_async import config as config_lib

    c = sweep.get_config()
    for axis, value in overrides.items():
        _set(c, axis, value)
    if warmstart_cache and not c.warmstart.cache_dir:
        c.warmstart.cache_dir = os.path.abspath(warmstart_cache)
    config_lib.validate(c)
    return c


def run_cell(sweep_path: str, out: str, cell: str, warmstart_cache: str = DEFAULT_WARMSTART_CACHE,
             warmstart_only: bool = False) -> None:
    """Runs one cell (or only its warm start) in this process: what each cell subprocess does."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    sweep = load_sweep(sweep_path)
    overrides = dict(expand(sweep))[cell]
    config = cell_config(sweep, overrides, warmstart_cache)
    workdir = os.path.join(out, "cells", cell)
    if warmstart_only:
        from jaxrl_async import config as config_lib
        from jaxrl_async.learner.warmstart import warmstart_params
        from jaxrl_async.models import transformer as model_lib

        os.makedirs(workdir, exist_ok=True)
        model_config = config_lib.model_config_from(config)
        graphdef, params = model_lib.init_model(model_config, config.seed)
        warmstart_params(config, graphdef, params, model_config, workdir, print)
    else:
        from jaxrl_async.train import train_and_evaluate

        train_and_evaluate(config, workdir, resume=True, progress=False)


def _run_process(sweep_path: str, out: str, warmstart_cache: str, cid: str, warmstart_only: bool,
                 cores: queue.Queue) -> int:
    """One cell's subprocess, on a core taken from `cores` (-1: unpinned); returns its exit code."""
    workdir = os.path.join(out, "cells", cid)
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    # Compilations are the same in every cell: share them across processes.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(out, "..", "jax_cache")))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    core = cores.get()
    try:
        cmd = [sys.executable, "-m", "jaxrl_async.experiments.sweep", f"--sweep={sweep_path}", f"--out={out}",
               f"--warmstart_cache={warmstart_cache}", f"--cell={cid}", f"--core={core}"]
        if warmstart_only:
            cmd.append("--warmstart_only")
        with open(os.path.join(workdir, "warmstart_log.txt" if warmstart_only else "log.txt"), "a") as log:
            return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    finally:
        cores.put(core)


def _run_pool(sweep_path: str, out: str, warmstart_cache: str, workers: int, jobs: list[tuple[str, bool]],
              label: str) -> list[str]:
    """Runs `(cell id, warmstart_only)` jobs, `workers` at a time, in order; returns the failed ids."""
    if not jobs:
        return []
    # One core per worker: the tiny models do not gain from threads, and pinning keeps
    # concurrent cells from stealing each other's time slices.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores: queue.Queue = queue.Queue()
    for i in range(workers):
        cores.put(cpus[i % len(cpus)] if cpus and workers > 1 else -1)
    failed, t0 = set(), time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep") as pool:
        futures = {pool.submit(_run_process, sweep_path, out, warmstart_cache, cid, ws, cores): cid
                   for cid, ws in jobs}
        try:
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                cid, code = futures[future], future.result()
                if code != 0:
                    failed.add(cid)
                print(f"[{label} {done}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {cid}: "
                      f"{'ok' if code == 0 else f'FAILED (exit {code}), see its log.txt'}", flush=True)
        except BaseException:  # Ctrl-C: start no further cells; the running ones get the signal too
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return [cid for cid, _ in jobs if cid in failed]


def run_sweep(sweep_path: str, out: str, workers: int = 1,
              warmstart_cache: str = DEFAULT_WARMSTART_CACHE) -> dict:
    """Runs the unfinished cells of the sweep; returns {'cells', 'ran', 'skipped', 'failed'}.

    Raises SystemExit naming the cell and field when a cell's config does not validate,
    before anything runs or is written.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    sweep = load_sweep(sweep_path)
    cells = expand(sweep)
    for cid, overrides in cells:  # every cell's config validates before anything runs
        try:
            cell_config(sweep, overrides, warmstart_cache)
        except ValueError as e:
            raise SystemExit(f"error: sweep cell {cid}: {e}") from None
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump({"sweep": sweep_path, "cells": dict(cells), "workers": workers}, f, indent=2)
    todo = [(cid, ov) for cid, ov in cells if not os.path.exists(os.path.join(out, "cells", cid, "summary.json"))]
    # Seed-major order: an interrupted sweep leaves whole seeds complete rather than whole routes.
    todo.sort(key=lambda c: (c[1].get("seed", 0),))
    print(f"sweep {sweep_path}: {len(cells)} cells, {len(cells) - len(todo)} finished, {len(todo)} to run "
          f"on {workers} worker(s)", flush=True)
    failed = []
    if todo:
        # One warm start per distinct setting, before the cells, so no two cells race to fill the cache.
        keys = {}
        for cid, ov in todo:
            c = cell_config(sweep, ov, warmstart_cache)
            if c.warmstart.enabled:
                keys.setdefault(json.dumps([c.seed, c.task.to_dict(), c.model.to_dict(), c.warmstart.to_dict()],
                                           sort_keys=True, default=str), cid)
        failed += _run_pool(sweep_path, out, warmstart_cache, workers, [(cid, True) for cid in keys.values()],
                            "warm start")
        failed += _run_pool(sweep_path, out, warmstart_cache, workers,
                            [(cid, False) for cid, _ in todo if cid not in failed], "cell")
    collect(out, cells)
    return {"cells": len(cells), "ran": len(todo), "skipped": len(cells) - len(todo), "failed": failed}


def _axis_columns(overrides: dict) -> dict:
    return {axis.split(".")[-1]: _fmt(v) for axis, v in overrides.items()}


def collect(out: str, cells: list[tuple[str, dict]]):
    """Writes `runs.csv` and `curves.csv` from the finished cells; returns them as (runs, curves) DataFrames."""
    import numpy as np
    import pandas as pd

    from jaxrl_async.metrics_log import read_metrics

    runs, curves = [], []
    for cid, overrides in cells:
        workdir = os.path.join(out, "cells", cid)
        path = os.path.join(workdir, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        metrics = pd.DataFrame(read_metrics(workdir))
        steps = metrics[metrics["loss/policy"].notna()] if "loss/policy" in metrics else metrics.iloc[:0]
        step_s = steps.groupby("step")["perf/step_s"].last() if len(steps) else pd.Series(dtype=float)
        if len(step_s) > 1:  # the first step of a (re)start holds the compilations: count it as a typical step
            step_s.iloc[0] = float(np.median(step_s.iloc[1:]))
        axes = _axis_columns(overrides)
        run = {"cell": cid, **axes,
               "success_start": summary["initial_success_rate"], "success_final": summary["final_success_rate"],
               "success_best": summary["best_success_rate"], "steps": summary["steps"],
               "wall_s": summary["wall_seconds"], "learner_wall_s": float(step_s.sum())}
        later = steps.iloc[1:]  # steps[0] holds the compilations
        for key in MEAN_METRICS:
            run[key] = float(later[key].mean()) if key in later and later[key].notna().any() else float("nan")
        evals = metrics[metrics["eval/success_rate"].notna()] if "eval/success_rate" in metrics else metrics.iloc[:0]
        run.update(_stability(steps, evals))
        run["config"] = json.dumps(summary["config"], sort_keys=True)
        runs.append(run)
        for step, success in zip(evals["step"], evals["eval/success_rate"]):
            # Learner wall-clock up to this evaluation: the RL steps before it, evaluation excluded.
            curves.append({"cell": cid, **axes, "step": int(step), "success": float(success),
                           "learner_wall_s": float(step_s[step_s.index < step].sum())})
    runs, curves = pd.DataFrame(runs), pd.DataFrame(curves)
    for name, table in (("runs.csv", runs), ("curves.csv", curves)):
        if len(table):
            table.to_csv(os.path.join(out, name), index=False, na_rep="nan")
    return runs, curves


def _stability(steps, evals) -> dict:
    """Stability of one run: the largest (pre-clip) gradient norm and its ratio to the run's median, the
    number of spikes (steps above `GRAD_SPIKE_FACTOR` x the median), the largest drop of held-out success
    below its running best (`success_drawdown`; a collapse shows as a large one), and the updates skipped
    for a non-finite loss or gradient. `steps`: the RL steps; `evals`: the evaluations."""
    import numpy as np

    out = {"grad_norm_max": float("nan"), "grad_norm_max_over_median": float("nan"), "grad_spikes": float("nan"),
           "success_drawdown": float("nan"), "skipped_nonfinite": float("nan")}
    if "perf/grad_norm" in steps and steps["perf/grad_norm"].notna().any():
        g = steps["perf/grad_norm"].dropna().to_numpy(float)
        med = float(np.median(g))
        out["grad_norm_max"] = float(g.max())
        out["grad_norm_max_over_median"] = float(g.max() / med) if med > 0 else float("nan")
        out["grad_spikes"] = float((g > GRAD_SPIKE_FACTOR * med).sum())
    if len(evals):
        s = evals.sort_values("step")["eval/success_rate"].to_numpy(float)
        out["success_drawdown"] = float((np.maximum.accumulate(s) - s).max())
    if "train/skipped_nonfinite" in steps:
        out["skipped_nonfinite"] = float(steps["train/skipped_nonfinite"].fillna(0).sum())
    return out


def main(argv):
    """`python -m jaxrl_async.experiments.sweep`: the flags are defined below, in `__main__`."""
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if FLAGS.cell:
        if FLAGS.core >= 0 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {FLAGS.core})  # before JAX starts its thread pools
        run_cell(FLAGS.sweep, FLAGS.out, FLAGS.cell, FLAGS.warmstart_cache, FLAGS.warmstart_only)
        return
    if FLAGS.collect_only:
        collect(FLAGS.out, expand(load_sweep(FLAGS.sweep)))
        return
    result = run_sweep(FLAGS.sweep, FLAGS.out, FLAGS.workers, FLAGS.warmstart_cache)
    print(f"{result['ran']} cells run, {result['skipped']} skipped (finished before); results in "
          f"{FLAGS.out}/runs.csv and {FLAGS.out}/curves.csv")
    if result["failed"]:
        raise SystemExit(f"error: {len(result['failed'])} cell(s) failed: {result['failed']}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("sweep", None, "Sweep file with get_config() and get_sweep().", required=True)
    flags.DEFINE_string("out", None, "Output directory (cells, runs.csv, curves.csv).", required=True)
    flags.DEFINE_integer("workers", default_workers(), "Cells run at once, one pinned core each.", lower_bound=1)
    flags.DEFINE_string("warmstart_cache", DEFAULT_WARMSTART_CACHE, "Warm-start cache shared by every cell and sweep.")
    flags.DEFINE_bool("collect_only", False, "Only rebuild runs.csv and curves.csv from the finished cells.")
    flags.DEFINE_string("cell", None, "Internal: run this one cell in this process.")
    flags.DEFINE_bool("warmstart_only", False, "Internal, with --cell: run only the cell's warm start.")
    flags.DEFINE_integer("core", -1, "Internal, with --cell: pin this process to this core (-1: no pinning).")
    app.run(main)
