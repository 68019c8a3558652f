"""The package's one public door: every public name and error class is exported, and
the CLI and the lab go through it."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
from pathlib import Path

import conversation_memory
from conversation_memory import errors

CONTRACT = {  # the names the README promises; checks outside this repo rely on them
    "Memory",
    "Conversation",
    "count_tokens",
    "fit",
    "ConversationNotFound",
    "SearchHit",
}


def test_all_is_sorted_and_complete():
    exported = conversation_memory.__all__
    # isort-style, as ruff's RUF022 keeps it: CONSTANTS, Classes, then functions.
    kind = lambda n: (0 if n.isupper() else 1 if n[0].isupper() else 2, n)  # noqa: E731
    assert exported == sorted(exported, key=kind)
    assert set(exported) >= CONTRACT
    for name in exported:
        assert hasattr(conversation_memory, name), name


def test_a_search_hit_is_a_frozen_value_with_the_documented_fields():
    hit = conversation_memory.SearchHit
    assert dataclasses.is_dataclass(hit)
    assert hit.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert [field.name for field in dataclasses.fields(hit)] == [
        "conversation_id", "title", "position", "role", "message", "text", "created_at",
        "score", "snippet",
    ]  # fmt: skip
    for name in ("Conversation", "Memory", "AsyncConversation", "AsyncMemory"):
        returned = inspect.signature(getattr(conversation_memory, name).search).return_annotation
        assert returned == "list[SearchHit]", name


def test_every_error_class_is_exported_and_rooted():
    for name, value in vars(errors).items():
        if inspect.isclass(value) and issubclass(value, Exception):
            assert name in conversation_memory.__all__, name
            assert issubclass(value, errors.ConversationMemoryError), name
            assert name in errors.__doc__, f"{name} missing from the tree in errors.py"


# --- the CLI and the lab stand on the public surface -------------------------------------

PACKAGE = Path(conversation_memory.__file__).parent
PUBLIC = {
    "conversation_memory",
    "conversation_memory.admin",
    "conversation_memory.errors",
    "conversation_memory.llm",
    "conversation_memory.local",
    "conversation_memory.testing",
}
"""What the CLI and the lab may import from the package, besides their own subpackage."""
CLI_ALSO = {"conversation_memory.lab"}  # `convmem lab` drives the lab through its public door


@functools.cache
def _modules() -> frozenset[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return frozenset(found)


def reaches_inside(source: str, *, package: str, own: str, allowed: set[str]) -> list[str]:
    """What ``source`` imports from the package beyond ``allowed`` and its ``own``
    subpackage: other modules, or private names of allowed ones. ``package`` is where
    its relative imports start (the package that holds the module)."""

    def inside(name: str) -> bool:
        return name == own or name.startswith(own + ".")

    wrong = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imports = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            imports = [(base, alias.name) for alias in node.names]
        else:
            continue
        for target, name in imports:
            if target.split(".")[0] != "conversation_memory" or inside(target):
                continue
            inner = f"{target}.{name}"
            if target not in allowed:
                wrong.append(target)
            elif inner in _modules() and inner not in allowed and not inside(inner):
                wrong.append(inner)  # `from conversation_memory import engine`
            elif name and name.startswith("_") and not name.startswith("__"):
                wrong.append(inner)  # `from conversation_memory import _config`
    return sorted(set(wrong))


def test_the_cli_and_the_lab_import_only_the_public_surface():
    checked = 0
    for folder, extra in (("cli", CLI_ALSO), ("lab", set())):
        own = f"conversation_memory.{folder}"
        for path in sorted((PACKAGE / folder).glob("*.py")):
            relative = path.relative_to(PACKAGE.parent).as_posix()
            source = path.read_text(encoding="utf-8")
            wrong = reaches_inside(source, package=own, own=own, allowed=PUBLIC | extra)
            assert wrong == [], relative
            checked += 1
    assert checked >= 15


def test_the_import_check_catches_what_it_is_for():
    def wrong(source: str, own: str = "conversation_memory.lab") -> list[str]:
        return reaches_inside(source, package=own, own=own, allowed=PUBLIC)

    assert wrong("from conversation_memory.engine import Memory") == ["conversation_memory.engine"]
    assert wrong("import conversation_memory.tokens") == ["conversation_memory.tokens"]
    assert wrong("from conversation_memory import engine") == ["conversation_memory.engine"]
    assert wrong("from conversation_memory import _config") == ["conversation_memory._config"]
    assert wrong("def f():\n    from conversation_memory.store import migrate\n") == [
        "conversation_memory.store"
    ]
    assert wrong("from conversation_memory.testing.server import ChatServer") == [
        "conversation_memory.testing.server"
    ]
    assert wrong("from ..budget import fit") == ["conversation_memory.budget"]
    assert wrong("from .. import tokens") == ["conversation_memory.tokens"]
    assert wrong("from conversation_memory.cli import _render") == ["conversation_memory.cli"]
    fine = (
        "from conversation_memory import Memory, __version__\n"
        "from conversation_memory.llm import LLM\n"
        "from conversation_memory.lab.results import Results\n"
        "from conversation_memory.lab import testmodel\n"
        "from . import scoring\n"
        "from .measure import Lab\n"
        "import json\n"
    )
    assert wrong(fine) == []
    assert wrong("from conversation_memory.cli import _render", "conversation_memory.cli") == []


def test_default_model_is_convmem_model_or_the_documented_default():
    assert conversation_memory.default_model({"CONVMEM_MODEL": "gpt-4o"}) == "gpt-4o"
    assert conversation_memory.default_model({}) == "gpt-4o-mini"
