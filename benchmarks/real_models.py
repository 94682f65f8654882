"""Real-model benchmarks: the learner's tokens/s and MFU, decode tokens/s against the
memory-bandwidth bound, peak memory, for the HF model families (`models/llama.py`).

    python -m benchmarks.real_models                    # CPU: the qwen3_tiny shapes; GPU: Qwen3-0.6B's
    python -m benchmarks.real_models --shapes=tiny      # or qwen3_0p6b (random weights, the real shapes)

Learner: the shipped RL update (`learner.update.make_rl_update`, float32 params as the configs
train them, AdamW, one gradient step over the batch) on random tokens `[B, T]`; model FLOPs per
token are 6 x the matmul parameters plus the attention's 12 x layers x heads x head_dim x T
(forward and backward, no rematerialisation counted), MFU against the device's dense bf16
peak on a known GPU, or against a large float32 matmul measured in the same run on a CPU.
Decode: the bare KV-cache decode step (`llama.decode_step`; bf16 inference weights and cache
on the GPU shapes, float32 for the tiny ones as their config samples: bf16 is emulated, slow,
on a CPU) in a Python loop, at each batch; its bound is the weight bytes read per step over the
memory bandwidth (the GPU's HBM figure, or a large copy measured in the same run on a CPU;
the KV cache's own bytes are not in the bound; the cache holds `decode_len` positions). Peak
memory: the device's peak bytes in use on a GPU, the process's peak resident memory on a CPU.
JSON to `runs/bench_real_models.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxrl_async.core.losses import LossConfig
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.models import llama
from jaxrl_async.models.transformer import Numerics
from jaxrl_async.rollout.trajectory import Batch

# Qwen3 shapes: the tiny config's (configs/qwen3_tiny.py) and Qwen3-0.6B's (its config.json).
SHAPES = {
    "tiny": dict(model=dict(vocab_size=602, hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim_=32, max_len=512),
                 learner=((32, 480),), decode=(64, 256), decode_steps=32, decode_len=512, numerics="fp32"),
    "qwen3_0p6b": dict(model=dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                                  num_heads=16, num_kv_heads=8, head_dim_=128, rope_theta=1_000_000.0,
                                  tie_word_embeddings=True, max_len=4096, remat=True),
                       learner=((16, 1024), (4, 4096)), decode=(64, 256), decode_steps=32,
                       decode_len=1024, numerics="bf16"),  # a 4k cache at batch 256 would be 60 GB
}
# Dense bf16 peak FLOP/s and HBM bytes/s of the GPUs this project has been lent (vendor figures).
DEVICE_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def qwen3_config(**shape) -> llama.LlamaConfig:
    return llama.LlamaConfig(qk_norm=True, architecture="Qwen3ForCausalLM", **shape)


def matmul_params(cfg: llama.LlamaConfig) -> int:
    """Parameters that take part in a matmul per token: every layer's projections and the head."""
    h, kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = cfg.hidden_size * dh * (2 * h + 2 * kv)  # q, o: h heads; k, v: kv heads
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size  # SwiGLU: gate, up, down
    return cfg.num_layers * (attn + mlp) + cfg.hidden_size * cfg.vocab_size


def train_flops_per_token(cfg: llama.LlamaConfig, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def _device_peaks() -> tuple[float | None, float | None, str]:
    """(peak FLOP/s, bandwidth bytes/s, what they are) for this machine's first device."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        for name, (flops, bw) in DEVICE_PEAKS.items():
            if name in dev.device_kind:
                return flops, bw, f"{dev.device_kind}: vendor dense bf16 peak and HBM bandwidth"
        return None, None, f"{dev.device_kind}: no peak figures on record"
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(5))
    big = np.ones(32 * 2**20, np.float32)  # 128 MiB
    dst = np.empty_like(big)
    tc = min(_timed(lambda: np.copyto(dst, big)) for _ in range(5))
    return 2 * n**3 / t, 2 * big.nbytes / tc, "CPU: a 2048^2 float32 matmul and a 128 MiB copy measured now"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak_memory_mib() -> float:
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        return stats.get("peak_bytes_in_use", float("nan")) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_learner(cfg: llama.LlamaConfig, batch: int, seq_len: int, steps: int = 5) -> dict:
    """The RL update's seconds per step (median after a compile step) and tokens/s at [batch, seq_len]."""
    graphdef, params = llama.init_model(cfg, 0)
    optimizer = learner_lib.make_optimizer(1e-6, 1.0)
    state = learner_lib.create_train_state(params, optimizer)
    update = learner_lib.make_rl_update(graphdef, optimizer, LossConfig(), model=llama)
    rng = np.random.default_rng(0)
    shape = (batch, seq_len)
    data = jax.device_put(Batch(
        tokens=rng.integers(3, cfg.vocab_size, shape).astype(np.int32), loss_mask=np.ones(shape, bool),
        behav_logp=np.full(shape, -2.0, np.float32), versions=np.zeros(shape, np.int32),
        advantages=rng.normal(0, 1, shape).astype(np.float32), prox_logp=np.full(shape, -2.0, np.float32)))
    state, m = update(state, data, jax.random.key(0))
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = update(state, data, jax.random.key(i + 1))
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    return {"batch": batch, "seq_len": seq_len, "step_s": step_s, "tokens_per_s": batch * seq_len / step_s,
            "model_flops_per_s": train_flops_per_token(cfg, seq_len) * batch * seq_len / step_s}


def bench_decode(cfg: llama.LlamaConfig, batch: int, steps: int, numerics: str = "bf16") -> dict:
    """The bare KV-cache decode step at `batch` (median of per-step times over `steps` steps)."""
    graphdef, params = llama.init_model(cfg, 0)
    num = Numerics(numerics)
    inf = llama.inference_params(params, num)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(inf))
    tokens = jnp.full((batch,), 5, jnp.int32)
    positions = [jnp.full((batch,), i, jnp.int32) for i in range(steps)]
    key = jax.random.key(0)

    def run():
        cache = llama.init_cache(cfg, batch, num)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        for i in range(steps):
            logp, cache = llama.decode_step(graphdef, inf, cache, tokens, positions[i], num, key)
        jax.block_until_ready(logp)
        return (time.perf_counter() - t0) / steps

    run()  # compile
    step_s = float(np.median([run() for _ in range(3)]))
    return {"batch": batch, "step_ms": 1e3 * step_s, "tokens_per_s": batch / step_s, "weight_bytes": weight_bytes}


def run(shapes: str, out: str = "runs/bench_real_models.json", learner_steps: int = 5) -> dict:
    spec = SHAPES[shapes]
    cfg = qwen3_config(**spec["model"])
    peak_flops, bandwidth, peaks_from = _device_peaks()
    dev = jax.devices()[0]
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {dev.device_kind} x{jax.device_count()}, "
                      f"jax {jax.__version__}",
           "shapes": shapes, "decode_numerics": spec["numerics"], "matmul_params": matmul_params(cfg),
           "peaks_from": peaks_from,
           "peak_flops_per_s": peak_flops, "bandwidth_bytes_per_s": bandwidth, "learner": [], "decode": []}
    for b, t in spec["learner"]:
        r = bench_learner(cfg, b, t, learner_steps)
        r["mfu"] = r["model_flops_per_s"] / peak_flops if peak_flops else None
        res["learner"].append(r)
    for b in spec["decode"]:
        decode_cfg = dataclasses.replace(cfg, max_len=spec["decode_len"])
        r = bench_decode(decode_cfg, b, spec["decode_steps"], spec["numerics"])
        r["bound_tokens_per_s"] = b * bandwidth / r["weight_bytes"] if bandwidth else None
        r["vs_bound"] = r["tokens_per_s"] / r["bound_tokens_per_s"] if bandwidth else None
        res["decode"].append(r)
    res["peak_memory_mib"] = _peak_memory_mib()
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def print_tables(res: dict) -> None:
    print(f"machine: {res['machine']}; Qwen3 shapes {res['shapes']!r}, random weights, "
          f"{res['matmul_params'] / 1e6:.1f}M matmul parameters; peaks: {res['peaks_from']}")
    print("\n| learner (RL update, float32 params) | tokens/s | step s | model TFLOP/s | MFU |\n"
          "|---|---:|---:|---:|---:|")
    for r in res["learner"]:
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| [{r['batch']}, {r['seq_len']}] | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
              f"{r['model_flops_per_s'] / 1e12:.3f} | {mfu} |")
    print(f"\n| decode ({res['decode_numerics']} weights and KV cache, bare step) | tokens/s | ms per step | "
          "weight-bandwidth bound tokens/s | of the bound |\n|---|---:|---:|---:|---:|")
    for r in res["decode"]:
        bound = "" if r["bound_tokens_per_s"] is None else f"{r['bound_tokens_per_s']:.0f}"
        share = "" if r["vs_bound"] is None else f"{100 * r['vs_bound']:.1f}%"
        print(f"| batch {r['batch']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.3f} | {bound} | {share} |")
    print(f"\npeak memory: {res['peak_memory_mib']:.0f} MiB "
          f"({'device' if 'CPU' not in res['peaks_from'] else 'process resident'})")


def main(argv):
    del argv
    shapes = flags.FLAGS.shapes or ("tiny" if jax.default_backend() == "cpu" else "qwen3_0p6b")
    print_tables(run(shapes))


if __name__ == "__main__":
    # Defined here, not at import: `benchmarks.run` imports this module beside its own flags.
    flags.DEFINE_enum("shapes", None, list(SHAPES),
                      "Model shapes; default: tiny on a CPU, qwen3_0p6b on an accelerator.")
    app.run(main)
