"""`make bench`: the benchmark suite (prints tables, writes JSON).

1. `benchmarks.kernels`: the loss against rlax, KV-cache decoding against re-forward,
   learner tokens/s on 1 and 2 devices, the learner's before/after (donation, padding),
   asynchronous against synchronous episodes/s.
2. `benchmarks.routes`: per-route cost and learning at a fixed staleness.

The small setting (default) finishes in under 10 minutes on 2 CPU cores; `--full`
(`make bench BENCH_ARGS=--full`) runs 100 RL steps per route and 50 end-to-end steps,
the setting of the README's route table.
"""

import argparse

from benchmarks import kernels, routes

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="longer runs: 100 RL steps per route, 50 async steps")
    args = p.parse_args()
    if args.full:
        kernels.main(["--json=runs/bench_kernels_full.json", "--async-steps=50"])
        print()
        routes.main(["--steps=100", "--out=runs/bench_routes"])
    else:
        kernels.main(["--json=runs/bench_kernels.json"])
        print()
        routes.main(["--steps=30", "--out=runs/bench_routes_small"])
