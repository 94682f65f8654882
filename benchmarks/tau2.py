"""τ2-bench costs outside the model (`make bench`, section `tau2`; needs the tau2 package).

Per domain, gold episodes of the first tasks are played through `Tau2Env` (the training path,
shipped tokenizer) and timed:

- reward evaluation per episode: tau2's `evaluate_simulation(..., EvaluationType.ALL)` on the
  finished episode (what the last env step of every episode pays);
- env step per agent turn, without the evaluation: parse, tau2's orchestrator and environment
  (tool calls, the scripted user), the template render and the observation's encoding;
- the prompt length in tokens;
- the shared-prefix KV cache (`prefix_run`): the prompt prefill of 64 episodes with and without
  `Sampler(prefix_cache=True)` (`tau2_tiny`'s model, mock prompts with the scripted user);
- asynchronous against synchronous env steps (`overlap_run`): episodes/s of `tau2_tiny`'s model on
  mock with a scripted user that answers after a lognormal latency, with the env steps on the host
  (`sampler.env_workers=0`) and in a worker pool, as fractions of the overlap bound (goal >= 0.9).

    .venv/bin/python -m benchmarks.run --sections=tau2
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

# (domain, tasks timed): the first tasks of the base split.
DOMAINS = (("retail", 10), ("airline", 10), ("telecom", 20), ("mock", 9))


def run(out: str = "runs/bench_tau2.json", domains=DOMAINS) -> list[dict]:
    from jaxrl_async.tau2 import gold
    from jaxrl_async.tau2 import lib as lib_module
    from jaxrl_async.tau2.env import Tau2Env

    lib = lib_module.load()
    rows = []
    for domain, n in domains:
        env = Tau2Env(domain=domain, max_turns=1000, max_context=1 << 30)
        evals, steps, prompts = [], [], []
        for i in range(min(n, len(env.tasks))):
            prompts.append(len(env.reset(i)))
            texts = gold.plan(env, env.task)
            for k in range(len(texts) + 10):
                if env.done:
                    break
                res = env.step(env.encode(texts[min(k, len(texts) - 1)]))
                if not res.done:
                    steps.append(res.info["latency_s"])
            t0 = time.perf_counter()
            lib.evaluate_simulation(simulation=env.simulation, task=env.task, evaluation_type=lib.EvaluationType.ALL,
                                    solo_mode=False, domain=domain)
            evals.append(time.perf_counter() - t0)
        rows.append({"domain": domain, "episodes": len(evals), "eval_s_mean": float(np.mean(evals)),
                     "eval_s_p50": float(np.median(evals)), "step_ms_mean": 1e3 * float(np.mean(steps)),
                     "turns": len(steps) + len(evals), "prompt_tokens_mean": float(np.mean(prompts))})
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def print_table(rows: list[dict]) -> None:
    print("τ2: reward evaluation and env steps (gold episodes, shipped tokenizer)")
    print(f"{'domain':<10} {'episodes':>8} {'eval s/ep':>10} {'eval p50':>9} {'step ms/turn':>13} {'prompt tok':>11}")
    for r in rows:
        print(f"{r['domain']:<10} {r['episodes']:>8} {r['eval_s_mean']:>10.3f} {r['eval_s_p50']:>9.3f} "
              f"{r['step_ms_mean']:>13.1f} {r['prompt_tokens_mean']:>11.0f}")


class _Prompt:
    """An episode that is only its (precomputed) prompt: one sampled token ends it, so a generate
    call's time is the prompts' prefill plus one decode step (env resets stay out of the timing)."""

    max_turn_tokens = 1

    def __init__(self, prompt, eot_id, pad_id):
        self.prompt, self.eot_id, self.pad_id = prompt, eot_id, pad_id

    def reset(self, seed):
        return list(self.prompt)

    def step(self, action):
        from jaxrl_async.envs.base import StepResult

        return StepResult(observation=[], reward=0.0, done=True, info={"success": False, "latency_s": 0.0})


def prefix_run(episodes: int = 64, domain: str = "mock", repeats: int = 3,
               out: str = "runs/bench_tau2_prefix.json") -> dict:
    """Prefill seconds of `episodes` τ2 prompts (best of `repeats`, after a compiling call) with and
    without the shared-prefix KV cache. Each timed call loads the weights again, so the prefix is
    prefilled in it (once per version, as in training)."""
    import jax

    from configs import tau2_tiny
    from jaxrl_async import config as config_lib
    from jaxrl_async.rollout.sampler import Sampler
    from jaxrl_async.tau2.env import Tau2Env

    config = tau2_tiny.get_config()
    model_config = config_lib.model_config_from(config)
    graphdef, params = config_lib.init_params(config, model_config)
    env = Tau2Env(config_lib.chat_tokenizer(config), domain=domain, user="scripted", max_context=model_config.max_len)
    prompts = [env.reset(i) for i in range(len(env.tasks))]
    envs = [_Prompt(prompts[i % len(prompts)], env.eot_id, env.pad_id) for i in range(episodes)]
    row = {"domain": domain, "episodes": episodes, "prompt_tokens_mean": float(np.mean([len(p) for p in prompts]))}
    for prefix_cache in (False, True):
        sampler = Sampler(graphdef, model_config, config_lib.numerics_from(config), prefix_cache=prefix_cache)
        times = []
        for r in range(repeats + 1):
            sampler.update_params(params, r)
            t0 = time.perf_counter()
            _, stats = sampler.generate(envs, list(range(episodes)), list(range(episodes)), jax.random.key(0))
            if r:
                times.append(time.perf_counter() - t0)
        name = "with" if prefix_cache else "without"
        row[f"{name}_s"] = min(times)
        row[f"{name}_prefill_tokens"] = stats.prefill_tokens
        if prefix_cache:
            row["prefix_tokens"] = stats.prefix_tokens // max(stats.prefix_hits, 1)
    row["speedup"] = row["without_s"] / row["with_s"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(row, f, indent=2)
    return row


def print_prefix(row: dict) -> None:
    print(f"τ2: shared-prefix KV cache, prompt prefill of {row['episodes']} {row['domain']} episodes "
          f"(prompts {row['prompt_tokens_mean']:.0f} tokens, shared prefix {row['prefix_tokens']})")
    print(f"without {row['without_s']:.3f} s ({row['without_prefill_tokens']} tokens prefilled)   "
          f"with {row['with_s']:.3f} s ({row['with_prefill_tokens']} tokens prefilled + the prefix once)   "
          f"speedup {row['speedup']:.1f}x")


class _SlowUser:
    """A `Tau2Env` whose user takes time to answer: every user turn after the opening (each call of the
    scripted user's `generate_next_message` inside `step`) first sleeps a lognormal time,
    exp(N(log median_s, sigma^2)), drawn from a generator seeded by (seed, task seed), so a task's
    latencies are the same in every run that plays the same turns. The opening message (in `reset`)
    is not delayed: resets run on the host in both modes. Everything else is the wrapped env's."""

    def __init__(self, env, median_s: float, sigma: float, seed: int = 0):
        self.env, self.median_s, self.sigma, self.seed = env, median_s, sigma, seed
        self.slept_s = 0.0  # this episode's user latency so far

    def __getattr__(self, name):
        return getattr(self.env, name)

    def reset(self, seed):
        prompt = self.env.reset(seed)
        self.slept_s = 0.0
        if self.median_s > 0:
            rng = np.random.default_rng([self.seed, int(seed)])
            user = self.env.orch.user
            answer = user.generate_next_message

            def slow(message, state):
                wait = float(rng.lognormal(np.log(self.median_s), self.sigma))
                time.sleep(wait)
                self.slept_s += wait
                return answer(message, state)

            user.generate_next_message = slow
        return prompt

    def step(self, action):
        return self.env.step(action)


def overlap_run(episodes: int = 16, median_s: float = 1.0, sigma: float = 0.5, domain: str = "mock",
                out: str = "runs/bench_tau2_overlap.json") -> dict:
    """Episodes/s of `tau2_tiny`'s model on τ2 `domain` (scripted user, `_SlowUser` latency) with the env
    steps on the host (sync) and in a worker pool (async), against the overlap bound.

    Every run plays the same `episodes` episodes in one generate call with one KV-cache slot each
    (`Sampler(prefix_cache=True)`, the config's `max_turns` and `max_turn_tokens`). Each episode samples
    with its own key (`EpisodeSampling`), so its tokens, its user turns and their drawn latencies are
    the same in every run whatever the schedule: the runs do the same work (checked: equal tokens).

    - decode alone: the user answers at once (no latency), sync. `D` = its wall time; `f_i` = when
      episode i ended (`on_done`), relative to the call's start.
    - sync: `sampler.env_workers=0`: the envs step on the host between device calls, one after
      another; while one user answers, every slot waits (the latencies add up).
    - async: `sampler.env_workers=episodes`: each env step runs in a worker thread and its slot
      leaves the decode batch while the other slots keep decoding; it rejoins when the answer is in.
    - overlap bound: the wall time if every user latency overlapped perfectly with the other
      episodes' decoding, `max(D, max_i (f_i + L_i))`, `L_i` = episode i's total user latency. No
      schedule beats it: the batch cannot decode faster than without latency (the decode step has a
      fixed shape, so fewer active slots cost the same), and episode i cannot end before its own
      decoding (done by `f_i` at best) plus its own waits, which nothing overlaps with its decoding.
      Reported as episodes/s, `episodes / bound`; the goal is async >= 0.9 of it.

    Compilation stays out of the timings: an untimed sync call before the decode-alone run, an untimed
    async call (same latencies) before the timed async one; each is then timed once."""
    import jax

    from configs import tau2_tiny
    from jaxrl_async import config as config_lib
    from jaxrl_async.rollout.sampler import EpisodeSampling, Sampler
    from jaxrl_async.tau2.env import Tau2Env

    config = tau2_tiny.get_config()
    model_config = config_lib.model_config_from(config)
    graphdef, params = config_lib.init_params(config, model_config)
    tokenizer = config_lib.chat_tokenizer(config)
    kw = config.task.kwargs
    # The mock tasks without env assertions: tau2's evaluator raises on the other two when the agent
    # never created the task they assert on (a random model never does).
    probe = Tau2Env(tokenizer, domain=domain, user="scripted")
    task_ids = [t.id for t in probe.tasks if not (t.evaluation_criteria and t.evaluation_criteria.env_assertions)]
    seeds = list(range(episodes))
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(config.seed), episodes)), np.uint32)
    sampling = EpisodeSampling(keys, np.full(episodes, config.sampler.temperature, np.float32),
                               np.ones(episodes, np.float32))

    def play(workers: int, latency: float):
        envs = [_SlowUser(Tau2Env(tokenizer, domain=domain, user="scripted", max_turns=kw.max_turns,
                                  max_turn_tokens=kw.max_turn_tokens, max_context=model_config.max_len,
                                  task_ids=task_ids),
                          latency, sigma) for _ in range(episodes)]
        sampler = Sampler(graphdef, model_config, config_lib.numerics_from(config), config.sampler.temperature,
                          prefix_cache=True, env_workers=workers)
        sampler.update_params(params, 0)
        ended = {}
        t0 = time.perf_counter()
        trajs, stats = sampler.generate(envs, seeds, seeds, jax.random.key(1), episode_sampling=sampling,
                                        on_done=lambda i, _: ended.setdefault(i, time.perf_counter() - t0))
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "ended_s": [ended[i] for i in range(episodes)],
                "latency_s": [e.slept_s for e in envs], "tokens": [t.tokens.tolist() for t in trajs],
                "turns": [t.num_turns for t in trajs], "decode_steps": stats.decode_steps,
                "loop_calls": stats.loop_calls}

    play(0, 0.0)  # compiles the decode loop, the prefill and prefix widths
    alone = play(0, 0.0)
    sync = play(0, median_s)
    # Untimed first: the answers arrive at other times than in the sync runs, so the slots rejoin with
    # observations to prefill in other groupings, whose (power-of-two) prefill widths compile here.
    play(episodes, median_s)
    asyn = play(episodes, median_s)
    same = alone["tokens"] == sync["tokens"] == asyn["tokens"]
    lat = np.asarray(sync["latency_s"])
    bound_s = max(alone["wall_s"], float(np.max(np.asarray(alone["ended_s"]) + lat)))
    row = {"domain": domain, "episodes": episodes, "median_s": median_s, "sigma": sigma,
           "same_tokens": bool(same), "turns_mean": float(np.mean(alone["turns"])),
           "user_turn_latency_s_total": float(lat.sum()), "user_latency_s_max": float(lat.max()),
           "decode_alone_s": alone["wall_s"], "sync_s": sync["wall_s"], "async_s": asyn["wall_s"],
           "bound_s": bound_s, "decode_steps": {"alone": alone["decode_steps"], "sync": sync["decode_steps"],
                                                 "async": asyn["decode_steps"]},
           "loop_calls": {"alone": alone["loop_calls"], "sync": sync["loop_calls"], "async": asyn["loop_calls"]}}
    for name in ("decode_alone", "sync", "async", "bound"):
        row[f"{name}_eps_per_s"] = episodes / row[f"{name}_s"]
    row["async_vs_sync"] = row["async_eps_per_s"] / row["sync_eps_per_s"]
    row["sync_vs_bound"] = row["sync_eps_per_s"] / row["bound_eps_per_s"]
    row["async_vs_bound"] = row["async_eps_per_s"] / row["bound_eps_per_s"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(row, f, indent=2)
    return row


def print_overlap(row: dict) -> None:
    print(f"τ2: async against sync, {row['episodes']} {row['domain']} episodes of tau2_tiny's model, scripted user "
          f"with lognormal latency (median {row['median_s']} s, sigma {row['sigma']}; {row['turns_mean']:.1f} turns "
          f"per episode, {row['user_turn_latency_s_total']:.1f} s of user latency in all, at most "
          f"{row['user_latency_s_max']:.2f} s per episode; same tokens in every run: {row['same_tokens']})")
    print(f"{'run':<22} {'wall s':>8} {'episodes/s':>11} {'/ bound':>8}")
    for name, label in (("decode_alone", "decode alone (no user)"), ("sync", "sync (env_workers=0)"),
                        ("async", f"async (env_workers={row['episodes']})"), ("bound", "overlap bound")):
        print(f"{label:<22} {row[f'{name}_s']:>8.2f} {row[f'{name}_eps_per_s']:>11.2f} "
              f"{row[f'{name}_eps_per_s'] / row['bound_eps_per_s']:>8.2f}")
    print(f"async / sync {row['async_vs_sync']:.2f}x   async / bound {row['async_vs_bound']:.2f} (goal >= 0.9)")
