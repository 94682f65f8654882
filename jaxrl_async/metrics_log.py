"""Run outputs: `metrics.jsonl`, TensorBoard events, and the learning-curve figure."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np


def _to_python(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


class MetricsWriter:
    """Appends one JSON object per logged step to `metrics.jsonl` and mirrors scalars to TensorBoard.

    On resume, pass the number of lines the file had when the checkpoint was written
    (`lines` at that time): later lines are dropped first, so a resumed run's file equals
    an uninterrupted run's.
    """

    def __init__(self, workdir: str, keep_lines: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.lines = self._truncate(keep_lines)
        from tensorboardX import SummaryWriter  # imported lazily: heavy, and only the trainer needs it

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
        self._f = open(self.path, "a")

    def _truncate(self, keep: int) -> int:
        """Keeps the first `keep` lines of the file (if any); returns how many remain."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            kept = [line for line in f if line.strip()][:keep]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return len(kept)

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        self.lines += 1
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

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
