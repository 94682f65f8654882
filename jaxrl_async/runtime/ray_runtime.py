"""The Ray runtime: sampler actors on a Ray cluster, the learner in the driver (`runtime.mode="ray"`).

Same contract as the process runtime (`process.py`), with the host-local pieces replaced by
Ray ones (docs/design.md section 4.8):

- Every sampler is a Ray actor (`SamplerActor`, `runtime.ray_num_cpus` / `ray_num_gpus`
  each, `max_restarts=-1`) running the same generate loop as a sampler process.
- Weights: the learner `ray.put`s each new version once (numpy leaves) and registers the
  ObjectRef with the coordinator; samplers fetch the newest between decode chunks from the
  object store. The Orbax ring buffer stays the durable record (snapshot route, dedicated
  scorer, resume).
- Groups: a `Coordinator` actor holds what the sampler processes share through memory and
  the spool (the learner's next version, groups in flight and taken, the staleness gate, a
  bounded buffer of finished groups keyed `groups.GroupKey`, the set of keys the learner took,
  as a `groups.TakenKeys`). It is one actor, so every call is atomic: the gate counts exactly.
  It is a plain class, run as an actor: its logic needs no Ray to test. `RaySource` is the
  coordinator with the sampler actors as a `groups.GroupSource`, and the learner waits for
  groups in the loop the process runtime uses too (`groups.GroupLoop`).
  A restarted sampler asks it for its `batches_done` and regenerates its unfinished batch
  under the same keys; a key that is waiting or already taken is dropped as a duplicate.
- Learner resume: the buffer lives in the coordinator's memory and dies with the learner, so
  instead of persisting groups the runtime persists which keys the learner has taken. After
  each take it writes `WORKDIR/queue/ray/state-<v>.json` (the state a checkpoint at learner
  version `v` includes: per sampler the first batch not wholly taken, the keys taken beyond it,
  and the key epoch); a learner resumed from checkpoint `v` restarts every sampler at that
  batch under the same keys. Groups waiting in the lost coordinator or taken after the
  checkpoint are therefore regenerated (same keys, same task seeds and sampling keys, current
  weights), and groups taken before the checkpoint are never generated again.
- Close: stop flag, a short grace for the actors to return, then `ray.kill` of every actor,
  and `ray.shutdown()` if this runtime started the cluster.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable
from typing import Optional

import numpy as np

from jaxrl_async.runtime.groups import (
    DeathStreak,
    Group,
    GroupKey,
    GroupLoop,
    SamplerState,
    SourceStatus,
    TakenKeys,
    gate_admits,
    hung,
    ledger_dir,
    queue_capacity,
    queue_dir,
    retained_checkpoints,
    too_stale,
)

_log = logging.getLogger(__name__)
NAMESPACE = "jaxrl_async"
_POLL_S = 0.02
# A sampler actor that dies this many times in a row without finishing a batch stops the run.
ACTOR_DEATHS = 11


def state_dir(workdir: str) -> str:
    """Where the taken-key state for each checkpointable learner version goes (`state-<v>.json`)."""
    return os.path.join(queue_dir(workdir), "ray")


def state_path(workdir: str, version: int) -> str:
    return os.path.join(state_dir(workdir), f"state-{int(version)}.json")


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a machine crash
    finally:
        os.close(fd)


def restore_taken(workdir: str, version: int, num_samplers: int, sampler_groups: int,
                  epoch: int) -> tuple[TakenKeys, list[str]]:
    """The taken-key state a learner resumed at `version` continues from (`state-<version>.json`,
    written when the batch before that checkpoint was taken), and warnings. Every sampler restarts
    at its first batch not wholly taken, under the same key epoch, so the groups the lost
    coordinator held or the lost steps took are regenerated under their keys and nothing the
    checkpoint includes is. Without a usable state (a fresh run, no file, another
    `sampler_groups`): new keys under key epoch `epoch` from batch 0."""
    fresh = TakenKeys(epoch, num_samplers, sampler_groups)
    if version == 0:
        return fresh, []  # a fresh run: keys of this epoch from batch 0
    path = state_path(workdir, version)
    try:
        with open(path) as f:
            state = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        return fresh, [f"ray runtime: no taken-key state for learner version {version} ({type(e).__name__}: "
                       f"{path}); the resumed run generates new groups under key epoch {epoch}, and groups "
                       f"taken after that checkpoint are not regenerated"]
    if state["sampler_groups"] != sampler_groups:
        return fresh, [f"ray runtime: runtime.sampler_groups changed from {state['sampler_groups']} to "
                       f"{sampler_groups}; the resumed run generates new groups under key epoch {epoch}"]
    warnings = []
    if len(state["next_batch"]) > num_samplers:
        warnings.append(f"ray runtime: {len(state['next_batch'])} samplers before the resume, {num_samplers} "
                        f"now: the unfinished groups of samplers {num_samplers}.. are not regenerated")
    next_batch = (list(state["next_batch"]) + [0] * num_samplers)[:num_samplers]
    key_epoch = int(state["key_epoch"])
    keys = [k for k in state["consumed"] if GroupKey.parse(k).sampler < num_samplers]
    return TakenKeys(key_epoch, num_samplers, sampler_groups, next_batch, keys), warnings


def taken_state(taken: TakenKeys, version: int, epoch: int) -> dict:
    """`state-<version>.json`: what a checkpoint at learner `version` includes of the taken keys."""
    return {"version": int(version), "epoch": int(epoch), "key_epoch": taken.key_epoch,
            "sampler_groups": taken.k, "next_batch": list(taken.next_batch), "consumed": taken.beyond()}


class Coordinator:
    """Shared state of the learner and its sampler actors (run as one Ray actor, num_cpus=0).

    Calls are executed one at a time, so each is atomic. Sampler calls carry the sampler's
    incarnation (from `sampler_started`): a late call of a killed incarnation may still add a
    group it finished, but never changes the accounting of its successor.
    """

    def __init__(self, num_samplers: int, groups_per_step: int, bound: int, capacity: int, taken: TakenKeys):
        """taken: the keys the learner has taken (a resumed learner's, `restore_taken`): each sampler
        starts at its frontier (`taken.next_batch`), and a key in it is never accepted again."""
        self.g, self.bound, self.capacity = groups_per_step, bound, capacity
        self.next_version = 0  # version of the learner's next batch
        self.latest: Optional[tuple[int, list]] = None  # (version, [ObjectRef of its numpy leaves])
        self.inflight = [0] * num_samplers  # groups each sampler has claimed and not yet put
        self.taken = 0  # groups taken for the batch the learner is assembling
        self.batches_done = list(taken.next_batch)
        self.pid = [0] * num_samplers
        self.incarnation = [0] * num_samplers
        self.heartbeat = [0.0] * num_samplers
        self.started_at = [0.0] * num_samplers
        self.ready = [False] * num_samplers
        self.loaded = [-1] * num_samplers
        self.buffer: dict[str, tuple] = {}  # key -> (start_version, seq, payload, meta)
        self.seq = 0
        self.consumed = taken  # keys handed to the learner (trained or dropped as stale)
        self.puts: list[tuple] = []  # (key, start_version, new, t) since the last drain
        self.stopped = False
        self.stats = dict(put=0, duplicates_dropped=0, taken=0, dropped_stale=0)

    def _beat(self, i: int) -> None:
        self.heartbeat[i] = time.time()

    def _current(self, i: int, inc: int) -> bool:
        return inc == self.incarnation[i]

    # -- learner side ---------------------------------------------------------------

    def publish(self, version: int, ref_box: list) -> None:
        """The newest version's ObjectRef (boxed in a list, so Ray passes the ref, not the value)."""
        self.latest = (int(version), ref_box)

    def set_next_version(self, version: int) -> None:
        self.next_version = int(version)

    def take(self, want: int, version: int) -> tuple[list, list, list, int]:
        """Up to `want` waiting groups, oldest start version first (ties: put order); any older than
        the bound for `version` is dropped instead. Returns (taken, dropped, puts, depth)."""
        order = sorted(self.buffer.items(), key=lambda kv: (kv[1][0], kv[1][1]))
        got, dropped = [], []
        for key, (sv, _, payload, meta) in order:
            if len(got) >= want:
                break
            del self.buffer[key]
            self.consumed.add(key)
            self.stats["taken"] += 1
            if too_stale(version, sv, self.bound):
                self.stats["dropped_stale"] += 1
                dropped.append((key, sv))
            else:
                got.append((key, sv, payload, meta))
                self.taken += 1
        puts, self.puts = self.puts, []
        return got, dropped, puts, len(self.buffer)

    def end_batch(self, version: int) -> None:
        # The next batch is for version + 1 (moved on before `taken` is reset: both in one atomic call).
        self.next_version = int(version) + 1
        self.taken = 0

    def stop(self) -> None:
        self.stopped = True

    def status(self) -> dict:
        now = time.time()
        return {"depth": len(self.buffer), "next_version": self.next_version, "stats": dict(self.stats),
                "samplers": [{"id": i, "pid": self.pid[i], "inflight": self.inflight[i],
                              "batches_done": self.batches_done[i],
                              "loaded_version": self.loaded[i], "ready": self.ready[i],
                              "incarnation": self.incarnation[i],
                              "silent_s": now - max(self.heartbeat[i], self.started_at[i])}
                             for i in range(len(self.inflight))]}

    def final(self) -> dict:
        """What is left at close: puts not yet drained, waiting keys, counters."""
        puts, self.puts = self.puts, []
        return {"puts": puts, "waiting": [[k, v[0]] for k, v in self.buffer.items()], "stats": dict(self.stats),
                "batches_done": list(self.batches_done)}

    # -- sampler side ---------------------------------------------------------------

    def sampler_started(self, i: int, pid: int = 0) -> tuple[int, int]:
        """A (re)started sampler (`pid`: its worker process): (its incarnation, the batch to generate next)."""
        self.incarnation[i] += 1
        self.pid[i] = int(pid)
        self.inflight[i] = 0
        self.ready[i] = False
        self.started_at[i] = time.time()
        self._beat(i)
        return self.incarnation[i], self.batches_done[i]

    def open_batch(self, i: int, inc: int, k: int):
        """The staleness gate: "stop", None (wait), or (v_s, [ref]) with `k` groups claimed at v_s."""
        self._beat(i)
        if self.stopped or not self._current(i, inc):
            return "stop"
        if self.latest is None:
            return None
        v_s = self.latest[0]
        others = sum(self.inflight) - self.inflight[i]
        outstanding = len(self.buffer) + others + k + self.taken
        if gate_admits(outstanding, self.next_version, v_s, self.bound, self.g):
            self.inflight[i] = k
            self.loaded[i] = v_s
            return self.latest
        self.inflight[i] = 0
        return None

    def newer(self, i: int, inc: int, have: int):
        """Between decode chunks: (version, [ref]) if a version newer than `have` is published, else None."""
        self._beat(i)
        if self._current(i, inc):
            self.ready[i] = True
        if self.latest is None or self.latest[0] <= have:
            return None
        if self._current(i, inc):
            self.loaded[i] = self.latest[0]
        return self.latest

    def put(self, i: int, inc: int, batch: int, last: bool, key: str, start_version: int, payload: bytes,
            meta: dict) -> str:
        """One finished group: "ok", "dup" (waiting or taken already: dropped), "full" (retry) or "stop"."""
        self._beat(i)
        if self.stopped:
            return "stop"
        current = self._current(i, inc)
        if key in self.buffer or key in self.consumed:
            self.stats["duplicates_dropped"] += 1
            self.puts.append((key, int(start_version), False, time.time()))
            status = "dup"
        elif len(self.buffer) >= self.capacity:
            return "full"
        else:
            self.buffer[key] = (int(start_version), self.seq, payload, meta)
            self.seq += 1
            self.stats["put"] += 1
            self.puts.append((key, int(start_version), True, time.time()))
            status = "ok"
        if current:
            self.inflight[i] = max(0, self.inflight[i] - 1)
            if last:
                self.inflight[i] = 0
                self.batches_done[i] = batch + 1
        return status


class SamplerActor:
    """One sampler on the Ray cluster: `run()` generates under the gate until the coordinator stops it."""

    def __init__(self, config_json: str, workdir: str, sampler_id: int, epoch: int, coordinator):
        import jax
        from ml_collections import config_dict

        from jaxrl_async import config as config_lib
        from jaxrl_async.runtime.base import make_sampler

        self.config = config_dict.ConfigDict(json.loads(config_json))
        self.workdir, self.i, self.epoch, self.coord = workdir, sampler_id, epoch, coordinator
        graphdef, target = config_lib.model_structure(self.config)  # weights come from the object store
        self.treedef = jax.tree.structure(target)
        rows = self.config.runtime.sampler_groups * self.config.rl.group_size
        # The dedicated route's scorer is a subprocess of this actor reading the on-disk ring buffer.
        self.sampler, self.scorer = make_sampler(self.config, graphdef, workdir, rows)
        self.make_env = config_lib.env_factory(self.config)

    def _params(self, ref):
        import jax
        import jax.numpy as jnp
        import ray

        return jax.tree.unflatten(self.treedef, [jnp.asarray(x) for x in ray.get(ref)])

    def ping(self) -> int:
        """The actor's worker pid. Answered only while `run` is not executing (one call at a time):
        during a run the coordinator's `status()` has it (`samplers[i]["pid"]`)."""
        return os.getpid()

    def run(self) -> None:
        import ray

        from jaxrl_async.runtime.base import generate_sampler_batch

        config, coord, i = self.config, self.coord, self.i
        k = config.runtime.sampler_groups
        inc, batch = ray.get(coord.sampler_started.remote(i, os.getpid()))

        def newer_weights(_step):
            got = ray.get(coord.newer.remote(i, inc, self.sampler.version))
            if got is None:
                return None
            version, (ref,) = got
            return self._params(ref), version

        while True:
            t_gate = time.perf_counter()
            while True:
                opened = ray.get(coord.open_batch.remote(i, inc, k))
                if opened == "stop":
                    return
                if opened is not None:
                    break
                time.sleep(_POLL_S)
            gate_wait = time.perf_counter() - t_gate
            v_s, (ref,) = opened
            self.sampler.update_params(self._params(ref), v_s)
            groups, meta = generate_sampler_batch(self.sampler, self.make_env, config, self.epoch, i, batch,
                                                  newer_weights, gate_wait)
            for g, group in enumerate(groups):
                payload = pickle.dumps(group, protocol=5)
                while True:
                    st = ray.get(coord.put.remote(i, inc, batch, g == k - 1, GroupKey(self.epoch, i, batch, g).format(),
                                                  int(v_s), payload, meta))
                    if st == "stop":
                        return
                    if st != "full":
                        break
                    time.sleep(_POLL_S)
            batch += 1

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None


@dataclasses.dataclass
class _Slot:
    actor: object
    run_ref: object = None
    submitted_at: float = 0.0


class RaySource:
    """The coordinator actor with the sampler actors as a `groups.GroupSource` (the learner's side).

    It keeps the learner's taken-key state (`taken`) and writes it after each batch
    (`state-<version + 1>.json`), and appends every put the coordinator reports to the put ledger.
    """

    name = "sampler actor"

    def __init__(self, coord, spawn: Callable[[int], object], num: int, workdir: str, epoch: int,
                 taken: TakenKeys, puts_file):
        """spawn(i): a new actor for sampler `i`; puts_file: the put ledger (`put-ray-e<epoch>.jsonl`)."""
        self.coord, self.spawn, self.workdir, self.epoch, self.taken = coord, spawn, workdir, epoch, taken
        self._puts = puts_file
        self.slots = [_Slot(spawn(i)) for i in range(num)]
        self.deaths = DeathStreak(num, ACTOR_DEATHS)
        self.restarts = 0
        self.hung_restarts = 0
        self.recovered = 0
        self._depth = 0
        for i in range(num):
            self._submit(i)

    def _submit(self, i: int) -> None:
        slot = self.slots[i]
        slot.run_ref = slot.actor.run.remote()
        slot.submitted_at = time.monotonic()

    def _raw_status(self) -> dict:
        import ray

        return ray.get(self.coord.status.remote())

    def write_puts(self, puts) -> None:
        if puts and self._puts is not None:
            for key, sv, new, t in puts:
                self._puts.write(json.dumps({"key": key, "sv": sv, "new": new, "t": t}) + "\n")
            self._puts.flush()

    # -- GroupSource ---------------------------------------------------------------------

    def begin(self, step: int) -> None:
        del step

    def take(self, want: int, version: int, have: int) -> tuple[list[Group], list[Group]]:
        import ray

        del have  # the coordinator counts its takes itself, in the same atomic call
        got, drop, puts, self._depth = ray.get(self.coord.take.remote(want, version))
        self.write_puts(puts)
        return ([Group(key, int(sv), pickle.loads(payload), meta) for key, sv, payload, meta in got],
                [Group(key, int(sv), [], {}) for key, sv in drop])

    def wait(self) -> None:
        time.sleep(_POLL_S)

    def end(self, version: int, taken: list[Group]) -> None:
        import ray

        ray.get(self.coord.end_batch.remote(version))
        # The state a checkpoint at version + 1 includes, on disk before the update (so before any
        # checkpoint that includes it).
        for g in taken:
            self.taken.add(g.key)
        _write_json_atomic(state_path(self.workdir, version + 1), taken_state(self.taken, version + 1, self.epoch))

    def depth(self) -> int:
        return self._depth

    def status(self) -> SourceStatus:
        st = self._raw_status()
        return SourceStatus(st["depth"], st["next_version"], [
            SamplerState(id=s["id"], pid=s["pid"], alive=True, ready=s["ready"], inflight=s["inflight"],
                         batches_done=s["batches_done"], loaded_version=s["loaded_version"], silent_s=s["silent_s"])
            for s in st["samplers"]])

    def restart_dead(self) -> list[tuple[int, str]]:
        """Resubmits `run` to samplers whose actor died (Ray restarts the actor itself); raises on a
        sampler error, or when one died `ACTOR_DEATHS` times in a row without finishing a batch."""
        import ray

        refs = [s.run_ref for s in self.slots]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        status = None
        out = []
        for i, slot in enumerate(self.slots):
            if slot.run_ref not in ready:
                continue
            try:
                ray.get(slot.run_ref)
            except ray.exceptions.RayActorError as e:
                status = status or self._raw_status()
                n = self.deaths.died(i, status["samplers"][i]["batches_done"])
                if self.deaths.exceeded(i):
                    raise RuntimeError(f"sampler actor {i} died {n} times without finishing a batch: {e}") from e
                self.restarts += 1
                self._submit(i)
                out.append((i, "died"))
            except ray.exceptions.RayTaskError as e:
                raise RuntimeError(f"sampler actor {i} failed: {e}") from e
            else:
                self._submit(i)  # returned although not stopped: run again
        return out

    def restart_hung(self, timeout_s: float, startup_s: float) -> list[int]:
        import ray

        status = self._raw_status()
        out = []
        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            st = status["samplers"][i]
            if hung(st["ready"], st["silent_s"], now - slot.submitted_at, timeout_s, startup_s):
                ray.kill(slot.actor, no_restart=False)  # Ray restarts it; `restart_dead` resubmits its run
                slot.submitted_at = now
                out.append(i)
        self.hung_restarts += len(out)
        return out

    def metrics(self) -> dict:
        return {}


class RayRuntime:
    """`Runtime` of sampler actors on a Ray cluster, a coordinator actor between them and the learner."""

    def __init__(self, config, workdir: str, epoch: int, store, log: Callable = print):
        """store: the learner's `VersionStore` (writer): `published(v)` reads `v` from its memory cache."""
        try:
            import ray  # noqa: F401  (fails here, at startup, if the `ray` extra is not installed)
        except ImportError as e:
            raise ImportError("config.runtime.mode='ray' needs Ray: pip install -e '.[ray]'") from e

        self.config, self.workdir, self.epoch = config, os.path.abspath(workdir), epoch
        self.store, self.log = store, log
        self.bound = config.runtime.max_staleness
        self.capacity = queue_capacity(config)
        self.num = config.runtime.num_samplers
        self.source: Optional[RaySource] = None
        self.loop: Optional[GroupLoop] = None
        self.started_ray = False
        self.refs: collections.deque = collections.deque(maxlen=2)  # keeps the newest published objects owned
        self._puts = None

    @property
    def coord(self):
        """The coordinator actor (None before `start` and after `close`)."""
        return self.source.coord if self.source is not None else None

    @property
    def slots(self) -> list[_Slot]:
        return self.source.slots if self.source is not None else []

    # -- set-up ---------------------------------------------------------------------

    def _actor_options(self) -> dict:
        rt = self.config.runtime
        opts = {"num_cpus": float(rt.ray_num_cpus), "num_gpus": float(rt.ray_num_gpus), "max_restarts": -1,
                "max_task_retries": 0, "namespace": NAMESPACE}
        env = {k: os.environ[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS") if k in os.environ}
        if env and rt.ray_address:
            opts["runtime_env"] = {"env_vars": env}  # a local cluster inherits the driver's environment
        return opts

    def _spawn(self, coord, key_epoch: int, i: int):
        import ray

        cls = ray.remote(SamplerActor).options(name=f"sampler-e{self.epoch}-{i}-{os.getpid()}-{id(self):x}",
                                               **self._actor_options())
        return cls.remote(self.config.to_json(), self.workdir, i, key_epoch, coord)

    def start(self, version: int) -> None:
        import ray

        rt = self.config.runtime
        if not ray.is_initialized():
            if rt.ray_address:
                ray.init(address=rt.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=max(1, math.ceil(self.num * rt.ray_num_cpus)), include_dashboard=False,
                         namespace=NAMESPACE, logging_level=logging.WARNING)
                self.started_ray = True
        os.makedirs(ledger_dir(self.workdir), exist_ok=True)
        self._puts = open(os.path.join(ledger_dir(self.workdir), f"put-ray-e{self.epoch}.jsonl"), "a")
        os.makedirs(state_dir(self.workdir), exist_ok=True)
        taken, warnings = restore_taken(self.workdir, int(version), self.num, rt.sampler_groups, self.epoch)
        for w in warnings:
            _log.warning(w)
            self.log(w)
        coord = ray.remote(Coordinator).options(num_cpus=0, namespace=NAMESPACE).remote(
            self.num, self.config.rl.groups_per_step, self.bound, self.capacity,
            TakenKeys(taken.key_epoch, self.num, taken.k, taken.next_batch, taken.beyond()))
        ray.get(coord.set_next_version.remote(int(version)))
        self._publish(coord, int(version))
        self.source = RaySource(coord, lambda i: self._spawn(coord, taken.key_epoch, i), self.num, self.workdir,
                                self.epoch, taken, self._puts)
        self.loop = GroupLoop(self.source, self.config, self.workdir, self.epoch, self.log)

    def _publish(self, coord, version: int) -> None:
        import jax
        import ray

        params = self.store.get(version)  # the writer's cached copy: no disk read
        leaves = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(params))]
        ref = ray.put(leaves)
        self.refs.append(ref)
        ray.get(coord.publish.remote(version, [ref]))

    # -- the Runtime protocol ------------------------------------------------------------

    def next_groups(self, step: int, version: int):
        """Takes `G` groups within the staleness bound from the coordinator; returns (trajectories, info)."""
        return self.loop.next_groups(step, version)

    def published(self, version: int) -> None:
        self._publish(self.coord, int(version))

    def checkpointed(self, step: int) -> None:
        # Keep the taken-key state of every retained checkpoint (a resume may fall back past a corrupt
        # newest one) and of versions not reached yet; the rest is void.
        retained = retained_checkpoints(self.workdir)
        for name in os.listdir(state_dir(self.workdir)):
            v = name[len("state-"):-len(".json")] if name.startswith("state-") and name.endswith(".json") else ""
            if v.isdigit() and int(v) < step and int(v) not in retained:
                os.remove(os.path.join(state_dir(self.workdir), name))

    def close(self, grace_s: float = 5.0) -> None:
        """Stops the samplers (a short grace to return, then `ray.kill`), the coordinator, and the
        cluster if this runtime started it. Safe to call twice or before `start`."""
        try:
            import ray
        except ImportError:
            return
        try:
            coord, slots = self.coord, self.slots
            if coord is not None and ray.is_initialized():
                try:
                    ray.get(coord.stop.remote(), timeout=grace_s)
                    refs = [s.run_ref for s in slots if s.run_ref is not None]
                    if refs:
                        ray.wait(refs, num_returns=len(refs), timeout=grace_s)
                    closes = [s.actor.close.remote() for s in slots]
                    ray.wait(closes, num_returns=len(closes), timeout=grace_s)
                    final = ray.get(coord.final.remote(), timeout=grace_s)
                    self.source.write_puts(final["puts"])
                    with open(os.path.join(ledger_dir(self.workdir), f"ray-close-e{self.epoch}.json"), "w") as f:
                        json.dump({k: v for k, v in final.items() if k != "puts"}, f)
                except Exception as e:  # noqa: BLE001 (a dead cluster must not stop the shutdown)
                    _log.warning("ray runtime: orderly stop failed (%s: %s); killing the actors",
                                 type(e).__name__, e)
                for s in slots:
                    try:
                        ray.kill(s.actor, no_restart=True)
                    except Exception:  # noqa: BLE001
                        pass
                try:
                    ray.kill(coord, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
        finally:
            self.source = None
            self.refs.clear()
            if self.loop is not None:
                self.loop.close()
            if self._puts is not None:
                self._puts.close()
            self._puts = None
            if self.started_ray and ray.is_initialized():
                ray.shutdown()
            self.started_ray = False
