"""One call from a config to every component of a run: the assembly of the system.

`RLCluster(config, workdir)` validates the config and the machine (`check_startup`),
builds the model, optimizer, learner mesh and jitted update, the parameter-version ring
buffer, the proximal route and the runtime, and restores the latest checkpoint or runs
the warm start. `train_step(step)` is one RL step (batch in, update, new version
published); `evaluate(step)`, `save(step, meta)` and `close()` do the rest. The entry
point (`train.py`), the notebooks and the benchmarks all set up a run through it.

    cluster = RLCluster(config, workdir)        # resumes from workdir's checkpoint if any
    try:
        cluster.runtime.start(int(cluster.state.version))   # starts sampler processes or actors, if any
        for step in range(cluster.start_step, config.train.steps):
            metrics = cluster.train_step(step)
    finally:
        cluster.close()
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any, Optional

import jax
import numpy as np

from jaxrl_async import config as config_lib
from jaxrl_async.core import advantages as adv_lib
from jaxrl_async.core.proximal import Route
from jaxrl_async.learner import mesh as mesh_lib
from jaxrl_async.learner import update as learner_lib
from jaxrl_async.learner.checkpoints import CheckpointMismatch, Checkpoints
from jaxrl_async.learner.route import ProximalRoute
from jaxrl_async.learner.warmstart import warmstart_params
from jaxrl_async.rollout.evaluate import Evaluator, rollout_metrics
from jaxrl_async.rollout.trajectory import Batch, Trajectory, bucket_length, collate
from jaxrl_async.runtime import base as runtime_base
from jaxrl_async.runtime import groups as groups_lib
from jaxrl_async.runtime import handoff as handoff_lib
from jaxrl_async.runtime.base import Runtime
from jaxrl_async.runtime.handoff import WeightSlot
from jaxrl_async.runtime.inline import InlineRuntime
from jaxrl_async.runtime.process import ProcessRuntime
from jaxrl_async.runtime.versions import VersionEvicted, VersionStore


class ConfigError(ValueError):
    """A config or setup problem found at startup; the message names the field or path."""


def check_startup(config, workdir: str) -> None:
    """Validates everything that can be checked before compiling or sampling; raises ConfigError."""
    try:
        config_lib.validate(config)
        config_lib.loss_config_from(config)  # LossConfig checks the loss fields
        model_config = config_lib.model_config_from(config)
        config_lib.numerics_from(config)
        rows = mesh_lib.row_shards(mesh_lib.mesh_from_config(config))  # raises if there are too few devices
        if (config.rl.groups_per_step * config.rl.group_size) % rows:
            raise ValueError(f"the RL batch rl.groups_per_step * rl.group_size = "
                             f"{config.rl.groups_per_step * config.rl.group_size} must split evenly over "
                             f"{rows} devices (config.parallel.data * fsdp, or num_devices)")
        env = config_lib.env_factory(config)()  # builds the task once: bad task names or kwargs fail here
        if env.max_episode_tokens > model_config.max_len:
            raise ValueError(f"config.model.max_len ({model_config.max_len}) is shorter than the longest possible "
                             f"episode of task {config.task.name!r} ({env.max_episode_tokens} tokens)")
        if config_lib.vocab_size(config) > model_config.vocab_size:
            raise ValueError(f"the task's tokenizer has {config_lib.vocab_size(config)} tokens, more than the model's "
                             f"vocabulary ({model_config.vocab_size}): config.task.tokenizer does not fit config.model")
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if config.runtime.mode == "process":  # its samplers take weights from the shared-memory slot
        try:
            handoff_lib.check_platform()
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable: {e}") from None


# Fields that make a workdir's checkpoints another run's: they shape the train state (the model, the
# task's vocabulary) or the route's extra state (EWMA weights), or they change what is learned (the task).
_RUN_FIELDS = ("model.", "task.", "proximal.source", "proximal.anchor")
_ABSENT = "(absent)"


def _flat_json(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat_json(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(workdir: str, config) -> list[tuple[str, Any, Any]]:
    """(field, value in the workdir's config.json, value in `config`) for every field that differs;
    [] if the workdir has no readable config.json."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            old = _flat_json(json.load(f))
    except (OSError, ValueError):
        return []
    new = _flat_json(json.loads(config.to_json()))
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _show(v) -> str:
    return v if isinstance(v, str) and v else json.dumps(v)


def _changes_text(changes: list, limit: int = 5) -> str:
    lines = [f"  {k}: {_show(a)} -> {_show(b)}" for k, a, b in changes[:limit]]
    if len(changes) > limit:
        lines.append(f"  (and {len(changes) - limit} more)")
    return "\n".join(lines)


def check_resumable(workdir: str, config) -> None:
    """Raises ConfigError, in a few lines, if the workdir's config.json is another run's: one that
    differs from `config` in a field of `_RUN_FIELDS`. Called only when the workdir has checkpoints."""
    changes = config_changes(workdir, config)
    blocking = [ch for ch in changes if ch[0].startswith(_RUN_FIELDS)]
    if blocking:
        others = [ch for ch in changes if not ch[0].startswith(_RUN_FIELDS)]
        raise ConfigError(
            f"workdir {workdir} holds the checkpoints of a run of another config (its config.json), which "
            f"this config cannot resume:\n{_changes_text(blocking + others)}\n"
            f"Rerun with --noresume (resume=False) to start this config afresh in that workdir (its checkpoints "
            f"are removed), or pass another --workdir.")


def _has_checkpoints(workdir: str) -> bool:
    try:
        return any(name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
    except OSError:
        return False


def batch_from(trajs: list[Trajectory], config, max_len: int) -> Batch:
    """The host batch `[B, max_len]` of `trajs` with their per-token advantages (grouped by `group_id`).
    (`max_len`: the padded length, `model.max_len` or its length bucket, `trajectory.bucket_length`.)

    Discarded episodes (`Trajectory.discarded`, e.g. a user-simulator failure) never reach the
    loss: their rows keep their place (the batch shape, hence the compiled update, is unchanged)
    with the loss mask and advantages zeroed; their groups' baselines are the other members'
    (a group left with fewer than two is not trained: `kept_episode_advantages`). Every
    runtime's batches come through here.
    """
    batch = collate(trajs, max_len)
    adv, train = adv_lib.kept_episode_advantages([t.reward for t in trajs], [t.group_id for t in trajs],
                                                 [not t.discarded for t in trajs], config.rl.advantage,
                                                 config.rl.normalize_std)
    mask = batch.loss_mask & train[:, None]
    return batch.replace(loss_mask=mask, advantages=np.where(mask, adv[:, None], np.float32(0.0)).astype(np.float32))


class RLCluster:
    """Every component of one run, built from `config` in `workdir`.

    With `resume` the run continues from the workdir's latest checkpoint if there is one
    (a ConfigError if it is another config's run: `check_resumable`); without it the run
    starts fresh and the workdir's old checkpoints, versions and queue are removed.

    Attributes (after construction):
      config, workdir; loss_config, model_config, numerics: the typed config views.
      graphdef: the model's NNX graph definition; optimizer; mesh: the learner's device mesh.
      state: the learner's `TrainState` on the mesh (params and optimizer state split over its fsdp and
        tensor axes, `state_sharding`); meta: checkpoint metadata (evaluations, counters, `epoch` = how
        many times this run has (re)started, `memory/state_bytes_per_device`).
      start_step: the RL step this run continues from (0 for a fresh run).
      store: the parameter-version ring buffer (written in the background); handoff: the
        shared-memory `WeightSlot` the process runtime's samplers take new versions from
        (None for the inline and Ray runtimes); route: the `ProximalRoute`; update: the
        jitted RL update; runtime: the `Runtime` (inline, process or Ray); checkpoints.
    """

    def __init__(self, config, workdir: str, resume: bool = True, log: Callable = print):
        runtime_base.refuse_in_spawn_bootstrap()  # before anything touches the workdir
        check_startup(config, workdir)
        if resume and _has_checkpoints(workdir):
            # Another config's run is named as such first: before the model is built, and before Orbax
            # tries (and fails) to read its checkpoints.
            check_resumable(workdir, config)
        self.config, self.workdir, self.log = config, workdir, log
        self.loss_config = config_lib.loss_config_from(config)
        self.model_config = config_lib.model_config_from(config)
        self.numerics = config_lib.numerics_from(config)
        route = Route(config.proximal.source)
        anchor = config_lib.proximal_anchor(config)  # the three-term loss's PPO anchor, or None
        ewma = route.uses_ewma or (anchor is not None and anchor.uses_ewma)

        # The model family's module (transformer or llama) builds it; `model.checkpoint` supplies the weights.
        self.graphdef, init_params = config_lib.init_params(config, self.model_config)
        self.optimizer = learner_lib.make_optimizer(config.optim.learning_rate, config.optim.grad_clip,
                                                    config.optim.weight_decay)
        if not resume:  # a fresh run: the workdir's old checkpoints are void (Orbax would skip saving over them)
            shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
        self.checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
        # The train state on the learner mesh, split by the model's logical axes over fsdp and tensor
        # (replicated on a data-only mesh); created split, and checkpoints restore into that placement.
        self.mesh = mesh_lib.mesh_from_config(config)
        axes = config_lib.model_module(config).param_axes(init_params)
        state, self.state_sharding = mesh_lib.sharded_train_state(init_params, self.optimizer, self.mesh, axes, ewma)
        restored = None
        if resume and self.checkpoints.all_steps():
            try:
                # The newest intact checkpoint: corrupt newer ones are reported and set aside; if checkpoints
                # exist but none is intact this raises CheckpointCorrupt (a fresh start needs resume=False).
                # One of another shape (another config's, without a config.json to tell) is no corruption.
                restored = self.checkpoints.restore_latest(state, warn=log)
            except CheckpointMismatch as e:
                self.checkpoints.close()
                raise ConfigError(str(e)) from None
            changes = config_changes(workdir, config)
            if changes:
                log(f"resuming with changed settings:\n{_changes_text(changes)}")
        start: Optional[int] = restored[0] if restored is not None else None
        if start is None:
            runtime_base.reset_dirs(workdir)
        # Background writes: the learner hands the version over and goes on; the disk write (Orbax save,
        # SHA-256 manifest, rename) overlaps the next step. The process runtime's samplers take new
        # versions from shared memory (self.handoff), not from disk.
        self.store = VersionStore(runtime_base.versions_dir(workdir), runtime_base.ring_capacity(config),
                                  init_params, writer=True, background=True)
        if start is not None:
            _, state, meta = restored
            # Versions published after the checkpoint belong to the lost future; the ring buffer
            # keeps versions up to the checkpoint, which the sampler reads as before.
            self.store.truncate_after(start)
            for version, problem in self.store.remove_corrupt():
                log(f"warning: removed corrupt parameter version {version}: {problem}")
            if self.store.latest_version() != int(state.version):
                # The checkpoint's own version was evicted (or corrupt): publish it again, so the
                # samplers have the weights the learner continues from.
                self.store.publish(int(state.version), state.params)
            log(f"resumed from checkpoint at step {start}")
        else:
            start, meta = 0, {"epoch": -1}
            if config.warmstart.enabled:
                params, ws_metrics = warmstart_params(config, self.graphdef, init_params, self.model_config,
                                                      workdir, log)
                meta.update(ws_metrics)
                state, _ = mesh_lib.sharded_train_state(params, self.optimizer, self.mesh, axes, ewma)
            self.store.publish(0, state.params)
        self.store.flush()  # the version the run starts from is on disk before any reader starts
        self.handoff: Optional[WeightSlot] = None
        if config.runtime.mode == "process":
            self.handoff = WeightSlot.create(state.params)
            self.handoff.write(int(state.version), state.params)
        # One more (re)start of this run. The counter file also counts restarts that resumed from the
        # same checkpoint (a learner killed before its next save), so queue keys never repeat.
        last = groups_lib.read_epoch(workdir) if restored is not None else None
        meta["epoch"] = max(meta["epoch"], -1 if last is None else last) + 1
        groups_lib.write_epoch(workdir, meta["epoch"])
        self.meta, self.start_step = meta, start
        self.state = jax.device_put(state, self.state_sharding)  # a restored state may come back elsewhere
        self.meta["memory/state_bytes_per_device"] = mesh_lib.bytes_per_device(
            (self.state.params, self.state.opt_state, self.state.ewma))
        log(f"learner mesh {dict(self.mesh.shape)}: memory/state_bytes_per_device = "
            f"{self.meta['memory/state_bytes_per_device']:,} (params, optimizer state, EWMA)")

        self.update = learner_lib.make_rl_update(self.graphdef, self.optimizer, self.loss_config,
                                                 config.optim.num_minibatches, config.optim.num_epochs,
                                                 loglinear=route == Route.LOGLINEAR, three_term=anchor is not None,
                                                 model=config_lib.model_module(config), mesh=self.mesh,
                                                 state_sharding=self.state_sharding)
        self.route = ProximalRoute(config, self.graphdef, self.store, self.loss_config,
                                   meta.get("staleness_window", []), self.mesh, missing=(VersionEvicted,),
                                   param_sharding=self.state_sharding.params)
        self.k_sample, self.k_update, self.k_eval = jax.random.split(jax.random.key(config.seed), 3)
        self._evaluator: Optional[Evaluator] = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = int(meta.get("skipped_nonfinite_total", 0))
        self.runtime: Runtime = self._make_runtime()

    def _make_runtime(self) -> Runtime:
        config = self.config
        if config.runtime.mode == "inline":
            rows = config.rl.groups_per_step * config.rl.group_size
            sampler, scorer = runtime_base.make_sampler(config, self.graphdef, self.workdir, rows)
            return InlineRuntime(config, sampler, self.store, config_lib.env_factory(config), self.k_sample, scorer)
        if config.runtime.mode == "ray":
            from jaxrl_async.runtime.ray_runtime import RayRuntime  # ray is an optional extra

            return RayRuntime(config, self.workdir, self.meta["epoch"], self.store, log=self.log)
        return ProcessRuntime(config, self.workdir, self.meta["epoch"], self.start_step or None, log=self.log,
                              handoff=self.handoff.name)

    def train_step(self, step: int) -> dict:
        """One RL step: a batch from the runtime, its proximal log-probs, the update, the new version.

        Returns the step's metrics (loss, rollout, staleness, runtime, route and timing), as floats.
        """
        t0 = time.perf_counter()
        v = int(self.state.version)
        trajs, info = self.runtime.next_groups(step, v)
        t_data = time.perf_counter()
        length = bucket_length(max(t.length for t in trajs), self.model_config.max_len,
                               self.config.learner.length_buckets)
        host = batch_from(trajs, self.config, length)
        t_collate = time.perf_counter()
        batch, prox_metrics = self.route(self.state, host, v)  # the batch crosses to the device here, once
        t_route = time.perf_counter()
        self.state, metrics = self.update(self.state, batch, jax.random.fold_in(self.k_update, step),
                                          self.route.ewma_beta)
        jax.block_until_ready(self.state.params)
        t_update = time.perf_counter()
        t_publish = self.publish(v + 1)
        self.runtime.published(v + 1)
        t_m = time.perf_counter()
        metrics = {k: float(x) for k, x in jax.device_get(metrics).items()}  # one transfer for all metrics
        self._guard_nonfinite(step, metrics, host, trajs)
        metrics.update(rollout_metrics(trajs, v, self.runtime.bound, self.config.task.name))
        metrics.update(info)
        metrics.update(prox_metrics)
        # Where the learner's own part of the step goes (the wait for data is the runtime's).
        metrics["perf/collate_s"] = t_collate - t_data  # padding and advantages, on the host
        metrics["perf/batch_len"] = float(length)  # the batch's padded length T (`learner.length_buckets`)
        metrics["perf/route_s"] = t_route - t_collate  # proximal log-probs dispatched, batch to the device
        metrics["perf/update_s"] = t_update - t_route  # the update, until its new params are ready
        metrics["perf/publish_s"] = t_publish
        metrics["perf/metrics_s"] = time.perf_counter() - t_m  # fetching and summarising the metrics
        metrics["perf/train_s"] = time.perf_counter() - t_data
        metrics["perf/step_s"] = time.perf_counter() - t0
        metrics["perf/learner_steps_per_s"] = 1.0 / metrics["perf/step_s"]
        return metrics

    def publish(self, version: int) -> float:
        """Publishes the current params as `version`: into the shared weight slot (the process
        runtime's samplers take it from there: one memory copy) and into the ring buffer (a copy
        now, the disk write on the store's background thread). Returns the seconds it took, the
        hand-off's share of the learner's step."""
        jax.block_until_ready(self.state.params)  # the update's own compute is not the hand-off's
        t0 = time.perf_counter()
        if self.handoff is not None:
            self.handoff.write(version, self.state.params)
        self.store.publish(version, self.state.params)  # copies: the next update donates these buffers
        return time.perf_counter() - t0

    def _guard_nonfinite(self, step: int, metrics: dict, host: Batch, trajs: list[Trajectory]) -> None:
        """Counts updates the learner skipped for a non-finite loss or gradient; stops the run after
        `train.max_nonfinite_skips` in a row, naming the groups whose inputs were not finite."""
        if not metrics["train/skipped_nonfinite"]:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            mask = host.loss_mask
            bad = ~np.isfinite(np.where(mask, host.behav_logp, 0.0)).all(axis=1)
            if host.old_logp is not None:
                bad |= ~np.isfinite(np.where(mask, host.old_logp, 0.0)).all(axis=1)
            groups = sorted({(trajs[i].group_id, trajs[i].task_seed) for i in np.flatnonzero(bad)})
            where = (f"groups (group_id, task_seed) with non-finite log-probs: {groups}" if groups else
                     "no input was non-finite: the loss or gradient overflowed in the learner")
            self.log(f"step {step}: non-finite loss or gradient norm, update skipped "
                     f"({self.nonfinite_in_a_row} in a row); {where}")
            limit = self.config.train.max_nonfinite_skips
            if self.nonfinite_in_a_row >= limit:
                raise RuntimeError(f"{self.nonfinite_in_a_row} consecutive updates had a non-finite loss or gradient "
                                   f"norm (config.train.max_nonfinite_skips = {limit}); last: {where}")
        metrics["train/skipped_nonfinite_total"] = float(self.nonfinite_total)

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out success rate and return of the current params (sampler numerics)."""
        if self._evaluator is None:  # one for the run: its compiled decode loop is reused
            self._evaluator = Evaluator(self.graphdef, self.model_config, self.numerics, self.config)
        return self._evaluator(self.state.params, step, jax.random.fold_in(self.k_eval, step))

    def save(self, step: int, **meta) -> None:
        """Checkpoints the train state with `meta` (merged into the run's metadata)."""
        self.meta.update(meta, staleness_window=self.route.window, skipped_nonfinite_total=self.nonfinite_total)
        self.checkpoints.save(step, self.state, self.meta)
        self.runtime.checkpointed(step)

    def close(self) -> None:
        """Stops the runtime (samplers first), waits for the ring buffer's last background write
        (raising its error, if any), then closes the checkpoints and removes the weight slot."""
        try:
            self.runtime.close()
        finally:
            try:
                self.store.close()
            finally:
                try:
                    self.checkpoints.close()
                finally:
                    if self.handoff is not None:
                        self.handoff.close()
