"""Writes the shipped chat tokenizer, jaxrl_async/assets/chat_tokenizer/.

A byte-level BPE (Qwen2 pre-tokenizer, ChatML special tokens, a Qwen2.5-like chat template
with tools) trained with the `tokenizers` package on chats generated from the tasks:
system prompts with the tools' JSON schemas, user messages, tool calls (well-formed and
malformed, from the scripted agent at several noise levels) and tool results. Saved with
`transformers.PreTrainedTokenizerFast.save_pretrained` (needs the `reference` extra).

Deterministic: the corpus is generated from fixed seeds, and BPE training on the same
corpus gives the same merges, so a rerun rewrites the same files.

Usage: python scripts/make_chat_tokenizer.py [--out DIR] [--vocab-size N] [--episodes N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxrl_async.envs import ENV_NAMES  # noqa: E402
from jaxrl_async.envs import chat_tokenizer as ct  # noqa: E402
from jaxrl_async.envs.base import expert_episode  # noqa: E402
from jaxrl_async.envs.chat import ChatEnv, make_chat_env  # noqa: E402

NOISES = (0.0, 0.3, 1.0)


def corpus(tokenizer, episodes: int) -> list[str]:
    """Rendered chats of the scripted agent on every task (ChatML)."""
    texts = []
    for name in ENV_NAMES:
        env: ChatEnv = make_chat_env(name, tokenizer)
        for k, noise in enumerate(NOISES):
            rng = np.random.default_rng([k, 7])
            for seed in range(episodes):
                expert_episode(env, seed, rng, noise)
                texts.append(env.conversation_text())
    return texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=ct.SHIPPED_TOKENIZER)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--episodes", type=int, default=300, help="episodes per task and noise level")
    args = parser.parse_args(argv)
    from jaxrl_async.models.hf import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # A bytes-only tokenizer with the same specials and template renders the corpus.
        boot = ct.save_chatml_tokenizer(["x"], os.path.join(tmp, "boot"), vocab_size=300)
        texts = corpus(load_tokenizer(boot), args.episodes)
    ct.save_chatml_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    tok = load_tokenizer(args.out)
    print(f"{args.out}: vocab {tok.vocab_size}, trained on {len(texts)} chats "
          f"({sum(len(t) for t in texts)} characters)")


if __name__ == "__main__":
    main()
