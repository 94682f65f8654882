"""Entry point: config in, trained policy, metrics, checkpoints and summary out.

    python -m jaxrl_async.train --config=configs/default.py --workdir=runs/default \
        [--config.train.steps=20 ...]

`train_and_evaluate` sets the run up with `cluster.RLCluster` (which restores the latest
checkpoint or runs the warm start) and runs the RL loop: one `train_step` per step, with
logging, evaluation and checkpoints on schedule. In the inline runtime everything random
derives from (seed, step), so a run restored from its checkpoint continues exactly as an
uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

from jaxrl_async import metrics_log
from jaxrl_async.cluster import ConfigError, RLCluster
from jaxrl_async.learner import mesh as mesh_lib


def train_and_evaluate(config, workdir: str, resume: bool = True, progress: bool = True) -> dict:
    """Trains `config` in `workdir` (restoring its latest checkpoint when `resume`); returns the summary.

    Raises `cluster.ConfigError` (naming the field or path) before any compilation when the
    config or the workdir is unusable.
    """
    t_start = time.perf_counter()
    log = print if progress else (lambda *a: None)
    cluster = RLCluster(config, workdir, resume=resume, log=log)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    meta, start, train = cluster.meta, cluster.start_step, config.train
    writer = metrics_log.MetricsWriter(workdir, keep_lines=int(meta.get("metrics_lines", 0)))
    evals = dict(meta.get("evals", {}))
    wall_prev = float(meta.get("wall_seconds", 0.0))

    def do_eval(step):
        m = cluster.evaluate(step)
        evals[str(step)] = m["eval/success_rate"]
        writer.write(step, m)

    try:
        if start == 0:
            do_eval(0)
        cluster.runtime.start(int(cluster.state.version))
        bar = tqdm(range(start, train.steps), initial=start, total=train.steps, disable=not progress, desc="RL",
                   dynamic_ncols=True)
        for step in bar:
            metrics = cluster.train_step(step)
            done = step + 1
            if step % train.log_every == 0 or done == train.steps:
                writer.write(step, metrics)
            if done % train.eval_every == 0 or done == train.steps:
                do_eval(done)
            bar.set_postfix(sr=f"{metrics['rollout/success_rate']:.2f}", eval=f"{evals[max(evals, key=int)]:.2f}",
                            tok_s=f"{metrics['rollout/tokens_per_s']:.0f}")
            if done % train.checkpoint_every == 0 or done == train.steps:
                cluster.save(done, evals=evals, metrics_lines=writer.lines,
                             wall_seconds=wall_prev + time.perf_counter() - t_start)
        bar.close()
    finally:
        # Samplers stop before anything else closes, on success, error or Ctrl-C alike.
        cluster.close()
        writer.close()

    steps_sorted = sorted(evals, key=int)
    summary = {
        "initial_success_rate": evals[steps_sorted[0]],
        "final_success_rate": evals[steps_sorted[-1]],
        "best_success_rate": max(evals.values()),
        "steps": int(cluster.state.version),
        "wall_seconds": wall_prev + time.perf_counter() - t_start,
        "warmstart": {k: v for k, v in meta.items() if k.startswith("warmstart/")},
        "evals": evals,
        "config": json.loads(config.to_json()),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    metrics_log.plot_learning_curve(workdir)
    log(f"success rate {summary['initial_success_rate']:.3f} -> {summary['final_success_rate']:.3f} "
        f"in {summary['steps']} steps, {summary['wall_seconds']:.0f} s; outputs in {workdir}")
    return summary


def main(argv):
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    import jax

    if mesh_lib.initialize_distributed() and jax.process_count() > 1:  # must come before any other JAX call
        raise SystemExit(f"error: JAX_COORDINATOR_ADDRESS joins {jax.process_count()} processes, but the training "
                         "loop (samplers, metrics, checkpoints) runs in one; the learner update itself runs on "
                         "several (learner/mesh.py)")
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir, resume=flags.FLAGS.resume)
    except ConfigError as e:  # configuration errors: one clear line naming the field, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.", lock_config=True)
    flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and summaries.")
    flags.DEFINE_bool("resume", True, "Restore the latest checkpoint in --workdir if there is one.")
    app.run(main)
