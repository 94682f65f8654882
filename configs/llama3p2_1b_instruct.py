"""Llama-3.2-1B-Instruct on the chat form of `tooluse_easy`: RL from a real checkpoint on one 80 GB GPU.

Set the checkpoint directory (config.json, *.safetensors, tokenizer files as the Hub ships them):

    python -m jaxrl_async.train --config=configs/llama3p2_1b_instruct.py \
        --config.model.checkpoint=/path/to/Llama-3.2-1B-Instruct --workdir=runs/llama3p2_1b_instruct

Without it (or with a directory that does not exist) the run stops at startup naming
`model.checkpoint`. The tokenizer is the checkpoint's own (`task.tokenizer` = ""), so the
chat format, end-of-turn (<|eot_id|>, Llama-3.1 JSON tool calls) and padding ids are the model's. Not run in CI: the
numbers below are a starting point sized for one 80 GB GPU, not tuned results.
"""

from ml_collections import config_dict

from jaxrl_async.config import base_config


def get_config():
    c = base_config()
    c.task.name = "tooluse_easy"
    c.task.format = "chat"
    c.task.kwargs.max_turn_tokens = 64  # a tool call is ~20-30 tokens; room for a short thought before it

    c.model.family = "llama"
    c.model.checkpoint = config_dict.placeholder(str)  # required: --config.model.checkpoint=/path
    c.model.max_len = 1024  # the longest episode (system prompt with tool schemas + 5 turns) is well under 1k
    # Learner activations: 128 rows x 1k tokens x 16 layers (1.2B) fit in 80 GB only rematerialised.
    c.model.remat = True

    c.numerics.dtype = "bf16"  # sampler weights and KV cache in bf16 (the learner stays fp32)

    c.rl.groups_per_step = 16  # 16 tasks x 8 samples = 128 episodes per step
    c.rl.group_size = 8
    c.optim.learning_rate = 1e-6  # full fine-tuning of a pretrained model: a small step
    c.optim.num_minibatches = 8  # 16 episodes per gradient step (fp32 params + AdamW: ~20 GB for 1.2B)

    c.warmstart.enabled = True  # a short SFT on the scripted agent teaches the task's call format
    c.warmstart.episodes = 2048
    c.warmstart.steps = 100
    c.warmstart.batch_size = 16
    c.warmstart.learning_rate = 1e-5

    c.train.steps = 200
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.eval.episodes = 256
    return c
