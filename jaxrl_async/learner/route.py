"""The learner side of the proximal routes: fills `Batch.prox_logp` (docs/design.md section 3).

`ProximalRoute` turns a host batch into the device batch the update reads, with
`prox_logp` from the configured `proximal.source` (`core.proximal.Route`) and the route's
cost metrics. With `proximal.anchor` (the three-term loss) an exact source fills
`old_logp` instead, and `prox_logp` holds the anchor. `snapshot_logp` is the exact snapshot
recomputation from the parameter-version ring buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_async import config as config_lib
from jaxrl_async.core.buckets import bucket
from jaxrl_async.core.losses import policy_loss
from jaxrl_async.core.proximal import Route, matched_beta
from jaxrl_async.learner import mesh as mesh_lib
from jaxrl_async.learner.update import token_logprobs
from jaxrl_async.rollout.trajectory import Batch


def snapshot_logp(logprob_fn: Callable, get_params: Callable, tokens: np.ndarray, versions: np.ndarray,
                  loss_mask: np.ndarray, missing: tuple = (KeyError,), row_multiple: int = 1):
    """Exact old log-probs from retained parameter versions (the `snapshot` route).

    For each version present among the generated tokens, one learner-numerics forward pass
    over only the rows that hold it (padded to a power-of-two row count, rounded up to a
    multiple of `row_multiple` so the rows split evenly over a device mesh), and a gather
    of the tokens of that version.

    Args:
      logprob_fn: `(params, tokens [b, T]) -> [b, T]` learner log-probs.
      get_params: `version -> params`; raises one of `missing` for a version no longer retained.
      tokens, versions: `[B, T]` int; loss_mask: `[B, T]` bool.
      row_multiple: padded row counts are multiples of this (the learner's device count, so
        each forward shards evenly over the mesh); B must be a multiple of it.

    Returns:
      (old_logp `[B, T]` float32 (0 off the mask and on rows with a missing version),
       missing_rows `[B]` bool: rows holding a token of a version no longer retained,
       forward_passes: int, rows_scored: int).
    """
    b = tokens.shape[0]
    old = np.zeros(tokens.shape, np.float32)
    missing_rows = np.zeros(b, bool)
    passes = rows_scored = 0
    for v in np.unique(versions[loss_mask]):
        rows = np.flatnonzero(((versions == v) & loss_mask).any(axis=1))
        try:
            params = get_params(int(v))
        except missing:
            missing_rows[rows] = True
            continue
        # Power-of-two row counts (at most B): a few shapes, so a few compilations.
        n = min(-(-bucket(len(rows)) // row_multiple) * row_multiple, b)
        padded = np.concatenate([rows, np.repeat(rows[:1], n - len(rows))])
        lp = np.asarray(logprob_fn(params, jnp.asarray(tokens[padded])))[: len(rows)]
        sel = (versions[rows] == v) & loss_mask[rows]
        block = old[rows]
        block[sel] = lp[sel]
        old[rows] = block
        passes += 1
        rows_scored += len(padded)
    old[missing_rows] = 0.0
    return old, missing_rows, passes, rows_scored


def mesh_logprob_fn(logprob_fn, mesh, param_sharding=None):
    """`fn(params, tokens [B, T]) -> [B, T]` for `snapshot_logp` on the learner's mesh: the rows split
    over (data, fsdp), the version's weights placed by `param_sharding` (the learner's params
    shardings: split like the train state, so no device holds a whole extra copy; `device_put`
    keeps a cached version already placed so), or replicated when it is None."""
    def fn(params, tokens):
        params = mesh_lib.replicate(params, mesh) if param_sharding is None else jax.device_put(params,
                                                                                                 param_sharding)
        return logprob_fn(params, mesh_lib.shard_rows(tokens, mesh))
    return fn


class ProximalRoute:
    """Fills `prox_logp` for a batch from the configured `proximal.source`, with its cost metrics.

    Exact routes: `snapshot` recomputes pi_old with each token's version from the ring
    buffer; `dedicated` and `interrupt` arrive with `old_logp` filled by the sampler side.
    Approximate routes: `recompute` (learner weights at the start of the step), `bypass`
    (behaviour log-probs), `loglinear` (interpolated inside the loss), `ewma` and
    `revised_ewma` (a forward pass with the EWMA weights of the train state). With
    `proximal.audit`, exact routes also log what `recompute` would have given, so the
    entanglement of staleness and mismatch is visible in every exact run.

    With `proximal.anchor` (`recompute`, `ewma` or `revised_ewma`, only beside an exact
    source) the exact pi_old goes to `old_logp` and `prox_logp` holds the anchor, computed
    as the approximate route of that name computes it (one more forward pass, counted in
    `proximal/forward_passes`): the update then runs the three-term loss.
    """

    AUDIT_KEYS = ("mask/token_frac", "mask/seq_frac", "mask/catastrophic_frac", "is/truncated_frac",
                  "is/weight_mean", "mismatch/kl_k1")

    def __init__(self, config, graphdef, store, loss_config, window: list = (), mesh=None,
                 missing: tuple = (KeyError,), param_sharding=None):
        """store: the version ring buffer (`runtime.versions.VersionStore`; read by `snapshot`);
        window: the revised EWMA's staleness window, restored from a checkpoint;
        missing: exceptions `store.get` raises for a version no longer retained;
        param_sharding: the learner's params shardings on `mesh` (the snapshot forwards place each
        version so); None: replicated."""
        self.config = config
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(1)
        self.param_sharding = param_sharding
        self.route = Route(config.proximal.source)
        self.anchor = config_lib.proximal_anchor(config)  # None: two-term loss
        self.graphdef = graphdef
        self.model = config_lib.model_module(config)  # transformer or llama
        self.store = store
        self.loss_config = loss_config
        self.missing = missing
        self.window = list(window)  # mean token staleness of recent batches (revised_ewma)
        self.ewma_beta = float(config.proximal.ewma_beta)
        self.steps_per_version = config.optim.num_minibatches * config.optim.num_epochs

    def _logp(self, params, tokens):
        return token_logprobs(self.graphdef, params, tokens, self.model)

    def __call__(self, state, batch: Batch, version: int) -> tuple[Batch, dict]:
        """batch: a host (numpy) Batch with advantages; returns (the device Batch with `prox_logp`, metrics).

        With `proximal.anchor`, the device Batch also has `old_logp` (the exact pi_old) and
        `prox_logp` is the anchor. The input is not changed; every array crosses to the
        device once.
        """
        route, m = self.route, {}
        passes, copies = 0, 0
        if route == Route.SNAPSHOT:
            prox, batch, passes, copies = self._snapshot(batch, m)
        # Every array but prox_logp goes to the learner's mesh once (rows over the `data` axis).
        dev = mesh_lib.shard_rows(batch.replace(old_logp=None, prox_logp=None), self.mesh)
        if route in (Route.RECOMPUTE, Route.EWMA, Route.REVISED_EWMA):
            prox, passes, copies = self._learner_prox(route, state, batch, version, dev, m)
        elif route in (Route.BYPASS, Route.LOGLINEAR):
            prox = dev.behav_logp  # loglinear: replaced inside the loss at every gradient step
        elif route.sampler_side:
            if batch.old_logp is None:
                raise RuntimeError(f"proximal.source={route.value!r} but the trajectories arrived without old_logp")
            prox, copies = batch.old_logp, 1
        if not isinstance(prox, jax.Array):  # host arrays cross once; device ones are only resharded
            prox = np.asarray(prox, np.float32)
        prox = mesh_lib.shard_rows(prox, self.mesh)
        anchor = None
        if self.anchor is None:
            dev = dev.replace(prox_logp=prox)
        else:  # three-term loss: the exact pi_old is old_logp, the anchor is prox_logp
            anchor, anchor_passes, anchor_copies = self._learner_prox(self.anchor, state, batch, version, dev, m)
            passes, copies = passes + anchor_passes, copies + anchor_copies
            dev = dev.replace(old_logp=prox, prox_logp=anchor)
        m["proximal/forward_passes"] = float(passes)
        m["proximal/param_copies"] = float(copies)
        if route.exact and self.config.proximal.audit:
            # The recompute anchor is exactly what the audit compares against: no second forward for it.
            recompute = anchor if self.anchor == Route.RECOMPUTE else self._logp(state.params, dev.tokens)
            for name, p in (("exact", prox), ("recompute", recompute)):
                audit = _discrepancy_metrics(p, dev.behav_logp, dev.advantages, dev.loss_mask, self.loss_config)
                m.update({f"audit/{name}/{k}": float(audit[k]) for k in self.AUDIT_KEYS})
        return dev, m

    def _learner_prox(self, route: Route, state, batch: Batch, version: int, dev: Batch, m: dict):
        """`(prox, forward_passes, param_copies)` of a learner-side approximate route (`recompute`, `ewma`,
        `revised_ewma`): the route itself, or the anchor of the three-term loss."""
        if route == Route.RECOMPUTE:
            return self._logp(state.params, dev.tokens), 1, 0
        if route == Route.REVISED_EWMA:
            self._match_beta(batch, version)
            m["proximal/ewma_beta"] = self.ewma_beta
        return self._logp(state.ewma, dev.tokens), 1, 1

    def _snapshot(self, batch: Batch, m: dict):
        """Exact pi_old from the ring buffer; episodes whose versions were evicted train nothing."""
        bytes_before = self.store.stats["bytes_read"]
        # Each version's forward runs on the learner's mesh: its rows sharded, its weights split like the learner's.
        prox, missing, passes, rows = snapshot_logp(
            mesh_logprob_fn(self._logp, self.mesh, self.param_sharding), self.store.get, batch.tokens,
            batch.versions, batch.loss_mask, missing=self.missing, row_multiple=self.mesh.devices.size)
        if missing.any() and self.config.proximal.on_evicted == "fail":
            raise RuntimeError(f"proximal.source='snapshot': {int(missing.sum())} episodes hold versions no "
                               f"longer in the ring buffer (retained: {self.store.versions()}); raise "
                               f"runtime.ring_capacity or set proximal.on_evicted='drop'")
        batch = batch.replace(loss_mask=batch.loss_mask & ~missing[:, None])  # dropped episodes train nothing
        m["proximal/dropped_episodes"] = float(missing.sum())
        m["proximal/rows_scored"] = float(rows)
        m["proximal/bytes_read"] = float(self.store.stats["bytes_read"] - bytes_before)
        copies = len(np.unique(batch.versions[batch.loss_mask]))
        return prox, batch, passes, copies

    def _match_beta(self, batch: Batch, version: int) -> None:
        """Revised EWMA: the decay whose average age matches the recent mean token staleness."""
        gen = batch.loss_mask
        if gen.any():
            self.window = (self.window + [float((version - batch.versions[gen]).mean())])[
                -self.config.proximal.staleness_window:]
        s = (np.mean(self.window) if self.window else 0.0) * self.steps_per_version  # in optimizer steps
        self.ewma_beta = float(matched_beta(s, self.config.proximal.beta_min, self.config.proximal.beta_max))


@functools.partial(jax.jit, static_argnames=("loss_config",))
def _discrepancy_metrics(prox, behav, advantages, mask, loss_config):
    # The discrepancy statistics depend only on prox and behav; logp = prox makes r = 1.
    return policy_loss(prox, prox, behav, advantages, mask, loss_config)[1]
