"""`make bench`: the benchmark suite at its small setting (prints tables, writes JSON).

So far: the per-route cost and learning table (`benchmarks/routes.py`).
"""

from benchmarks import routes

if __name__ == "__main__":
    routes.main(["--steps=60", "--out=runs/bench_routes_small"])
