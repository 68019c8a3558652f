"""Models outside the registry: aliases, case, a models file, and the command line.

A server such as Ollama or an Azure deployment answers to names the registry
has never heard of (``llama3.2``, ``prod-gpt4o``); the registry still needs
their window and tokenizer. Each test registers names of its own, so the
process-wide default registry can't carry one test's model into another.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from conversation_memory import Memory, get_model, load_models, load_models_from_env
from conversation_memory.cli import cli
from conversation_memory.errors import ConfigurationError, UnknownModel
from conversation_memory.registry import ModelRegistry
from conversation_memory.testing import ChatServer


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_deployment_name_registers_like_the_model_it_serves() -> None:
    registry = ModelRegistry.builtin()
    gpt4o = registry.get("gpt-4o")
    deployment = registry.register("prod-gpt4o", like="gpt-4o")
    assert deployment.name == "prod-gpt4o"
    assert (deployment.encoding, deployment.window, deployment.max_output) == (
        gpt4o.encoding,
        gpt4o.window,
        gpt4o.max_output,
    )
    assert deployment.cost(1000, 1000) == gpt4o.cost(1000, 1000)
    assert deployment.tool_constants == gpt4o.tool_constants
    smaller = registry.register("prod-gpt4o-eu", like="gpt-4o", window=32_000)
    assert (smaller.window, smaller.encoding) == (32_000, gpt4o.encoding)
    with pytest.raises(UnknownModel, match="like"):
        registry.register("x", like="no-such-model")
    with pytest.raises(ConfigurationError, match="window"):
        registry.register("x")  # neither facts nor a model to take them from
    assert "x" not in registry


def test_a_window_alone_gets_a_reply_reserve_of_a_quarter_at_most_4096() -> None:
    registry = ModelRegistry()
    assert registry.register("small", window=8192).max_output == 2048
    assert registry.register("large", window=131_072).max_output == 4096


def test_names_match_case_insensitively_and_the_exact_name_wins() -> None:
    registry = ModelRegistry.builtin()
    assert registry.get("GPT-4o-Mini") is registry.get("gpt-4o-mini")
    assert registry.get("GPT-4O-2024-08-06") is registry.get("gpt-4o")  # a snapshot, any case
    assert "Gpt-4.1" in registry
    upper = registry.register("GPT-4o", window=1000, max_output=100)  # an Azure deployment
    assert registry.get("GPT-4o") is upper
    assert registry.get("gpt-4o").window == 128_000


def write_models(path: Path, models: object) -> str:
    path.write_text(json.dumps(models), encoding="utf-8")
    return str(path)


def test_a_models_file_named_by_the_environment_makes_any_model_usable(tmp_path) -> None:
    llama, deployment = fresh("llama3.2"), fresh("prod-gpt4o")
    models = write_models(
        tmp_path / "models.json",
        {llama: {"window": 8192, "max_output": 1024}, deployment: {"like": "gpt-4o"}},
    )
    with pytest.raises(UnknownModel, match="CONVMEM_MODELS"):
        Memory(":memory:", model=llama)
    env = {"CONVMEM_MODELS": models, "CONVMEM_MODEL": llama}
    with Memory(":memory:", env=env) as memory:
        chat = memory.conversation()
        assert chat.model == llama
        assert chat.budget().window == 8192
        assert memory.conversation(model=deployment).budget().window == 128_000
    assert get_model(llama).max_output == 1024


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        (json.dumps(["llama"]), "object"),
        (json.dumps({"m": {"window": "big"}}), "window"),
        (json.dumps({"m": {"window": 10, "colour": "red"}}), "colour"),
        (json.dumps({"m": {"like": "no-such-model"}}), "no-such-model"),
    ],
)
def test_a_bad_models_file_is_refused_with_its_name(tmp_path, content, said) -> None:
    path = tmp_path / "models.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigurationError, match=said) as caught:
        Memory(":memory:", env={"CONVMEM_MODELS": str(path)})
    assert str(path) in str(caught.value)


def test_load_models_from_env_reads_the_file_convmem_models_names(tmp_path) -> None:
    llama = fresh("llama3.2")
    models = write_models(tmp_path / "models.json", {llama: {"window": 8192, "max_output": 9}})
    registry = ModelRegistry.builtin()
    assert load_models_from_env({}, registry=registry) == []
    (loaded,) = load_models_from_env({"CONVMEM_MODELS": models}, registry=registry)
    assert loaded.name == llama
    assert registry.get(llama).max_output == 9
    with pytest.raises(UnknownModel):
        get_model(llama)  # only the registry it was given learned it


def test_load_models_wants_a_path() -> None:
    with pytest.raises(ConfigurationError, match="path"):
        load_models(5)  # type: ignore[arg-type]


def convmem(*args: str, stdin: str = "", **env: str):
    clean = {k: None for k in os.environ if k.startswith(("OPENAI_", "CONVMEM_"))}
    return CliRunner(env={**clean, **env}).invoke(cli, list(args), input=stdin)


def test_convmem_chat_talks_to_a_model_outside_the_registry(tmp_path) -> None:
    llama = fresh("llama3.2")
    db = str(tmp_path / "cli.db")
    with ChatServer(model=llama, window=8192) as server:
        refused = convmem(
            "chat", "--db", db, "-m", llama, "--base-url", server.base_url, stdin="hello\n"
        )
        assert refused.exit_code == 1
        assert "--window" in refused.stderr
        assert "CONVMEM_MODELS" in refused.stderr
        done = convmem(
            "chat", "--db", db, "-m", llama, "--base-url", server.base_url,
            "--window", "8192", "--new", stdin="hello\n",
        )  # fmt: skip
        assert done.exit_code == 0, done.stderr
        assert done.stdout.startswith("Reply #1")
        assert server.chat_requests[0].body["model"] == llama
    assert get_model(llama).window == 8192
    assert get_model(llama).max_output == 2048
    lonely = convmem("chat", "--db", db, "--window", "8192")
    assert lonely.exit_code == 2
    assert "--model" in lonely.stderr


def test_convmem_reads_the_models_file_for_every_command(tmp_path) -> None:
    llama = fresh("llama3.2")
    path = tmp_path / "models.json"
    models = write_models(path, {llama: {"window": 4096}})
    db = str(tmp_path / "cli.db")
    with ChatServer(model=llama, window=4096) as server:
        done = convmem(
            "chat", "--db", db, "-m", llama, "--base-url", server.base_url, "--new",
            "--title", "ollama", stdin="hello\n", CONVMEM_MODELS=models,
        )  # fmt: skip
        assert done.exit_code == 0, done.stderr
    write_models(path, {llama: {"window": 6000}})  # read again by the next command
    shown = convmem("context", "ollama", "--db", db, "--json", CONVMEM_MODELS=models)
    assert shown.exit_code == 0, shown.stderr
    assert json.loads(shown.stdout)["report"]["window"] == 6000


def test_convmem_lab_reads_the_models_file_too(tmp_path) -> None:
    from conversation_memory import lab

    llama = fresh("llama3.2")
    models = write_models(tmp_path / "models.json", {llama: {"window": 8192}})
    with lab.lab_server(model=llama) as server:
        done = convmem(
            "lab", "--base-url", server.base_url, "--model", llama, "--turns", "6",
            "--probe-every", "3", "-s", "truncate", "-b", "300", "--no-baseline", "--json",
            "--out", str(tmp_path / "lab"), "--no-plots", CONVMEM_MODELS=models,
        )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert get_model(llama).window == 8192
