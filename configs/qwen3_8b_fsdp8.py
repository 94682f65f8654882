"""Qwen3-8B on the chat form of `tooluse_easy`, full fine-tuning sharded over 8 accelerators (FSDP).

Full fine-tuning holds 16 bytes a parameter (float32 params, gradients and AdamW's two
moments): 131 GB for Qwen3-8B, more than any single accelerator. With `parallel.fsdp = 8`
every device holds 1/8 of the params, gradients and optimizer state, gathers one layer's
weights when it computes with them, and takes 1/8 of each gradient step's rows.

Check the per-device memory before a run (shapes only, nothing is allocated; the vocabulary
is the checkpoint tokenizer's, given here because no checkpoint is read):

    python -m jaxrl_async.plan --config=configs/qwen3_8b_fsdp8.py --vocab_size=151936

Train (the checkpoint directory as the Hub ships it: config.json, *.safetensors, tokenizer):

    python -m jaxrl_async.train --config=configs/qwen3_8b_fsdp8.py \
        --config.model.checkpoint=/path/to/Qwen3-8B --workdir=runs/qwen3_8b

Without `model.checkpoint` the run stops at startup naming it. The sizes below are Qwen3-8B's
(its config.json: the checkpoint's shapes are used when it is given). Not run in CI: a
starting point sized for 8 x 80 GB, not tuned results: the plan gives 37 GB a device (params,
gradients and AdamW 16.4 GB, the in-memory version 4.1 GB, activations 4.8 GB, and the inline
sampler's bf16 weights 2.1 GB and KV cache 9.7 GB), where one device would need 195 GB. The warm
start is off: it runs unsharded, on one device.
"""

from ml_collections import config_dict

from jaxrl_async.config import base_config


def get_config():
    c = base_config()
    c.task.name = "tooluse_easy"
    c.task.format = "chat"
    c.task.kwargs.max_turn_tokens = 64

    c.model.family = "qwen3"
    c.model.checkpoint = config_dict.placeholder(str)  # required: --config.model.checkpoint=/path
    # Qwen3-8B's shapes (the plan's; a given checkpoint's config.json takes precedence).
    c.model.d_model = 4096  # hidden_size
    c.model.n_layers = 36
    c.model.n_heads = 32
    c.model.num_kv_heads = 8
    c.model.head_dim = 128
    c.model.d_ff = 12288  # intermediate_size
    c.model.max_len = 1024
    c.model.remat = True  # one layer's activations at a time in the backward
    c.model.scan_layers = True  # one compiled layer for all 36

    c.numerics.dtype = "bf16"  # sampler weights and KV cache in bf16 (the learner stays fp32)
    c.sampler.slots = 64  # KV-cache slots (continuous batching): 64 x 1k tokens = 9.7 GB of bf16 cache

    c.parallel.fsdp = 8  # 8 devices, params / gradients / optimizer state split 8 ways
    c.parallel.data = 1

    c.rl.groups_per_step = 16  # 16 tasks x 8 samples = 128 episodes per step
    c.rl.group_size = 8
    c.optim.learning_rate = 1e-6
    c.optim.num_minibatches = 4  # 32 episodes per gradient step: 4 rows per device
    c.proximal.source = "recompute"  # snapshot would replicate a whole fp32 version (33 GB) on every device

    c.warmstart.enabled = False

    c.train.steps = 200
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.eval.episodes = 256
    return c
