"""Data parallelism for the learner: one device mesh with a `data` axis.

The learner's jitted update is written for the global batch. Placing the batch rows
sharded over the `data` axis and the train state replicated lets XLA partition the same
program over the devices, so one code path serves 1 and N devices, and every reduction
of the loss (the token-mean numerator and denominator, the metrics, the gradient) is over
the global batch: a token mean is exact, not a mean of per-device means.

Several hosts: when `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES` and
`JAX_PROCESS_ID`), `initialize_distributed` calls `jax.distributed.initialize` before any
other JAX call, and the mesh spans every process's devices. Each host then feeds its
share of the rows. This path is written for multi-host accelerators and cannot be run on
a single CPU machine.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed() -> bool:
    """Joins a multi-process JAX job when its environment is set; returns whether it did."""
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
    """A 1-D mesh over the first `num_devices` devices (0 = all of them)."""
    available = len(jax.devices())
    n = num_devices or available
    if n > available:
        raise ValueError(f"config.parallel.num_devices ({n}) exceeds the {available} devices JAX sees")
    # Auto axes: XLA propagates the row sharding through the unchanged single-device program.
    return jax.make_mesh((n,), (DATA_AXIS,), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, mesh):
    """Places every array of `tree` on every device of the mesh (the train state)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_rows(batch, mesh):
    """Splits the leading (row) axis of each `[B, ...]` array of `batch` over the `data` axis.

    batch: any pytree of arrays (a dict, a `rollout.trajectory.Batch`); None leaves stay
    None. B must be a multiple of the mesh size; scalars are replicated.
    """
    n = mesh.devices.size
    rows, whole = NamedSharding(mesh, PartitionSpec(DATA_AXIS)), NamedSharding(mesh, PartitionSpec())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    arrays, shardings = [], []
    for path, x in leaves:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim and x.shape[0] % n:
            raise ValueError(f"batch field {jax.tree_util.keystr(path, simple=True, separator='.')!r} has "
                             f"{x.shape[0]} rows, not a multiple of {n} devices")
        arrays.append(x)
        shardings.append(rows if x.ndim else whole)
    # One call for every field: JAX batches the transfers (one call per field costs a dispatch each).
    return jax.tree_util.tree_unflatten(treedef, jax.device_put(arrays, shardings))
