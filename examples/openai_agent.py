"""An agent written against the OpenAI API, producing training episodes through the agent proxy.

    python examples/openai_agent.py [--episodes=8] [--group_size=4]

The server (the agent proxy, `jaxrl_async.serve`) runs in this process on a free port with a
random qwen3_tiny-shaped model. The agent plays the chat form of `search_easy` (tool calls, as
configs/qwen3_tiny.py trains it) with the `openai` client: each episode's calls go to
`/v1/episodes/{id}/...`, the task (`envs.chat.ChatEnv`)
executes the tool calls, and the agent reports the reward. The proxy turns each episode into
a `Trajectory` (its calls' token ids, log-probs and versions, token in, token out) and hands
each complete group to its sink: here a list printed at the end; in training, the trajectory
queue (`runtime.spool.TrajectoryQueue.put`), as the sampler processes queue their groups.
"""

import json
import logging

import httpx
import openai
from absl import app, flags

from jaxrl_async.config import base_config
from jaxrl_async.envs.chat import make_chat_env
from jaxrl_async.serve.app import start_in_thread
from jaxrl_async.serve.episodes import EpisodeRecorder
from jaxrl_async.serve.service import build_service

flags.DEFINE_integer("episodes", 8, "Episodes to play.")
flags.DEFINE_integer("group_size", 4, "Episodes per task instance (a training group).")


def play(base: str, episode: str, seed: int, group: str) -> float:
    env = make_chat_env("search_easy", system_prompt="Call one tool per turn.", max_turn_tokens=24)  # the task: executes the agent's tool calls
    env.reset(seed)
    messages = list(env.messages)
    client = openai.OpenAI(base_url=f"{base}/episodes/{episode}", api_key="dummy_key")
    reward = 0.0
    while not env.done:
        msg = client.chat.completions.create(model="agent", messages=messages, tools=env.tools,
                                             max_tokens=env.max_turn_tokens, temperature=1.0).choices[0].message
        call = msg.tool_calls[0] if msg.tool_calls else None
        text = env.call_text(call.function.name, json_args(call)) if call else (msg.content or "")
        result = env.step(env.encode(text))
        reward = result.reward
        messages += [msg.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id if call else "none", "content": env.messages[-1]["content"]}]
    httpx.post(f"{base}/episodes/{episode}/reward", json={"reward": reward, "group": group}).raise_for_status()
    return reward


def config():
    c = base_config()  # the qwen3_tiny shapes, random weights
    c.task.name, c.task.format, c.model.family = "search_easy", "chat", "qwen3"
    c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.num_kv_heads = 64, 2, 4, 2
    c.model.head_dim, c.model.d_ff, c.model.max_len = 32, 192, 480
    return c


def json_args(call):
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def main(argv):
    del argv
    for name in ("httpx", "httpx2"):  # no line per request
        logging.getLogger(name).setLevel(logging.WARNING)
    groups = []
    service = build_service(config(), model_name="agent", max_slots=8)
    service.recorder = EpisodeRecorder(service.chat, flags.FLAGS.group_size, sink=lambda g, t: groups.append((g, t)))
    server, base = start_in_thread(service)
    try:
        for i in range(flags.FLAGS.episodes):
            seed = i // flags.FLAGS.group_size  # group_size episodes per task instance
            play(base, f"ep{i}", seed, group=f"task{seed}")
    finally:
        server.should_exit = True
        service.engine.close()
    for name, trajs in groups:
        print(f"{name}: rewards {[t.reward for t in trajs]}, tokens {[t.length for t in trajs]}, "
              f"generated {[int(t.loss_mask.sum()) for t in trajs]}, turns {[t.num_turns for t in trajs]}")


if __name__ == "__main__":
    app.run(main)
