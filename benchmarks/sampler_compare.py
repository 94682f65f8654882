"""The sampler's rollout against the bare KV-cache decode step, for the code of any checkout.

    python -m benchmarks.sampler_compare [CHECKOUT]    # default: this repository

Imports `jaxrl_async` from CHECKOUT (a `git worktree` of an older commit, say), then times
20 rollouts of the default task (batch 64, fp32 sampler), each followed by a bare KV-cache
pass of the same model and batch, and prints one JSON line of medians. Run it once per
checkout, alternating, to compare two versions of the sampler on one machine under the same
load (docs/benchmarks.md, "The sampler's host side").
"""

import json
import os
import sys
import time


def main(argv) -> None:
    repo = os.path.abspath(argv[1] if len(argv) > 1 else os.path.dirname(os.path.dirname(__file__)))
    sys.path.insert(0, repo)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs.default import get_config
    from jaxrl_async import config as config_lib
    from jaxrl_async.models import transformer as M
    from jaxrl_async.rollout import sampler as S

    if not S.__file__.startswith(repo):
        raise SystemExit(f"imported {S.__file__}, not the checkout {repo}")
    c = get_config()
    cfg = config_lib.model_config_from(c)
    graphdef, params = M.init_model(cfg, 0)
    num = M.Numerics("fp32")
    inf = M.inference_params(params, num)
    make = config_lib.env_factory(c)
    b, n = 64, 46
    sampler = S.Sampler(graphdef, cfg, num)
    sampler.update_params(params, 0)

    def rollout(seed):
        envs = [make() for _ in range(b)]
        t0 = time.perf_counter()
        _, stats = sampler.generate(envs, list(range(seed, seed + b)), list(range(b)), jax.random.key(seed))
        return time.perf_counter() - t0, stats

    columns = [jnp.full((b,), 5, jnp.int32)] * n
    positions = [jnp.full((b,), i, jnp.int32) for i in range(n)]

    def bare():
        cache = M.init_cache(cfg, b, num)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        for i in range(n):
            logp, cache = M.decode_step(graphdef, inf, cache, columns[i], positions[i], num, jax.random.key(0))
        jax.block_until_ready(logp)
        return (time.perf_counter() - t0) / n

    rollout(0), bare()  # compile
    runs, bares = [], []
    for r in range(1, 21):
        runs.append(rollout(r))
        bares.append(bare())
    wall = np.array([w for w, _ in runs])
    steps = np.array([st.decode_steps for _, st in runs])
    print(json.dumps({"checkout": repo, "bare_ms": 1e3 * float(np.median(bares)),
                      "rollout_ms": 1e3 * float(np.median(wall)), "ms_per_step": 1e3 * float(np.median(wall / steps)),
                      "vs_bare": float(np.median(wall / steps) / np.median(bares)), "decode_steps": float(steps.mean()),
                      "loop_calls": float(np.mean([st.loop_calls for _, st in runs]))}))


if __name__ == "__main__":
    main(sys.argv)
