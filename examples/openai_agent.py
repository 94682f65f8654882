"""An agent written against the OpenAI API that trains a policy through the agent proxy.

    python examples/openai_agent.py --base_url=http://127.0.0.1:8000/v1 --episodes=4800 --group_size=8

The server (`python -m jaxrl_async.serve --workdir=WORKDIR`) runs beside a process-mode training
run with no sampler processes (`runtime.num_samplers = 0`; docs/serve.md has the three
commands). The agent plays the chat form of `search_easy` (`--n`, `--max_turns`: the config's)
with the `openai` client: each episode's calls go to `/v1/episodes/{id}/...`, the task
(`envs.chat.ChatEnv`) executes the tool calls, and the agent reports the reward. The proxy keeps
each call's token ids, log-probs and versions and queues every group of `rl.group_size` episodes
(one task instance: `--group_size` must equal the run's) for the learner, whose new versions the
server then serves. The agent prints its success rate and the policy versions it met every
`--report_every` episodes.
"""

import concurrent.futures
import itertools
import json
import threading

import httpx
import openai
from absl import app, flags, logging

from jaxrl_async.envs.chat import make_chat_env

flags.DEFINE_string("base_url", "http://127.0.0.1:8000/v1", "The server's OpenAI base URL.")
flags.DEFINE_integer("episodes", 512, "Episodes to play.")
flags.DEFINE_integer("group_size", 8, "Episodes per task instance: the run's rl.group_size.")
flags.DEFINE_integer("concurrency", 8, "Episodes played at once.")
flags.DEFINE_integer("report_every", 64, "Episodes per printed success rate.")
flags.DEFINE_integer("seed", 1000, "Task seeds start here (the run evaluates its own held-out seeds).")
flags.DEFINE_integer("n", 4, "The hidden number is in [0, n): the run's task.kwargs.n.")
flags.DEFINE_integer("max_turns", 3, "Turns per episode: the run's task.kwargs.max_turns.")


def play(base: str, i: int) -> tuple[bool, int]:
    """Episode `i` (task instance `i // group_size`); returns (success, newest version served)."""
    f = flags.FLAGS
    env = make_chat_env("search_easy", system_prompt="Call one tool per turn.", max_turn_tokens=24, n=f.n,
                        max_turns=f.max_turns)
    env.reset(f.seed + i // f.group_size)
    messages, success, version = list(env.messages), False, -1
    client = openai.OpenAI(base_url=f"{base}/episodes/ep{i}", api_key="dummy_key", timeout=600)
    while not env.done:
        r = client.chat.completions.create(model="agent", messages=messages, tools=env.tools,
                                           max_tokens=env.max_turn_tokens, temperature=1.0)
        msg, version = r.choices[0].message, max(version, r.model_extra["policy_version"])
        call = msg.tool_calls[0] if msg.tool_calls else None
        try:
            args = json.loads(call.function.arguments) if call else None
        except ValueError:
            args = call.function.arguments
        result = env.step(env.encode(env.call_text(call.function.name, args) if call else (msg.content or "")))
        success = bool(result.info["success"])
        messages += [msg.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id if call else "none",
                                                         "content": env.messages[-1]["content"]}]
    httpx.post(f"{base}/episodes/ep{i}/reward", timeout=None, json={
        "reward": result.reward, "success": success, "group": f"task{i // f.group_size}"}).raise_for_status()
    return success, version


def main(argv):
    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)  # no line per request
    done, lock = [], threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(f.concurrency) as pool:
        for i, (success, version) in zip(itertools.count(), pool.map(lambda i: play(f.base_url, i), range(f.episodes))):
            with lock:
                done.append((success, version))
            if (i + 1) % f.report_every == 0:
                window = done[-f.report_every:]
                rate = sum(s for s, _ in window) / len(window)
                print(f"episodes {i + 2 - f.report_every}-{i + 1}: success {rate:.3f}, "
                      f"policy versions {min(v for _, v in window)}-{max(v for _, v in window)}", flush=True)


if __name__ == "__main__":
    app.run(main)
