"""Word-level tokenizer over one fixed vocabulary shared by every task.

Every whole number 0..99 and every word the tasks use is a single token, so a tiny
policy never has to assemble a number from digits. The vocabulary is fixed (it does not
depend on any task's configuration), so a model trained for one task can be run on
another and ``vocab_size`` is a constant.

Layout of the ids::

    0 <pad>   1 <bos>   2 <eot>   3 <unk>
    4 .. 103  the numbers "0" .. "99"
    104 ..    the task words (WORDS below), in order
"""

from __future__ import annotations

from collections.abc import Iterable

# Largest whole number with its own token.
MAX_NUMBER = 99

SPECIALS = ("<pad>", "<bos>", "<eot>", "<unk>")

# Words used by the tasks. Append only: ids of existing words must not move.
WORDS = (
    # search
    "find", "number", "below", "guess", "higher", "lower", "correct",
    # error observations ("error : unknown tool", ...)
    "error", ":", "unknown", "tool", "wrong", "arity", "not", "empty", "turn", "bad", "value",
    # tooluse
    "user", "wants", "refund", "for", "lookup", "order", "amount", "done",
    # tooluse items
    "hat", "shoe", "book", "lamp", "cup", "sock", "pen", "bag",
)


class Tokenizer:
    """Word-level tokenizer over one fixed vocabulary shared by all tasks."""

    PAD = 0
    BOS = 1
    EOT = 2  # ends an agent turn
    UNK = 3
    NUM_OFFSET = len(SPECIALS)  # id of the number 0

    def __init__(self):
        numbers = tuple(str(i) for i in range(MAX_NUMBER + 1))
        self.id_to_word: tuple[str, ...] = SPECIALS + numbers + WORDS
        if len(set(self.id_to_word)) != len(self.id_to_word):
            raise AssertionError("duplicate word in the vocabulary")
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(self.id_to_word)}
        self.vocab_size: int = len(self.id_to_word)
        self.max_number: int = MAX_NUMBER

    # ---- text <-> ids -------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Whitespace-split words to ids; a word outside the vocabulary maps to UNK."""
        return [self.word_to_id.get(w, self.UNK) for w in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; special tokens render as <pad>, <bos>, <eot>, <unk>."""
        return " ".join(self.word(i) for i in ids)

    # ---- single tokens ------------------------------------------------------------
    def word(self, token_id) -> str:
        """The word of one id; an id outside the vocabulary renders as <unk>."""
        i = int(token_id)
        if 0 <= i < self.vocab_size:
            return self.id_to_word[i]
        return SPECIALS[self.UNK]

    def token(self, word: str) -> int:
        """The id of one word (UNK when unknown)."""
        return self.word_to_id.get(word, self.UNK)

    def number_token(self, n: int) -> int:
        """The id of the whole number ``n`` (0 <= n <= MAX_NUMBER)."""
        n = int(n)
        if not 0 <= n <= MAX_NUMBER:
            raise ValueError(f"number {n} has no token (vocabulary holds 0..{MAX_NUMBER})")
        return self.NUM_OFFSET + n

    def number_value(self, token_id) -> int | None:
        """The integer a number token stands for, or None for any other token."""
        v = int(token_id) - self.NUM_OFFSET
        return v if 0 <= v <= MAX_NUMBER else None

    def is_number(self, token_id) -> bool:
        return self.number_value(token_id) is not None


TOKENIZER = Tokenizer()
