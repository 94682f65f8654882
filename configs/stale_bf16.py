"""Stale, mismatched data with exact old log-probs: the setting the routes differ in.

Inline runtime with the sampler two versions behind and a mid-episode weight switch
(tokens 2 and 3 versions old), a bf16 sampler (a real training-inference mismatch), and
the exact `snapshot` route with token-level rejection. Switch `proximal.source` to
compare routes on identical schedules, e.g. `--config.proximal.source=recompute`.
"""

from jaxrl_async.config import base_config


def get_config():
    c = base_config()
    c.runtime.lag = 2  # the sampler uses the weights of 2 versions ago
    c.runtime.partial_rollout = True  # each batch starts 3 versions ago and switches mid-episode
    c.runtime.switch_after = 16  # decode steps before the switch (episodes are about 25 tokens)
    c.sampler.chunk = 8  # check for new weights every 8 decode steps
    c.numerics.dtype = "bf16"  # sampler numerics differ from the fp32 learner
    c.proximal.source = "snapshot"  # exact pi_old from the ring buffer
    c.loss.token_mask = (0.5, 2.0)  # reject tokens whose pi_old / mu leaves this band
    return c
