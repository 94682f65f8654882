"""τ2-bench on the CPU: a randomly initialised tiny Qwen3 on the mock domain in tau2's solo mode.

The whole τ2 path (jaxrl_async/tau2, docs/tau2.md) at a size that runs on 2 CPU cores: tau2's
solo agent prompt with the mock policy and the task's ticket, the domain's tools (plus `done`)
through the shipped ChatML tokenizer's template, tool calls executed by tau2's Environment and
the reward from tau2's evaluator. Mock in solo mode has 6 tasks (5 whose gold actions can pass);
a solo episode needs no user simulator.

    make train CONFIG=configs/tau2_tiny.py WORKDIR=runs/tau2_tiny

Sizes: the prompts are 1357-1397 tokens (the policy and 5 tool schemas in a 602-token
vocabulary); a gold episode is 1492-1530 tokens (a call is 48-91 tokens, `done` 17). Three
96-token turns and their tool results fit in `model.max_len` = 2048; an episode that outgrows it
ends with reward 0. The warm start imitates the gold actions (`Tau2Env.expert_action`).
"""

from jaxrl_async.config import base_config


def get_config():
    c = base_config()
    c.task.name = "tau2"
    c.task.format = "chat"
    c.task.tokenizer = ""  # the shipped ChatML tokenizer
    c.task.kwargs.domain = "mock"
    c.task.kwargs.split = "base"
    c.task.kwargs.user = "solo"
    c.task.kwargs.max_turns = 3
    c.task.kwargs.max_turn_tokens = 96  # the longest gold call is 91 tokens

    c.model.family = "qwen3"
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.num_kv_heads = 2
    c.model.head_dim = 32
    c.model.d_ff = 192
    c.model.max_len = 2048  # task.kwargs.max_context defaults to this
    # Batches padded to the shortest of 256, 512, ..., 2048 tokens that holds their longest episode.
    c.learner.length_buckets = 8

    c.rl.groups_per_step = 4
    c.rl.group_size = 4

    c.warmstart.episodes = 96
    c.warmstart.noise = 0.2
    c.warmstart.steps = 60
    c.warmstart.batch_size = 8

    c.train.steps = 20
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
    c.eval.episodes = 12
    return c
