"""Gold trajectories: each task's gold actions written as the policy would write them.

``plan(env, task)`` is the list of agent turn texts, in the env's chat format:

* each gold assistant action: one tool call (``env.call_text``: the template's own form);
* not solo, each run of consecutive gold user actions: one text message asking the user to do
  them (the ``scripted`` user then makes those calls and answers ``Done.``);
* not solo, last: a text message holding the task's ``communicate_info`` strings (the scripted
  user then stops the episode); solo, last: the ``done`` call (tau2's solo stop).

``check(...)`` sends every task's plan, as token ids, through the training path (parse ->
tau2 orchestrator/environment -> tau2 evaluator) and compares with ``oracle_reward``: tau2's
evaluator on the gold actions executed directly in a tau2 ``Environment`` (no tokenizer, no
parser, no orchestrator). A task passes the check when the oracle gives 1.0 and the
training path does too; tasks whose gold actions cannot pass (the oracle gives less) are
reported, not failed.
"""

from __future__ import annotations

import copy
import dataclasses
import uuid

from jaxrl_async.tau2 import lib as lib_module


def _actions(task) -> list:
    return list(task.evaluation_criteria.actions or []) if task.evaluation_criteria else []


def final_message(task) -> str:
    info = list(task.evaluation_criteria.communicate_info or []) if task.evaluation_criteria else []
    if info:
        return "Here is what you asked for: " + " ; ".join(info) + " . Is there anything else?"
    return "Your request has been handled. Is there anything else I can help you with?"


def plan(env, task) -> list[str]:
    """The gold agent's turn texts for ``task`` (see the module docstring)."""
    actions = _actions(task)
    texts, i = [], 0
    while i < len(actions):
        a = actions[i]
        if a.requestor == "assistant" or env.solo:
            texts.append(env.call_text(a.name, a.arguments))
            i += 1
            continue
        j = i
        while j < len(actions) and actions[j].requestor == "user":
            j += 1
        steps = "; ".join(x.get_func_format() for x in actions[i:j])
        texts.append(f"Please do the following on your device: {steps}")
        i = j
    texts.append(env.call_text("done", {}) if env.solo else final_message(task))
    return texts


def oracle_reward(domain: str, task, solo: bool) -> float:
    """tau2's reward for the gold actions run directly in a tau2 Environment."""
    lib = lib_module.load()
    M, S = lib.message, lib.simulation
    constructor = lib.registry.get_env_constructor(domain)
    environment = constructor(solo_mode=True) if solo else constructor()
    init = task.initial_state
    history = copy.deepcopy(init.message_history or []) if init is not None else []
    environment.set_state(init.initialization_data if init else None,
                          init.initialization_actions if init else None, history)
    messages = list(history)
    for k, a in enumerate(_actions(task)):
        requestor = "assistant" if solo else a.requestor
        call = M.ToolCall(id=f"gold_{k}", name=a.name, arguments=a.arguments, requestor=requestor)
        cls = M.AssistantMessage if requestor == "assistant" else M.UserMessage
        messages += [cls(role=requestor, content=None, tool_calls=[call]), environment.get_response(call)]
    # Solo: the agent cannot talk; its last message is the stop the `done` call becomes.
    last = lib.LLMSoloAgent.STOP_TOKEN if solo else final_message(task)
    messages.append(M.AssistantMessage(role="assistant", content=last))
    now = lib.get_now()
    sim = S.SimulationRun(id=str(uuid.uuid4()), task_id=task.id, start_time=now, end_time=now, duration=0.0,
                          termination_reason=S.TerminationReason.AGENT_STOP, messages=messages)
    return float(lib.evaluate_simulation(simulation=sim, task=task, evaluation_type=lib.EvaluationType.ALL,
                                         solo_mode=solo, domain=domain).reward)


@dataclasses.dataclass
class CheckResult:
    domain: str
    rewards: list[float]  # the training path's reward per task
    oracle: list[float]  # tau2's reward for the gold actions run directly
    simulations: list  # tau2 SimulationRuns (reward_info set)
    task_ids: list[str]

    @property
    def scored(self) -> int:
        return sum(r == 1.0 for r in self.rewards)

    @property
    def failed(self) -> list[str]:
        """Tasks whose gold actions pass under tau2 but not through the training path."""
        return [t for t, r, o in zip(self.task_ids, self.rewards, self.oracle) if o == 1.0 and r != 1.0]

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        return f"{self.domain}: {self.scored}/{len(self.rewards)} tasks scored 1.0"


def run_episode(env, index: int) -> tuple[list[int], list[int]]:
    """Plays the gold plan of task ``index`` through ``env`` as token ids; (tokens, loss mask)."""
    tokens = list(env.reset(index))
    mask = [0] * len(tokens)
    texts = plan(env, env.task)
    for k in range(len(texts) + env.max_turns):
        if env.done:
            break
        ids = env.encode(texts[min(k, len(texts) - 1)])
        res = env.step(ids + [env.eot_id])
        tokens += ids + [env.eot_id] + res.observation
        mask += [1] * (len(ids) + 1) + [0] * len(res.observation)
    return tokens, mask


def check(env, task_ids=None) -> CheckResult:
    """Runs every task of ``env`` (or ``task_ids``) through the gold check."""
    indices = [i for i, t in enumerate(env.tasks) if task_ids is None or t.id in task_ids]
    rewards, oracle, sims = [], [], []
    for i in indices:
        run_episode(env, i)
        sim = env.simulation
        sim.trial = 0
        sims.append(sim)
        rewards.append(float(sim.reward_info.reward) if sim is not None else 0.0)
        oracle.append(oracle_reward(env.domain, env.tasks[i], env.solo))
    return CheckResult(env.domain, rewards, oracle, sims, [env.tasks[i].id for i in indices])
