"""Hugging Face checkpoints (Llama-3, Qwen2.5, Qwen3) in and out of `models.llama`.

* `load(path, dtype="float32")` reads a checkpoint directory as HF writes it
  (`config.json` + `model.safetensors` or sharded `*.safetensors` with
  `model.safetensors.index.json`) with the `safetensors` numpy API (no torch), maps the
  tensors onto the NNX params and returns an `HFModel` (`logits(tokens)`, `graphdef`,
  `params`, `config`, `hf_config`).
* `export(model_or_params, config, path)` writes params back in the same layout
  (+ config.json) so `transformers` loads them.
* `load_tokenizer(path)` reads `tokenizer.json` + `tokenizer_config.json` with the
  `tokenizers` package and renders the checkpoint's Jinja chat template the way
  `transformers` does (sandboxed env, trim_blocks, lstrip_blocks, `raise_exception`,
  `tojson`, `strftime_now`, the special tokens in the context).

Errors (unsupported architecture, missing / unexpected / mis-shaped tensors, missing
files, a template that fails) raise `CheckpointError` naming the file and the tensor or
field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_async.models import families, llama

SUPPORTED_ARCHITECTURES = families.HF_ARCHITECTURES  # the HF rows of the family table
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_DEFAULT_MAX_LEN = 4096


class CheckpointError(ValueError):
    """A checkpoint (or tokenizer) directory that cannot be read or written as asked."""


# ---------------------------------------------------------------------------
# config.json <-> LlamaConfig


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def config_from_hf(hf: dict, max_len: int | None = None, source: str = "config.json", **overrides) -> llama.LlamaConfig:
    """LlamaConfig from a HF config.json dict. max_len: KV-cache / sequence length
    (default min(max_position_embeddings, 4096))."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: field 'architectures' = {archs!r} is not supported "
            f"(supported: one of {list(SUPPORTED_ARCHITECTURES)})"
        )
    arch = archs[0]
    family = families.by_architecture(arch, source)

    def need(field):
        if field not in hf or hf[field] is None:
            raise CheckpointError(f"{source}: required field {field!r} is missing")
        return hf[field]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    # Rope: transformers v4 writes rope_theta + rope_scaling, v5 rope_parameters.
    rope = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        rope.update(hf["rope_scaling"])
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10_000.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(
            f"{source}: field 'rope_scaling' has rope_type {rope_type!r}; only 'default' "
            "and 'llama3' are supported"
        )
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if rope.get(key) is None:
                raise CheckpointError(f"{source}: llama3 rope_scaling lacks field {key!r}")
    rope = {k: v for k, v in rope.items() if k in (
        "rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
    )} if rope_type == "llama3" else None

    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise CheckpointError(f"{source}: sliding-window attention ('use_sliding_window' / 'layer_types') "
                              "is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: field 'hidden_act' = {hf.get('hidden_act')!r}; only 'silu' is supported")
    if float(hf.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise CheckpointError(f"{source}: field 'partial_rotary_factor' != 1 is not supported")

    attention_bias = bool(hf.get("attention_bias", False))
    if family.qkv_bias:  # Qwen2: q/k/v biases always, none on the output projection
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = attention_bias
    max_pos = int(hf.get("max_position_embeddings") or _DEFAULT_MAX_LEN)
    kwargs = dict(
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim_=int(hf["head_dim"]) if hf.get("head_dim") else None,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=_freeze(rope) if rope else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if arch == "LlamaForCausalLM" else False,
        qk_norm=family.qk_norm,
        max_len=int(max_len) if max_len is not None else min(max_pos, _DEFAULT_MAX_LEN),
        architecture=arch,
    )
    kwargs.update(overrides)
    try:
        return llama.LlamaConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


def config_to_hf(config: llama.LlamaConfig, base: dict | None = None) -> dict:
    """HF config.json dict for `config` (fields of `base` kept where not overridden)."""
    hf = dict(base or {})
    arch = config.architecture
    hf.update(
        architectures=[arch],
        model_type=families.by_architecture(arch).name,  # HF's model_type is the family's name
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    hf.setdefault("max_position_embeddings", config.max_len)
    rope = dict(config.rope_params) if config.rope_scaling else {"rope_type": "default"}
    rope["rope_theta"] = config.rope_theta
    hf["rope_parameters"] = rope
    hf["rope_theta"] = config.rope_theta
    hf["rope_scaling"] = dict(config.rope_params) if config.rope_scaling else None
    if arch == "LlamaForCausalLM":
        hf["attention_bias"] = config.qkv_bias
        hf["mlp_bias"] = config.mlp_bias
    elif arch == "Qwen3ForCausalLM":
        hf["attention_bias"] = config.qkv_bias
    hf.pop("torch_dtype", None)
    hf.pop("dtype", None)
    return hf


# ---------------------------------------------------------------------------
# Tensor name mapping


def _tensor_map(config: llama.LlamaConfig) -> dict[str, tuple[tuple, tuple[int, ...], bool]]:
    """HF tensor name -> (path into the NNX params state, HF shape, transpose?)."""
    d, f = config.hidden_size, config.intermediate_size
    h, kvh, dh = config.num_heads, config.num_kv_heads, config.head_dim
    out: dict[str, tuple[tuple, tuple[int, ...], bool]] = {
        "model.embed_tokens.weight": (("embed_tokens",), (config.vocab_size, d), False),
        "model.norm.weight": (("norm", "weight"), (d,), False),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head",), (config.vocab_size, d), True)
    linears = [
        ("self_attn", "q_proj", d, h * dh, config.qkv_bias),
        ("self_attn", "k_proj", d, kvh * dh, config.qkv_bias),
        ("self_attn", "v_proj", d, kvh * dh, config.qkv_bias),
        ("self_attn", "o_proj", h * dh, d, config.o_bias),
        ("mlp", "gate_proj", d, f, config.mlp_bias),
        ("mlp", "up_proj", d, f, config.mlp_bias),
        ("mlp", "down_proj", f, d, config.mlp_bias),
    ]
    for i in range(config.num_layers):
        pre = f"model.layers.{i}"
        out[f"{pre}.input_layernorm.weight"] = (("layers", i, "input_layernorm", "weight"), (d,), False)
        out[f"{pre}.post_attention_layernorm.weight"] = (
            ("layers", i, "post_attention_layernorm", "weight"), (d,), False)
        for sub, name, d_in, d_out, bias in linears:
            out[f"{pre}.{sub}.{name}.weight"] = (("layers", i, sub, name, "kernel"), (d_out, d_in), True)
            if bias:
                out[f"{pre}.{sub}.{name}.bias"] = (("layers", i, sub, name, "bias"), (d_out,), False)
        if config.qk_norm:
            for name in ("q_norm", "k_norm"):
                out[f"{pre}.self_attn.{name}.weight"] = (("layers", i, "self_attn", name, "weight"), (dh,), False)
    return out


# Buffers some HF versions wrote into checkpoints; never weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _get(state, path):
    node = state
    for key in path:
        node = node[key]
    return node


def _set(state, path, value):
    _get(state, path[:-1])[path[-1]] = value


def _stacked(config: llama.LlamaConfig, path: tuple) -> tuple[tuple, int | None]:
    """(path into the params, layer index or None): with `scan_layers` a layer's tensor is the
    slice `[i]` of the stacked leaf at `("layers", ...)`, not the leaf at `("layers", i, ...)`."""
    if config.scan_layers and path[0] == "layers":
        return ("layers",) + tuple(path[2:]), path[1]
    return path, None


# ---------------------------------------------------------------------------
# Loading


def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file (absolute)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        data = _read_json(index)
        if "weight_map" not in data:
            raise CheckpointError(f"{index}: field 'weight_map' is missing")
        files = {}
        for name, fname in data["weight_map"].items():
            full = os.path.join(path, fname)
            if not os.path.isfile(full):
                raise CheckpointError(f"{full}: shard listed in {index} (tensor {name!r}) not found")
            files[name] = full
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json found"
        )
    from safetensors import safe_open

    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


@dataclasses.dataclass
class HFModel:
    """A loaded checkpoint: `graphdef`, `params` (nnx.State), `config` (LlamaConfig),
    `hf_config` (the config.json dict), `path`."""

    graphdef: nnx.GraphDef
    params: nnx.State
    config: llama.LlamaConfig
    hf_config: dict
    path: str | None = None

    def logits(self, tokens) -> jax.Array:
        """tokens [B, T] int32 (right padding fine: causal) -> [B, T, V] float32."""
        return llama.forward_logits(self.graphdef, self.params, jnp.asarray(tokens, jnp.int32))

    def token_logprobs(self, tokens) -> jax.Array:
        return llama.token_logprobs(self.graphdef, self.params, jnp.asarray(tokens, jnp.int32))


def load(path: str, dtype: str = "float32", max_len: int | None = None, **config_overrides) -> HFModel:
    """Loads a HF Llama / Qwen2 / Qwen3 checkpoint directory. dtype: "float32" |
    "bfloat16" | "float16" (the params' dtype, hence the compute dtype). max_len: KV
    cache / sequence length (default min(max_position_embeddings, 4096)).
    config_overrides: e.g. remat=True, logprob_chunk=128."""
    from safetensors import safe_open

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    hf = _read_json(cfg_path)
    config = config_from_hf(hf, max_len=max_len, source=cfg_path, **config_overrides)
    expected = _tensor_map(config)
    files = _weight_files(path)

    extra = sorted(n for n in files if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    # A tied checkpoint may still carry lm_head.weight (equal to the embedding): ignore it.
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
    if extra:
        raise CheckpointError(
            f"{files[extra[0]]}: unexpected tensor(s) for {config.architecture}: {extra[:5]}"
            + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        )
    missing = sorted(n for n in expected if n not in files)
    if missing:
        raise CheckpointError(
            f"{path}: missing tensor(s) for {config.architecture}: {missing[:5]}"
            + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        )

    graphdef, abstract = nnx.eval_shape(lambda: nnx.split(llama.LlamaModel(config, nnx.Rngs(params=0)), nnx.Param))
    state = nnx.to_pure_dict(abstract)
    target = _DTYPES[dtype]
    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    layers: dict[tuple, list] = {}  # scan_layers: each stacked leaf's per-layer arrays
    for fname, names in by_file.items():
        with safe_open(fname, framework="numpy") as f:
            for name in names:
                arr = f.get_tensor(name)
                state_path, shape, transpose = expected[name]
                if tuple(arr.shape) != shape:
                    raise CheckpointError(
                        f"{fname}: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}"
                    )
                if transpose:
                    arr = arr.T
                state_path, layer = _stacked(config, state_path)
                if layer is not None:
                    layers.setdefault(state_path, [None] * config.num_layers)[layer] = arr
                    continue
                _set(state, state_path, jnp.asarray(np.ascontiguousarray(arr)).astype(target))
    for state_path, arrays in layers.items():
        _set(state, state_path, jnp.asarray(np.stack(arrays)).astype(target))
    nnx.replace_by_pure_dict(abstract, state)
    return HFModel(graphdef=graphdef, params=abstract, config=config, hf_config=hf, path=path)


# ---------------------------------------------------------------------------
# Export


_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def export(model_or_params, config: llama.LlamaConfig | None, path: str, dtype: str | None = None,
           max_shard_bytes: int | None = None) -> None:
    """Writes params as a HF checkpoint (config.json + model.safetensors, or shards +
    model.safetensors.index.json when `max_shard_bytes` is given and exceeded).

    model_or_params: an `HFModel` (its config.json fields are kept) or an nnx.State of
    params; config: the LlamaConfig (None: the HFModel's). dtype: "float32" |
    "bfloat16" | "float16" for the written tensors (default: the params' dtype)."""
    from safetensors.numpy import save_file

    base = None
    if isinstance(model_or_params, HFModel):
        params = model_or_params.params
        base = model_or_params.hf_config
        config = config or model_or_params.config
    else:
        params = model_or_params
    if config is None:
        raise ValueError("export needs the LlamaConfig when given bare params")
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    state = nnx.to_pure_dict(params)
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, (state_path, shape, transpose) in _tensor_map(config).items():
        try:
            stacked_path, layer = _stacked(config, state_path)
            arr = _get(state, stacked_path)
            if layer is not None:
                arr = arr[layer]
        except (KeyError, IndexError, TypeError) as e:
            raise CheckpointError(f"export: params lack the leaf for tensor {name!r} ({state_path})") from e
        arr = np.asarray(jax.device_get(arr))
        if dtype is not None:
            arr = np.asarray(jnp.asarray(arr).astype(_DTYPES[dtype]))
        if transpose:
            arr = arr.T
        if tuple(arr.shape) != shape:
            raise CheckpointError(f"export: tensor {name!r} has shape {tuple(arr.shape)}, expected {shape}")
        tensors[name] = np.ascontiguousarray(arr)

    hf = config_to_hf(config, base)
    first = next(iter(tensors.values()))
    hf["torch_dtype"] = hf["dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
        first.dtype, "bfloat16")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)

    meta = {"format": "pt"}
    total = sum(a.nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------
# Decoding helper (greedy / sampled continuation with the KV cache)


def generate(model: HFModel, prompts: list[list[int]], max_new_tokens: int,
             numerics: llama.Numerics | None = None, temperature: float | None = None,
             seed: int = 0, eos_token_id: int | None = None) -> list[list[int]]:
    """Continues each prompt with the KV-cache decode loop (greedy when temperature is
    None). Rows are fed token by token at their own positions (ragged prompts fine)."""
    numerics = numerics or llama.Numerics()
    inf = llama.inference_params(model.params, numerics)
    b = len(prompts)
    cache = llama.init_cache(model.config, b, numerics)
    key = jax.random.PRNGKey(seed)
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError("prompts must be non-empty")
    out = [list(p) for p in prompts]
    done = [False] * b
    # step s feeds token s of each row (prompt token, or the row's last generated token)
    for s in range(max(lens) + max_new_tokens - 1):
        toks = np.array([out[r][min(s, len(out[r]) - 1)] for r in range(b)], np.int32)
        pos = np.array([min(s, len(out[r]) - 1) for r in range(b)], np.int32)
        key, k_noise, k_sample = jax.random.split(key, 3)
        logp, cache = llama.decode_step(model.graphdef, inf, cache, jnp.asarray(toks), jnp.asarray(pos),
                                        numerics, k_noise)
        if temperature is None:
            nxt = np.asarray(jnp.argmax(logp, axis=-1))
        else:
            nxt = np.asarray(llama.sample_token(logp, k_sample, temperature)[0])
        for r in range(b):
            # row r predicts its next token once the step fed its last token
            if s == len(out[r]) - 1 and not done[r] and len(out[r]) - lens[r] < max_new_tokens:
                out[r].append(int(nxt[r]))
                if eos_token_id is not None and nxt[r] == eos_token_id:
                    done[r] = True
    return [o[n:] for o, n in zip(out, lens)]


# ---------------------------------------------------------------------------
# Tokenizer


def _token_str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HFTokenizer:
    """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) of a checkpoint."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        path = os.fspath(path)
        self.path = path
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise CheckpointError(f"{tok_file}: file not found (only fast tokenizers are supported)")
        try:
            self._tok = Tokenizer.from_file(tok_file)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{tok_file}: cannot be read by tokenizers ({e})") from e
        cfg_file = os.path.join(path, "tokenizer_config.json")
        self.tokenizer_config = _read_json(cfg_file)
        special_map = os.path.join(path, "special_tokens_map.json")
        specials = _read_json(special_map) if os.path.isfile(special_map) else {}
        specials.update({k: v for k, v in self.tokenizer_config.items() if k in _SPECIAL_ATTRS})
        self.special_tokens = {
            k: _token_str(specials[k]) for k in _SPECIAL_ATTRS if _token_str(specials.get(k)) is not None
        }
        self.chat_template, self.chat_template_source = self._find_template(cfg_file)
        self.clean_up_tokenization_spaces = bool(self.tokenizer_config.get("clean_up_tokenization_spaces", False))

    def _find_template(self, cfg_file):
        jinja_file = os.path.join(self.path, "chat_template.jinja")
        if os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                return f.read(), jinja_file
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}
        if template is None:
            cj = os.path.join(self.path, "chat_template.json")
            if os.path.isfile(cj):
                return _read_json(cj).get("chat_template"), cj
        return template, cfg_file

    # -- ids ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __getattr__(self, name):
        if name.endswith("_token_id") and name[: -len("_id")] in _SPECIAL_ATTRS:
            tok = self.__dict__.get("special_tokens", {}).get(name[: -len("_id")])
            return None if tok is None else self._tok.token_to_id(tok)
        if name in _SPECIAL_ATTRS:
            return self.__dict__.get("special_tokens", {}).get(name)
        raise AttributeError(name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    # -- chat --------------------------------------------------------------
    def render_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                             add_generation_prompt: bool = True, **kwargs) -> str:
        """The chat rendered to text, as transformers' apply_chat_template(tokenize=False)."""
        import jinja2

        template = self.chat_template
        where = self.chat_template_source
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                template = template["tool_use"]
            elif "default" in template:
                template = template["default"]
            else:
                raise CheckpointError(f"{where}: several chat templates and none named 'default'")
        if not template:
            raise CheckpointError(f"{where}: field 'chat_template' is missing (and no chat_template.jinja)")
        if not messages:
            raise ValueError("Cannot apply a chat template to an empty conversation")
        # transformers drops None-valued keys and aliases the reasoning field names.
        chat = []
        for m in messages:
            m = {k: v for k, v in dict(m).items() if v is not None}
            keys = ("reasoning_content", "thinking", "reasoning")
            reasoning = next((m[k] for k in keys if m.get(k) is not None), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            chat.append(m)
        context = {**self.special_tokens, **kwargs}
        try:
            compiled = _compile_template(template)
            return compiled.render(messages=chat, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **context)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{where}: chat template failed to render: {e}") from e

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of the rendered chat (no extra special tokens: the template has them)."""
        text = self.render_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(template: str):
    """Compiles like transformers' `_compile_jinja_template` (minus its {% generation %}
    assistant-mask tracker, which only marks spans and renders its body unchanged)."""
    if template in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[template]
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    compiled = env.from_string(template)
    _TEMPLATE_CACHE[template] = compiled
    return compiled


def load_tokenizer(path: str) -> HFTokenizer:
    """The checkpoint's tokenizer (tokenizer.json + tokenizer_config.json)."""
    return HFTokenizer(path)
