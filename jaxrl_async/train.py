"""Entry point: config in, warm start, RL loop, evaluation, checkpoints, logs.

    python -m jaxrl_async.train --config=configs/default.py --workdir=runs/default \
        [--config.train.steps=20 ...]

One learner loop serves both runtimes (`runtime.py`): each RL step takes a batch of
complete groups from the runtime, fills `prox_logp` from the configured proximal route
(`ProximalRoute`), applies the jitted update, publishes the new version into the ring
buffer, and logs, evaluates and checkpoints on schedule. In the inline runtime everything
random derives from (seed, step), so a run restored from its checkpoint continues exactly
as an uninterrupted run would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_async import advantages as adv_lib
from jaxrl_async import config as config_lib
from jaxrl_async import learner as learner_lib
from jaxrl_async import model as model_lib
from jaxrl_async import parallel
from jaxrl_async import proximal
from jaxrl_async import runtime as runtime_lib
from jaxrl_async import sampler_process
from jaxrl_async import metrics_log
from jaxrl_async import warmstart
from jaxrl_async.envs import make_env
from jaxrl_async.losses import LossConfig, policy_loss
from jaxrl_async.rollout import Sampler, Trajectory, collate
from jaxrl_async.versions import VersionEvicted, VersionStore


def loss_config_from(config) -> LossConfig:
    """The LossConfig of `config.loss` (which validates the loss fields)."""
    fields = config.loss.to_dict()
    for band in ("token_mask", "seq_mask"):
        if fields[band] is not None:
            fields[band] = tuple(float(x) for x in fields[band])
    return LossConfig(**fields)


def model_config_from(config) -> model_lib.ModelConfig:
    from jaxrl_async.envs.tokenizer import TOKENIZER

    return model_lib.ModelConfig(vocab_size=TOKENIZER.vocab_size, **config.model.to_dict())


def numerics_from(config) -> model_lib.Numerics:
    return model_lib.Numerics(**config.numerics.to_dict())


def env_factory(config):
    kwargs = config.task.kwargs.to_dict()
    return lambda: make_env(config.task.name, **kwargs)


def _check_startup(config, workdir: str):
    """Validates everything that can be checked before compiling or sampling; returns the typed configs."""
    config_lib.validate(config)
    loss_config = loss_config_from(config)
    model_config = model_config_from(config)
    numerics = numerics_from(config)
    devices = parallel.make_mesh(config.parallel.num_devices).devices.size  # raises if there are too few
    if (config.rl.groups_per_step * config.rl.group_size) % devices:
        raise ValueError(f"the RL batch rl.groups_per_step * rl.group_size = "
                         f"{config.rl.groups_per_step * config.rl.group_size} must split evenly over "
                         f"{devices} devices (config.parallel.num_devices)")
    env = env_factory(config)()  # builds the task once: bad task names or kwargs fail here
    if env.max_episode_tokens > model_config.max_len:
        raise ValueError(f"config.model.max_len ({model_config.max_len}) is shorter than the longest possible "
                         f"episode of task {config.task.name!r} ({env.max_episode_tokens} tokens)")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable: {e}") from e
    return loss_config, model_config, numerics


def episode_advantages(trajs: list[Trajectory], config) -> np.ndarray:
    """Episode advantages `[B]` from rewards, computed per group of `rl.group_size` samples."""
    g, n = config.rl.groups_per_step, config.rl.group_size
    rewards = np.asarray([t.reward for t in trajs], np.float32).reshape(g, n)
    if config.rl.advantage == "grpo":
        adv = adv_lib.group_relative(rewards, normalize_std=config.rl.normalize_std)
    else:
        adv = adv_lib.rloo(rewards)
    return np.asarray(adv, np.float32).reshape(-1)


def rollout_metrics(trajs: list[Trajectory], version: int, runtime_config) -> dict:
    """`rollout/...` and `staleness/...` metrics of one batch of trajectories at learner `version`."""
    gen_versions = np.concatenate([t.versions[t.loss_mask] for t in trajs])
    staleness = version - gen_versions if gen_versions.size else np.zeros(1, np.int64)
    bound = runtime_config.max_staleness if runtime_config.mode == "process" else runtime_config.lag + 1
    return {
        "rollout/success_rate": float(np.mean([t.success for t in trajs])),
        "rollout/return_mean": float(np.mean([t.reward for t in trajs])),
        "rollout/episode_tokens_mean": float(np.mean([t.length for t in trajs])),
        "rollout/generated_tokens_mean": float(np.mean([t.loss_mask.sum() for t in trajs])),
        "rollout/turns_mean": float(np.mean([t.num_turns for t in trajs])),
        "rollout/partial_frac": float(np.mean([t.is_partial for t in trajs])),
        "staleness/mean": float(staleness.mean()),
        "staleness/max": float(staleness.max()),
        # token counts at staleness 0, 1, ..., bound
        "staleness/hist": np.bincount(np.clip(staleness, 0, bound), minlength=bound + 1).tolist(),
    }


def evaluate(graphdef, model_config, numerics, params, version: int, config, key) -> dict[str, float]:
    """Success rate and return of `params` in the sampler's numerics on the fixed held-out task seeds."""
    make = env_factory(config)
    n = config.eval.episodes
    seeds = [config.eval.seed_offset + i for i in range(n)]
    eval_sampler = Sampler(graphdef, model_config, numerics, config.eval.temperature)
    eval_sampler.update_params(params, version)
    trajs, _ = eval_sampler.generate([make() for _ in range(n)], seeds, list(range(n)), key)
    return {
        "eval/success_rate": float(np.mean([t.success for t in trajs])),
        "eval/return": float(np.mean([t.reward for t in trajs])),
        "eval/turns_mean": float(np.mean([t.num_turns for t in trajs])),
    }


class _Checkpoints:
    """Orbax checkpoints of the full train state plus JSON metadata (evaluations, counters)."""

    def __init__(self, workdir: str, keep: int):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def restore(self, step: int, state_target):
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_target), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        self.manager.close()


class ProximalRoute:
    """Fills `prox_logp` for a batch from the configured `proximal.source`, with its cost metrics.

    Exact routes: `snapshot` recomputes pi_old with each token's version from the ring
    buffer; `dedicated` and `interrupt` arrive with `old_logp` filled by the sampler side.
    Approximate routes: `recompute` (learner weights at the start of the step), `bypass`
    (behaviour log-probs), `loglinear` (interpolated inside the loss), `ewma` and
    `revised_ewma` (a forward pass with the EWMA weights of the train state). With
    `proximal.audit`, exact routes also log what `recompute` would have given, so the
    entanglement of staleness and mismatch is visible in every exact run.
    """

    AUDIT_KEYS = ("mask/token_frac", "mask/seq_frac", "mask/catastrophic_frac", "is/truncated_frac",
                  "is/weight_mean", "mismatch/kl_k1")

    def __init__(self, config, graphdef, store, loss_config, window: list, mesh=None):
        self.config = config
        self.mesh = mesh if mesh is not None else parallel.make_mesh(1)
        self.source = config.proximal.source
        self.graphdef = graphdef
        self.store = store
        self.loss_config = loss_config
        self.window = list(window)  # mean token staleness of recent batches (revised_ewma)
        self.ewma_beta = float(config.proximal.ewma_beta)
        self.steps_per_version = config.optim.num_minibatches * config.optim.num_epochs

    def _logp(self, params, tokens):
        return learner_lib.token_logprobs(self.graphdef, params, tokens)

    def __call__(self, state, batch: dict, version: int):
        """batch: collated numpy arrays plus `advantages`; returns (jnp batch with `prox_logp`, metrics)."""
        src, m = self.source, {}
        tokens = parallel.shard_rows({"tokens": batch["tokens"]}, self.mesh)["tokens"]
        passes, copies = 0, 0
        if src == "recompute":
            prox, passes = self._logp(state.params, tokens), 1
        elif src in ("bypass", "loglinear"):
            prox = batch["behav_logp"]  # loglinear: replaced inside the loss at every gradient step
        elif src in ("ewma", "revised_ewma"):
            prox, passes, copies = self._logp(state.ewma, tokens), 1, 1
            if src == "revised_ewma":
                self._match_beta(batch, version)
                m["proximal/ewma_beta"] = self.ewma_beta
        elif src == "snapshot":
            bytes_before = self.store.stats["bytes_read"]
            # Each version's forward runs on the learner's mesh: its rows sharded, its weights replicated.
            prox, missing, passes, rows = proximal.snapshot_logp(
                lambda p, t: self._logp(parallel.replicate(p, self.mesh),
                                        parallel.shard_rows({"t": t}, self.mesh)["t"]),
                self.store.get, batch["tokens"], batch["versions"], batch["loss_mask"], missing=(VersionEvicted,),
                row_multiple=self.mesh.devices.size)
            if missing.any() and self.config.proximal.on_evicted == "fail":
                raise RuntimeError(f"proximal.source='snapshot': {int(missing.sum())} episodes hold versions no "
                                   f"longer in the ring buffer (retained: {self.store.versions()}); raise "
                                   f"runtime.ring_capacity or set proximal.on_evicted='drop'")
            batch["loss_mask"] = batch["loss_mask"] & ~missing[:, None]  # dropped episodes train nothing
            copies = len(np.unique(batch["versions"][batch["loss_mask"]]))
            m["proximal/dropped_episodes"] = float(missing.sum())
            m["proximal/rows_scored"] = float(rows)
            m["proximal/bytes_read"] = float(self.store.stats["bytes_read"] - bytes_before)
        else:  # dedicated, interrupt: filled by the sampler side
            if "old_logp" not in batch:
                raise RuntimeError(f"proximal.source={src!r} but the trajectories arrived without old_logp")
            prox, copies = batch["old_logp"], 1
        m["proximal/forward_passes"] = float(passes)
        m["proximal/param_copies"] = float(copies)
        out = {k: batch[k] for k in learner_lib.BATCH_KEYS if k != "prox_logp"}
        out["prox_logp"] = jnp.asarray(prox, jnp.float32)
        out = parallel.shard_rows(out, self.mesh)  # rows over the `data` axis of the learner's mesh
        if src in proximal.EXACT_SOURCES and self.config.proximal.audit:
            recompute = self._logp(state.params, tokens)
            for name, p in (("exact", out["prox_logp"]), ("recompute", recompute)):
                audit = _discrepancy_metrics(p, out["behav_logp"], out["advantages"], out["loss_mask"],
                                             self.loss_config)
                m.update({f"audit/{name}/{k}": float(audit[k]) for k in self.AUDIT_KEYS})
        return out, m

    def _match_beta(self, batch, version: int) -> None:
        """Revised EWMA: the decay whose average age matches the recent mean token staleness."""
        gen = batch["loss_mask"]
        if gen.any():
            self.window = (self.window + [float((version - batch["versions"][gen]).mean())])[
                -self.config.proximal.staleness_window:]
        s = (np.mean(self.window) if self.window else 0.0) * self.steps_per_version  # in optimizer steps
        self.ewma_beta = float(proximal.matched_beta(s, self.config.proximal.beta_min,
                                                     self.config.proximal.beta_max))


@functools.partial(jax.jit, static_argnames=("loss_config",))
def _discrepancy_metrics(prox, behav, advantages, mask, loss_config):
    # The discrepancy statistics depend only on prox and behav; logp = prox makes r = 1.
    return policy_loss(prox, prox, behav, advantages, mask, loss_config)[1]


def warmstart_params(config, graphdef, params, model_config, workdir: str, log) -> tuple:
    """The warm-started params and metrics, from `warmstart.cache_dir` when it holds this setting.

    The cache key covers everything the warm start depends on (task, model, warm-start
    settings, seed), so runs that differ only after the warm start (routes, runtimes,
    loss settings) share one warm start.
    """
    cache = config.warmstart.cache_dir
    if not cache:
        return run_warmstart(config, graphdef, params, model_config, workdir, log)
    keyed = {k: config[k].to_dict() for k in ("task", "model", "warmstart")}
    keyed.update(seed=config.seed, grad_clip=config.optim.grad_clip, max_len=model_config.max_len)
    keyed["warmstart"].pop("cache_dir")
    key = hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.abspath(os.path.join(cache, key))
    checkpointer = ocp.StandardCheckpointer()
    if os.path.exists(os.path.join(path, "metrics.json")):
        log(f"warm start: cached in {path}")
        restored = checkpointer.restore(os.path.join(path, "params"), params)
        with open(os.path.join(path, "metrics.json")) as f:
            return restored, json.load(f)
    out, metrics = run_warmstart(config, graphdef, params, model_config, workdir, log)
    os.makedirs(path, exist_ok=True)
    checkpointer.save(os.path.join(path, "params"), out, force=True)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, "metrics.json"), "w") as f:  # written last: marks the entry complete
        json.dump(metrics, f)
    return out, metrics


def run_warmstart(config, graphdef, params, model_config, workdir: str, log) -> tuple:
    """Supervised warm start on cached noisy demonstrations; returns (params, metrics)."""
    ws = config.warmstart
    rng = np.random.default_rng([config.seed, 7])
    seeds = rng.integers(0, config.eval.seed_offset, ws.episodes)
    demos = warmstart.cached_demonstrations(
        os.path.join(workdir, "demonstrations.npz"), make_env=env_factory(config), task_seeds=seeds,
        noise=ws.noise, seed=config.seed, max_len=model_config.max_len)
    optimizer = learner_lib.make_optimizer(ws.learning_rate, config.optim.grad_clip)
    state = learner_lib.create_train_state(params, optimizer)
    update = learner_lib.make_sft_update(graphdef, optimizer)
    t0 = time.perf_counter()
    nll = []
    for i in range(ws.steps):
        idx = rng.integers(0, ws.episodes, ws.batch_size)
        state, m = update(state, {k: jnp.asarray(v[idx]) for k, v in demos.items()})
        nll.append(float(m["sft/nll"]))
        if (i + 1) % 50 == 0 or i + 1 == ws.steps:
            log(f"warm start {i + 1}/{ws.steps}: nll {np.mean(nll[-50:]):.3f}")
    return state.params, {"warmstart/nll_final": float(np.mean(nll[-20:])), "warmstart/wall_s": time.perf_counter() - t0}


def train_and_evaluate(config, workdir: str, resume: bool = True, progress: bool = True) -> dict:
    """Trains `config` in `workdir` (restoring its latest checkpoint when `resume`); returns the summary."""
    loss_config, model_config, numerics = _check_startup(config, workdir)
    t_start = time.perf_counter()
    log = print if progress else (lambda *a: None)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))

    graphdef, init_params = model_lib.init_model(model_config, config.seed)
    optimizer = learner_lib.make_optimizer(config.optim.learning_rate, config.optim.grad_clip,
                                           config.optim.weight_decay)
    ckpt = _Checkpoints(workdir, config.train.keep_checkpoints)
    start = ckpt.latest_step() if resume else None
    source = config.proximal.source
    uses_ewma = source in ("ewma", "revised_ewma")
    state = learner_lib.create_train_state(init_params, optimizer, ewma=uses_ewma)
    if start is None:
        runtime_lib.reset_dirs(workdir)
    store = VersionStore(sampler_process.versions_dir(workdir), runtime_lib.ring_capacity(config), init_params,
                         writer=True)
    if start is not None:
        state, meta = ckpt.restore(start, state)
        # Versions published after the checkpoint belong to the lost future; the ring buffer
        # keeps versions up to the checkpoint, which the sampler reads as before.
        store.truncate_after(start)
        log(f"resumed from checkpoint at step {start}")
    else:
        start, meta = 0, {"epoch": -1}
        if config.warmstart.enabled:
            params, ws_metrics = warmstart_params(config, graphdef, init_params, model_config, workdir, log)
            meta.update(ws_metrics)
            state = learner_lib.create_train_state(params, optimizer, ewma=uses_ewma)
        store.publish(0, state.params)
    meta["epoch"] += 1  # one more (re)start of this run
    mesh = parallel.make_mesh(config.parallel.num_devices)
    state = parallel.replicate(state, mesh)

    update = learner_lib.make_rl_update(graphdef, optimizer, loss_config, config.optim.num_minibatches,
                                        config.optim.num_epochs, loglinear=source == "loglinear")
    prox_route = ProximalRoute(config, graphdef, store, loss_config, meta.get("staleness_window", []), mesh)
    g_n = config.rl.groups_per_step * config.rl.group_size
    key = jax.random.key(config.seed)
    k_sample, k_update, k_eval = jax.random.split(key, 3)
    if config.runtime.mode == "inline":
        sampler, scorer = runtime_lib.make_sampler(config, graphdef, model_config, numerics, workdir, g_n)
        runtime = runtime_lib.InlineRuntime(config, sampler, store, env_factory(config), k_sample, scorer)
    else:
        runtime = runtime_lib.ProcessRuntime(config, workdir, meta["epoch"], start if start else None)
    writer = metrics_log.MetricsWriter(workdir, keep_lines=int(meta.get("metrics_lines", 0)))
    evals = dict(meta.get("evals", {}))

    def do_eval(step):
        m = evaluate(graphdef, model_config, numerics, state.params, step, config, jax.random.fold_in(k_eval, step))
        evals[str(step)] = m["eval/success_rate"]
        writer.write(step, m)

    from tqdm import tqdm

    wall_prev = float(meta.get("wall_seconds", 0.0))
    try:
        if start == 0:
            do_eval(0)
        runtime.start(int(state.version))
        bar = tqdm(range(start, config.train.steps), initial=start, total=config.train.steps,
                   disable=not progress, desc="RL", dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            v = int(state.version)
            trajs, info = runtime.next_groups(step, v)
            t_data = time.perf_counter()
            batch = collate(trajs, model_config.max_len)
            batch["advantages"] = adv_lib.broadcast_to_tokens(episode_advantages(trajs, config), batch["loss_mask"])
            batch, prox_metrics = prox_route(state, batch, v)
            state, metrics = update(state, batch, jax.random.fold_in(k_update, step), prox_route.ewma_beta)
            store.publish(v + 1, state.params)  # publish copies: the next update donates these buffers
            runtime.published(v + 1)
            metrics = {k: float(x) for k, x in metrics.items()}
            metrics.update(rollout_metrics(trajs, v, config.runtime))
            metrics.update(info)
            metrics.update(prox_metrics)
            metrics["perf/train_s"] = time.perf_counter() - t_data
            metrics["perf/step_s"] = time.perf_counter() - t0
            metrics["perf/learner_steps_per_s"] = 1.0 / metrics["perf/step_s"]
            done = step + 1
            if step % config.train.log_every == 0 or done == config.train.steps:
                writer.write(step, metrics)
            if done % config.train.eval_every == 0 or done == config.train.steps:
                do_eval(done)
            bar.set_postfix(sr=f"{metrics['rollout/success_rate']:.2f}", eval=f"{evals[max(evals, key=int)]:.2f}",
                            tok_s=f"{metrics['rollout/tokens_per_s']:.0f}")
            if done % config.train.checkpoint_every == 0 or done == config.train.steps:
                meta.update(evals=evals, metrics_lines=writer.lines, staleness_window=prox_route.window,
                            wall_seconds=wall_prev + time.perf_counter() - t_start)
                ckpt.save(done, state, meta)
                runtime.checkpointed(done)
        bar.close()
    finally:
        # Samplers stop before anything else closes, on success, error or Ctrl-C alike.
        runtime.close()
        writer.close()
        ckpt.close()

    steps_sorted = sorted(evals, key=int)
    summary = {
        "initial_success_rate": evals[steps_sorted[0]],
        "final_success_rate": evals[steps_sorted[-1]],
        "best_success_rate": max(evals.values()),
        "steps": int(state.version),
        "wall_seconds": wall_prev + time.perf_counter() - t_start,
        "warmstart": {k: v for k, v in meta.items() if k.startswith("warmstart/")},
        "evals": evals,
        "config": json.loads(config.to_json()),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    metrics_log.plot_learning_curve(workdir)
    log(f"success rate {summary['initial_success_rate']:.3f} -> {summary['final_success_rate']:.3f} "
        f"in {summary['steps']} steps, {summary['wall_seconds']:.0f} s; outputs in {workdir}")
    return summary


def main(argv):
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO

    parallel.initialize_distributed()  # several hosts: must come before any other JAX call
    config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    try:
        _check_startup(config, workdir)
    except ValueError as e:  # configuration errors: one clear line naming the field, no traceback
        raise SystemExit(f"error: {e}") from None
    train_and_evaluate(config, workdir, resume=flags.FLAGS.resume)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.", lock_config=True)
    flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints, metrics and summaries.")
    flags.DEFINE_bool("resume", True, "Restore the latest checkpoint in --workdir if there is one.")
    app.run(main)
