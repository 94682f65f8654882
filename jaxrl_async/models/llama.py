"""Llama-3 / Qwen2.5 / Qwen3 decoder-only family in Flax NNX.

One implementation with per-family switches (`LlamaConfig`) covers the architectures
of Hugging Face's `LlamaForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM`:

* grouped-query attention (`num_kv_heads` <= `num_heads`), rotary embeddings in the
  HF half-split layout, with the `llama3` frequency scaling (`rope_scaling`);
* SwiGLU MLP (`down(silu(gate(x)) * up(x))`), RMSNorm (HF numerics: statistics in
  float32, scale applied after casting back);
* switches: `qkv_bias` (Qwen2), `o_bias` / `mlp_bias` (Llama's `attention_bias` /
  `mlp_bias`), `qk_norm` (Qwen3: an RMSNorm over the head dim of q and k, before the
  rotation), `tie_word_embeddings` (no `lm_head`: the embedding is the head).

The module-level functions mirror `jaxrl_async.models.transformer` (same names,
argument order and semantics), so the sampler and learner can take either module:
`init_model`, `forward_logits`, `token_logprobs`, `inference_params`, `init_cache`,
`decode_step`, `prefill`, `sample_token`. Inference numerics (`Numerics`: bf16/fp16 weight casts,
int8 per-output-channel weight quantisation, logit noise) are transformer.py's own.

Differences from transformer.py: the config is a `LlamaConfig` (with ModelConfig-style
aliases `d_model`, `n_layers`, `n_heads`, `d_ff`, `max_len`, `head_dim`); the KV cache
holds `num_kv_heads` heads (`[L, B, S, KVH, Dh]`); `token_logprobs` never materialises
the `[B, T, V]` float32 logits (it maps over sequence chunks of the final hidden states);
`config.remat` wraps each block in `nnx.remat` for the learner. With `config.scan_layers` the
decoder layers are one module with stacked weights (a leading `[L]` axis on every layer
parameter) run by `jax.lax.scan`, so compile time does not grow with depth; `remat_policy`
picks what the rematerialised backward keeps (`REMAT_POLICIES`).

Weights are stored as `[in, out]` matrices (HF's `nn.Linear.weight` transposed), so
"output channel" is the last axis, as transformer.py's int8 quantisation assumes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_async.models import sharding
from jaxrl_async.models import transformer as _tf
from jaxrl_async.models.sharding import constrain
from jaxrl_async.models.transformer import Numerics, sample_token  # noqa: F401  (re-exported)

Array = jax.Array
Cache = dict[str, Array]

__all__ = [
    "LlamaConfig",
    "LlamaModel",
    "Numerics",
    "PARAM_AXES",
    "param_axes",
    "init_model",
    "forward_logits",
    "hidden_states",
    "token_logprobs",
    "inference_params",
    "init_cache",
    "decode_step",
    "prefill",
    "sample_token",
]


# ---------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and per-family switches (hashable: it lives in the graphdef).

    max_len: number of positions the KV cache holds (and the longest learner
      sequence); defaults in `hf.load` to min(max_position_embeddings, 4096).
    rope_scaling: None or a tuple of (key, value) pairs of HF's `rope_scaling` /
      `rope_parameters` dict (only `rope_type` "default" and "llama3" are supported).
    remat: wrap every block in `nnx.remat` (learner memory).
    remat_policy: what a rematerialised layer keeps for the backward (`REMAT_POLICIES`):
      "nothing_saveable" (recompute everything: least memory), "dots_saveable",
      "dots_with_no_batch_dims_saveable" (keep the matmul outputs: less recompute).
    scan_layers: stack the decoder layers' weights (`[L, ...]`) and run them with a scan.
    logprob_chunk: sequence chunk of `token_logprobs` ([B, chunk, V] logits at a time).
    architecture: the HF `architectures[0]` this config was read from / exports to.
    """

    vocab_size: int
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim_: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_len: int = 128
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    scan_layers: bool = False
    logprob_chunk: int = 64
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "max_len", "logprob_chunk",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"LlamaConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim_ is None and self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"LlamaConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}) when head_dim is not given"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"LlamaConfig head_dim ({self.head_dim}) must be even (rotary)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                             f"got {self.remat_policy!r}")
        rope_type = self.rope_params.get("rope_type", self.rope_params.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"LlamaConfig.rope_scaling: rope_type {rope_type!r} is not supported "
                "(supported: 'default', 'llama3')"
            )

    # ModelConfig-style aliases (what the sampler / learner read from transformer.py's config).
    @property
    def head_dim(self) -> int:
        return self.head_dim_ if self.head_dim_ is not None else self.hidden_size // self.num_heads

    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_layers

    @property
    def n_heads(self) -> int:
        return self.num_heads

    @property
    def d_ff(self) -> int:
        return self.intermediate_size

    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


# What a rematerialised layer keeps for the backward. None is jax.checkpoint's default (nothing).
REMAT_POLICIES = {
    "nothing_saveable": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse rotary frequencies [head_dim / 2] float32, as HF's rope init computes them
    (float32 arithmetic), with the `llama3` smoothing when configured."""
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    params = config.rope_params
    if params.get("rope_type", params.get("type", "default")) != "llama3":
        return inv_freq
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = smooth.astype(np.float32)
    smoothed = (1 - smooth) * inv_llama / np.float32(factor) + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_llama).astype(np.float32)


# ---------------------------------------------------------------------------
# The module


def _normal(key: Array, shape: tuple[int, ...], std: float) -> Array:
    return std * jax.random.normal(key, shape, jnp.float32)


class RMSNorm(nnx.Module):
    """HF-style RMSNorm: statistics in float32, normalised x cast back to the input
    dtype, then multiplied by the weight (in the input dtype)."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (HF weight transposed)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, std: float, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs.params(), (d_in, d_out), std))
        self.bias = nnx.Param(jnp.zeros((d_out,), jnp.float32)) if bias else None

    def __call__(self, x: Array) -> Array:
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def _rotary(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """HF rotary (half-split, `rotate_half`). x: [B, T, H, Dh]; positions [B, T].

    cos/sin computed in float32 and cast to x's dtype, then applied in x's dtype,
    as HF does."""
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    emb = jnp.concatenate([angle, angle], axis=-1)
    cos = jnp.cos(emb).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, h, kvh, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        out_std = 1.0 / math.sqrt(2 * config.num_layers)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, dh
        self.q_proj = Linear(d, h * dh, config.qkv_bias, 1.0 / math.sqrt(d), rngs)
        self.k_proj = Linear(d, kvh * dh, config.qkv_bias, 1.0 / math.sqrt(d), rngs)
        self.v_proj = Linear(d, kvh * dh, config.qkv_bias, 1.0 / math.sqrt(d), rngs)
        self.o_proj = Linear(h * dh, d, config.o_bias, out_std / math.sqrt(h * dh), rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(dh, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, positions, inv_freq, cache, layer):
        b, t, _ = x.shape
        dt = x.dtype
        h, kvh, dh = self.num_heads, self.num_kv_heads, self.head_dim
        # A sharded learner splits the heads over `tensor` (no-ops elsewhere).
        q = constrain(self.q_proj(x).reshape(b, t, h, dh), ("batch", "length", "act_heads", None))
        k = constrain(self.k_proj(x).reshape(b, t, kvh, dh), ("batch", "length", "act_kv_heads", None))
        v = constrain(self.v_proj(x).reshape(b, t, kvh, dh), ("batch", "length", "act_kv_heads", None))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = _rotary(q, positions, inv_freq)
        k = _rotary(k, positions, inv_freq)

        keys, values, mask, cache = _tf.attention_keys(k, v, positions, cache, layer, dt)
        qg = q.reshape(b, t, kvh, h // kvh, dh)  # query head i uses kv head i // group
        scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, keys).astype(jnp.float32)
        scores = scores * (dh ** -0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        attn = jnp.einsum("bkgqs,bskd->bqkgd", probs, values).reshape(b, t, h * dh)
        return self.o_proj(attn), cache


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        out_std = 1.0 / math.sqrt(2 * config.num_layers)
        self.gate_proj = Linear(d, f, config.mlp_bias, 1.0 / math.sqrt(d), rngs)
        self.up_proj = Linear(d, f, config.mlp_bias, 1.0 / math.sqrt(d), rngs)
        self.down_proj = Linear(f, d, config.mlp_bias, out_std / math.sqrt(f), rngs)

    def __call__(self, x):
        hidden = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("batch", "length", "act_mlp"))
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, inv_freq, cache, layer):
        attn, cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, cache, layer)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


def _stacked_layers(config: LlamaConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """One `DecoderLayer` whose every parameter has a leading `[num_layers]` axis (its own
    random init per layer)."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.num_layers)
    def make(r):
        return DecoderLayer(config, r)

    return make(rngs)


class LlamaModel(nnx.Module):
    """Embedding, decoder layers, final norm, head (`lm_head`, or the embedding if tied).

    The compute dtype follows the embedding's dtype (float32 params: learner numerics;
    bf16/fp16 from `inference_params`: inference numerics)."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.config = config
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = nnx.Param(_normal(rngs.params(), (v, d), 1.0))
        if config.scan_layers:
            self.layers = _stacked_layers(config, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.norm = RMSNorm(d, config.rms_norm_eps)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(_normal(rngs.params(), (d, v), 0.05 / math.sqrt(d)))

    def hidden(self, tokens, positions, cache=None):
        """Final-normed hidden states [B, T, D] (compute dtype) and the cache."""
        inv_freq = rope_inv_freq(self.config)
        # The residual stream's rows split over (data, fsdp) on a sharded learner, its width whole.
        residual = ("batch", "length", "act_embed")
        x = constrain(jnp.take(self.embed_tokens[...], tokens, axis=0), residual)
        if self.config.scan_layers:
            x, cache = self._scan_layers(x, positions, inv_freq, cache, residual)
            return self.norm(x), cache
        policy = REMAT_POLICIES[self.config.remat_policy]
        for i, layer in enumerate(self.layers):
            if self.config.remat and cache is None:
                x, _ = nnx.remat(
                    lambda lyr, x_, i=i: lyr(x_, positions, inv_freq, None, i), policy=policy
                )(layer, x)
            else:
                x, cache = layer(x, positions, inv_freq, cache, i)
            x = constrain(x, residual)
        return self.norm(x), cache

    def _scan_layers(self, x, positions, inv_freq, cache, residual):
        """The stacked layers by `jax.lax.scan`: one layer's program, whatever the depth.

        Each step merges one layer's slice of the stacked weights into a `DecoderLayer`; with a
        cache it also takes and returns that layer's `[B, S, KVH, Dh]` slice of k and v.
        """
        graphdef, stacked = nnx.split(self.layers)

        if cache is None:
            def body(h, layer_state):
                h, _ = nnx.merge(graphdef, layer_state)(h, positions, inv_freq, None, 0)
                return constrain(h, residual), None

            if self.config.remat:
                body = jax.checkpoint(body, policy=REMAT_POLICIES[self.config.remat_policy], prevent_cse=False)
            x, _ = jax.lax.scan(body, x, stacked)
            return x, None

        def body_cached(h, xs):
            layer_state, k, v = xs
            h, c = nnx.merge(graphdef, layer_state)(h, positions, inv_freq, {"k": k[None], "v": v[None]}, 0)
            return h, (c["k"][0], c["v"][0])

        x, (k, v) = jax.lax.scan(body_cached, x, (stacked, cache["k"], cache["v"]))
        return x, {"k": k, "v": v}

    def head_matrix(self, dtype) -> Array:
        """[D, V] output matrix in `dtype`."""
        if self.lm_head is None:
            return self.embed_tokens[...].astype(dtype).T
        return self.lm_head[...].astype(dtype)

    def __call__(self, tokens, positions, cache=None):
        x, cache = self.hidden(tokens, positions, cache)
        return x @ self.head_matrix(x.dtype), cache


# ---------------------------------------------------------------------------
# Pure functions on the split state (mirroring transformer.py)


# The logical axes of every parameter, by the last names of its path (models/sharding.py).
PARAM_AXES = {
    ("embed_tokens",): ("vocab", "embed"),
    ("lm_head",): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("o_proj", "bias"): ("norm",),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("gate_proj", "bias"): ("mlp",),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "bias"): ("mlp",),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("down_proj", "bias"): ("norm",),
    ("q_norm", "weight"): ("head_dim",),
    ("k_norm", "weight"): ("head_dim",),
    ("weight",): ("norm",),  # the layer norms and the final norm
}


def param_axes(params: nnx.State):
    """The logical axes of every parameter (a pytree like `params`), for the learner's mesh."""
    return sharding.param_axes(params, PARAM_AXES, "llama")


def init_model(config: LlamaConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """Builds the model with random weights; returns (graphdef, params)."""
    model = LlamaModel(config, nnx.Rngs(params=seed))
    return nnx.split(model, nnx.Param)


def _merge(graphdef: nnx.GraphDef, params: nnx.State) -> LlamaModel:
    model = nnx.merge(graphdef, params)
    if not isinstance(model, LlamaModel):
        raise TypeError(f"graphdef must describe a LlamaModel, got {type(model).__name__}")
    return model


def _positions(model: LlamaModel, tokens: Array) -> Array:
    _tf._check_tokens(tokens, rank=2)
    b, t = tokens.shape
    if t > model.config.max_len:
        raise ValueError(f"sequence length {t} exceeds LlamaConfig.max_len={model.config.max_len}")
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@functools.partial(jax.jit, static_argnums=0)
def forward_logits(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array) -> Array:
    """Learner forward. tokens [B, T] int -> logits [B, T, V] float32 (logit t predicts
    token t + 1; positions 0..T-1 per row, so right padding does not change the valid
    positions). Materialises [B, T, V]: use `token_logprobs` in the learner."""
    model = _merge(graphdef, params)
    logits, _ = model(tokens, _positions(model, tokens))
    return logits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def hidden_states(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array) -> Array:
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    model = _merge(graphdef, params)
    x, _ = model.hidden(tokens, _positions(model, tokens))
    return x


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array) -> Array:
    """Learner log-probs of the given tokens. tokens [B, T] -> [B, T] float32.

    out[:, t] = log p(tokens[:, t] | tokens[:, :t]); out[:, 0] = 0. Differentiable in
    params. The vocabulary projection and log-softmax run over `config.logprob_chunk`
    positions at a time (a rematerialised `lax.map`), so at most [B, chunk, V] float32
    logits exist at once, forward or backward.
    """
    model = _merge(graphdef, params)
    x, _ = model.hidden(tokens, _positions(model, tokens))  # [B, T, D]
    head = model.head_matrix(x.dtype)  # [D, V]
    b, t, d = x.shape
    n = t - 1
    if n == 0:
        return jnp.zeros((b, t), jnp.float32)
    chunk = min(model.config.logprob_chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(x[:, :-1], ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad)))
    h = h.reshape(b, n_chunks, chunk, d).swapaxes(0, 1)  # [C, B, chunk, D]
    h = constrain(h, (None, "batch", "length", "act_embed"))  # rows stay split as in the residual stream
    targets = targets.reshape(b, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args):
        hc, tc = args
        logits = constrain((hc @ head).astype(jnp.float32), ("batch", "length", "act_vocab"))  # [B, chunk, V]
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    picked = jax.lax.map(one_chunk, (h, targets))  # [C, B, chunk]
    picked = picked.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :n]
    return jnp.concatenate([jnp.zeros((b, 1), jnp.float32), picked], axis=1)


def inference_params(params: nnx.State, numerics: Numerics) -> nnx.State:
    """Learner params -> inference weights, exactly as transformer.inference_params:
    fp32 unchanged; bf16/fp16 every leaf cast; int8 every matrix (embedding and, when
    untied, lm_head included) fake-quantised per output channel (last axis)."""
    return _tf.inference_params(params, numerics)


def init_cache(config: LlamaConfig, batch: int, numerics: Numerics) -> Cache:
    """Empty KV cache {"k", "v": [L, B, max_len, KVH, Dh]} in the compute dtype (GQA:
    only the kv heads are stored). Rows need no reset between episodes."""
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    shape = (config.num_layers, batch, config.max_len, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, numerics.compute_dtype)
    return {"k": zeros, "v": jnp.zeros_like(zeros)}


def _decode_step(graphdef, inf_params, cache, tokens, positions, numerics, key):
    """One incremental step per row under inference numerics; same contract as
    transformer.decode_step: returns (logp [B, V] float32 of the NEXT token, noise
    included, NaN rows for positions out of range; the updated (donated) cache)."""
    model = _merge(graphdef, inf_params)
    _tf._check_inference_inputs(tokens, positions, 1, numerics, cache, model.embed_tokens[...])
    positions = positions.astype(jnp.int32)
    logits, cache = model(tokens[:, None], positions[:, None], cache)
    logits = logits[:, 0].astype(jnp.float32)
    if numerics.logit_noise_std > 0:
        logits = logits + numerics.logit_noise_std * jax.random.normal(key, logits.shape)
    logp = jax.nn.log_softmax(logits, axis=-1)
    in_range = (positions >= 0) & (positions < cache["k"].shape[2])
    return jnp.where(in_range[:, None], logp, jnp.nan), cache


decode_step = jax.jit(_decode_step, static_argnums=(0, 5), donate_argnums=2)


def _prefill(graphdef, inf_params, cache, tokens, positions, numerics):
    """Writes known tokens into the KV cache in one batched forward; same contract as
    transformer.prefill: tokens, positions [B, T] int32, a position >= max_len marks
    padding (its cache write is dropped); DONATES the cache, returns it (no logits)."""
    model = _merge(graphdef, inf_params)
    _tf._check_inference_inputs(tokens, positions, 2, numerics, cache, model.embed_tokens[...])
    _, cache = model.hidden(tokens, positions.astype(jnp.int32), cache)
    return cache


prefill = jax.jit(_prefill, static_argnums=(0, 5), donate_argnums=2)
