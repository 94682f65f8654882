"""A randomly initialised, CPU-sized Qwen3-architecture model on the chat form of `search_easy`.

The whole path a real checkpoint takes (HF model family, chat template, tool calls parsed from
text, the model's own end-of-turn token) at a size that runs on 2 CPU cores: the model is a
2-layer Qwen3 (grouped-query attention with q/k RMSNorm, SwiGLU) over the shipped 602-token
ChatML tokenizer (`jaxrl_async/assets/chat_tokenizer`), warm-started on the noisy scripted
agent's tool calls, then trained with RL.

    make train CONFIG=configs/qwen3_tiny.py WORKDIR=runs/qwen3_tiny

Episodes are long for a CPU (the template's tool schema alone is ~150 tokens): a short system
prompt and a 24-token turn budget (a call is ~19 tokens with its end-of-turn token) keep the
longest episode at 504 tokens (the schema states each argument's range), so `model.max_len` is 512.
"""

from jaxrl_async.config import base_config


def get_config():
    c = base_config()
    c.task.name = "search_easy"  # find a hidden number in [0, 8) with `guess` tool calls, 5 turns
    c.task.format = "chat"
    c.task.tokenizer = ""  # the shipped ChatML tokenizer (PAD 0, <|im_start|> 1, <|im_end|> 2)
    c.task.kwargs.system_prompt = "Call one tool per turn."
    c.task.kwargs.max_turn_tokens = 24

    c.model.family = "qwen3"
    c.model.d_model = 64  # hidden_size
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 32  # Qwen3 decouples head_dim from hidden_size / heads
    c.model.d_ff = 192  # intermediate_size (SwiGLU)
    c.model.max_len = 512  # >= the longest episode (504 tokens)

    c.rl.groups_per_step = 8
    c.rl.group_size = 8

    # Sized for the budget (20 minutes on 2 CPU cores): measured on a shared 2-core machine, a
    # warm-start step (32 x 480 tokens) takes ~2-3 s and an RL step (64 episodes) ~10 s.
    c.warmstart.episodes = 1024
    c.warmstart.steps = 150
    c.warmstart.batch_size = 32

    c.train.steps = 50
    c.train.eval_every = 10
    c.train.checkpoint_every = 20
    c.eval.episodes = 64
    return c
