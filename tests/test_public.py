"""The package's one public door: every public name and error class is exported."""

from __future__ import annotations

import inspect

import conversation_memory
from conversation_memory import errors

CONTRACT = {  # the names the README promises; checks outside this repo rely on them
    "Memory",
    "Conversation",
    "count_tokens",
    "fit",
    "ConversationNotFound",
}


def test_all_is_sorted_and_complete():
    exported = conversation_memory.__all__
    # isort-style, as ruff's RUF022 keeps it: CONSTANTS, Classes, then functions.
    kind = lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n)  # noqa: E731
    assert exported == sorted(exported, key=kind)
    assert set(exported) >= CONTRACT
    for name in exported:
        assert hasattr(conversation_memory, name), name


def test_every_error_class_is_exported_and_rooted():
    for name, value in vars(errors).items():
        if inspect.isclass(value) and issubclass(value, Exception):
            assert name in conversation_memory.__all__, name
            assert issubclass(value, errors.ConversationMemoryError), name
            assert name in errors.__doc__, f"{name} missing from the tree in errors.py"
