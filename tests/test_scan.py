"""Scanned decoder layers (`LlamaConfig.scan_layers`): the same model as the unrolled layers.

The weights of an unrolled model are exported as a Hugging Face checkpoint and loaded back
stacked (`hf.load(..., scan_layers=True)`): log-probs, gradients and KV-cache decoding agree
with the unrolled model, the stacked weights export to the same tensors, and every stacked
parameter carries the `layers` logical axis.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_async.models import hf, llama
from jaxrl_async.models.transformer import Numerics

CFG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                        num_kv_heads=2, qk_norm=True, max_len=16, logprob_chunk=8,
                        architecture="Qwen3ForCausalLM")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("unrolled"))
    graphdef, params = llama.init_model(CFG, 0)
    hf.export(params, CFG, path)
    scanned = hf.load(path, max_len=CFG.max_len, logprob_chunk=8, scan_layers=True, remat=True,
                      remat_policy="dots_with_no_batch_dims_saveable")
    return (graphdef, params), scanned, path


def test_scanned_equals_unrolled(models):
    (graphdef, params), scanned, _ = models
    assert scanned.config.scan_layers
    kernel = nnx.to_pure_dict(scanned.params)["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.shape == (3, 32, 64)  # stacked: one leaf for all layers
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (4, 16)), jnp.int32)

    def logp_and_grad(g, p):  # one compilation per model: log-probs and their gradient
        def total(q):
            lp = llama.token_logprobs(g, q, tokens)
            return lp.sum(), lp
        return jax.jit(jax.grad(total, has_aux=True))(p)

    ga, a = logp_and_grad(graphdef, params)
    gb, b = logp_and_grad(scanned.graphdef, scanned.params)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(nnx.to_pure_dict(gb)["layers"]["self_attn"]["k_proj"]["kernel"][i],
                                   nnx.to_pure_dict(ga)["layers"][i]["self_attn"]["k_proj"]["kernel"],
                                   rtol=1e-4, atol=1e-6)
    # KV-cache decoding: prefill 8 tokens, decode the 9th; the next token's log-prob is the
    # unrolled model's full-sequence one.
    num = Numerics("fp32")
    cache = llama.init_cache(scanned.config, 4, num)
    cache = llama.prefill(scanned.graphdef, scanned.params, cache, tokens[:, :8],
                          jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (4, 8)), num)
    lp, _ = llama.decode_step(scanned.graphdef, scanned.params, cache, tokens[:, 8], jnp.full((4,), 8, jnp.int32),
                              num, jax.random.key(0))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(lp), np.asarray(tokens[:, 9:10]), axis=1)[:, 0],
                               np.asarray(a[:, 9]), rtol=1e-5, atol=1e-5)


def test_scanned_export_writes_the_unrolled_tensors(models, tmp_path):
    _, scanned, path = models
    hf.export(scanned, None, str(tmp_path))
    from safetensors.numpy import load_file

    a, b = load_file(os.path.join(path, "model.safetensors")), load_file(os.path.join(tmp_path, "model.safetensors"))
    assert sorted(a) == sorted(b) and "model.layers.2.self_attn.q_norm.weight" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_scanned_params_have_a_layers_axis(models):
    _, scanned, _ = models
    axes = nnx.to_pure_dict(llama.param_axes(scanned.params))
    assert axes["layers"]["self_attn"]["q_proj"]["kernel"].axes == ("layers", "embed", "heads")
    assert axes["layers"]["input_layernorm"]["weight"].axes == ("layers", "norm")
    assert axes["embed_tokens"].axes == ("vocab", "embed")


def test_bad_remat_policy_is_named():
    with pytest.raises(ValueError, match="LlamaConfig.remat_policy must be one of"):
        CFG.replace(remat_policy="everything")
