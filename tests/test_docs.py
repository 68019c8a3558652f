"""The README's examples run, and the repository passes its own linter."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_example_runs(number, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[number], f"README.md block {number + 1}", "exec"), {})


def test_quick_start_demo_runs():
    out = subprocess.run(
        [sys.executable, "-m", "conversation_memory", "demo"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "stored 301 messages" in out
    assert "tokens" in out


def quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    run, test = quick_start_commands()
    assert run.endswith("convmem chat")
    assert test.endswith("-m pytest")
    assert test in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_cli_command_is_in_the_readme():
    from conversation_memory.cli import cli

    for name, command in cli.commands.items():
        assert f"convmem {name}" in README, f"`convmem {name}` is missing from the README"
        assert (command.help or "").strip(), f"`convmem {name}` has no --help text"
        for sub, inner in getattr(command, "commands", {}).items():
            assert f"`{sub}`" in README or f"convmem {name} {sub}" in README, (name, sub)
            assert (inner.help or "").strip(), f"`convmem {name} {sub}` has no --help text"


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run(
        [ruff, "check", "--output-format", "concise", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heading", "folder"),
    [("## Comparing strategies", "docs/lab"), ("## Remembering beyond the window", "docs/recall")],
)
def test_the_readme_lab_table_is_what_its_command_writes(tmp_path, heading, folder):
    """A README lab command, rerun: same table as the README's and as its folder's
    results.md (the lab is deterministic against its test model)."""
    from click.testing import CliRunner

    from conversation_memory.cli import cli

    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(convmem lab .*?)\n```", section, flags=re.DOTALL)
    assert command is not None
    args = command.group(1).replace("\\\n", " ").split()[1:]
    assert args[-2:] == ["--out", folder]
    out = tmp_path / "lab"
    result = CliRunner().invoke(cli, [*args[:-1], str(out), "--no-plots"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = (out / "results.md").read_text(encoding="utf-8").strip()
    assert table == (ROOT / folder / "results.md").read_text(encoding="utf-8").strip()
    assert table in section
