"""Logical axis names for parameters and activations, and the rules that map them onto a mesh.

Every parameter of a model family has one logical name per dimension (its family's
`PARAM_AXES` table, looked up by the parameter's path):

    vocab     token ids (embedding rows, output-head columns)
    embed     the residual stream's width (d_model / hidden_size)
    heads     query heads x head dim, flattened (q projection out, o projection in)
    kv_heads  key/value heads x head dim, flattened (grouped-query attention)
    head_dim  one head's width (Qwen3's q/k norms)
    mlp       the MLP's hidden width
    layers    stacked layers (scanned models)
    norm      any other vector (norm scales, output biases): never split

`RULES` maps logical names onto the learner mesh's axes `data`, `fsdp` and `tensor`
(`learner.mesh`): parameters are split over `fsdp` along `embed` (FSDP: each device holds
1/fsdp of every matrix and gathers a layer's weights when it computes with them) and over
`tensor` along heads, kv_heads, mlp and vocab (Megatron-style tensor parallelism).
Activations have names of their own (`batch`, `length`, `act_*`): their rows split over
`data` and `fsdp`, their heads / MLP hidden / vocabulary over `tensor`.

A dimension that a mesh axis does not divide evenly is not split over it (a 2-kv-head
model on `tensor=4` keeps its k/v projections whole), and neither is one whose mesh axis
has size 1, so any model runs on any mesh.

`constrain` pins an activation's sharding inside a traced function. It is a no-op unless
the function is traced under `jax.set_mesh` with a mesh of more than one device: the
single-device programs (the sampler's, the reference tests') are unchanged, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes), None = not split.
RULES: dict[str, tuple[str, ...] | str | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}

LogicalAxes = tuple  # one logical name (or None) per dimension


def _shape(x) -> tuple[int, ...]:
    """The shape of an array or a `jax.ShapeDtypeStruct` (an abstract one, as `jax.eval_shape` gives)."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def path_names(path) -> tuple:
    """The dict keys / attribute names / indices of a pytree path, less the Variable's `.value`."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                out.append(k.name)
        else:
            out.append(str(k))
    return tuple(out)


def param_axes(params, table: Mapping[tuple[str, ...], LogicalAxes], family: str):
    """The logical axes of every parameter: a pytree like `params` whose leaves are tuples of names.

    table: `{name suffix: logical axes}`, a suffix being the last names of the parameter's
    path (`("q_proj", "kernel")`, `("wq",)`); the longest matching suffix wins. A parameter
    no entry matches, or whose rank differs from its entry's, raises ValueError naming it
    (a new parameter must be given its axes).
    """

    def axes(path, x):
        names = tuple(n for n in path_names(path) if isinstance(n, str))
        for k in range(len(names), 0, -1):
            if names[-k:] in table:
                logical = table[names[-k:]]
                if "layers" in names and len(_shape(x)) == len(logical) + 1:
                    logical = ("layers",) + tuple(logical)  # scanned layers: stacked on a leading axis
                if len(logical) != len(_shape(x)):
                    raise ValueError(f"{family} parameter {'.'.join(names)} has shape {_shape(x)}, but its "
                                     f"logical axes {logical} name {len(logical)} dimensions")
                return logical
        raise ValueError(f"{family} parameter {'.'.join(map(str, path_names(path)))} has no logical axes "
                         f"(add it to the family's PARAM_AXES)")

    # Tuples of names are pytrees: wrap them so they come back as leaves.
    return jax.tree_util.tree_map_with_path(lambda p, x: _Leaf(axes(p, x)), params)


class _Leaf:
    """A pytree leaf holding one parameter's logical axes (a tuple would be a pytree node)."""

    __slots__ = ("axes",)

    def __init__(self, axes):
        self.axes = tuple(axes)

    def __repr__(self):
        return f"Axes{self.axes}"


def axes_of(leaf) -> LogicalAxes:
    return leaf.axes if isinstance(leaf, _Leaf) else tuple(leaf)


def mesh_spec(logical: Sequence, shape: Sequence[int], axis_sizes: Mapping[str, int],
              rules: Mapping = RULES) -> PartitionSpec:
    """The PartitionSpec of an array `shape` with `logical` axes on a mesh of `axis_sizes`.

    A dimension is split over the mesh axes its rule names when their product divides it;
    mesh axes of size 1, already used by another dimension, or absent from the mesh are skipped.
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        rule = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        mesh_axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
        mesh_axes = tuple(a for a in mesh_axes if axis_sizes.get(a, 1) > 1 and a not in used)
        size = int(np.prod([axis_sizes[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def shard_shape(shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The shape one device holds of an array of `shape` split by `spec` (no device needed)."""
    out = list(shape)
    for i, entry in enumerate(spec):
        for a in (entry,) if isinstance(entry, str) else (entry or ()):
            out[i] //= axis_sizes[a]
    return tuple(out)


def param_shardings(axes_tree, params, mesh: jax.sharding.Mesh, rules: Mapping = RULES):
    """NamedShardings of `params` on `mesh`, from `param_axes(params, ...)` (a pytree like params)."""
    sizes = dict(mesh.shape)
    return jax.tree.map(lambda a, x: NamedSharding(mesh, mesh_spec(axes_of(a), _shape(x), sizes, rules)),
                        axes_tree, params, is_leaf=lambda a: isinstance(a, _Leaf))


def param_specs(axes_tree, params, axis_sizes: Mapping[str, int], rules: Mapping = RULES):
    """PartitionSpecs of `params` (arrays or abstract shapes) for mesh axes of `axis_sizes`, no devices needed."""
    return jax.tree.map(lambda a, x: mesh_spec(axes_of(a), _shape(x), axis_sizes, rules),
                        axes_tree, params, is_leaf=lambda a: isinstance(a, _Leaf))


def constrain(x: jax.Array, logical: Sequence, rules: Mapping = RULES) -> jax.Array:
    """Pins the sharding of activation `x` (`logical`: one name per dimension) on the mesh that
    `jax.set_mesh` made current while tracing; the identity without one (or on one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = mesh_spec(logical, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)
