"""Check count_tokens against the cookbook formula, and measure counting speed.

For a fixed, deterministic set of message lists (no tools, no images) this
counts every list twice: with ``conversation_memory.count_tokens``, and with a
plain re-statement of the cookbook's ``num_tokens_from_messages`` written here
on top of tiktoken. It prints the mismatches per encoding (the expected line
is "0 mismatches") and how many messages per second ``count_message`` handles.

    python bench/bench_tokens.py
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

import tiktoken

from conversation_memory import count_tokens, counter_for, get_encoding

MODELS = {"cl100k_base": "gpt-4", "o200k_base": "gpt-4o"}

# fmt: off
WORDS = [
    "the", "memory", "keeps", "every", "turn", "and", "sends", "only", "what", "fits",
    "window", "while", "summaries", "cover", "older", "ranges", "of", "conversation",
    "tokens", "budget", "reply", "reserve",
]
# fmt: on
SNIPPETS = [
    "",
    " ",
    "\n\n",
    "Hello!",
    "naïve café résumé — “quotes” and ‘apostrophes’",
    "日本語の文章とカタカナ、ひらがな。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم",
    "emoji 🎉🚀 family 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "e\u0301 combining marks a\u0308",
    "special-looking text <|endoftext|> and <|im_start|>user<|im_end|> <|endofprompt|>",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY id;",
    "    indented\ttabs\tand   spaces   ",
    "1234567890 3.14159 -42 1e10 0x1F",
    "https://example.com/path?query=1&b=2#frag",
    "ALL CAPS SHOUTING AND CamelCaseWords and snake_case_words",
    "\u200bzero\u200dwidth\ufeffchars",
]
ROLES = ["user", "assistant", "system", "developer", "tool"]
NAMES = ["alice", "bob_2", "example_user", "Zoë"]


def make_message(rng: random.Random) -> dict[str, Any]:
    role = rng.choice(ROLES)
    kind = rng.random()
    if kind < 0.4:
        content = rng.choice(SNIPPETS)
    elif kind < 0.8:
        content = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 80)))
    elif kind < 0.95:
        content = "\n".join(rng.choice(SNIPPETS) for _ in range(rng.randint(2, 12)))
    else:
        content = rng.choice(SNIPPETS[3:]) * rng.randint(200, 2000)  # long text
    message: dict[str, Any] = {"role": role, "content": content}
    if role == "tool":
        message["tool_call_id"] = f"call_{rng.getrandbits(48):012x}"
    elif role in {"user", "system"} and rng.random() < 0.25:
        message["name"] = rng.choice(NAMES)
    return message


def make_lists(count: int = 60, seed: int = 20240806) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    lists = [[make_message(rng) for _ in range(rng.randint(1, 40))] for _ in range(count)]
    lists.append([])  # an empty request costs only the reply priming
    lists.append([{"role": "user", "content": ""}])
    return lists


def cookbook(messages: list[dict[str, Any]], encoding: tiktoken.Encoding) -> int:
    """The cookbook's num_tokens_from_messages; special tokens read as text."""
    total = 0
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(encoding.encode(value, disallowed_special=()))
            if key == "name":
                total += 1
    return total + 3


def throughput(counter: Any, messages: list[dict[str, Any]]) -> tuple[float, float]:
    """Messages and tokens per second of count_message, best of 5 rounds."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        tokens = sum(counter.count_message(message) for message in messages)
        best = min(best, time.perf_counter() - start)
    return len(messages) / best, tokens / best


def main() -> int:
    lists = make_lists()
    n_messages = sum(map(len, lists))
    print(f"{len(lists)} message lists, {n_messages} messages")
    total_mismatches = 0
    for encoding_name, model in MODELS.items():
        encoding = get_encoding(encoding_name)
        mismatches = sum(
            count_tokens(messages, model=model) != cookbook(messages, encoding)
            for messages in lists
        )
        counter = counter_for(model)
        flat = [message for messages in lists for message in messages]
        short = [message for message in flat if len(message["content"]) < 2000]
        rate, tokens_rate = throughput(counter, flat)
        short_rate, _ = throughput(counter, short)
        print(
            f"{encoding_name} ({model}): {mismatches} mismatches; "
            f"{rate:,.0f} messages/s over all ({tokens_rate:,.0f} tokens/s), "
            f"{short_rate:,.0f} messages/s without the long texts"
        )
        total_mismatches += mismatches
    print(f"total: {total_mismatches} mismatches")
    return 1 if total_mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
