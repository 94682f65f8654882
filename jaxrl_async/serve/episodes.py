"""The agent proxy: chat calls tied to an episode become one training trajectory, token in, token out.

A program written against the OpenAI API ties its calls to an episode with the route
`/v1/episodes/{episode}/chat/completions` (or the header `X-Episode-Id` on
`/v1/chat/completions`) and reports the episode's reward with
`POST /v1/episodes/{episode}/reward` `{"reward": r, "success": bool, "group": str}`.

The episode is laid out as the sampler lays a chat episode out (`envs.chat.ChatEnv`): the
first call's prompt, each call's generated tokens (the end-of-turn token included; a forced
one, context only, when the budget ran out), then what follows the end-of-turn token up to the
next generation prompt (the rest of the assistant turn as the template writes it, the tool or
user messages), rendered by the chat template and encoded. The generated tokens are never
re-tokenised: a later call's prompt is the episode's token stream so far plus the new
messages' tokens, whatever the client sends back as the assistant message (its content is
not read). A later call must extend the conversation: its messages start with the previous
call's messages, then one assistant message, then the new ones; otherwise it gets a 400.

The finished episode is a `rollout.trajectory.Trajectory` (tokens, loss mask on the generated
tokens, behaviour log-probs, per-token versions, reward). Episodes reported with the same
`group` form a group (the group-relative advantages' unit); a group of `group_size` episodes is
handed to `sink` (e.g. a `runtime.spool.TrajectoryQueue`'s `put` of an `Item`, as the sampler
processes queue theirs).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from typing import Optional

import numpy as np

from jaxrl_async.rollout.trajectory import Trajectory
from jaxrl_async.serve.chat_format import ChatFormat, template_messages
from jaxrl_async.serve.protocol import APIError, bad


@dataclasses.dataclass
class _Episode:
    messages: list  # the last call's request messages
    tools: Optional[list]
    tokens: list = dataclasses.field(default_factory=list)
    loss_mask: list = dataclasses.field(default_factory=list)
    behav: list = dataclasses.field(default_factory=list)
    versions: list = dataclasses.field(default_factory=list)
    calls: int = 0


class EpisodeRecorder:
    """The episodes in flight (see the module docstring). Thread-safe.

    chat: the model's `ChatFormat`; group_size: episodes per group; sink: called with
    (group name, [Trajectory]) when a group is complete (None: the newest 1024 groups are kept
    in `groups`). A trajectory's `group_id` numbers its group in order of first report.
    """

    def __init__(self, chat: ChatFormat, group_size: int = 1, sink: Optional[Callable] = None):
        self.chat, self.group_size, self.sink = chat, int(group_size), sink
        self._episodes: dict[str, _Episode] = {}
        self._pending: dict[str, list[Trajectory]] = {}
        self.groups: collections.deque = collections.deque(maxlen=1024)
        self._group_ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def _observation(self, prev: list, messages: list, tools) -> str:
        """Text after the previous assistant turn's end-of-turn token up to the next generation
        prompt (as `ChatEnv._observation_text`)."""
        n = len(prev) + 1
        tok = self.chat.tokenizer
        a = tok.render_chat_template(template_messages(messages[:n]), tools=tools, add_generation_prompt=False)
        b = tok.render_chat_template(template_messages(messages), tools=tools, add_generation_prompt=True)
        i = a.rfind(self.chat.eot_token)
        if i < 0 or not b.startswith(a):
            raise bad("messages", "the chat template is not prefix-stable here: the call cannot extend the episode")
        return a[i + len(self.chat.eot_token):] + b[len(a):]

    def prompt(self, episode: str, messages: list, tools: Optional[list], rendered_prompt: list[int],
               prefix: str = "") -> list[int]:
        """The prompt ids of a call of `episode`: `rendered_prompt` for its first call, else the
        episode's tokens so far plus the new messages' tokens (and a forced call's `prefix`)."""
        with self._lock:
            ep = self._episodes.get(episode)
        if ep is None:
            return rendered_prompt
        n = len(ep.messages)
        if messages[:n] != ep.messages or len(messages) < n + 2 or messages[n].get("role") != "assistant":
            raise bad("messages", f"episode {episode!r}: a call must repeat the previous call's messages, then one "
                                  f"assistant message, then the new messages")
        if tools != ep.tools:
            raise bad("tools", f"episode {episode!r}: the tools must stay those of its first call")
        return list(ep.tokens) + self.chat.encode(self._observation(ep.messages, messages, tools) + prefix)

    def record(self, episode: str, messages: list, tools: Optional[list], prompt: list[int], completion) -> None:
        """Appends a call's prompt (the part not in the episode yet) and its generated tokens."""
        with self._lock:
            ep = self._episodes.get(episode)
            if ep is None:
                ep = self._episodes[episode] = _Episode(messages=[], tools=tools)
            new = prompt[len(ep.tokens):]
            ep.tokens += new
            ep.loss_mask += [False] * len(new)
            ep.behav += [0.0] * len(new)
            ep.versions += [-1] * len(new)
            ids = list(completion.token_ids)
            ep.tokens += ids
            ep.loss_mask += [True] * len(ids)
            ep.behav += list(completion.logprobs)
            ep.versions += list(completion.token_versions or [completion.version] * len(ids))
            if not completion.ended:  # the budget ran out: the turn is closed as the sampler closes it
                ep.tokens.append(self.chat.eot_id)
                ep.loss_mask.append(False)
                ep.behav.append(0.0)
                ep.versions.append(-1)
            ep.messages = list(messages)
            ep.calls += 1

    def finish(self, episode: str, reward: float, success: bool = False, group: Optional[str] = None) -> Trajectory:
        """Ends `episode` with its reward; returns its trajectory (and hands its group on when complete)."""
        with self._lock:
            ep = self._episodes.pop(episode, None)
            if ep is None:
                raise APIError(404, f"episode {episode!r} has no calls (or already ended)", param="episode",
                               code="episode_not_found")
            group = group if group is not None else episode
            gid = self._group_ids.setdefault(group, len(self._group_ids))
            traj = Trajectory(
                tokens=np.asarray(ep.tokens, np.int32), loss_mask=np.asarray(ep.loss_mask, bool),
                behav_logp=np.asarray(ep.behav, np.float32), versions=np.asarray(ep.versions, np.int32),
                reward=float(reward), success=bool(success), num_turns=ep.calls, group_id=gid, task_seed=-1)
            members = self._pending.setdefault(group, [])
            members.append(traj)
            done = len(members) >= self.group_size
            if done:
                del self._pending[group]
                self._group_ids.pop(group, None)
        if done:
            if self.sink is not None:
                self.sink(group, members)
            else:
                self.groups.append((group, members))
        return traj
