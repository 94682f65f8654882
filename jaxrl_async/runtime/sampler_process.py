"""The asynchronous runtime's sampler processes and their supervisor.

Each sampler process runs the batched multi-turn rollout in inference numerics, takes
weights from the learner's shared-memory weight slot (`handoff.WeightSlot`; the
parameter-version ring buffer on disk when the slot is empty or absent), and hands
finished groups to the learner through the spool-directory queue. Between decode chunks
it checks for a newer version; a newer version is loaded and generation continues
mid-episode (a partial rollout), so one trajectory can hold tokens of several versions.

Staleness control (AReaL's off-policyness bound, `groups.gate_admits`): a group started at
version `v_s` behind `D` outstanding groups (waiting in the queue or being generated) is
trained at version about `v_next + D // G`, where `v_next` is the version of the learner's
next batch and `G` groups make a batch. A sampler starts a batch of `k` groups only when
`D + k <= (max_staleness + 1 - (v_next - v_s)) * G`; the learner also drops, and counts,
any group that arrives older than the bound, so none reaches the loss.

Processes are started with the `spawn` method (never fork with JAX). A sampler exits
when the learner process that started it is gone, so a killed learner leaves no orphans.

Hang detection: a sampler writes a heartbeat (wall-clock seconds) into shared memory when
it is set up, at every turn of its gate loop, between decode chunks and while it waits to
queue a group. `SamplerPool.check_hung` SIGKILLs (never SIGCONTs) a live sampler whose
heartbeat, or spawn time if later, is older than `runtime.hang_timeout_s`, and restarts
it like a crashed one; a sampler that has not yet reached its first decode chunk (imports,
set-up, compilation) gets `runtime.sampler_startup_s` from its spawn instead (`groups.hung`);
the learner calls it only while it waits for groups. A sampler that dies is restarted
(`SamplerPool.restart_dead`, logged), but one that fails by itself during its start-up (before
its set-up finished) `STARTUP_DEATHS` times in a row stops the run with an error: a sampler
that cannot start would otherwise be restarted forever. The usual cause is a script that
trains at import, without `if __name__ == "__main__":`: spawn re-runs it in every sampler,
where the run refuses to start (`base.refuse_in_spawn_bootstrap`). Each sampler also appends
one line per group it queues to `WORKDIR/queue/ledger/` (key, start version, whether the
queue already had it), which the soak driver's accounting reads.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import signal
import time
from typing import Optional

from ml_collections import config_dict

from jaxrl_async import config as config_lib
from jaxrl_async.runtime.base import generate_sampler_batch, make_sampler, queue_dir, versions_dir
from jaxrl_async.runtime.groups import DeathStreak, GroupKey, SamplerState, gate_admits, hung, ledger_dir
from jaxrl_async.runtime.handoff import WeightSlot, WeightSource
from jaxrl_async.runtime.spool import Item, TrajectoryQueue
from jaxrl_async.runtime.versions import VersionEvicted, VersionStore

_CTX = mp.get_context("spawn")


@dataclasses.dataclass
class SamplerSpec:
    """Everything a sampler process needs, picklable for spawn."""

    config_json: str  # the run config (ConfigDict.to_json())
    workdir: str
    sampler_id: int
    epoch: int  # how many times the learner has (re)started in this workdir: keeps item keys unique across resumes
    start_batch: int  # first batch index to generate (a restarted sampler regenerates its unfinished batch)
    ring_capacity: int
    queue_capacity: int
    parent_pid: int
    handoff: Optional[str] = None  # name of the learner's shared-memory weight slot (None: ring buffer only)


class Shared:
    """Values shared between the learner and its samplers (created before spawning)."""

    def __init__(self, num_samplers: int):
        self.next_version = _CTX.Value("i", 0, lock=False)  # version of the learner's next batch
        self.inflight = _CTX.Array("i", num_samplers, lock=False)  # groups each sampler is generating now
        # Groups the learner has taken (or is about to take) for the batch it is assembling.
        # No lock (a SIGKILLed holder would deadlock everyone): writers and the gate read in
        # orders that make every interleaving over-count outstanding groups, never under-count.
        self.taken = _CTX.Value("i", 0, lock=False)
        self.batches_done = _CTX.Array("i", num_samplers, lock=False)  # batches each sampler has fully queued
        self.heartbeat = _CTX.Array("d", num_samplers, lock=False)  # time.time() of each sampler's last sign of life
        self.loaded_version = _CTX.Array("i", [-1] * num_samplers, lock=False)  # newest version each has loaded
        self.ready = _CTX.Array("i", num_samplers, lock=False)  # 1 once a sampler has decoded its first chunk
        self.stop = _CTX.Event()
        # Posted by a sampler after each put; the learner waits on it for groups (spool's doorbell). A
        # semaphore: its post and wait are atomic, so a SIGKILLed sampler can leave it in no bad state.
        self.doorbell = _CTX.Semaphore(0)


def sampler_main(spec: SamplerSpec, shared: Shared) -> None:
    """Entry point of one sampler process: generate, queue, repeat until told to stop."""
    # Ctrl-C reaches the whole process group; the learner decides when samplers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = config_dict.ConfigDict(json.loads(spec.config_json))
    model_config = config_lib.model_config_from(config)
    graphdef, target = config_lib.model_structure(config, model_config)  # weights come from the learner
    store = VersionStore(versions_dir(spec.workdir), spec.ring_capacity, target)
    slot = None
    if spec.handoff is not None:
        try:
            slot = WeightSlot.attach(spec.handoff, target)
        except FileNotFoundError:  # the learner is gone (we exit at the next check) or closing
            slot = None
    source = WeightSource(store, slot)
    # Each put posts the learner's doorbell, so a learner waiting for this group wakes at once.
    queue = TrajectoryQueue(queue_dir(spec.workdir), spec.queue_capacity, fsync=config.runtime.queue_fsync,
                            doorbell=shared.doorbell)
    rows = config.runtime.sampler_groups * config.rl.group_size
    sampler, scorer = make_sampler(config, graphdef, spec.workdir, rows)
    shared.heartbeat[spec.sampler_id] = time.time()
    try:
        _sample_loop(spec, shared, config, sampler, source, queue, config_lib.env_factory(config))
    finally:
        source.close()
        if scorer is not None:
            scorer.close()


def _sample_loop(spec: SamplerSpec, shared: Shared, config, sampler, store, queue, make) -> None:
    """Generate groups under the staleness gate and queue them until the learner stops us.

    store: where weights come from (a `handoff.WeightSource`, or a `VersionStore`): its
    `latest_version()` and `get(version)`, which raises VersionEvicted for a version it no
    longer (or does not yet) hold."""
    g_total = config.rl.groups_per_step
    k = config.runtime.sampler_groups
    bound = config.runtime.max_staleness
    i = spec.sampler_id

    def learner_alive() -> bool:
        shared.heartbeat[i] = time.time()
        return os.getppid() == spec.parent_pid and not shared.stop.is_set()

    def newer_weights(_step):
        shared.heartbeat[i] = time.time()
        shared.ready[i] = 1
        latest = store.latest_version()
        if latest is None or latest <= sampler.version:
            return None
        try:
            params = store.get(latest)
        except VersionEvicted:  # overtaken while reading (or corrupt: skipped from now on); try next chunk
            return None
        shared.loaded_version[i] = latest
        return params, latest

    os.makedirs(ledger_dir(spec.workdir), exist_ok=True)
    ledger = open(os.path.join(ledger_dir(spec.workdir), f"put-e{spec.epoch}-s{i}.jsonl"), "a")

    batch = spec.start_batch
    while learner_alive():
        # Staleness gate: wait until a batch started now cannot be trained beyond the bound.
        t_gate = time.perf_counter()
        opened = False
        while learner_alive() and not opened:
            # Claim first, then look: two samplers passing at once each see the other's claim.
            shared.inflight[i] = k
            v_s = store.latest_version()
            # Read order matters: the learner raises `taken` before groups leave the queue and
            # moves `next_version` on before resetting `taken`.
            outstanding = queue.depth() + sum(shared.inflight) + shared.taken.value
            opened = v_s is not None and gate_admits(outstanding, shared.next_version.value, v_s, bound, g_total)
            if not opened:
                shared.inflight[i] = 0
                time.sleep(0.01)
        if not learner_alive():
            break
        gate_wait = time.perf_counter() - t_gate
        try:
            params = store.get(v_s)
        except VersionEvicted:  # evicted, or corrupt (then skipped: the gate falls back to an older version)
            shared.inflight[i] = 0
            continue
        sampler.update_params(params, v_s)
        shared.loaded_version[i] = v_s
        groups, meta = generate_sampler_batch(sampler, make, config, spec.epoch, i, batch, newer_weights, gate_wait)
        for g, group in enumerate(groups):
            # The version the episodes started with: every token of the group is at least as new.
            key = GroupKey(spec.epoch, i, batch, g).format()
            dups = queue.stats["duplicates_dropped"]
            while not queue.put(Item(key, group, v_s, meta), timeout=0.5):
                if not learner_alive():
                    return
            new = queue.stats["duplicates_dropped"] == dups
            ledger.write(json.dumps({"key": key, "sv": int(v_s), "new": new, "t": time.time()}) + "\n")
            ledger.flush()
        shared.inflight[i] = 0
        batch += 1
        shared.batches_done[i] = batch


# A sampler that fails by itself this many times in a row during its start-up stops the run.
STARTUP_DEATHS = 3
# Deaths from these signals come from outside (an operator, the OOM killer, a fault injector):
# the sampler is restarted however often they happen.
_KILLED_FROM_OUTSIDE = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _death(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class SamplerPool:
    """Starts, watches and restarts the sampler processes; shuts them down cleanly."""

    def __init__(self, config, workdir: str, epoch: int, ring_capacity: int, queue_capacity: int,
                 handoff: Optional[str] = None):
        """handoff: the name of the learner's shared-memory weight slot, passed to every sampler."""
        self.handoff = handoff
        self.config_json = config.to_json()
        self.workdir = os.path.abspath(workdir)
        self.epoch = epoch
        self.ring_capacity = ring_capacity
        self.queue_capacity = queue_capacity
        self.num = config.runtime.num_samplers
        self.shared = Shared(self.num)
        self.procs: list[Optional[mp.Process]] = [None] * self.num
        self.spawned_at = [0.0] * self.num
        self.restarts = 0
        self.hung_restarts = 0
        self.failures = DeathStreak(self.num, STARTUP_DEATHS)

    def _start(self, i: int) -> None:
        spec = SamplerSpec(self.config_json, self.workdir, i, self.epoch, self.shared.batches_done[i],
                           self.ring_capacity, self.queue_capacity, os.getpid(), self.handoff)
        p = _CTX.Process(target=sampler_main, args=(spec, self.shared), name=f"sampler-{i}", daemon=True)
        self.spawned_at[i] = time.time()
        self.shared.ready[i] = 0
        p.start()
        self.procs[i] = p

    def start(self) -> None:
        for i in range(self.num):
            self._start(i)

    def restart_dead(self) -> list[tuple[int, str]]:
        """Restarts samplers that died (their unfinished batch is regenerated with the same keys, so
        the queue drops the groups it already has); returns (id, how it died) of each.

        Raises RuntimeError when a sampler has failed by itself (an exit code, or a signal such as
        SIGSEGV; not a kill from outside) during its start-up, before its set-up finished (its
        first heartbeat), `STARTUP_DEATHS` times in a row.
        """
        restarted = []
        for i, p in enumerate(self.procs):
            if p is None or p.exitcode is None:
                continue
            code = p.exitcode
            if code < 0 and -code in _KILLED_FROM_OUTSIDE:
                pass  # not the sampler's fault: neither a failure nor progress
            elif self.shared.heartbeat[i] >= self.spawned_at[i]:
                self.failures.reset(i)  # it got through its start-up: a later failure may be transient
            elif self.failures.died(i, None) >= self.failures.limit:
                raise RuntimeError(
                    f"sampler {i} {_death(code)} during its start-up {self.failures.count[i]} times in a row "
                    f"(runtime.mode='process'); its error is in the output above. Samplers are started with "
                    f"multiprocessing's 'spawn' method, which imports the main script again in every sampler: "
                    f"a script that starts training at import must do so under `if __name__ == \"__main__\":`.")
            self.shared.inflight[i] = 0
            self._start(i)
            restarted.append((i, _death(code)))
        self.restarts += len(restarted)
        return restarted

    def check_hung(self, timeout_s: float, startup_s: float) -> list[int]:
        """SIGKILLs and restarts every live sampler that is `groups.hung`: no sign of life (heartbeat
        or spawn) for `timeout_s` seconds, or, before its first decode chunk, `startup_s` seconds
        since its spawn (a stopped process is killed, not continued); returns their ids."""
        out = []
        now = time.time()
        for i, p in enumerate(self.procs):
            if p is None or p.exitcode is not None:
                continue  # `restart_dead` restarts dead ones
            silent = now - max(self.shared.heartbeat[i], self.spawned_at[i])
            if hung(bool(self.shared.ready[i]), silent, now - self.spawned_at[i], timeout_s, startup_s):
                p.kill()  # SIGKILL works on a SIGSTOPped process too
                p.join(10.0)
                self.shared.inflight[i] = 0
                self._start(i)
                out.append(i)
        self.hung_restarts += len(out)
        self.restarts += len(out)
        return out

    def status(self) -> list[SamplerState]:
        """Per sampler: alive, groups in flight, batches done, newest version loaded, seconds since
        its last heartbeat."""
        now = time.time()
        return [SamplerState(id=i, pid=None if p is None else p.pid, alive=p is not None and p.exitcode is None,
                             ready=bool(self.shared.ready[i]), inflight=int(self.shared.inflight[i]),
                             batches_done=int(self.shared.batches_done[i]),
                             loaded_version=int(self.shared.loaded_version[i]),
                             silent_s=now - max(self.shared.heartbeat[i], self.spawned_at[i]))
                for i, p in enumerate(self.procs)]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def close(self, timeout: float = 10.0) -> None:
        """Asks samplers to stop, then terminates and finally kills any that linger."""
        self.shared.stop.set()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p is not None and p.is_alive():
                p.terminate()
                p.join(2.0)
            if p is not None and p.is_alive():
                p.kill()
                p.join()
        self.procs = [None] * self.num
