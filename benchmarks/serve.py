"""The OpenAI-compatible server's overhead: chat completions over HTTP against the in-process sampler.

    python -m benchmarks.serve [--rounds=2]

A random model of the qwen3_tiny shapes over the shipped ChatML tokenizer. At concurrency
c in (1, 8, 32), `rounds * c` requests (a one-message chat with the task's tool, 32 tokens
each, seeded) go through the pinned `openai` client to the server (uvicorn in a thread, the
engine's 32 KV-cache slots) from c client threads, and the same prompts, keys and budgets run
in-process as `Sampler.generate` calls of c episodes on c slots (the batches the server forms
when c requests wait). Both generate the same tokens (per-episode keys), so requests/s and
tokens/s compare the serving path (HTTP, JSON, chat template, tokenizer, queue, batching)
against generation alone. Goal: at most 10% overhead at concurrency 32.
JSON to `runs/bench_serve.json`.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import numpy as np

CONCURRENCY = (1, 8, 32)
MAX_TOKENS = 32
TOOLS = [{"type": "function", "function": {
    "name": "guess", "description": "Guess the hidden number.",
    "parameters": {"type": "object", "properties": {"value": {"type": "integer"}}, "required": ["value"]}}}]


def _config():
    from jaxrl_async.config import base_config

    c = base_config()
    c.task.name, c.task.format = "search_easy", "chat"
    c.model.family = "qwen3"  # the qwen3_tiny shapes
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.num_kv_heads = 64, 2, 4, 2
    c.model.head_dim, c.model.d_ff, c.model.max_len = 32, 192, 480
    return c


def _messages(i: int) -> list[dict]:
    return [{"role": "system", "content": "Call one tool per turn."},
            {"role": "user", "content": f"I am user {i}. The number is between 0 and {8 + i % 5}."}]


def run(rounds: int = 2, out: str = "runs/bench_serve.json") -> dict:
    import logging

    import openai

    for name in ("httpx", "httpx2"):  # no line per request
        logging.getLogger(name).setLevel(logging.WARNING)

    from jaxrl_async.rollout.sampler import EpisodeSampling
    from jaxrl_async.serve.app import start_in_thread
    from jaxrl_async.serve.engine import OneTurnEnv
    from jaxrl_async.serve.service import build_service, choice_keys

    service = build_service(_config(), model_name="bench", max_slots=32, max_queue=1024)
    server, url = start_in_thread(service)
    client = openai.OpenAI(base_url=url, api_key="dummy_key", max_retries=0, timeout=600)
    sampler, chat = service.engine.sampler, service.chat
    # Every batch size the server may form, at the prompts' prefill width: no compilation in the timings.
    service.engine.warmup([len(chat.encode(chat.render(_messages(i), TOOLS))) for i in (0, 10)])

    def http(c: int, n: int) -> tuple[float, int]:
        def one(i):
            r = client.chat.completions.create(model="bench", messages=_messages(i), tools=TOOLS, seed=i,
                                               max_tokens=MAX_TOKENS, temperature=1.0)
            return r.usage.completion_tokens

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(c) as pool:
            tokens = sum(pool.map(one, range(n)))
        return time.perf_counter() - t0, tokens

    def direct(c: int, n: int) -> tuple[float, int]:
        import jax

        prompts = [chat.encode(chat.render(_messages(i), TOOLS)) for i in range(n)]  # outside the clock
        t0 = time.perf_counter()
        tokens = 0
        for lo in range(0, n, c):
            idx = range(lo, min(lo + c, n))
            envs = [OneTurnEnv(prompts[i], MAX_TOKENS, chat.pad_id, chat.eot_id) for i in idx]
            keys = np.concatenate([choice_keys(i, 1) for i in idx])
            sampling = EpisodeSampling(keys, np.ones(len(envs), np.float32), np.ones(len(envs), np.float32))
            _, stats = sampler.generate(envs, [0] * len(envs), list(range(len(envs))), jax.random.key(0),
                                        slots=len(envs), episode_sampling=sampling)
            tokens += stats.generated_tokens
        return time.perf_counter() - t0, tokens

    rows = []
    try:
        for c in CONCURRENCY:
            n = rounds * c
            direct(c, c)  # compile this batch size (the server shares the sampler and its compiled loops)
            http(c, c)
            d_s, d_tok = direct(c, n)
            batches = service.engine.stats["batches"]
            h_s, h_tok = http(c, n)
            rows.append({"concurrency": c, "requests": n, "server_batches": service.engine.stats["batches"] - batches,
                         "http_requests_per_s": n / h_s, "http_tokens_per_s": h_tok / h_s,
                         "sampler_requests_per_s": n / d_s, "sampler_tokens_per_s": d_tok / d_s,
                         "same_tokens": h_tok == d_tok, "overhead": h_s / d_s - 1.0})
    finally:
        server.should_exit = True
        server.thread.join(timeout=10)
        service.engine.close()
    res = {"machine": f"{os.cpu_count()} CPUs", "max_tokens": MAX_TOKENS, "rows": rows}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    return res


def print_table(res: dict) -> None:
    print(f"serve: chat completions over HTTP vs the in-process sampler ({res['max_tokens']} tokens a request)")
    print(f"{'conc':>5} {'reqs':>5} {'http req/s':>11} {'sampler req/s':>14} {'http tok/s':>11} "
          f"{'sampler tok/s':>14} {'overhead':>9} {'same tokens':>12} {'batches':>8}")
    for r in res["rows"]:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['http_requests_per_s']:>11.1f} "
              f"{r['sampler_requests_per_s']:>14.1f} {r['http_tokens_per_s']:>11.0f} "
              f"{r['sampler_tokens_per_s']:>14.0f} "
              f"{100 * r['overhead']:>8.1f}% {str(r['same_tokens']):>12} {r['server_batches']:>8}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_integer("rounds", 2, "Requests per client thread at each concurrency.")

    def main(argv):
        del argv
        print_table(run(rounds=flags.FLAGS.rounds))

    app.run(main)
