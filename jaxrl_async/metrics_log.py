"""Run outputs: `metrics.jsonl`, TensorBoard events, and the learning-curve figure."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping

import numpy as np


def _to_python(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    On resume, pass the number of lines the file had when the checkpoint was written
    (`lines` at that time): later lines are dropped first, so a resumed run's file equals
    an uninterrupted run's. The TensorBoard events (`tb/`) are rebuilt from the lines kept:
    events of the dropped steps would otherwise survive in the old event files and overlap
    the resumed run's (a fresh run, `keep_lines=0`, starts with none).
    """

    def __init__(self, workdir: str, keep_lines: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        kept = self._truncate(keep_lines)
        self.lines = len(kept)
        from tensorboardX import SummaryWriter  # imported lazily: heavy, and only the trainer needs it

        tb_dir = os.path.join(workdir, "tb")
        shutil.rmtree(tb_dir, ignore_errors=True)
        self._tb = SummaryWriter(tb_dir)
        for line in kept:
            self._mirror(json.loads(line))
        self._f = open(self.path, "a")

    def _truncate(self, keep: int) -> list[str]:
        """Keeps the first `keep` lines of the file (if any); returns them."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            kept = [line for line in f if line.strip()][:keep]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return kept

    def _mirror(self, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, row["step"])

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        self.lines += 1
        self._mirror(row)

    def close(self) -> None:
        self._f.close()
        self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All rows of `metrics.jsonl` in `workdir`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_learning_curve(workdir: str, out_name: str = "learning_curve.png") -> str:
    """Plots training-batch and held-out success rate against step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [(r["step"], r["rollout/success_rate"]) for r in rows if "rollout/success_rate" in r]
    evals = [(r["step"], r["eval/success_rate"]) for r in rows if "eval/success_rate" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), color="0.6", lw=1, label="training batch (behaviour policy)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="C0", label="held-out evaluation")
    ax.set_xlabel("RL step (parameter version)")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = os.path.join(workdir, out_name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
