"""Per-device memory of a run config, computed from shapes: does it fit an accelerator?

    python -m jaxrl_async.plan --config=configs/qwen3_8b_fsdp8.py [--vocab_size=151936] [--num_devices=8]

Nothing is allocated and nothing compiles: the parameter shapes come from `jax.eval_shape`
of the model's init, their split over the learner mesh (`config.parallel`) from the model
family's logical axes and the rules of `models/sharding.py`, and the rest is arithmetic:

* learner, per device: params, gradients (float32, split like the params), the optimizer
  state (AdamW's two moments) and the EWMA weights when the proximal route keeps them;
  the snapshot route's copy of one older version (split like the params); the
  activations of one gradient step under the remat policy (`model.remat`): an estimate,
  see `activation_bytes`;
* the parameter-version ring buffer's in-memory copies (`runtime.ring_capacity` versions,
  split like the params);
* sampler, per device: its weights in the sampler numerics and its KV cache (an upper
  bound). The inline runtime decodes on the learner's devices with the published
  version's weights, split like the learner's, so there the two add up; the process and
  Ray runtimes' samplers hold the float32 version they read and its inference copy on
  devices of their own. With `sampler.tensor` > 1 the sampler's own tensor-parallel mesh
  splits both about `tensor` ways (the KV cache when `tensor` divides the kv heads).

Each total is compared with a named accelerator's memory (`ACCELERATORS`), with 10% kept
back for XLA's workspace and fragmentation.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from jaxrl_async import config as config_lib
from jaxrl_async.core.proximal import Route
from jaxrl_async.models import sharding
from jaxrl_async.runtime import base as runtime_base

# Device memory in bytes (decimal GB, as the vendors state it).
ACCELERATORS = {"H100 80 GB": 80e9, "H200 141 GB": 141e9, "TPU v5p 95 GB": 95e9}
HEADROOM = 0.9  # the fraction of an accelerator's memory a plan may use
_F32 = 4
# Bytes per sampler weight: int8 is fake-quantised and stored dequantised in float32.
_SAMPLER_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 4}
_SAMPLER_ACT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 4}


@dataclasses.dataclass
class Plan:
    """Bytes per device of each part; `mesh` the (data, fsdp, tensor) sizes; `rows` the rows of one
    gradient step on one device."""

    mesh: dict
    num_params: int
    rows: int
    learner: dict
    sampler: dict
    sampler_on_learner: bool
    sampler_tensor: int = 1  # `sampler.tensor`: the devices one sampler decodes on

    @property
    def learner_total(self) -> int:
        return int(sum(self.learner.values())) + (self.sampler_total if self.sampler_on_learner else 0)

    @property
    def sampler_total(self) -> int:
        return int(sum(self.sampler.values()))

    def fits(self) -> dict[str, bool]:
        """{accelerator: whether the learner device (and a separate sampler device) fit in it}."""
        need = max(self.learner_total, self.sampler_total)
        return {name: need <= HEADROOM * cap for name, cap in ACCELERATORS.items()}


def _mesh_sizes(config, num_devices: int) -> dict[str, int]:
    p = config.parallel
    data = p.data
    if not data:
        n = p.num_devices or num_devices
        if n and n % (p.fsdp * p.tensor):
            raise ValueError(f"config.parallel.fsdp * tensor = {p.fsdp * p.tensor} does not divide {n} devices")
        data = n // (p.fsdp * p.tensor) if n else 1
    return {"data": int(data), "fsdp": int(p.fsdp), "tensor": int(p.tensor)}


def model_config_for_plan(config, vocab_size: int = 0):
    """The run's model config; `vocab_size` > 0 replaces the vocabulary (a tokenizer not at hand).

    A required `model.checkpoint` left unset is read as "" (the sizes of `config.model`): a plan
    needs shapes, not weights. A checkpoint directory that is set gives its config.json's shapes.
    """
    if config.model.checkpoint is None:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.model.checkpoint = ""
    config_lib.validate(config)
    model_config = config_lib.model_config_from(config)
    if vocab_size:
        model_config = dataclasses.replace(model_config, vocab_size=vocab_size)
    return model_config


def activation_bytes(model_config, rows: int, seq: int, tensor: int, remat: bool,
                     policy: str = "nothing_saveable") -> int:
    """Learner activations of one gradient step on one device, float32 (an estimate, not a measurement).

    Per layer and row, the forward keeps for the backward: the residual stream and the
    two norm outputs (3 D), q, k, v and the attention output ((2 H + 2 KVH) Dh), the
    attention scores and probabilities (2 H T), and the MLP's gate, up and product (3 F),
    heads and MLP widths split over `tensor`. With remat each layer keeps its input (D) and
    what the remat policy saves (the matmul outputs: q, k, v, o and the MLP's three, plus
    the attention's batched products for "dots_saveable"), plus one layer's full set while
    it is recomputed. The log-prob head adds one chunk of logits and their softmax
    (2 chunk V / tensor) and the final hidden states (D).
    """
    cfg = model_config
    d, layers = cfg.d_model, cfg.n_layers
    heads = cfg.n_heads
    kv_heads = getattr(cfg, "num_kv_heads", heads)
    head_dim = cfg.head_dim
    per_token = (3 * d + (2 * heads + 2 * kv_heads) * head_dim / tensor + 2 * heads * seq / tensor
                 + 3 * cfg.d_ff / tensor)
    layer = rows * seq * per_token * _F32
    if remat:
        kept = d  # the layer's input
        if policy != "nothing_saveable":
            kept += (heads + 2 * kv_heads) * head_dim / tensor + d + 2 * cfg.d_ff / tensor + d
        if policy == "dots_saveable":
            kept += (heads * seq + heads * head_dim) / tensor
        stored = layers * rows * seq * kept * _F32 + layer
    else:
        stored = layers * layer
    chunk = min(getattr(cfg, "logprob_chunk", seq), seq)
    head = rows * (2 * chunk * cfg.vocab_size / tensor + seq * d) * _F32
    if not hasattr(cfg, "logprob_chunk"):  # transformer.py materialises the [B, T, V] logits
        head = rows * seq * (2 * cfg.vocab_size / tensor + d) * _F32
    return int(stored + head)


def plan(config, vocab_size: int = 0, num_devices: int = 0) -> Plan:
    """The per-device memory plan of `config` (validated first); see the module docstring."""
    model_config = model_config_for_plan(config, vocab_size)
    module = config_lib.model_module(model_config)
    sizes = _mesh_sizes(config, num_devices)
    abstract = jax.eval_shape(lambda: module.init_model(model_config, 0)[1])
    specs = sharding.param_specs(module.param_axes(abstract), abstract, sizes)
    shapes = [tuple(x.shape) for x in jax.tree.leaves(abstract)]
    split = [sharding.shard_shape(s, spec, sizes) for s, spec in zip(shapes, jax.tree.leaves(specs))]
    num_params = int(sum(math.prod(s) for s in shapes))
    param_bytes = int(sum(math.prod(s) for s in split)) * _F32

    route = Route(config.proximal.source)
    anchor = config_lib.proximal_anchor(config)
    ewma = route.uses_ewma or (anchor is not None and anchor.uses_ewma)
    rows_total = config.rl.groups_per_step * config.rl.group_size
    row_shards = sizes["data"] * sizes["fsdp"]
    rows = -(-rows_total // (config.optim.num_minibatches * row_shards))
    remat = bool(getattr(model_config, "remat", False))
    learner = {
        "params": param_bytes,
        "gradients": param_bytes,
        "optimizer": 2 * param_bytes,
        "ewma": param_bytes if ewma else 0,
        # The parameter-version ring buffer keeps its versions in memory too, split like the params.
        "version_cache": runtime_base.ring_capacity(config) * param_bytes,
        # The snapshot route's forward places one retained version split like the params (read back from disk
        # when the in-memory versions no longer hold it).
        "snapshot_version": param_bytes if route == Route.SNAPSHOT else 0,
        "activations": activation_bytes(model_config, rows, model_config.max_len, sizes["tensor"], remat,
                                        getattr(model_config, "remat_policy", "nothing_saveable")),
    }
    numerics = config.numerics.dtype
    inline = config.runtime.mode == "inline"
    slots = config.sampler.slots or (rows_total if inline else config.runtime.sampler_groups * config.rl.group_size)
    kv_heads = getattr(model_config, "num_kv_heads", model_config.n_heads)
    kv_cache = int(2 * model_config.n_layers * slots * model_config.max_len * kv_heads * model_config.head_dim
                   * _SAMPLER_ACT_BYTES[numerics])
    # `sampler.tensor` > 1: the sampler's own tensor-parallel mesh splits its weights (about 1/tensor) and its
    # KV cache over the kv heads (when tensor divides them).
    t = config.sampler.tensor
    if kv_heads % t == 0:
        kv_cache //= t
    if inline and t == 1:
        # Decodes on the learner's mesh with the cached version's weights, split like the learner's.
        ways = param_bytes / (num_params * _F32)
        sampler = {"weights": int(num_params * _SAMPLER_WEIGHT_BYTES[numerics] * ways), "kv_cache": kv_cache}
    elif inline:
        sampler = {"weights": int(num_params * _SAMPLER_WEIGHT_BYTES[numerics] / t), "kv_cache": kv_cache}
    else:
        # Its own device(s): the float32 version it reads, and its inference weights (the same arrays at fp32).
        sampler = {"version": int(num_params * _F32 / t),
                   "weights": 0 if numerics == "fp32" else int(num_params * _SAMPLER_WEIGHT_BYTES[numerics] / t),
                   "kv_cache": kv_cache}
    return Plan(mesh=sizes, num_params=num_params, rows=rows, learner=learner, sampler=sampler,
                sampler_on_learner=inline, sampler_tensor=t)


def _gb(n: float) -> str:
    return f"{n / 1e9:9.2f} GB"


def report(p: Plan) -> str:
    """The plan as the table `python -m jaxrl_async.plan` prints."""
    mesh = " x ".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [f"mesh {mesh} ({math.prod(p.mesh.values())} learner devices); {p.num_params / 1e9:.3f} B params; "
             f"{p.rows} rows per device per gradient step",
             "learner, per device:"]
    lines += [f"  {k:<18}{_gb(v)}" for k, v in p.learner.items()]
    if p.sampler_tensor > 1:
        where = (f"{'on the learner' if p.sampler_on_learner else 'its own'} devices, weights split "
                 f"{p.sampler_tensor} ways (sampler.tensor)")
    else:
        where = ("inline: on the learner's devices, weights split like the learner's" if p.sampler_on_learner
                 else "its own device, whole weights")
    lines.append(f"sampler, per device ({where}):")
    lines += [f"  {k:<18}{_gb(v)}" for k, v in p.sampler.items()]
    lines.append(f"learner device total{_gb(p.learner_total)}"
                 + (" (sampler included)" if p.sampler_on_learner else ""))
    if not p.sampler_on_learner:
        lines.append(f"sampler device total{_gb(p.sampler_total)}")
    lines.append(f"fits (at most {HEADROOM:.0%} of the memory):")
    for name, ok in p.fits().items():
        lines.append(f"  {name:<16}{'yes' if ok else 'no'}")
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags

    try:
        print(report(plan(flags.FLAGS.config, flags.FLAGS.vocab_size, flags.FLAGS.num_devices)))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/default.py", "Run config file.", lock_config=True)
    flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0 = the task tokenizer's or the checkpoint's).")
    flags.DEFINE_integer("num_devices", 0, "Learner devices when config.parallel.data is 0 (0 = one data shard).")
    app.run(main)
