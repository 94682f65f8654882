"""The dedicated old-logit process (docs/design.md section 3, the `dedicated` route).

A separate process holds learner-numerics (float32) weights at the sampler's version,
read from the parameter-version ring buffer, and scores each generated segment as soon
as the sampler submits it, so the learner gets `pi_old` without an extra forward pass.
Samplers may hold a version (from the learner's shared-memory slot, `runtime.handoff`)
before the learner's background write puts it on disk: the scorer then waits (polling)
for it to appear, up to `disk_wait_s` (a minute by default).

    sampler (client)                         scorer process
    ----------------                         --------------
    prefetch(v)      ──("load", v)──────▶    store.get(v), kept in memory
    submit(tokens, v) ─("score", id, ...)─▶  token_logprobs(graphdef, params_v, tokens)
    collect([ids])   ◀─("result", id, logp)─

`submit` never waits for the answer; `collect` blocks until the asked-for answers are in.
Rows are padded to a power-of-two bucket (`bucket`) so the scorer compiles once per
bucket, not once per row count; the token axis is never padded (the sampler always sends
`max_len` columns).

The process is a fresh interpreter (`subprocess.Popen` of `python -m
jaxrl_async.runtime.scorer`): the equivalent of multiprocessing's 'spawn', never a fork of a
JAX process, and unlike `multiprocessing.Process` it may be started from a daemonic
process (the runtime's sampler processes are daemonic). The two talk over a pair of OS
pipes with pickled messages. The scorer drains its request pipe on a reader thread, so
the client's `submit` never blocks on a busy scorer (no pipe deadlock). It exits on
`close()`, when its request pipe reaches end-of-file, or when its parent is gone
(`os.getppid()` changes; polled every half second), so a killed sampler leaves no
orphan.

This module imports no JAX at import time: a client costs nothing until `start`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue as queue_lib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection
from typing import Any, Optional

import numpy as np

from jaxrl_async.core.buckets import bucket

_POLL_S = 0.5
# How long the scorer waits for a version the sampler already has (from shared memory) to be
# written to the ring buffer by the learner's background writer.
_DISK_WAIT_S = 60.0


class ScorerError(RuntimeError):
    """The scorer process failed a request, or died."""


@dataclasses.dataclass
class ScorerStats:
    """Client-side counters (the scorer's busy time comes back with each answer).

    requests: score requests submitted. rows: rows scored (before bucket padding).
    padded_rows: rows including bucket padding. collect_wait_s: seconds `collect` spent
    blocked waiting for answers. submit_s: seconds spent in `submit` (padding, pickling,
    writing the pipe). busy_s: seconds the scorer spent computing the collected answers
    (loading weights included). loads: versions the scorer read from the ring buffer.
    """

    requests: int = 0
    rows: int = 0
    padded_rows: int = 0
    collect_wait_s: float = 0.0
    submit_s: float = 0.0
    busy_s: float = 0.0
    loads: int = 0


def _model_config_fields(model_config) -> dict:
    if isinstance(model_config, str):
        return json.loads(model_config)
    if isinstance(model_config, dict):
        return dict(model_config)
    return dataclasses.asdict(model_config)


def _family_name(model_config) -> str:
    """The `model.family` of a model config or its fields (`models.families`)."""
    from jaxrl_async.models import families

    return families.of_model_config(_model_config_fields(model_config)).name


def _build_model_config(spec: dict):
    """The model config and its module from the spec's family and fields (JSON round trip undone)."""
    from jaxrl_async.models import families

    fam = families.family(spec["family"])
    return fam.config_from_fields(spec["model_config"]), fam.module


class LogProbScorer:
    """Client of one old-logit scorer process. Not thread-safe: one user per instance.

    Usage::

        scorer = LogProbScorer().start(versions_dir, ring_capacity, model_config, seed)
        scorer.prefetch(v)                      # optional: load v while it is surely retained
        rid = scorer.submit(tokens, v)          # tokens [k, T] int32, answered asynchronously
        ...
        logp = scorer.collect([rid])[rid]       # [k, T] float32 = model.token_logprobs(params_v, tokens)
        scorer.close()

    Request ids are unique within an instance; a restarted sampler makes a new client
    (and so a new scorer process).
    """

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self._send: Optional[Connection] = None
        self._recv: Optional[Connection] = None
        self._ids = itertools.count()
        self._results: dict[int, Any] = {}
        self._pending: set[int] = set()
        self._ready = False
        self.stats = ScorerStats()

    # -- lifecycle -------------------------------------------------------------------

    def start(self, versions_dir: str, ring_capacity: int, model_config, seed: int, *,
              warmup_rows: int = 0, keep_versions: Optional[int] = None,
              env: Optional[dict] = None, disk_wait_s: float = _DISK_WAIT_S) -> LogProbScorer:
        """Starts the scorer process and returns self without waiting for it to be ready.

        versions_dir, ring_capacity: the ring buffer (`versions.VersionStore`, opened
          read-only in the scorer).
        model_config: a `transformer.ModelConfig` or `llama.LlamaConfig`, its fields as a dict, or
          their JSON; with `seed` it builds the graphdef and the params structure (`init_model`
          of its module; the weights themselves come from the ring buffer).
        warmup_rows: if > 0, the scorer compiles every bucket up to `bucket(warmup_rows)`
          at start, so no request pays for a compile.
        keep_versions: versions kept in the scorer's memory (default ring_capacity + 1),
          so a loaded version stays usable after the ring buffer evicts it on disk.
        disk_wait_s: how long a request for a version newer than the newest in the ring buffer
          waits for it to be written there (the sampler may have it from shared memory first)
          before it fails.
        env: extra environment for the scorer (e.g. JAX platform or GPU memory
          settings). By default it inherits this process's environment, with
          XLA_PYTHON_CLIENT_PREALLOCATE=false unless set (two JAX processes share a GPU).
        """
        if self.proc is not None:
            raise RuntimeError("LogProbScorer.start called twice; make a new client")
        spec = {
            "versions_dir": os.path.abspath(versions_dir),
            "ring_capacity": int(ring_capacity),
            "model_config": _model_config_fields(model_config),
            "family": _family_name(model_config),
            "seed": int(seed),
            "warmup_rows": int(warmup_rows),
            "max_len": int(_model_config_fields(model_config)["max_len"]),
            "keep_versions": int(keep_versions if keep_versions is not None else ring_capacity + 1),
            "parent_pid": os.getpid(),
            "disk_wait_s": float(disk_wait_s),
        }
        req_r, req_w = os.pipe()  # client -> scorer
        rep_r, rep_w = os.pipe()  # scorer -> client
        child_env = dict(os.environ)
        child_env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        child_env.update(env or {})
        # The package must be importable from the child whatever its working directory.
        # The directory that holds the jaxrl_async package (this file is jaxrl_async/runtime/scorer.py).
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, child_env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jaxrl_async.runtime.scorer", str(req_r), str(rep_w), json.dumps(spec)],
                pass_fds=(req_r, rep_w), env=child_env, close_fds=True)
        finally:
            os.close(req_r)
            os.close(rep_w)
        self._send = Connection(req_w, readable=False, writable=True)
        self._recv = Connection(rep_r, readable=True, writable=False)
        return self

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Blocks until the scorer has built its model (and compiled its warm-up buckets)."""
        deadline = time.monotonic() + timeout
        while not self._ready:
            self._pump(min(_POLL_S, max(0.0, deadline - time.monotonic())))
            if not self._ready and time.monotonic() >= deadline:
                raise TimeoutError(f"old-logit scorer not ready after {timeout} s")

    def close(self, timeout: float = 10.0) -> None:
        """Stops the scorer (asks, then terminates, then kills) and reaps it. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if self._send is not None and proc.poll() is None:
                self._send.send(("close",))
        except (OSError, EOFError, BrokenPipeError):
            pass
        for conn in (self._send, self._recv):
            if conn is not None:
                conn.close()
        self._send = self._recv = None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> LogProbScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close(timeout=1.0)
        except Exception:
            pass

    # -- requests --------------------------------------------------------------------

    def _check(self) -> None:
        if self.proc is None:
            raise ScorerError("the old-logit scorer is not running (never started, or closed)")
        if self.proc.poll() is not None:
            raise ScorerError(f"the old-logit scorer exited with code {self.proc.returncode}")

    def prefetch(self, version: int) -> None:
        """Asks the scorer to load `version` now (without waiting), e.g. right after the
        sampler loaded it, while the ring buffer surely retains it."""
        self._check()
        self._send.send(("load", int(version)))

    def submit(self, tokens: np.ndarray, version: int) -> int:
        """Queues `tokens` [k, T] int32 for scoring under `version`; returns the request id.

        The answer (`collect`) is `model.token_logprobs(graphdef, params_version, tokens)`,
        [k, T] float32. Never waits for the scorer."""
        t0 = time.perf_counter()
        self._check()
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an integer [k, T] array, got {tokens.dtype} {tokens.shape}")
        k, t = tokens.shape
        kb = bucket(k)
        padded = np.zeros((kb, t), np.int32)  # padding rows are scored and dropped
        padded[:k] = tokens
        rid = next(self._ids)
        self._send.send(("score", rid, int(version), padded, k))
        self._pending.add(rid)
        self._pump(0.0)  # take in answers already there (keeps the reply pipe drained)
        self.stats.requests += 1
        self.stats.rows += k
        self.stats.padded_rows += kb
        self.stats.submit_s += time.perf_counter() - t0
        return rid

    def collect(self, request_ids: Iterable[int], timeout: Optional[float] = None) -> dict[int, np.ndarray]:
        """Waits for the answers to `request_ids`; returns {id: logp [k, T] float32}.

        Each answer is handed out once. Raises ScorerError if the scorer failed a
        request (e.g. the version is neither in the ring buffer nor in its memory) or
        died, TimeoutError after `timeout` seconds."""
        ids = list(request_ids)
        unknown = [i for i in ids if i not in self._pending and i not in self._results]
        if unknown:
            raise KeyError(f"unknown or already collected request ids: {unknown}")
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while any(i not in self._results for i in ids):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"old-logit answers not in after {timeout} s")
                self._pump(_POLL_S)
        finally:
            self.stats.collect_wait_s += time.perf_counter() - t0
        out = {}
        for i in ids:
            self._pending.discard(i)
            result = self._results.pop(i)
            if isinstance(result, ScorerError):
                raise result
            out[i] = result
        return out

    def _pump(self, wait: float) -> None:
        """Reads every message available within `wait` seconds (at least the first)."""
        if self._recv is None:
            self._check()
        first = True
        while self._recv.poll(wait if first else 0):
            first = False
            try:
                msg = self._recv.recv()
            except EOFError:  # the scorer closed its end: it is exiting
                try:
                    self.proc.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass
                raise ScorerError(f"the old-logit scorer closed its pipe (exit code {self.proc.returncode})") from None
            kind = msg[0]
            if kind == "ready":
                self._ready = True
            elif kind == "loaded":
                self.stats.loads += 1
            elif kind == "result":
                _, rid, logp, busy = msg
                self._results[rid] = logp
                self.stats.busy_s += busy
            elif kind == "error":
                _, rid, text = msg
                if rid is None:
                    raise ScorerError(f"old-logit scorer failed: {text}")
                self._results[rid] = ScorerError(f"old-logit request {rid} failed: {text}")
        if first and self.proc is not None and self.proc.poll() is not None and not self._recv.poll(0):
            self._check()  # nothing came and the scorer is gone: raise instead of waiting forever


# ---------------------------------------------------------------------------
# The scorer process


def _scorer_main(req_fd: int, rep_fd: int, spec: dict) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when the scorer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = Connection(req_fd, readable=True, writable=False)
    replies = Connection(rep_fd, readable=False, writable=True)
    inbox: queue_lib.Queue = queue_lib.Queue()

    def reader():  # always drains the request pipe, so the client never blocks on submit
        while True:
            try:
                inbox.put(requests.recv())
            except (EOFError, OSError):
                inbox.put(("eof",))
                return

    outbox: queue_lib.Queue = queue_lib.Queue()
    client_gone = threading.Event()

    def writer():  # replies go out on their own thread: scoring never waits on a full pipe
        while True:
            msg = outbox.get()
            try:
                replies.send(msg)
            except OSError:
                client_gone.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()

    def parent_alive() -> bool:
        return os.getppid() == spec["parent_pid"] and not client_gone.is_set()

    import collections

    import jax

    from jaxrl_async.runtime.versions import VersionCorrupt, VersionEvicted, VersionStore

    config, model_lib = _build_model_config(spec)  # transformer or llama (the same functions)
    graphdef, target = model_lib.init_model(config, spec["seed"])
    store = VersionStore(spec["versions_dir"], spec["ring_capacity"], target, writer=False)
    held: collections.OrderedDict[int, Any] = collections.OrderedDict()

    def params_of(version: int):
        deadline = None
        retried = False
        while True:
            try:
                params = store.get(version)
                break
            except VersionEvicted as e:
                if version in held:  # evicted on disk since we loaded it: our copy is still exact
                    held.move_to_end(version)
                    return held[version]
                if isinstance(e, VersionCorrupt):
                    raise
                latest = store.latest_version()
                if latest is not None and version <= latest:
                    # The write may have landed between `get` and `latest_version`: read once more
                    # before calling it evicted.
                    if retried:
                        raise
                    retried = True
                    continue
                # Newer than the newest on disk: the sampler took it from the learner's shared-memory
                # slot, and the learner's background write has not landed yet. Wait for it.
                if deadline is None:
                    deadline = time.monotonic() + spec["disk_wait_s"]
                if time.monotonic() > deadline or not parent_alive():
                    raise VersionEvicted(f"parameter version {version} did not reach the ring buffer in "
                                         f"{spec['disk_wait_s']:g} s: {e}") from e
                time.sleep(0.005)
        if version not in held:
            outbox.put(("loaded", version))
        held[version] = params
        held.move_to_end(version)
        while len(held) > spec["keep_versions"]:
            held.popitem(last=False)
        return params

    if spec["warmup_rows"] > 0:
        zeros = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype), target)
        kb = 1
        while kb <= bucket(spec["warmup_rows"]):
            model_lib.token_logprobs(graphdef, zeros, np.zeros((kb, spec["max_len"]), np.int32)).block_until_ready()
            kb *= 2
    del target
    outbox.put(("ready",))

    while parent_alive():
        try:
            msg = inbox.get(timeout=_POLL_S)
        except queue_lib.Empty:
            continue
        kind = msg[0]
        if kind in ("close", "eof"):
            break
        if kind == "load":
            try:
                params_of(msg[1])
            except Exception:  # a failed prefetch is reported when a request needs the version
                pass
        elif kind == "score":
            _, rid, version, tokens, k = msg
            t0 = time.perf_counter()
            try:
                logp = np.asarray(model_lib.token_logprobs(graphdef, params_of(version), tokens))[:k]
            except Exception as e:  # answer this request with the error; keep serving
                reply = ("error", rid, f"{type(e).__name__}: {e}")
            else:
                reply = ("result", rid, logp, time.perf_counter() - t0)
            outbox.put(reply)
    # Closed, or the parent is gone: answers not yet sent are dropped with the process.


if __name__ == "__main__":
    _scorer_main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
