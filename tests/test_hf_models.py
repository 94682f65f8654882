"""Llama-3 / Qwen2.5 / Qwen3 checkpoints: `models.llama` + `models.hf` against `transformers`.

Tiny random checkpoints of each family are written with `transformers.save_pretrained`
(2 layers, hidden 64, 4 heads over 2 kv heads; llama3 rope scaling on for Llama; tied
embeddings for Qwen2; explicit head_dim for Qwen3) and compared: float32 logits on a
ragged right-padded batch, KV-cache decoding vs the full forward, 32 greedy tokens vs
`generate(do_sample=False)`, the export round trip, and the load errors.
Needs the `reference` extra (torch, transformers).
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxrl_async.models import hf, llama  # noqa: E402

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
FAMILIES = {
    # rope llama3 scaling with a small original context so the scaling changes frequencies.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
        rope_theta=500000.0, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
}

# Ragged right-padded batch: row lengths 12, 8, 5.
LENGTHS = (12, 8, 5)


def _batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, VOCAB, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
    mask = np.zeros_like(tokens, dtype=np.int64)
    for r, n in enumerate(LENGTHS):
        mask[r, :n] = 1
    tokens[mask == 0] = 0
    return tokens, mask


def _build(family, path):
    cfg_name, cls_name, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**COMMON, **extra)
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():
        # Random init has near-zero norms/biases: perturb everything so every tensor matters.
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


def _torch_logits(model, tokens, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(tokens, dtype=torch.long), **kwargs).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    ref = _build(request.param, path)
    ours = hf.load(path)
    return request.param, path, ref, ours


def test_config_switches(family):
    name, _, _, ours = family
    c = ours.config
    assert (c.num_heads, c.num_kv_heads, c.num_layers) == (4, 2, 2)
    assert c.tie_word_embeddings == (name == "qwen2")
    assert c.qkv_bias == (name == "qwen2")
    assert c.qk_norm == (name == "qwen3")
    assert (c.rope_params.get("rope_type") == "llama3") == (name == "llama")
    assert c.head_dim == (32 if name == "qwen3" else 16)


def test_logits_match_transformers(family):
    _, _, ref, ours = family
    tokens, mask = _batch()
    expected = _torch_logits(ref, tokens, mask)
    got = np.asarray(ours.logits(tokens))
    assert got.dtype == np.float32 and got.shape == expected.shape
    valid = mask == 1
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)


def test_chunked_token_logprobs_match_full_logits(family):
    name, _, _, ours = family
    tokens, _ = _batch()
    logits = np.asarray(ours.logits(tokens))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    expected = np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    # chunk 5 does not divide T - 1 = 11: exercises the padded last chunk.
    # remat per block for one family (compiling the gradient is the slow part).
    remat = name == "qwen2"
    config = ours.config.replace(logprob_chunk=5, remat=remat)
    graphdef, _ = llama.init_model(config, 0)
    got = np.asarray(llama.token_logprobs(graphdef, ours.params, jnp.asarray(tokens)))
    assert np.all(got[:, 0] == 0)
    np.testing.assert_allclose(got[:, 1:], expected, atol=1e-5)
    if remat:
        # Differentiable through remat + the rematerialised chunk map: finite, non-zero gradients.
        grads = jax.grad(lambda p: llama.token_logprobs(graphdef, p, jnp.asarray(tokens)).sum())(ours.params)
        leaves = jax.tree.leaves(grads)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
        assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_kv_cache_decoding_equals_full_forward(family):
    _, _, _, ours = family
    tokens, mask = _batch()
    numerics = llama.Numerics("fp32")
    full = np.asarray(jax.nn.log_softmax(ours.logits(tokens), axis=-1))
    cache = llama.init_cache(ours.config, tokens.shape[0], numerics)
    assert cache["k"].shape == (2, 3, ours.config.max_len, 2, ours.config.head_dim)  # kv heads only
    key = jax.random.PRNGKey(0)
    for t in range(tokens.shape[1]):
        pos = jnp.full((tokens.shape[0],), t, jnp.int32)
        logp, cache = llama.decode_step(ours.graphdef, ours.params, cache, jnp.asarray(tokens[:, t]), pos,
                                        numerics, key)
        valid = mask[:, t] == 1
        np.testing.assert_allclose(np.asarray(logp)[valid], full[valid, t], atol=1e-4)


def test_prefill_then_decode_equals_full_forward(family):
    """Ragged prefill (padding at position >= max_len is dropped), then decode the rest."""
    _, _, _, ours = family
    tokens, mask = _batch()
    numerics = llama.Numerics("fp32")
    full = np.asarray(jax.nn.log_softmax(ours.logits(tokens), axis=-1))
    cut = np.array([6, 3, 4])  # tokens prefilled per row
    pre_pos = np.where(np.arange(6)[None] < cut[:, None], np.arange(6)[None], ours.config.max_len).astype(np.int32)
    cache = llama.init_cache(ours.config, 3, numerics)
    cache = llama.prefill(ours.graphdef, ours.params, cache, jnp.asarray(tokens[:, :6]), jnp.asarray(pre_pos), numerics)
    rows = np.arange(3)
    for step in range(3):
        pos = cut + step
        logp, cache = llama.decode_step(ours.graphdef, ours.params, cache, jnp.asarray(tokens[rows, pos]),
                                        jnp.asarray(pos, jnp.int32), numerics, jax.random.PRNGKey(0))
        valid = mask[rows, pos] == 1
        np.testing.assert_allclose(np.asarray(logp)[valid], full[rows, pos][valid], atol=1e-4)


def test_greedy_generation_matches_transformers(family):
    _, _, ref, ours = family
    prompts = np.random.RandomState(1).randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        out = ref.generate(torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                           do_sample=False, max_new_tokens=32, min_new_tokens=32)
    expected = out[:, prompts.shape[1]:].tolist()
    got = hf.generate(ours, prompts.tolist(), max_new_tokens=32)
    assert got == expected


def test_export_round_trip(family, tmp_path):
    name, _, ref, ours = family
    out = str(tmp_path / "export")
    # Sharded for one family (index + several files), single file for the others.
    hf.export(ours, None, out, max_shard_bytes=100_000 if name == "qwen3" else None)
    if name == "qwen3":
        assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == type(ref).__name__
    tokens, mask = _batch()
    valid = mask == 1
    expected = _torch_logits(ref, tokens, mask)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens, mask)[valid], expected[valid], atol=1e-5)
    again = hf.load(out)
    np.testing.assert_allclose(np.asarray(again.logits(tokens))[valid], expected[valid], atol=1e-4)


def test_bare_params_export_bf16_and_inference_numerics(family, tmp_path):
    name, _, _, ours = family
    if name != "llama":
        pytest.skip("one family is enough")
    out = str(tmp_path / "bf16")
    hf.export(ours.params, ours.config, out, dtype="bfloat16")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    bf = hf.load(out, dtype="bfloat16")
    assert bf.params["embed_tokens"][...].dtype == jnp.bfloat16
    # Inference numerics: bf16 / int8 decode steps run and stay close to fp32.
    tokens, _ = _batch()
    base = None
    for dtype in ("fp32", "int8", "bf16"):
        numerics = llama.Numerics(dtype)
        inf = llama.inference_params(ours.params, numerics)
        cache = llama.init_cache(ours.config, 3, numerics)
        for t in range(4):
            logp, cache = llama.decode_step(ours.graphdef, inf, cache, jnp.asarray(tokens[:, t]),
                                            jnp.full((3,), t, jnp.int32), numerics, jax.random.PRNGKey(0))
        p = np.exp(np.asarray(logp))
        base = p if base is None else base
        assert np.all(np.isfinite(p)) and np.abs(p - base).sum(-1).max() < 0.2


# ---------------------------------------------------------------------------
# Errors


@pytest.fixture
def qwen2_dir(tmp_path):
    path = str(tmp_path / "ckpt")
    _build("qwen2", path)
    return path


def _rewrite_tensors(path, fn):
    from safetensors.numpy import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_unknown_architecture(qwen2_dir):
    cfg_path = os.path.join(qwen2_dir, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["GPT2LMHeadModel"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(hf.CheckpointError, match=r"config\.json.*architectures.*GPT2LMHeadModel"):
        hf.load(qwen2_dir)


def test_missing_tensor(qwen2_dir):
    _rewrite_tensors(qwen2_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(hf.CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf.load(qwen2_dir)


def test_misshaped_tensor(qwen2_dir):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :10].copy()

    _rewrite_tensors(qwen2_dir, shrink)
    with pytest.raises(hf.CheckpointError,
                       match=r"model\.safetensors.*model\.layers\.0\.mlp\.up_proj\.weight.*\(96, 10\).*\(96, 64\)"):
        hf.load(qwen2_dir)


def test_unexpected_tensor(qwen2_dir):
    _rewrite_tensors(qwen2_dir, lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(hf.CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.extra\.weight"):
        hf.load(qwen2_dir)


def test_missing_weights_file(qwen2_dir):
    os.remove(os.path.join(qwen2_dir, "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="model.safetensors"):
        hf.load(qwen2_dir)


def test_config_from_hub_style_json():
    """config.json as the Hub checkpoints have it (transformers v4 layout: rope_theta +
    rope_scaling) for Llama-3.1-8B, Qwen2.5-0.5B and Qwen3-0.6B."""
    llama31 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
               "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "tie_word_embeddings": False, "vocab_size": 128256, "hidden_act": "silu", "mlp_bias": False,
               "attention_bias": False, "torch_dtype": "bfloat16"}
    c = hf.config_from_hf(llama31)
    assert (c.head_dim, c.num_kv_heads, c.max_len, c.rope_theta) == (128, 8, 4096, 500000.0)
    assert c.rope_params["original_max_position_embeddings"] == 8192
    inv = llama.rope_inv_freq(c)
    assert inv.shape == (64,) and inv[-1] < 500000.0 ** (-126 / 128) / 7.9  # low frequencies scaled by 1/8
    qwen25 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
              "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
              "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21,
              "tie_word_embeddings": True, "vocab_size": 151936, "hidden_act": "silu", "rope_scaling": None}
    c = hf.config_from_hf(qwen25, max_len=512)
    assert c.qkv_bias and not c.o_bias and c.tie_word_embeddings and c.head_dim == 64 and c.max_len == 512
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072,
             "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "head_dim": 128,
             "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
             "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
             "tie_word_embeddings": True, "vocab_size": 151936, "hidden_act": "silu", "rope_scaling": None}
    c = hf.config_from_hf(qwen3)
    assert c.qk_norm and not c.qkv_bias and c.head_dim == 128 and c.num_heads * c.head_dim == 2048
    with pytest.raises(hf.CheckpointError, match="sliding"):
        hf.config_from_hf(dict(qwen25, use_sliding_window=True))
    with pytest.raises(hf.CheckpointError, match="rope_type 'yarn'"):
        hf.config_from_hf(dict(qwen3, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
