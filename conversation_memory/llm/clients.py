"""SDK clients from the environment: ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL``.

The SDK is imported only when a client is made, so :func:`server_configured`
costs nothing at start-up (``convmem chat`` asks it before anything else).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from conversation_memory import _config
from conversation_memory.errors import ConfigurationError

if TYPE_CHECKING:
    import openai

__all__ = ["NO_KEY", "async_client_from_env", "client_from_env", "server_configured"]

_DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "no-key"
"""Sent as the key to a server named by OPENAI_BASE_URL when no key is set (local servers
ignore it; one that checks it answers 401, which says how to set the key)."""


def _client_settings(env: Mapping[str, str] | None, options: dict[str, Any]) -> dict[str, Any]:
    if "max_retries" in options:
        raise ConfigurationError(
            "max_retries: the SDK's retries stay off (one retry layer); "
            "set LLM(..., retry=RetryPolicy(attempts=...)) instead.",
            argument="max_retries",
        )
    key = options.pop("api_key", None) or _config.openai_api_key(env)
    base_url = options.pop("base_url", None) or _config.openai_base_url(env)
    if not key:
        if not base_url:
            raise ConfigurationError(
                "No API key: set OPENAI_API_KEY (for OpenAI), or OPENAI_BASE_URL for a "
                "local OpenAI-compatible server (e.g. http://127.0.0.1:8080/v1), or pass "
                "client=OpenAI(api_key=..., base_url=...).",
                argument="OPENAI_API_KEY",
            )
        key = NO_KEY
    # Both passed explicitly, so the SDK doesn't read the process environment itself.
    return {"api_key": key, "base_url": base_url or _DEFAULT_BASE_URL, "max_retries": 0, **options}


def client_from_env(env: Mapping[str, str] | None = None, **options: Any) -> openai.OpenAI:
    """An ``OpenAI`` client from ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``, SDK retries off.

    ``env`` replaces the process environment (for tests); ``options`` go to
    ``openai.OpenAI`` (``timeout``, ``default_headers``, ``http_client``...).
    """
    import openai

    return openai.OpenAI(**_client_settings(env, dict(options)))


def async_client_from_env(
    env: Mapping[str, str] | None = None, **options: Any
) -> openai.AsyncOpenAI:
    """The ``AsyncOpenAI`` twin of :func:`client_from_env`."""
    import openai

    return openai.AsyncOpenAI(**_client_settings(env, dict(options)))


def server_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names a server for :func:`client_from_env`:
    ``OPENAI_API_KEY`` (OpenAI) or ``OPENAI_BASE_URL`` (any compatible server) is set."""
    return bool(_config.openai_api_key(env) or _config.openai_base_url(env))
