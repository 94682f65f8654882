"""Default config: the tool-use task, inline runtime, on-policy, CPU-sized.

`make train` runs this end to end on 2 CPU cores: a short supervised warm start on
demonstrations of a noisy scripted agent, then GRPO-style RL with the decomposed loss.
Every field and its meaning: `jaxrl_async/config.py`. Override any field from the
command line, e.g. `--config.train.steps=20`.
"""

from jaxrl_async.config import base_config


def get_config():
    c = base_config()
    c.task.name = "tooluse_easy"  # look a customer's order up, ask its amount, refund it with the copied values
    return c
