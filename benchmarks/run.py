"""`make bench`: the benchmark suite at its small setting (prints tables, writes JSON).

1. `benchmarks.kernels`: the loss against rlax, KV-cache decoding against re-forward,
   learner tokens/s on 1 and 2 devices, asynchronous against synchronous episodes/s.
2. `benchmarks.routes`: per-route cost and learning at a fixed staleness (30 RL steps).
"""

from benchmarks import kernels, routes

if __name__ == "__main__":
    kernels.main(["--json=runs/bench_kernels.json"])
    print()
    routes.main(["--steps=30", "--out=runs/bench_routes_small"])
