"""``tooluse``: a customer-service refund through three dependent tool calls.

The user id, order ids and amounts are fresh random numbers per seed, so the only way to
succeed is to copy values from the prompt and from earlier tool results into later calls.
With ``num_orders`` > 1 the user has distractor orders and the prompt names the item to
refund, so the agent has to read which order is the right one.

Format (num_orders = 2)::

    prompt       <bos> user U wants refund for ITEM
    tools        lookup U     -> order O1 ITEM1 order O2 ITEM2     (the user's orders)
                 amount O     -> amount A                          (the amount of order O)
                 refund O A   -> done                              (final action, ends the episode)
    errors       error : unknown user | unknown order | unknown tool | wrong arity | not number | empty turn

``lookup`` of another user and ``amount``/``refund`` of an order the user does not have are
answered with an error (the API refuses them; the episode goes on). ``refund`` of one of
the user's orders commits and ends the episode: success iff it is the order of the item
named in the prompt with that order's exact amount. Three turns suffice; the default
budget is 5.

Expert: ``lookup U``, then ``amount O`` of the target order, then ``refund O A``. Noise
(plausible mistakes, picked uniformly among those for the current stage): look up a
random user id; ask the amount of a distractor order (or a random id); refund before
knowing the amount with a random amount; refund the distractor order; refund the right
order with a wrong amount.
"""

from __future__ import annotations

import numpy as np

from jaxrl_async.envs.base import ERROR_MESSAGES, ERROR_TOKENS, Env, parse_call
from jaxrl_async.envs.tokenizer import MAX_NUMBER, Tokenizer

ITEMS = ("hat", "shoe", "book", "lamp", "cup", "sock", "pen", "bag")
TOOLS = {"lookup": 1, "amount": 1, "refund": 2}


class ToolUseEnv(Env):
    name = "tooluse"

    def __init__(
        self,
        num_orders: int = 2,
        max_value: int = 50,
        max_turns: int = 5,
        max_turn_tokens: int = 4,
        latency_mean_s: float = 0.0,
        latency_sigma: float = 1.0,
        sleep: bool = False,
    ):
        super().__init__(
            max_turns=max_turns,
            max_turn_tokens=max_turn_tokens,
            latency_mean_s=latency_mean_s,
            latency_sigma=latency_sigma,
            sleep=sleep,
        )
        if not 1 <= num_orders <= len(ITEMS):
            raise ValueError(f"num_orders must be in [1, {len(ITEMS)}], got {num_orders}")
        # user id, order ids and amounts are all distinct numbers in [0, max_value).
        if not 1 + 2 * num_orders <= max_value <= MAX_NUMBER + 1:
            raise ValueError(
                f"max_value must be in [{1 + 2 * num_orders}, {MAX_NUMBER + 1}] "
                f"for num_orders={num_orders}, got {max_value}"
            )
        self.num_orders = int(num_orders)
        self.max_value = int(max_value)
        self._user = 0
        self._orders: list[int] = []
        self._amounts: list[int] = []
        self._items: list[str] = []
        self._target = 0
        self._looked_up = False
        self._amount_known = False

    @property
    def turns_needed(self) -> int:
        return 3

    @property
    def max_prompt_tokens(self) -> int:
        return 7

    @property
    def max_observation_tokens(self) -> int:
        return max(3 * self.num_orders, ERROR_TOKENS, 2)

    def _reset(self, rng: np.random.Generator) -> list[int]:
        k = self.num_orders
        values = [int(v) for v in rng.choice(self.max_value, size=1 + 2 * k, replace=False)]
        self._user, self._orders, self._amounts = values[0], values[1 : 1 + k], values[1 + k :]
        self._items = [ITEMS[int(i)] for i in rng.choice(len(ITEMS), size=k, replace=False)]
        self._target = int(rng.integers(k))
        self._looked_up = False
        self._amount_known = False
        item = self._items[self._target]
        return [Tokenizer.BOS] + self.tokenizer.encode(f"user {self._user} wants refund for {item}")

    def _step(self, words):
        tool, args, error = parse_call(words, TOOLS, self.tokenizer)
        if error is not None:
            return ERROR_MESSAGES[error], False, False, error
        if tool == "lookup":
            if args[0] != self._user:
                return ERROR_MESSAGES["unknown_user"], False, False, "unknown_user"
            self._looked_up = True
            listing = " ".join(f"order {o} {it}" for o, it in zip(self._orders, self._items))
            return listing, False, False, None
        if args[0] not in self._orders:
            return ERROR_MESSAGES["unknown_order"], False, False, "unknown_order"
        idx = self._orders.index(args[0])
        if tool == "amount":
            if idx == self._target:
                self._amount_known = True
            return f"amount {self._amounts[idx]}", False, False, None
        # refund: commits and ends the episode.
        success = idx == self._target and args[1] == self._amounts[idx]
        return "done", True, success, None

    # ---- expert -----------------------------------------------------------------------
    def _correct_action(self) -> str:
        o, a = self._orders[self._target], self._amounts[self._target]
        if not self._looked_up:
            return f"lookup {self._user}"
        if not self._amount_known:
            return f"amount {o}"
        return f"refund {o} {a}"

    def _random_other(self, rng, exclude) -> int:
        while True:
            v = int(rng.integers(self.max_value))
            if v != exclude:
                return v

    def _noisy_action(self, rng: np.random.Generator) -> str:
        t = self._target
        o, a = self._orders[t], self._amounts[t]
        others = [i for i in range(self.num_orders) if i != t]
        if not self._looked_up:
            return f"lookup {self._random_other(rng, self._user)}"
        if not self._amount_known:
            if rng.random() < 0.5:
                d = self._orders[others[int(rng.integers(len(others)))]] if others else self._random_other(rng, o)
                return f"amount {d}"
            return f"refund {o} {self._random_other(rng, a)}"
        if others and rng.random() < 0.5:
            d = others[int(rng.integers(len(others)))]
            return f"refund {self._orders[d]} {self._amounts[d]}"
        return f"refund {o} {self._random_other(rng, a)}"
