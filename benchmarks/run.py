"""`make bench`: the benchmark suite (prints tables, writes JSON).

1. `benchmarks.kernels`: the loss against rlax, KV-cache decoding against re-forward,
   learner tokens/s on 1 and 2 devices, the learner's before/after (donation, padding),
   asynchronous against synchronous episodes/s.
2. `benchmarks.routes`: per-route cost and learning at a fixed staleness.
3. `benchmarks.real_models`: the HF families' learner tokens/s and MFU, decode tokens/s against
   the bandwidth bound, peak memory (the qwen3_tiny shapes on a CPU, Qwen3-0.6B's on a GPU).
4. `benchmarks.serve`: chat completions through the OpenAI-compatible server (HTTP) against the
   in-process sampler, requests/s and tokens/s at concurrency 1, 8 and 32 (needs the serve extra).
5. `benchmarks.tau2`: τ2-bench's reward evaluation per episode and env step per turn, per domain,
   the shared-prefix KV cache's prefill speedup at 64 episodes, and episodes/s with a slow
   simulated user, env steps on the host against a worker pool, as fractions of the overlap
   bound (needs the tau2 extra).

The small setting (default) finishes in under 10 minutes on 2 CPU cores; `--full`
(`make bench BENCH_ARGS=--full`) runs 100 RL steps per route and 50 end-to-end steps,
the setting of the README's route table. `--sections` runs a subset: any of the kernel
sections (loss, decode, learner, learner_variants, async, handoff, queue), `routes`, `real_models`, `serve`
and `tau2`.

    .venv/bin/python -m benchmarks.run [--full] [--sections=loss,decode,routes]
"""

import jax
from absl import app, flags, logging

from benchmarks import kernels, real_models, routes

SECTIONS = (*kernels.SECTIONS, "routes", "real_models", "serve", "tau2")

FLAGS = flags.FLAGS
flags.DEFINE_bool("full", False, "Longer runs: 100 RL steps per route, 50 async steps.")
flags.DEFINE_list("sections", list(SECTIONS), f"Comma-separated subset of {', '.join(SECTIONS)}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # as before absl: no INFO lines from XLA and Orbax
    unknown = sorted(set(FLAGS.sections) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"--sections: unknown {unknown}; allowed: {', '.join(SECTIONS)}")
    kernel_sections = [s for s in kernels.SECTIONS if s in FLAGS.sections]
    if kernel_sections:
        if FLAGS.full:
            kernels.run("runs/bench_kernels_full.json", async_steps=50, sections=kernel_sections)
        else:
            kernels.run("runs/bench_kernels.json", sections=kernel_sections)
    if "routes" in FLAGS.sections:
        if kernel_sections:
            print()
        if FLAGS.full:
            routes.run(steps=100, out="runs/bench_routes")
        else:
            routes.run(steps=30, out="runs/bench_routes_small")
    if "real_models" in FLAGS.sections:
        print()
        real_models.print_tables(real_models.run("tiny" if jax.default_backend() == "cpu" else "qwen3_0p6b"))
    if "serve" in FLAGS.sections:
        from benchmarks import serve  # the serve extra (fastapi, uvicorn, openai)

        print()
        serve.print_table(serve.run(rounds=4 if FLAGS.full else 2))
    if "tau2" in FLAGS.sections:
        from benchmarks import tau2  # the tau2 extra

        print()
        tau2.print_table(tau2.run())
        print()
        tau2.print_prefix(tau2.prefix_run())
        print()
        tau2.print_overlap(tau2.overlap_run())


if __name__ == "__main__":
    app.run(main)
