"""Compile time of the learner's RL update against depth: unrolled and scanned decoder layers.

    .venv/bin/python -m benchmarks.scan_compile [--layers=2,8,28] [--out=runs/bench_scan_compile.json]

For each depth, a Qwen3-architecture model of small width (the width barely changes compile
time; depth does) with rematerialised layers, and the RL update of `learner.update` (two
minibatches, AdamW) lowered and compiled once with the persistent compilation cache off.
With `model.scan_layers` the program holds one layer whatever the depth, so its compile time
should stay flat; unrolled, it grows with the number of layers.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxrl_async.core.losses import LossConfig
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.models import llama
from jaxrl_async.rollout.trajectory import Batch

flags.DEFINE_list("layers", ["2", "8", "28"], "Depths to compile.")
flags.DEFINE_string("out", "runs/bench_scan_compile.json", "Where the rows are written.")


def compile_seconds(num_layers: int, scan: bool, rows: int = 8, seq: int = 64) -> dict:
    """Seconds to trace+lower and to compile the RL update of a `num_layers`-deep model."""
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=num_layers,
                            num_heads=4, num_kv_heads=2, head_dim_=16, qk_norm=True, max_len=seq,
                            logprob_chunk=32, remat=True, scan_layers=scan)
    graphdef, params = llama.init_model(cfg, 0)
    optimizer = learner_lib.make_optimizer(1e-4, 1.0)
    state = learner_lib.create_train_state(params, optimizer)
    zeros = np.zeros((rows, seq), np.float32)
    batch = Batch(tokens=np.ones((rows, seq), np.int32), loss_mask=np.ones((rows, seq), bool),
                  versions=np.zeros((rows, seq), np.int32), behav_logp=zeros, prox_logp=zeros, advantages=zeros)
    batch = jax.tree.map(jnp.asarray, batch)
    update = learner_lib.make_rl_update(graphdef, optimizer, LossConfig(), num_minibatches=2, model=llama)
    t0 = time.perf_counter()
    lowered = update.lower(state, batch, jax.random.key(0), 0.0)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"layers": num_layers, "scan": scan, "lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def main(argv):
    del argv
    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    for n in map(int, flags.FLAGS.layers):
        for scan in (False, True):
            row = compile_seconds(n, scan)
            rows.append(row)
            print(f"{n:3d} layers  {'scanned ' if scan else 'unrolled'}  lower {row['lower_s']:6.1f} s  "
                  f"compile {row['compile_s']:6.1f} s  total {row['total_s']:6.1f} s", flush=True)
    os.makedirs(os.path.dirname(flags.FLAGS.out) or ".", exist_ok=True)
    with open(flags.FLAGS.out, "w") as f:
        json.dump({"backend": jax.default_backend(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
