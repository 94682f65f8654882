"""The default task on the asynchronous process runtime.

One sampler process generates continuously and hands groups to the learner through the
spool queue; weights travel through the Orbax ring buffer; no token older than
`runtime.max_staleness` versions reaches the loss. See README "Runtimes".
"""

from jaxrl_async.config import base_config


def get_config():
    c = base_config()
    c.runtime.mode = "process"  # sampler processes + host-side queue
    c.runtime.num_samplers = 1  # one sampler beside the learner on a 2-core machine
    c.runtime.max_staleness = 2  # staleness bound in versions
    c.runtime.sampler_groups = 4  # groups per sampler generate call (a quarter of a batch)
    return c
