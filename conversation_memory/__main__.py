"""``python -m conversation_memory demo``: store a long conversation and show its context.

A stand-in for the ``convmem`` command-line tool, which comes next: it
only calls the library and prints what the library reports.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

USAGE = "usage: python -m conversation_memory demo"


def demo() -> None:
    from conversation_memory import Memory, explain

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.db"
        with Memory(path) as memory:
            chat = memory.conversation(
                system="You are a helpful travel assistant.", model="gpt-4o-mini", budget=600
            )
            chat.append(
                {"role": "user", "content": "Remember: my passport number is X123."}, pinned=True
            )
            for day in range(1, 151):
                chat.append({"role": "user", "content": f"What should I do on day {day}?"})
                chat.append(
                    {
                        "role": "assistant",
                        "content": f"On day {day}, visit museum #{day} "
                        "and try the local food market near the harbour.",
                    }
                )
            context = chat.context()
            print(f"stored {len(chat)} messages in {path.name}; the next request sends:\n")
            print(explain(context))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["demo"]:
        print(USAGE, file=sys.stderr)
        return 2
    demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
