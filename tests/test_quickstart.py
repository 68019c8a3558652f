"""The README's quick start, verbatim, on a fresh copy of the repository.

The first command creates a venv, installs the package with the local model
and starts ``convmem chat``; it runs here exactly as written, inside a copy
of the checkout (tracked files only), with no API key in the environment, a
question on stdin, and the database pointed at a temporary file. This is
also the test that the wheel carries the migrations: a non-editable install
creates a database.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0]


def fresh_checkout(target: Path) -> Path:
    """The files git would check out (tracked, plus new ones not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.mark.slow
def test_quick_start_chats_with_the_local_model(tmp_path):
    checkout = fresh_checkout(tmp_path / "checkout")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CONVMEM_"))}
    env.pop("VIRTUAL_ENV", None)
    env["CONVMEM_DB"] = str(tmp_path / "chats.db")
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", quick_start()],
        cwd=checkout,
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), f"no reply printed; stderr: {done.stderr[-2000:]}"
    assert "site-packages" in subprocess.run(
        [str(checkout / ".venv/bin/python"), "-c",
         "import conversation_memory; print(conversation_memory.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout, "the quick start installs the package, not the checkout"  # fmt: skip
    with sqlite3.connect(tmp_path / "chats.db") as db:
        rows = db.execute("SELECT role, content FROM messages ORDER BY position").fetchall()
        [(model, settings)] = db.execute("SELECT model, settings FROM conversations").fetchall()
    assert [role for role, _ in rows] == ["user", "assistant"]
    assert rows[0][1] == "What is the capital of France?"
    assert rows[1][1].strip() == done.stdout.strip()
    assert model == "smollm2-135m-instruct"
    assert json.loads(settings)["strategy"] == "recall", "the local model recalls by default"
    print(f"quick start: {time.monotonic() - started:.1f} s")
