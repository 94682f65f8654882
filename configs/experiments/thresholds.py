"""Threshold interaction: the truncation cap and the token rejection band, exact vs recompute.

    python -m jaxrl_async.experiments.sweep --sweep=configs/experiments/thresholds.py \
        --out=runs/experiments/thresholds

Same small setting as `routes.py` at staleness 4 with a bf16 sampler. One block sweeps the
truncation cap of the discrepancy weight with no rejection band; the other sweeps the
token rejection band with the cap at 2. Under `recompute` the staleness moves from the
PPO-clipped ratio into the discrepancy weight, where these thresholds act on it; the
question is how much of the update they then cut (`ratio/effective_clip_frac`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import routes  # noqa: E402  (the shared small setting)


def get_config():
    return routes.get_config()


def get_sweep():
    common = {"proximal.source": ("snapshot", "recompute"), "staleness": (4,), "numerics.dtype": ("bf16",)}
    return [
        {**common, "loss.token_mask": (None,), "loss.is_cap": (1.2, 2.0, 5.0), "seed": (0, 1)},
        {**common, "loss.token_mask": ((0.8, 1.25), (0.5, 2.0), (0.2, 5.0)), "loss.is_cap": (2.0,),
         "seed": (0, 1)},
    ]
