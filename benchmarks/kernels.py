"""Micro and system benchmarks: the loss, decoding, the learner, async against sync, the trajectory hand-off.

Each section prints a table with the machine and settings and a ratio against a baseline
measured in the same run; `--json` writes everything to a file (sections not run keep their
previous results there).

    .venv/bin/python -m benchmarks.kernels [--json=runs/bench_kernels.json] [--sections=loss,decode]
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def machine() -> str:
    devs = jax.devices()
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on {devs[0].platform} "
            f"({devs[0].device_kind}) x{len(devs)}")


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to this process image alone;
    `ru_maxrss` would also count the parent's peak, which Linux carries over fork and exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timeit(fn, *args, repeats: int = 20) -> float:
    """Median seconds per call after one warm-up (compile) call; blocks on the result."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_loss(b: int, t: int) -> dict:
    """Decomposed `policy_loss` (forward + backward) against rlax's clipped PPO loss."""
    import rlax

    from jaxrl_async.core.losses import LossConfig, policy_loss

    rng = np.random.default_rng(0)
    logp = jnp.asarray(rng.normal(-1.0, 0.3, (b, t)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.1, (b, t)), jnp.float32)
    adv = jnp.asarray(rng.normal(0, 1, (b, t)), jnp.float32)
    mask = jnp.ones((b, t), bool)
    plain = LossConfig(is_mode="none")  # no discrepancy term, no masks: plain clipped PPO
    full = LossConfig(is_mode="token", token_mask=(0.5, 2.0), seq_mask_mode="geometric", seq_mask=(0.5, 2.0),
                      catastrophic_thr=1e-4, dual_clip=3.0)

    def ours(cfg):
        return jax.jit(jax.value_and_grad(lambda lp: policy_loss(lp, old, old, adv, mask, cfg)[0]))

    def theirs(lp):
        return rlax.clipped_surrogate_pg_loss(jnp.exp(lp - old).ravel(), adv.ravel(), 0.2)

    rlax_fn = jax.jit(jax.value_and_grad(theirs))
    v_ours, g_ours = ours(plain)(logp)
    v_rlax, g_rlax = rlax_fn(logp)
    # Sub-millisecond calls: many repeats, interleaved twice, keep the faster median of each.
    fns = {"rlax": rlax_fn, "plain": ours(plain), "full": ours(full)}
    best = {k: min(timeit(f, logp, repeats=200) for _ in range(2)) for k, f in fns.items()}
    t_rlax, t_plain, t_full = best["rlax"], best["plain"], best["full"]
    return {
        "shape": [b, t],
        "values_equal": bool(np.isclose(float(v_ours), float(v_rlax), rtol=1e-5)
                             and np.allclose(np.asarray(g_ours), np.asarray(g_rlax), rtol=1e-4, atol=1e-9)),
        "rlax_ms": 1e3 * t_rlax, "ours_plain_ms": 1e3 * t_plain, "ours_all_modes_ms": 1e3 * t_full,
        "plain_vs_rlax": t_plain / t_rlax, "all_modes_vs_rlax": t_full / t_rlax,
    }


def bench_decode(b: int, steps: int) -> dict:
    """KV-cache decoding against re-running the full forward for every new token, and the
    sampler's whole multi-turn rollout (device decode loop, host round trips at turn ends,
    environments, sampling) per decode step and in tokens/s, and 2b episodes through b slots
    (continuous batching) against two batches of b. Rollouts are interleaved with bare
    KV-cache passes and medians reported, so on a shared machine both see the same load.

    Both decoding paths get their per-step inputs prepared ahead (token column, positions,
    key), so the table compares the model calls, not the host-side helpers around them; on
    an accelerator each such helper is a dispatch that costs about as much as a decode step.
    """
    from jaxrl_async.envs.tokenizer import TOKENIZER
    from jaxrl_async.models import transformer as M
    from jaxrl_async.rollout.sampler import Sampler

    cfg = M.ModelConfig(vocab_size=TOKENIZER.vocab_size, max_len=steps)
    graphdef, params = M.init_model(cfg, 0)
    num = M.Numerics("fp32")
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, TOKENIZER.vocab_size, (b, steps)), jnp.int32)
    columns = [tokens[:, i] for i in range(steps)]
    positions = [jnp.full((b,), i, jnp.int32) for i in range(steps)]
    key = jax.random.key(0)
    full = jax.jit(lambda p, x: M.forward_logits(graphdef, p, x))

    def with_cache():
        cache = M.init_cache(cfg, b, num)
        for i in range(steps):
            logp, cache = M.decode_step(graphdef, params, cache, columns[i], positions[i], num, key)
        return logp

    def re_forward():
        for _ in range(steps):  # a fixed [B, max_len] shape: one compilation, the whole prefix each time
            out = full(params, tokens)
        return out

    t_full = timeit(lambda: re_forward(), repeats=5)

    # The real sampler: default task and model, `b` episodes batched, fp32 numerics.
    from configs.default import get_config
    from jaxrl_async import config as config_lib

    c = get_config()
    task_cfg = config_lib.model_config_from(c)
    task_graphdef, task_params = M.init_model(task_cfg, 0)
    sampler = Sampler(task_graphdef, task_cfg, num)
    sampler.update_params(task_params, 0)
    make = config_lib.env_factory(c)

    def rollout(seed, n=b, slots=None):
        return sampler.generate([make() for _ in range(n)], list(range(seed, seed + n)), list(range(n)),
                                jax.random.key(seed), slots=slots)[1]

    rollout(0)  # compile
    rollout(0, 2 * b, b)
    # Rollouts interleaved with bare KV-cache passes, medians: on a shared machine both see the same load.
    stats, bare = [], []
    for s in range(1, 11):
        stats.append(rollout(s))
        bare.append(timeit(lambda: with_cache(), repeats=1) / steps)
    wall = np.array([st.wall_s for st in stats])
    per_step = np.median(wall / np.array([st.decode_steps for st in stats]))
    t_bare = float(np.median(bare))
    # Continuous batching: 2b episodes through b slots, against the same episodes as two batches of b.
    cont, two = [], []
    for s in range(20, 25):
        cont.append(rollout(100 * s, 2 * b, b))
        x, y = rollout(100 * s, b), rollout(100 * s + b, b)
        two.append((x.wall_s + y.wall_s, x.decode_steps + y.decode_steps, x.generated_tokens + y.generated_tokens))
    two = np.array(two)
    return {"batch": b, "tokens": steps, "kv_cache_tok_s": b / t_bare, "re_forward_tok_s": b * steps / t_full,
            "speedup": t_full / steps / t_bare, "kv_cache_ms_per_step": 1e3 * t_bare,
            "sampler_decode_steps_per_s": 1.0 / per_step, "sampler_ms_per_step": 1e3 * per_step,
            "sampler_vs_kv_cache_step": per_step / t_bare,
            "sampler_slot_tok_s": b / per_step, "sampler_rollout_ms": 1e3 * float(np.median(wall)),
            "sampler_generated_tok_s": float(np.median([st.generated_tokens / st.wall_s for st in stats])),
            # Host round trips of the device decode loop and batched prefills, per rollout.
            "sampler_loop_calls": sum(st.loop_calls for st in stats) / len(stats),
            "sampler_prefill_calls": sum(st.prefill_calls for st in stats) / len(stats),
            "sampler_decode_steps": sum(st.decode_steps for st in stats) / len(stats),
            # 2b episodes: continuous batching through b slots against two batches of b (medians over 5).
            "continuous_rollout_ms": 1e3 * float(np.median([st.wall_s for st in cont])),
            "continuous_decode_steps": float(np.median([st.decode_steps for st in cont])),
            "continuous_generated_tok_s": float(np.median([st.generated_tokens / st.wall_s for st in cont])),
            "two_batches_rollout_ms": 1e3 * float(np.median(two[:, 0])),
            "two_batches_decode_steps": float(np.median(two[:, 1])),
            "two_batches_generated_tok_s": float(np.median(two[:, 2] / two[:, 0]))}


LEARNER_SCRIPT = r"""
# One run's learner, set up as training sets it up (RLCluster, no warm start), timed on
# random batches of the default shape: the shipped update, state donated, rows sharded.
import json, sys, tempfile, time
import jax, numpy as np
from jaxrl_async.cluster import RLCluster
from jaxrl_async.config import base_config
from jaxrl_async.learner.mesh import shard_rows
from jaxrl_async.rollout.trajectory import Batch
n = int(sys.argv[1])
c = base_config()
c.parallel.num_devices = n
c.warmstart.enabled = False
with tempfile.TemporaryDirectory() as workdir:
    cluster = RLCluster(c, workdir, log=lambda *a: None)
    B, T = c.rl.groups_per_step * c.rl.group_size, cluster.model_config.max_len
    rng = np.random.default_rng(0)
    batch = Batch(tokens=rng.integers(4, cluster.model_config.vocab_size, (B, T)).astype(np.int32),
                  loss_mask=np.ones((B, T), bool), behav_logp=np.full((B, T), -2.0, np.float32),
                  versions=np.zeros((B, T), np.int32), advantages=rng.normal(0, 1, (B, T)).astype(np.float32),
                  prox_logp=np.full((B, T), -2.0, np.float32))
    sb = shard_rows(batch, cluster.mesh)
    state, update = cluster.state, cluster.update
    state, m = update(state, sb, jax.random.key(0)); jax.block_until_ready(m)
    times = []
    for i in range(10):
        t0 = time.perf_counter(); state, m = update(state, sb, jax.random.key(i)); jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    cluster.close()
t = float(np.median(times))
print("RESULT" + json.dumps({"devices": n, "step_s": t, "tokens_per_s": B * T * c.optim.num_epochs / t,
                             "compiles": update._cache_size()}))
"""


def bench_learner() -> list[dict]:
    """Learner tokens/s for the default model on 1 and 2 devices: forced host-platform
    devices on a CPU, the real devices (1 and all of them) on an accelerator."""
    on_cpu = jax.default_backend() == "cpu"
    out = []
    for n in (1, 2) if on_cpu else sorted({1, jax.device_count()}):
        env = dict(os.environ)
        if on_cpu:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        r = subprocess.run([sys.executable, "-c", LEARNER_SCRIPT, str(n)], env=env, capture_output=True, text=True,
                           check=True)
        out.append(json.loads([x for x in r.stdout.splitlines() if x.startswith("RESULT")][0][6:]))
    base = out[0]["tokens_per_s"]
    for row in out:
        row["vs_1_device"] = row["tokens_per_s"] / base
    return out


def bench_learner_variants(batches: int = 12) -> list[dict]:
    """Before/after of the learner's performance work, default model and batch, 1 device.

    The same `batches` RL batches, whose longest episode varies as real batches do, through:
    the shipped update (state donated, every batch padded to `max_len`: one compilation);
    the same without donation (XLA allocates a fresh state every step); and batches trimmed
    to their longest episode (less compute per step, but a compilation per new length).
    """
    from jaxrl_async import config as config_lib
    from jaxrl_async.core.losses import LossConfig
    from jaxrl_async.learner import update as L
    from jaxrl_async.models import transformer as M
    from jaxrl_async.rollout.trajectory import Batch

    c = config_lib.base_config()
    cfg = config_lib.model_config_from(c)
    graphdef, params = M.init_model(cfg, 0)
    b, t_max = c.rl.groups_per_step * c.rl.group_size, cfg.max_len
    rng = np.random.default_rng(0)
    lengths = rng.integers(24, t_max + 1, batches)  # longest episode of each batch
    data = []
    for n in lengths:
        mask = np.arange(t_max)[None] < rng.integers(8, n + 1, b)[:, None]
        data.append({"tokens": rng.integers(4, cfg.vocab_size, (b, t_max)).astype(np.int32), "loss_mask": mask,
                     "behav_logp": np.full((b, t_max), -2.0, np.float32),
                     "prox_logp": np.full((b, t_max), -2.0, np.float32),
                     "advantages": rng.normal(0, 1, (b, t_max)).astype(np.float32),
                     "versions": np.zeros((b, t_max), np.int32)})
    opt = L.make_optimizer(1e-4, 1.0)
    out = []
    for name, donate, trim in (("padded to max_len, state donated (shipped)", True, False),
                               ("padded, no donation", False, False),
                               ("trimmed to the batch's longest episode, donated", True, True)):
        update = L.make_rl_update(graphdef, opt, LossConfig(), c.optim.num_minibatches, c.optim.num_epochs,
                                  donate=donate)
        state = L.create_train_state(jax.tree.map(jnp.copy, params), opt)
        times = []
        for i, (batch, n) in enumerate(zip(data, lengths)):
            batch = Batch(**{k: jnp.asarray(v[:, :n] if trim else v) for k, v in batch.items()})
            t0 = time.perf_counter()
            state, m = update(state, batch, jax.random.key(i))
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        out.append({"variant": name, "total_s": float(np.sum(times)), "first_step_s": times[0],
                    "steady_step_s": float(np.median(times[len(times) // 2:])), "compiles": update._cache_size(),
                    "distinct_lengths": int(len(set(lengths.tolist()))), "batches": batches})
    return out


def bench_async_vs_sync(steps: int) -> dict:
    """Episodes/s of the inline (synchronous) and process (asynchronous) runtimes, same task and budget."""
    from configs.default import get_config
    from jaxrl_async.metrics_log import read_metrics
    from jaxrl_async.train import train_and_evaluate

    out = {}
    for mode in ("inline", "process"):
        c = get_config()
        c.warmstart.enabled = False
        c.runtime.mode = mode
        c.train.steps = steps
        c.train.eval_every = c.train.checkpoint_every = steps
        c.eval.episodes = 16
        with tempfile.TemporaryDirectory() as d:
            train_and_evaluate(c, d, progress=False)
            rows = [r for r in read_metrics(d) if "loss/policy" in r][2:]  # skip compile steps
        episodes = c.rl.groups_per_step * c.rl.group_size
        step_s = float(np.mean([r["perf/step_s"] for r in rows]))
        out[mode] = {"episodes_per_s": episodes / step_s, "step_s": step_s}
        if mode == "process":
            # Where the asynchronous learner's step goes: waiting for a batch (idle), the update
            # and its host work, publishing the new version (shared slot + background ring buffer).
            wait = float(np.mean([r["perf/learner_wait_s"] for r in rows]))
            train = float(np.mean([r["perf/train_s"] for r in rows]))
            publish = float(np.mean([r.get("perf/publish_s", 0.0) for r in rows]))
            out[mode].update(learner_wait_s=wait, train_s=train, publish_s=publish, idle_frac=wait / step_s,
                             sampler_gate_wait_s=float(np.mean([r["perf/sampler_gate_wait_s"] for r in rows])))
            # The learner's step in parts (NaN where the run's code does not report a part): blocked on
            # the queue, its own queue work (listing, renames, reads, unpickling, fsync), collate,
            # route (the batch's transfer), update, metrics.
            for key in ("queue_wait", "queue_take", "queue_read", "queue_sync", "collate", "route", "update",
                        "metrics"):
                out[mode][f"{key}_s"] = float(np.mean([r.get(f"perf/{key}_s", np.nan) for r in rows]))
        if mode == "inline":
            t_sample = float(np.mean([r["perf/sample_s"] for r in rows]))
            t_train = float(np.mean([r["perf/train_s"] for r in rows]))
            out["ideal_overlap_bound"] = (t_sample + t_train) / max(t_sample, t_train)
            out["inline"].update(sample_s=t_sample, train_s=t_train)
    out["async_vs_sync"] = out["process"]["episodes_per_s"] / out["inline"]["episodes_per_s"]
    out["async_vs_overlap_bound"] = out["async_vs_sync"] / out["ideal_overlap_bound"]
    return out


def _handoff_sampler(config_json: str, versions: str, capacity: int, slot_name, ready, out) -> None:
    """A sampler process of the hand-off benchmark: polls for a newer version as a sampler does between
    decode chunks (here every 0.5 ms, so the wait for a chunk boundary is left out), takes it (shared
    slot, else the ring buffer), loads it into its sampler (inference numerics) and reports
    (version, time.monotonic() of that first use). Exits when the learner puts None in `ready`'s place."""
    import json as json_lib

    from ml_collections import config_dict

    from jaxrl_async import config as config_lib
    from jaxrl_async.runtime.base import make_sampler
    from jaxrl_async.runtime.handoff import WeightSlot, WeightSource
    from jaxrl_async.runtime.versions import VersionEvicted, VersionStore

    config = config_dict.ConfigDict(json_lib.loads(config_json))
    graphdef, target = config_lib.model_structure(config, config_lib.model_config_from(config))
    slot = WeightSlot.attach(slot_name, target) if slot_name else None
    source = WeightSource(VersionStore(versions, capacity, target), slot)
    sampler, _ = make_sampler(config, graphdef, os.path.dirname(versions), 1)
    loaded = -1
    while not ready.is_set():
        latest = source.latest_version()
        if latest is not None and latest > loaded:
            try:
                params = source.get(latest)
            except VersionEvicted:
                continue
            sampler.update_params(params, latest)
            jax.block_until_ready(sampler.inf_params)
            out.put((latest, time.monotonic(), source.stats["slot_reads"], source.stats["disk_reads"]))
            loaded = latest
        else:
            time.sleep(0.0005)
    source.close()


def bench_handoff(versions: int = 15) -> dict:
    """Weight hand-off, default model on this host: publish of a version to its first use by a
    sampler process, through the shared-memory slot (shipped: Orbax write in the background) and
    through the ring buffer only (the old path: synchronous Orbax save + SHA-256 manifest, the
    sampler restores from disk), in the same run, with the learner step of the same run.

    One learner (RLCluster, process runtime, random batches of the default shape) alternates an
    update and a publish; after each publish it waits for the sampler process to report the
    version before the next update, so sampler and learner do not compete for cores while timed.
    """
    import multiprocessing as mp

    from jaxrl_async.cluster import RLCluster
    from jaxrl_async.config import base_config
    from jaxrl_async.learner.mesh import shard_rows
    from jaxrl_async.rollout.trajectory import Batch
    from jaxrl_async.runtime.versions import VersionStore

    ctx = mp.get_context("spawn")
    c = base_config()
    c.warmstart.enabled = False
    c.runtime.mode = "process"
    out = {"versions": versions}
    with tempfile.TemporaryDirectory() as workdir:
        cluster = RLCluster(c, workdir, log=lambda *a: None)
        try:
            b, t = c.rl.groups_per_step * c.rl.group_size, cluster.model_config.max_len
            rng = np.random.default_rng(0)
            batch = Batch(tokens=rng.integers(4, cluster.model_config.vocab_size, (b, t)).astype(np.int32),
                          loss_mask=np.ones((b, t), bool), behav_logp=np.full((b, t), -2.0, np.float32),
                          versions=np.zeros((b, t), np.int32),
                          advantages=rng.normal(0, 1, (b, t)).astype(np.float32),
                          prox_logp=np.full((b, t), -2.0, np.float32))
            sb = shard_rows(batch, cluster.mesh)
            cluster.state, m = cluster.update(cluster.state, sb, jax.random.key(0))  # compile
            jax.block_until_ready(m)
            capacity = cluster.store.capacity
            disk_dir = os.path.join(workdir, "disk_path", "versions")
            disk_store = VersionStore(disk_dir, capacity, cluster.state.params, writer=True)
            for path in ("disk", "shm"):
                if path == "disk":
                    disk_store.publish(int(cluster.state.version), cluster.state.params)
                else:
                    cluster.publish(int(cluster.state.version))
                stop, q = ctx.Event(), ctx.Queue()
                proc = ctx.Process(target=_handoff_sampler, daemon=True, args=(
                    c.to_json(), disk_dir if path == "disk" else cluster.store.directory, capacity,
                    cluster.handoff.name if path == "shm" else None, stop, q))
                proc.start()
                first = q.get(timeout=300)  # the sampler is up, with the version published before the loop
                assert first[0] == int(cluster.state.version), first
                steps, publish, waits, slot_writes, latency, reads = [], [], [], [], [], None
                for i in range(versions):
                    t0 = time.perf_counter()
                    cluster.state, m = cluster.update(cluster.state, sb, jax.random.key(i + 1))
                    jax.block_until_ready(m)
                    steps.append(time.perf_counter() - t0)
                    v = int(cluster.state.version)
                    w0 = cluster.store.stats["publish_wait_s"]
                    s0 = cluster.handoff.stats["write_s"]
                    t_pub = time.monotonic()
                    if path == "shm":
                        cluster.publish(v)
                    else:
                        disk_store.publish(v, cluster.state.params)  # the old publish, synchronous
                    publish.append(time.monotonic() - t_pub)
                    waits.append(cluster.store.stats["publish_wait_s"] - w0)
                    slot_writes.append(cluster.handoff.stats["write_s"] - s0)
                    while True:
                        got = q.get(timeout=120)
                        if got[0] == v:
                            break
                    latency.append(got[1] - t_pub)
                    reads = got[2:]
                stop.set()
                proc.join(30)
                cluster.store.flush()
                out[path] = {"latency_ms": 1e3 * float(np.median(latency)),
                             "latency_max_ms": 1e3 * float(np.max(latency)),
                             "publish_ms": 1e3 * float(np.median(publish)),
                             # Of which waiting for the previous background write (one in flight at most).
                             "publish_wait_ms": 1e3 * float(np.median(waits)),
                             "slot_write_ms": 1e3 * float(np.median(slot_writes)),
                             "learner_step_ms": 1e3 * float(np.median(steps)),
                             "sampler_slot_reads": reads[0], "sampler_disk_reads": reads[1]}
        finally:
            cluster.close()
    shm, disk = out["shm"], out["disk"]
    # The learner step of the run: both halves ran the same update on the same batch.
    step_ms = float(np.median([shm["learner_step_ms"], disk["learner_step_ms"]]))
    out.update(latency_ms=shm["latency_ms"], disk_latency_ms=disk["latency_ms"], learner_step_ms=step_ms,
               publish_ms=shm["publish_ms"], disk_publish_ms=disk["publish_ms"],
               latency_vs_learner_step=shm["latency_ms"] / step_ms,
               disk_latency_vs_learner_step=disk["latency_ms"] / step_ms,
               speedup_vs_disk=disk["latency_ms"] / shm["latency_ms"])
    return out


def _queue_group(key: str, n: int, length: int, rng, start_version: int = 0):
    """One realistic queue item: a group of `n` trajectories of `length` tokens (the default task's
    longest episodes), with the metadata a sampler attaches."""
    from jaxrl_async.rollout.trajectory import Trajectory
    from jaxrl_async.runtime.spool import Item

    trajs = [Trajectory(tokens=rng.integers(4, 200, length).astype(np.int32), loss_mask=rng.random(length) < 0.6,
                        behav_logp=-rng.random(length).astype(np.float32),
                        versions=rng.integers(-1, 3, length).astype(np.int32), reward=float(rng.random()),
                        success=True, num_turns=3, group_id=0, task_seed=int(rng.integers(1 << 30)))
             for _ in range(n)]
    meta = {"sampler_id": 0, "batch": 0, "tokens_per_s": 1.0, "gate_wait_s": 0.0, "sample_s": 0.1,
            "weight_switches": 0, "proximal/sampler_stall_s": 0.0, "proximal/sampler_forward_passes": 0.0}
    return Item(key, trajs, start_version, meta)


def _make_queue(directory: str, capacity: int, fsync: bool, doorbell=None):
    """A TrajectoryQueue; the doorbell only where this version of the queue has one."""
    import inspect

    from jaxrl_async.runtime.spool import TrajectoryQueue

    kwargs = {"fsync": fsync}
    if doorbell is not None and "doorbell" in inspect.signature(TrajectoryQueue).parameters:
        kwargs["doorbell"] = doorbell
    return TrajectoryQueue(directory, capacity, **kwargs)


def _queue_producer(directory: str, fsync: bool, doorbell, count: int, interval_s: float, n: int,
                    length: int) -> None:
    """Producer process of the hand-off latency benchmark: a put every `interval_s`, each item
    stamped (time.monotonic) just before its put."""
    rng = np.random.default_rng(1)
    tq = _make_queue(directory, 10**6, fsync, doorbell)
    for i in range(count):
        time.sleep(interval_s)
        item = _queue_group(f"lat-{i}", n, length, rng)
        item.meta["put_t"] = time.monotonic()
        tq.put(item)


def bench_queue(items: int = 48, latency_items: int = 40) -> dict:
    """The trajectory hand-off on its own, default group shape (`rl.group_size` trajectories of
    `model.max_len` tokens), in a spool on this machine's disk:

    - what its parts cost: pickling and unpickling one group, writing, fsyncing and renaming
      its file, fsyncing a directory, listing the spool (the raw operations, whatever the
      queue does with them);
    - a producer's `put`, and one learner step's takes (`rl.groups_per_step` groups arriving
      `runtime.sampler_groups` at a time, taken as the process runtime takes them), with and
      without fsync;
    - hand-off latency: from the start of a put in a producer process to the group in the
      learner's hands, the learner waiting in the process runtime's loop (doorbell, where
      the queue has one; else polling).
    """
    import multiprocessing as mp
    import pickle
    import shutil

    from jaxrl_async.config import base_config
    from jaxrl_async.runtime.spool import TrajectoryQueue

    c = base_config()
    n, length = c.rl.group_size, c.model.max_len
    g, k = c.rl.groups_per_step, c.runtime.sampler_groups
    rng = np.random.default_rng(0)
    out = {"group_size": n, "tokens": length, "groups_per_step": g, "arrivals_per_step": -(-g // k)}
    doorbell_api = hasattr(TrajectoryQueue, "wait")
    out["doorbell"] = doorbell_api
    root = tempfile.mkdtemp()
    try:
        # --- the raw operations
        item = _queue_group("raw", n, length, rng)
        data = pickle.dumps(item, protocol=5)
        out["item_bytes"] = len(data)
        raw = {k: [] for k in ("pickle", "unpickle", "write", "fsync_file", "rename", "fsync_dir", "read", "listdir")}
        d = os.path.join(root, "raw")
        os.makedirs(d)
        for i in range(items):
            t0 = time.perf_counter()
            blob = pickle.dumps(item, protocol=5)
            t1 = time.perf_counter()
            pickle.loads(blob)
            t2 = time.perf_counter()
            tmp = os.path.join(d, f".tmp{i}")
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                t3 = time.perf_counter()
                os.fsync(f.fileno())
                t4 = time.perf_counter()
            os.replace(tmp, os.path.join(d, f"{i}.item"))
            t5 = time.perf_counter()
            fd = os.open(d, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            t6 = time.perf_counter()
            with open(os.path.join(d, f"{i}.item"), "rb") as f:
                f.read()
            t7 = time.perf_counter()
            os.listdir(d)
            t8 = time.perf_counter()
            for name, dt in zip(raw, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7)):
                raw[name].append(dt)
        out["raw_ms"] = {name: 1e3 * float(np.median(v)) for name, v in raw.items()}

        # --- put and one step's takes, through the queue
        for fsync in (True, False):
            d = os.path.join(root, f"api-{int(fsync)}")
            tq = _make_queue(d, 10**6, fsync)
            timing0 = dict(getattr(tq, "timing", {}))
            puts = []
            for i in range(items):
                it = _queue_group(f"k{i}", n, length, rng)
                t0 = time.perf_counter()
                tq.put(it)
                puts.append(time.perf_counter() - t0)
            steps = []
            for step in range(items // g):
                tq.set_step(step)
                t0 = time.perf_counter()
                for _ in range(-(-g // k)):
                    if doorbell_api:
                        tq.take(k, timeout=0, sync=False)
                    else:
                        tq.take(k, timeout=0)
                if doorbell_api:
                    tq.sync()
                steps.append(time.perf_counter() - t0)
            row = {"put_ms": 1e3 * float(np.median(puts)), "take_step_ms": 1e3 * float(np.median(steps))}
            if doorbell_api:
                spent = {key: 1e3 * (tq.timing[key] - timing0.get(key, 0.0)) for key in tq.timing}
                row["put_parts_ms"] = {key[4:-2]: v / items for key, v in spent.items() if key.startswith("put_")}
                row["put_ms_mean"] = 1e3 * float(np.mean(puts))
                row["take_parts_ms_per_step"] = {key[5:-2]: v / len(steps) for key, v in spent.items()
                                                 if key.startswith("take_")}
            out["fsync" if fsync else "no_fsync"] = row

        # --- hand-off latency: producer process -> learner loop
        ctx = mp.get_context("spawn")
        for fsync in (True, False):
            d = os.path.join(root, f"lat-{int(fsync)}")
            doorbell = ctx.Semaphore(0) if doorbell_api else None
            tq = _make_queue(d, 10**6, fsync, doorbell)
            proc = ctx.Process(target=_queue_producer, daemon=True,
                               args=(d, fsync, doorbell, latency_items, 0.02, n, length))
            proc.start()
            lat, deadline = [], time.monotonic() + 120
            while len(lat) < latency_items and time.monotonic() < deadline:
                if tq.depth() == 0:  # as ProcessRuntime.next_groups waits and takes
                    if doorbell_api:
                        tq.wait()
                    else:
                        time.sleep(0.01)
                    continue
                for it in (tq.take(1, timeout=0, sync=False) if doorbell_api else tq.take(1, timeout=0)):
                    lat.append(time.monotonic() - it.meta["put_t"])
                if doorbell_api and len(lat) % g == 0:
                    tq.sync()  # once per learner step
            proc.join(30)
            out[f"latency_{'fsync' if fsync else 'no_fsync'}_ms"] = {
                "median": 1e3 * float(np.median(lat)), "p90": 1e3 * float(np.percentile(lat, 90)),
                "max": 1e3 * float(np.max(lat)), "items": len(lat)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def bench_learner_host(steps: int = 12) -> dict:
    """The learner's own part of a step, default model and batch, no sampler running: realistic
    trajectories (`G * n` of random lengths up to `max_len`) through what `RLCluster.train_step`
    does after the batch arrives: collate and advantages, the proximal route (the batch's one
    transfer to the device), the update until its params are ready, publishing the new version
    (shared-memory slot + ring-buffer copy), and fetching the metrics. Medians over `steps`."""
    from jaxrl_async.cluster import RLCluster, batch_from
    from jaxrl_async.config import base_config
    from jaxrl_async.rollout.trajectory import Trajectory

    c = base_config()
    c.warmstart.enabled = False
    c.runtime.mode = "process"
    b = c.rl.groups_per_step * c.rl.group_size
    rng = np.random.default_rng(0)
    names = ("collate", "route", "update", "publish", "metrics")
    parts = {k: [] for k in names}
    quiet = {k: [] for k in names}  # the same, with the previous ring-buffer write landed first
    with tempfile.TemporaryDirectory() as workdir:
        cluster = RLCluster(c, workdir, log=lambda *a: None)
        try:
            t_max = cluster.model_config.max_len
            for step in range(2 * steps + 2):
                if step >= steps + 2:
                    cluster.store.flush()  # untimed: this step's host work runs without the writer thread
                v = int(cluster.state.version)
                trajs = []
                for i in range(b):
                    length = int(rng.integers(t_max // 2, t_max + 1))
                    mask = rng.random(length) < 0.6
                    trajs.append(Trajectory(
                        tokens=rng.integers(4, cluster.model_config.vocab_size, length).astype(np.int32),
                        loss_mask=mask, behav_logp=np.where(mask, -1.5, 0.0).astype(np.float32),
                        versions=np.where(mask, v, -1).astype(np.int32), reward=float(rng.random()), success=True,
                        num_turns=2, group_id=i // c.rl.group_size, task_seed=i))
                t0 = time.perf_counter()
                host = batch_from(trajs, c, t_max)
                t1 = time.perf_counter()
                batch, _ = cluster.route(cluster.state, host, v)
                t2 = time.perf_counter()
                cluster.state, m = cluster.update(cluster.state, batch, jax.random.fold_in(cluster.k_update, step),
                                                  cluster.route.ewma_beta)
                jax.block_until_ready(cluster.state.params)
                t3 = time.perf_counter()
                cluster.publish(v + 1)
                t4 = time.perf_counter()
                {k: float(x) for k, x in jax.device_get(m).items()}
                t5 = time.perf_counter()
                if step >= 2:  # the first two compile
                    for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                        (parts if step < steps + 2 else quiet)[name].append(dt)
            cluster.store.flush()
        finally:
            cluster.close()
    out = {f"{name}_ms": 1e3 * float(np.median(v)) for name, v in parts.items()}
    out["host_ms"] = out["collate_ms"] + out["route_ms"] + out["publish_ms"] + out["metrics_ms"]
    # Without the background ring-buffer write of the previous version competing for the GIL.
    out["no_writer"] = {f"{name}_ms": 1e3 * float(np.median(v)) for name, v in quiet.items()}
    out["no_writer"]["host_ms"] = sum(out["no_writer"][f"{k}_ms"] for k in ("collate", "route", "publish", "metrics"))
    out["steps"] = steps
    return out


def _print_queue(res):
    res["queue"] = r = bench_queue()
    res["learner_host"] = h = bench_learner_host()
    print(f"trajectory hand-off, one group = {r['group_size']} trajectories of {r['tokens']} tokens "
          f"({r['item_bytes'] / 1024:.1f} KiB pickled), spool on this machine's disk; medians")
    raw = r["raw_ms"]
    print("| part | ms |\n|---|---:|")
    for name, label in (("pickle", "pickle a group"), ("unpickle", "unpickle a group"), ("write", "write its file"),
                        ("fsync_file", "fsync the file"), ("rename", "rename (the commit)"),
                        ("fsync_dir", "fsync a directory"), ("read", "read a file"), ("listdir", "list the spool")):
        print(f"| {label} | {raw[name]:.3f} |")
    print()
    print(f"| queue | put ms (producer) | one learner step's takes ms ({r['groups_per_step']} groups in "
          f"{r['arrivals_per_step']} arrivals) | hand-off latency, put start to learner, median ms | p90 ms |\n"
          "|---|---:|---:|---:|---:|")
    for key, label in (("fsync", "fsync (default)"), ("no_fsync", "no fsync")):
        lat = r[f"latency_{key}_ms"]
        print(f"| {label} | {r[key]['put_ms']:.3f} | {r[key]['take_step_ms']:.3f} | {lat['median']:.2f} | "
              f"{lat['p90']:.2f} |")
    wake = "doorbell (semaphore posted after each put)" if r["doorbell"] else "polling every 10 ms"
    print(f"the learner wakes by: {wake}")
    if "put_parts_ms" in r["fsync"]:
        for key in ("fsync", "no_fsync"):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r[key]["put_parts_ms"].items())
            takes = ", ".join(f"{k} {v:.3f}" for k, v in r[key]["take_parts_ms_per_step"].items() if k != "wait")
            print(f"{key}: per put (ms): {parts}; per learner step (ms): {takes}")
    print()
    print("the learner's own part of a step, default model and batch, no sampler running (medians, ms)\n"
          "| | collate + advantages | route (batch to device) | update (to params ready) | publish | metrics | "
          "host work (all but update) |\n|---|---:|---:|---:|---:|---:|---:|")
    print("| as in training (the previous version's ring-buffer write in flight) | "
          f"{h['collate_ms']:.2f} | {h['route_ms']:.2f} | {h['update_ms']:.1f} | {h['publish_ms']:.2f} | "
          f"{h['metrics_ms']:.2f} | {h['host_ms']:.2f} |")
    q = h["no_writer"]
    print("| the previous write landed first (untimed) | "
          f"{q['collate_ms']:.2f} | {q['route_ms']:.2f} | {q['update_ms']:.1f} | {q['publish_ms']:.2f} | "
          f"{q['metrics_ms']:.2f} | {q['host_ms']:.2f} |\n")


def _print_loss(res):
    res["loss"] = r = bench_loss(256, 512)
    print(f"policy_loss forward+backward, jitted, [B, T] = {r['shape']}; baseline rlax.clipped_surrogate_pg_loss")
    print("| loss | ms | vs rlax |\n|---|---|---|")
    print(f"| rlax clipped PPO | {r['rlax_ms']:.3f} | 1.00 |")
    print(f"| policy_loss, plain config (values equal to rlax: {r['values_equal']}) | {r['ours_plain_ms']:.3f} | "
          f"{r['plain_vs_rlax']:.2f} |")
    print(f"| policy_loss, every mode on | {r['ours_all_modes_ms']:.3f} | {r['all_modes_vs_rlax']:.2f} |\n")


def _print_decode(res):
    res["decode"] = r = bench_decode(64, 64)
    print(f"decoding, default model, batch {r['batch']}, {r['tokens']} tokens; baseline full re-forward per token")
    print("| decoding | tokens/s | ms per decode step | vs re-forward |\n|---|---|---|---|")
    print(f"| full re-forward | {r['re_forward_tok_s']:.0f} | {1e3 * r['batch'] / r['re_forward_tok_s']:.3f} | 1.00 |")
    print(f"| KV cache | {r['kv_cache_tok_s']:.0f} | {r['kv_cache_ms_per_step']:.3f} | {r['speedup']:.2f} |")
    print(f"| sampler rollout, default task (device decode loop; slot-steps/s) | {r['sampler_slot_tok_s']:.0f} | "
          f"{r['sampler_ms_per_step']:.3f} | |\n")
    print(f"sampler: {r['sampler_ms_per_step'] / r['kv_cache_ms_per_step']:.2f}x the KV-cache step per decode step; "
          f"{r['sampler_rollout_ms']:.1f} ms per rollout of {r['sampler_decode_steps']:.0f} decode steps, "
          f"{r['sampler_generated_tok_s']:.0f} generated tokens/s, {r['sampler_loop_calls']:.1f} device-loop calls "
          f"(host round trips) and {r['sampler_prefill_calls']:.1f} prefills per rollout\n")
    print(f"{2 * r['batch']} episodes through {r['batch']} slots (continuous batching): "
          f"{r['continuous_rollout_ms']:.1f} ms, {r['continuous_decode_steps']:.0f} decode steps, "
          f"{r['continuous_generated_tok_s']:.0f} generated tokens/s; as two batches of {r['batch']}: "
          f"{r['two_batches_rollout_ms']:.1f} ms, {r['two_batches_decode_steps']:.0f} decode steps, "
          f"{r['two_batches_generated_tok_s']:.0f} generated tokens/s\n")


def _print_learner(res):
    res["learner"] = rows = bench_learner()
    kind = ("forced host-platform devices (on a CPU they share the same cores)" if jax.default_backend() == "cpu"
            else f"{jax.default_backend()} devices")
    print(f"learner RL update, default model and batch (128 x 64 tokens), {kind}; baseline 1 device")
    print("| devices | step s | tokens/s | vs 1 device | compiled variants |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['devices']} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | {row['vs_1_device']:.2f} | "
              f"{row['compiles']} |")
    print()


def _print_learner_variants(res):
    res["learner_variants"] = rows = bench_learner_variants()
    print(f"learner performance work, before/after: the same {rows[0]['batches']} RL batches (default model, "
          f"128 rows, longest episode varying over {rows[0]['distinct_lengths']} lengths), 1 device")
    print("| variant | total s (compiles included) | first step s | steady step s | compiled variants |\n"
          "|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['total_s']:.2f} | {row['first_step_s']:.2f} | {row['steady_step_s']:.3f} | "
              f"{row['compiles']} |")
    print()


def _print_async(res, steps: int):
    res["async_vs_sync"] = r = bench_async_vs_sync(steps)
    print(f"end to end, default task, {steps} RL steps, no warm start; baseline inline (synchronous)")
    print("| runtime | episodes/s | vs sync |\n|---|---|---|")
    print(f"| inline (sync) | {r['inline']['episodes_per_s']:.1f} | 1.00 |")
    print(f"| process (async, 1 sampler) | {r['process']['episodes_per_s']:.1f} | {r['async_vs_sync']:.2f} |")
    print(f"| ideal overlap bound (T_sample + T_train) / max(...) from the inline run | | "
          f"{r['ideal_overlap_bound']:.2f} |")
    print(f"async/sync as a share of the overlap bound: {r['async_vs_overlap_bound']:.2f}\n")
    i, p = r["inline"], r["process"]
    print("where a step goes (s, means over steps 2+)\n| runtime | step | sampling / waiting for data | "
          "update, host work, publish | of which publish | learner idle |\n|---|---|---|---|---|---|")
    print(f"| inline | {i['step_s']:.3f} | {i['sample_s']:.3f} (sampling) | {i['train_s']:.3f} | | |")
    print(f"| process | {p['step_s']:.3f} | {p['learner_wait_s']:.3f} (waiting) | {p['train_s']:.3f} | "
          f"{p['publish_s']:.4f} | {p['idle_frac']:.0%} |\n")
    print("the asynchronous learner's step in parts (ms, means over steps 2+)\n| waiting for data | of which "
          "blocked on the queue | queue work (list, rename, read, unpickle, fsync) | of which read + unpickle | "
          "of which fsync | collate | route (batch to device) | update | publish | metrics |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("| " + " | ".join(f"{1e3 * p[k]:.2f}" for k in (
        "learner_wait_s", "queue_wait_s", "queue_take_s", "queue_read_s", "queue_sync_s", "collate_s", "route_s",
        "update_s", "publish_s", "metrics_s")) + " |\n")


def _print_handoff(res):
    res["handoff"] = r = bench_handoff()
    print(f"weight hand-off, default model, {r['versions']} versions: publish to first use by a sampler process "
          f"(median); baseline the ring buffer on disk only")
    print("| path | publish to first use ms | max ms | learner critical path ms | vs disk | vs learner step |\n"
          "|---|---|---|---|---|---|")
    print(f"| ring buffer only (Orbax save + SHA-256, sampler restores) | {r['disk_latency_ms']:.2f} | "
          f"{r['disk']['latency_max_ms']:.2f} | {r['disk_publish_ms']:.2f} | 1.00 | "
          f"{r['disk_latency_vs_learner_step']:.3f} |")
    print(f"| shared-memory slot (Orbax in the background) | {r['latency_ms']:.2f} | "
          f"{r['shm']['latency_max_ms']:.2f} | {r['publish_ms']:.2f} | {1 / r['speedup_vs_disk']:.3f} | "
          f"{r['latency_vs_learner_step']:.3f} |")
    print(f"learner step (same run, median): {r['learner_step_ms']:.1f} ms; of the slot path's critical path "
          f"(medians): {r['shm']['slot_write_ms']:.2f} ms writing the slot, {r['shm']['publish_wait_ms']:.2f} ms "
          f"waiting for the previous background Orbax write\n")


SECTIONS = {"loss": _print_loss, "decode": _print_decode, "learner": _print_learner,
            "learner_variants": _print_learner_variants, "async": _print_async, "handoff": _print_handoff,
            "queue": _print_queue}


def run(json_path: str = "runs/bench_kernels.json", async_steps: int = 20, sections=tuple(SECTIONS)) -> dict:
    """Runs `sections` (names in SECTIONS) in order, printing their tables; writes and returns the results."""
    sections = list(sections)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; allowed: {', '.join(SECTIONS)}")
    print(f"machine: {machine()}\n")
    res = {"machine": machine(), "sections": sections}
    for name, section in SECTIONS.items():
        if name == "async" and name in sections:
            section(res, async_steps)
        elif name in sections:
            section(res)
    res["peak_rss_mib"] = peak_rss_mib()
    print(f"peak resident memory of this process: {res['peak_rss_mib']:.0f} MiB")
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    # Sections not run this time keep their last results (e.g. `decode` after `--sections=handoff`).
    try:
        with open(json_path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = {}
    merged = {**old, **res}
    merged["machine_by_section"] = {**old.get("machine_by_section", {}), **{name: res["machine"] for name in sections}}
    with open(json_path, "w") as f:
        json.dump(merged, f, indent=2)
    return res


def main(argv):
    """`python -m benchmarks.kernels`: the flags are defined below, in `__main__`."""
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # as before absl: no INFO lines from XLA and Orbax
    try:
        run(FLAGS.json, FLAGS["async-steps"].value, FLAGS.sections)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("json", "runs/bench_kernels.json", "Where the results go (JSON).")
    flags.DEFINE_integer("async-steps", 20, "RL steps of each runtime in the async section.", lower_bound=1)
    flags.DEFINE_list("sections", list(SECTIONS), f"Comma-separated subset of {', '.join(SECTIONS)}.")
    app.run(main)
