"""A key a server echoes back never reaches an error, the database or the terminal.

Gateways and proxies sometimes quote the request (its ``Authorization`` or
``api-key`` header) in their error bodies. ``ChatServer``'s
``Fault.status(..., echo_headers=True)`` does exactly that, over real HTTP to
the real SDK. Test keys are built at run time: the repository never holds a
string shaped like a real key.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import sqlalchemy as sa

from conversation_memory import Memory, register_model
from conversation_memory.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ModelError,
    ServerError,
    redact,
)
from conversation_memory.llm import LLM, RetryPolicy
from conversation_memory.testing import ChatServer, Fault

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "hello"}]
CONVMEM = str(Path(sys.executable).with_name("convmem"))


def openai_shaped_key() -> str:
    return "sk-" + "proj-" + secrets.token_urlsafe(30)


def gateway_key() -> str:
    """A key with no telltale shape: only knowing it is configured can hide it."""
    return "gw" + secrets.token_hex(12)


def leaks(error: BaseException, key: str) -> list[str]:
    """Every rendering of ``error`` that still shows ``key``."""
    shown = {
        "str": str(error),
        "repr": repr(error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    return [name for name, text in shown.items() if key in text]


def call(llm: LLM, *, stream: bool) -> str:
    if not stream:
        return llm.complete(model=MODEL, messages=MESSAGES).text
    with llm.stream(model=MODEL, messages=MESSAGES) as reply:
        return "".join(reply)


@pytest.mark.parametrize("make_key", [openai_shaped_key, gateway_key])
@pytest.mark.parametrize("stream", [False, True])
def test_an_echoed_key_is_redacted_from_the_error(make_key, stream) -> None:
    key = make_key()
    with ChatServer(model=MODEL) as server, server.client(api_key=key) as client:
        llm = LLM(client, retry=RetryPolicy(attempts=1))
        server.fail(Fault.status(401, echo_headers=True))
        with pytest.raises(AuthenticationFailed) as caught:
            call(llm, stream=stream)
        echoed = server.chat_requests[0]
        assert key in echoed.headers["authorization"], "the server did see the key"
    assert leaks(caught.value, key) == []
    assert "<redacted>" in str(caught.value)
    assert caught.value.status == 401


def test_a_key_in_a_plain_text_body_or_a_stream_error_is_redacted() -> None:
    key = gateway_key()
    with ChatServer(model=MODEL) as server, server.client(api_key=key) as client:
        llm = LLM(client, retry=RetryPolicy(attempts=1))
        server.fail(Fault.status(502, body=f"upstream said: bad credential {key}"))
        with pytest.raises(ServerError) as plain:
            call(llm, stream=False)
        server.fail(Fault.sse_error(f"auth failed for key {key}", after_chunks=0))
        with pytest.raises(ModelError) as midstream:
            call(llm, stream=True)
    assert leaks(plain.value, key) == []
    assert leaks(midstream.value, key) == []


def test_secret_shapes_are_redacted_even_when_not_configured() -> None:
    openai_key, token = openai_shaped_key(), secrets.token_urlsafe(24)
    text = (
        f"proxy error: Authorization: Bearer {token}; key={openai_key}; "
        f'{{"api-key": "{token}"}}; postgresql://app:{token}@db.example/chats'
    )
    cleaned = redact(text)
    assert openai_key not in cleaned
    assert token not in cleaned
    assert "postgresql://app:<redacted>@db.example/chats" in cleaned
    # Every error of the library passes its message through the same filter.
    assert token not in str(ConfigurationError(text))
    # Help texts that name settings keep their words.
    for help_text in (
        "Set OPENAI_API_KEY to a valid key, or pass client=OpenAI(api_key=..., base_url=...).",
        "No API key: set OPENAI_API_KEY (for OpenAI).",
        "Bearer tokens expire; the server said 401.",
    ):
        assert redact(help_text) == help_text


def test_an_echoed_key_never_reaches_the_usage_table(tmp_path) -> None:
    """A failed summary stores its error in ``usage.error``: redacted, like the raised one."""
    key = gateway_key()
    register_model("secrets-test-model", window=4096, max_output=256)
    db = str(tmp_path / "secrets.db")
    with (
        ChatServer(model="secrets-test-model") as server,
        server.client(api_key=key) as client,
        Memory(
            db,
            client=client,
            model="secrets-test-model",
            strategy="summary",
            compaction="manual",
            retry=RetryPolicy(attempts=1),
        ) as memory,
    ):
        chat = memory.conversation(budget=300)
        chat.extend(
            {"role": role, "content": f"message {n}: " + "words " * 20}
            for n, role in zip(range(30), ["user", "assistant"] * 15, strict=True)
        )
        server.fail(Fault.status(500, echo_headers=True))
        outcome = chat.compact()
        assert outcome.error
        assert key not in outcome.error
    engine = sa.create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            errors = conn.execute(sa.text("SELECT error FROM usage")).scalars().all()
    finally:
        engine.dispose()
    assert errors
    assert all(error for error in errors)
    assert [error for error in errors if key in error] == []
    assert "<redacted>" in errors[0]


def test_convmem_chat_never_prints_an_echoed_key(tmp_path) -> None:
    key = openai_shaped_key()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CONVMEM_"))}
    env["OPENAI_API_KEY"] = key
    with ChatServer(model=MODEL, window=128_000) as server:
        server.fail(Fault.status(401, echo_headers=True))
        done = subprocess.run(
            [CONVMEM, "chat", "--db", str(tmp_path / "cli.db"), "--base-url", server.base_url,
             "--model", MODEL, "--new", "--debug"],
            input="hello\n", capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert key in server.chat_requests[0].headers["authorization"]
    assert done.returncode == 5, done.stderr
    assert "refused the credentials" in done.stderr
    assert "Traceback" in done.stderr  # --debug: the chained SDK error is printed too
    assert key not in done.stderr + done.stdout
