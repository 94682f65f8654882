"""The learner's device mesh: data parallelism, FSDP and tensor parallelism.

One mesh with three axes, `data`, `fsdp` and `tensor` (`config.parallel.data`, `fsdp`,
`tensor`; their product is the number of devices used). The learner's jitted update is
written for the global batch and the whole model; placing the arrays on the mesh lets XLA
partition that one program over the devices, so one code path serves 1 and N devices:

* batch rows are split over (`data`, `fsdp`), so every reduction of the loss (the
  token-mean numerator and denominator, the metrics, the gradient) is over the global batch;
* parameters are split by their logical axes (each model family's `param_axes`, the rules
  of `models/sharding.py`): over `fsdp` along the model width, over `tensor` along heads,
  MLP hidden and vocabulary; with `fsdp = tensor = 1` they are replicated (plain data
  parallelism). The optimizer state and the EWMA weights are split like their params
  (`state_shardings`), so the train state one device holds is about 1/(fsdp x tensor) of
  the whole.

Several processes (hosts): when `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES`
and `JAX_PROCESS_ID`), `initialize_distributed` calls `jax.distributed.initialize` before
any other JAX call (on CPUs with gloo collectives), and `make_mesh` spans every process's
devices. Every process runs the same program on the same host data (params, batch): the
placements here (`jax.device_put` to a mesh sharding, `shard_rows`) copy to each process
only the shards its own devices hold, so each feeds its share of the rows. An update on
2 processes x 4 CPU devices equals one device (tests/test_multihost.py). The training
loop (`train.py`: samplers, metrics and checkpoint files) is one process's and refuses
several.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_async.models.sharding import MESH_AXES, param_shardings, path_names

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = MESH_AXES
ROW_AXES = (DATA_AXIS, FSDP_AXIS)  # batch rows split over both


def initialize_distributed() -> bool:
    """Joins a multi-process JAX job when its environment is set; returns whether it did."""
    if not os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return False
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        # CPU devices of several processes talk through gloo (the default has no cross-process collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
    )
    return True


def make_mesh(num_devices: int = 0, *, data: int = 0, fsdp: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
    """The `(data, fsdp, tensor)` mesh over the first data x fsdp x tensor devices.

    data = 0: as many as the other two axes leave of `num_devices` (0 = every device JAX
    sees); `make_mesh(n)` is n-way data parallelism. A product that does not fit the
    devices, or disagrees with a nonzero `num_devices`, raises ValueError naming the
    `config.parallel` fields.
    """
    available = len(jax.devices())
    for name, value, least in (("num_devices", num_devices, 0), ("data", data, 0), ("fsdp", fsdp, 1),
                               ("tensor", tensor, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"config.parallel.{name} must be an integer >= {least}; got {value!r}")
    if data == 0:
        n = num_devices or available
        if n % (fsdp * tensor):
            used = "config.parallel.num_devices" if num_devices else "all JAX sees"
            raise ValueError(f"config.parallel.fsdp * tensor = {fsdp} * {tensor} = {fsdp * tensor} does not divide "
                             f"the {n} devices used ({used})")
        data = n // (fsdp * tensor)
    n = data * fsdp * tensor
    if num_devices and n != num_devices:
        raise ValueError(f"config.parallel.data * fsdp * tensor = {data} * {fsdp} * {tensor} = {n}, but "
                         f"config.parallel.num_devices = {num_devices}: their product is the number of devices used")
    if n > available:
        raise ValueError(f"config.parallel.data * fsdp * tensor = {data} * {fsdp} * {tensor} = {n} devices "
                         f"(config.parallel.num_devices = {num_devices}) exceeds the {available} devices JAX sees")
    # Auto axes: XLA propagates the placements of the inputs through the unchanged single-device program.
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, devices=jax.devices()[:n],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


def mesh_from_config(config) -> jax.sharding.Mesh:
    """The learner mesh of `config.parallel`."""
    p = config.parallel
    return make_mesh(p.num_devices, data=p.data, fsdp=p.fsdp, tensor=p.tensor)


def row_shards(mesh) -> int:
    """How many ways batch rows are split: data x fsdp (rows are whole on the `tensor` axis)."""
    return int(np.prod([mesh.shape[a] for a in ROW_AXES if a in mesh.shape]))


def replicate(tree, mesh):
    """Places every array of `tree` on every device of the mesh (whole weights for a forward)."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def is_sharded(mesh) -> bool:
    """Whether the mesh splits parameters (fsdp or tensor > 1), not only batch rows."""
    return mesh.shape.get(FSDP_AXIS, 1) * mesh.shape.get(TENSOR_AXIS, 1) > 1


def state_shardings(state, mesh, axes):
    """NamedShardings of a whole train state (`learner.update.TrainState`) on `mesh`.

    axes: the model family's `param_axes(state.params)`. Params are split by their logical
    axes; every other leaf whose path ends with a parameter's path and has its shape (the
    AdamW moments, the EWMA weights) is split like that parameter; the rest (counters,
    scalars) is replicated.
    """
    by_path = {}
    for path, sh, x in zip(*_paths_and(state.params, param_shardings(axes, state.params, mesh))):
        by_path[path] = (sh, np.shape(x))
    lengths = sorted({len(p) for p in by_path}, reverse=True)
    whole = NamedSharding(mesh, PartitionSpec())

    def pick(path, x):
        names = path_names(path)
        for k in lengths:
            hit = by_path.get(names[-k:]) if len(names) >= k else None
            if hit is not None and hit[1] == np.shape(x):
                return hit[0]
        return whole

    return jax.tree_util.tree_map_with_path(pick, state)


def sharded_train_state(params, optimizer, mesh, axes, ewma: bool = False):
    """A fresh `learner.update.TrainState` of `params` placed by `state_shardings`: the params are
    split first, and the optimizer state and EWMA are created split, so the whole state never
    sits on one device. Returns (state, its shardings)."""
    from jaxrl_async.learner import update as update_lib

    abstract = jax.eval_shape(lambda p: update_lib.create_train_state(p, optimizer, ewma), params)
    shardings = state_shardings(abstract, mesh, axes)
    state = update_lib.create_train_state(jax.device_put(params, shardings.params), optimizer, ewma, shardings)
    return state, shardings


def _paths_and(params, shardings):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return ([path_names(p) for p, _ in leaves], jax.tree.leaves(shardings), [x for _, x in leaves])


def bytes_per_device(tree) -> int:
    """Bytes of `tree` one device holds (its shard of each array; a host array counts whole)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if isinstance(x, jax.Array) else np.shape(x)
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def shard_rows(batch, mesh):
    """Splits the leading (row) axis of each `[B, ...]` array of `batch` over the `data` and `fsdp` axes.

    batch: any pytree of arrays (a dict, a `rollout.trajectory.Batch`); None leaves stay
    None. B must be a multiple of data x fsdp; scalars are replicated, and so are rows
    over the `tensor` axis.
    """
    n = row_shards(mesh)
    rows, whole = NamedSharding(mesh, PartitionSpec(ROW_AXES)), NamedSharding(mesh, PartitionSpec())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    arrays, shardings = [], []
    for path, x in leaves:
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim and x.shape[0] % n:
            raise ValueError(f"batch field {jax.tree_util.keystr(path, simple=True, separator='.')!r} has "
                             f"{x.shape[0]} rows, not a multiple of {n} devices (parallel.data x fsdp)")
        arrays.append(x)
        shardings.append(rows if x.ndim else whole)
    # One call for every field: JAX batches the transfers (one call per field costs a dispatch each).
    return jax.tree_util.tree_unflatten(treedef, jax.device_put(arrays, shardings))
