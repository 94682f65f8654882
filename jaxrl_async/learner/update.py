"""Train state and the jitted train steps (RL and supervised warm start).

The whole update for one batch (epochs x minibatches of gradient steps) is one compiled
function, as in purejaxrl; batches have a fixed padded shape so it compiles once.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxrl_async.core import proximal
from jaxrl_async.core.losses import LossConfig, policy_loss
from jaxrl_async.models import transformer as model_lib
from jaxrl_async.rollout.trajectory import Batch


@flax.struct.dataclass
class TrainState:
    """Everything the learner needs to continue: checkpointed as one pytree.

    params: model params (learner numerics, float32).
    opt_state: optax state.
    step: optimizer steps taken (int32 scalar).
    version: parameter version = number of RL updates applied (int32 scalar); the
      sampler tags tokens with it.
    ewma, ewma_count: the bias-corrected EWMA of `params` and its normaliser (the EWMA
      proximal routes); None otherwise.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    version: jax.Array
    ewma: Any = None
    ewma_count: Any = None


def make_optimizer(learning_rate: float, grad_clip: float, weight_decay: float = 0.0,
                   b2: float = 0.99) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping (clipping guards against rare large-ratio batches)."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(learning_rate, b1=0.9, b2=b2, weight_decay=weight_decay),
    )


def create_train_state(params, optimizer: optax.GradientTransformation, ewma: bool = False,
                       shardings=None) -> TrainState:
    """A fresh train state; with `ewma`, an EWMA of the weights that starts as a copy (count 0).

    shardings: the state's placement (`learner.mesh.state_shardings`, params placed so
    already): the optimizer state and the EWMA are then built in place, split, never whole on
    one device.
    """
    if shardings is not None:
        return jax.jit(lambda p: create_train_state(p, optimizer, ewma), out_shardings=shardings)(params)
    return TrainState(params=params, opt_state=optimizer.init(params),
                      step=jnp.zeros((), jnp.int32), version=jnp.zeros((), jnp.int32),
                      ewma=jax.tree.map(jnp.copy, params) if ewma else None,
                      ewma_count=jnp.zeros((), jnp.float32) if ewma else None)


@functools.partial(jax.jit, static_argnames=("graphdef", "model"))
def token_logprobs(graphdef, params, tokens, model=model_lib):
    """Learner-numerics log-probs `[B, T]` of `tokens` `[B, T]` (no gradient needed).

    model: the model module (`models.transformer` or `models.llama`, see `config.model_module`)."""
    return model.token_logprobs(graphdef, params, tokens)


def _minibatches(batch: Batch, key, num_minibatches: int) -> Batch:
    """Shuffles rows and splits `[B, ...]` arrays into `[M, B/M, ...]`."""
    b = batch.tokens.shape[0]
    if b % num_minibatches:
        raise ValueError(f"batch of {b} rows does not split into {num_minibatches} minibatches")
    perm = jax.random.permutation(key, b)
    return jax.tree.map(lambda x: x[perm].reshape(num_minibatches, b // num_minibatches, *x.shape[1:]), batch)


def make_rl_update(graphdef, optimizer: optax.GradientTransformation, loss_config: LossConfig,
                   num_minibatches: int = 1, num_epochs: int = 1, loglinear: bool = False, donate: bool = True,
                   three_term: bool = False, model=model_lib, mesh=None, state_sharding=None):
    """Builds `update(state, batch, key, ewma_beta=0.0) -> (state, metrics)`, jitted with the state donated.

    (`donate=False` keeps the input state alive: only for the before/after benchmark.)
    model: the model module (`models.transformer` or `models.llama`, see `config.model_module`).
    mesh, state_sharding: the learner mesh and the train state's placement on it
    (`learner.mesh.state_shardings`); the new state comes back placed the same way, and the
    model's activation constraints apply (it is traced under `jax.set_mesh(mesh)`).

    batch: a `Batch` of `[B, T]` arrays with `advantages` and `prox_logp` filled by the
    proximal route (`learner.route`), except with `loglinear`, where the proximal log-probs
    are interpolated inside the loss from the current log-probs at every gradient step
    (they depend on `pi_theta`, docs/design.md section 3). With `three_term` (`proximal.anchor`),
    the loss also reads `old_logp` (the exact pi_old; `prox_logp` is then the anchor) and takes
    the three-term form (docs/design.md section 2.6); otherwise `old_logp` is ignored. When the
    state carries an EWMA it is updated after every optimizer step with decay `ewma_beta`. Metrics
    are averaged over all gradient steps of the update.

    Non-finite guard: if the loss or the gradient norm of any gradient step is not finite
    (NaN behaviour log-probs from a broken sampler, an overflow, a corrupt batch), the whole
    update is skipped: params, optimizer state, EWMA and step counter come back unchanged,
    only `version` advances (the runtime's schedule stays the same; the new version holds
    the old weights), and `train/skipped_nonfinite` is 1.
    """

    def loss_fn(params, mb, version):
        logp = model.token_logprobs(graphdef, params, mb.tokens)
        prox = proximal.loglinear_logp(logp, mb.behav_logp, mb.versions, version) if loglinear else mb.prox_logp
        old = mb.old_logp if three_term else None
        return policy_loss(logp, prox, mb.behav_logp, mb.advantages, mb.loss_mask, loss_config, old)

    def grad_step(state: TrainState, mb, ewma_beta):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, mb, state.version)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, **{"perf/grad_norm": optax.global_norm(grads)})
        state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
        if state.ewma is not None:
            ewma, count = proximal.ewma_update(state.ewma, params, state.ewma_count, ewma_beta)
            state = state.replace(ewma=ewma, ewma_count=count)
        return state, metrics

    def update(state: TrainState, batch: Batch, key, ewma_beta=0.0):
        if three_term:
            if batch.old_logp is None:
                raise ValueError("three_term update: the batch has no old_logp "
                                 "(the route fills it with proximal.anchor)")
        else:
            batch = batch.replace(old_logp=None)  # read through prox_logp only

        def epoch(state, key):
            return jax.lax.scan(lambda s, mb: grad_step(s, mb, ewma_beta), state,
                                _minibatches(batch, key, num_minibatches))

        new, metrics = jax.lax.scan(epoch, state, jax.random.split(key, num_epochs))
        finite = jnp.isfinite(metrics["loss/policy"]).all() & jnp.isfinite(metrics["perf/grad_norm"]).all()
        # A select, not a branch: the finite path's values pass through bit for bit.
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["train/skipped_nonfinite"] = 1.0 - finite.astype(jnp.float32)
        return new.replace(version=state.version + 1), metrics

    return _on_mesh(jax.jit(update, donate_argnums=0 if donate else (),
                            **_out_shardings(mesh, state_sharding)), mesh)


def _out_shardings(mesh, state_sharding) -> dict:
    """jit's `out_shardings` for `(state, metrics)`: the state kept where it was, the metrics replicated."""
    if state_sharding is None:
        return {}
    return {"out_shardings": (state_sharding, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))}


def _on_mesh(fn, mesh):
    """`fn` called (and so traced) with `mesh` as the current mesh, which the models' `constrain` reads."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def make_sft_update(graphdef, optimizer: optax.GradientTransformation, model=model_lib, mesh=None,
                    state_sharding=None):
    """Builds `update(state, batch) -> (state, metrics)`: one supervised step.

    mesh, state_sharding: as for `make_rl_update`.

    batch: `tokens` and `loss_mask` `[B, T]`; the loss is the mean negative log-likelihood
    of the masked (agent) tokens. Used for the warm start on scripted demonstrations; it
    does not change the parameter version.
    """

    def loss_fn(params, batch):
        logp = model.token_logprobs(graphdef, params, batch["tokens"])
        mask = batch["loss_mask"].astype(jnp.float32)
        return -(logp * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def update(state: TrainState, batch: dict):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state), {"sft/nll": loss}

    return _on_mesh(jax.jit(update, donate_argnums=0, **_out_shardings(mesh, state_sharding)), mesh)
