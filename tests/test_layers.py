"""The pure floors import only downwards, and nothing that does I/O.

Every import counts, also one inside a function or under ``TYPE_CHECKING``: a
circle closed at call level is still a circle (budget.py and strategies.py
used to import each other that way).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "conversation_memory"

FLOORS = [  # lowest first: each module may import only the ones before it
    "_config",  # the one module that reads the environment
    "errors",
    "types",
    "registry",
    "_tiktoken_data",
    "tokens",
    "messages",
    "units",
    "retrieval",
    "budget",
    "strategies",
    "recall",
    "strategy_names",
    "fitting",
    "fusion",
]
PURE = [
    "messages",
    "units",
    "retrieval",
    "budget",
    "strategies",
    "recall",
    "strategy_names",
    "fitting",
    "fusion",
]
"""No I/O, no clock, no randomness: only these standard modules."""
PURE_STDLIB = {
    "__future__",
    "collections",
    "collections.abc",
    "dataclasses",
    "functools",
    "json",
    "math",
    "operator",
    "re",
    "typing",
}


def imports(module: str) -> set[str]:
    """Every module ``module`` imports, anywhere in its source."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text("utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "conversation_memory":  # from conversation_memory import tokens
                found.update(f"conversation_memory.{alias.name}" for alias in node.names)
    return found


def package_imports(module: str) -> set[str]:
    prefix = "conversation_memory."
    return {name.removeprefix(prefix) for name in imports(module) if name.startswith(prefix)}


@pytest.mark.parametrize("module", FLOORS)
def test_each_floor_imports_only_the_floors_below(module: str) -> None:
    below = set(FLOORS[: FLOORS.index(module)])
    assert package_imports(module) <= below, f"{module} imports from its own floor or above"


@pytest.mark.parametrize("module", PURE)
def test_the_pure_floors_import_nothing_that_does_io(module: str) -> None:
    outside = {name for name in imports(module) if not name.startswith("conversation_memory")}
    assert outside <= PURE_STDLIB
