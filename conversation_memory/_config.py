"""The one place that reads environment variables.

Everything else receives these values as arguments, which is what keeps the
rest injectable and testable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DEFAULT_MODEL = "gpt-4o-mini"
"""Model used when neither the caller nor ``CONVMEM_MODEL`` names one."""

APP_NAME = "conversation-memory"


def environ(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return os.environ if env is None else env


def default_db_path(env: Mapping[str, str] | None = None) -> str:
    """``CONVMEM_DB`` if set, else one file in the platform's user data folder."""
    value = environ(env).get("CONVMEM_DB")
    if value:
        return value
    import platformdirs

    return str(Path(platformdirs.user_data_dir(APP_NAME, appauthor=False)) / "convmem.db")


def db_source(env: Mapping[str, str] | None = None) -> str:
    """Where :func:`default_db_path` took its answer from: "CONVMEM_DB" or "default"."""
    return "CONVMEM_DB" if environ(env).get("CONVMEM_DB") else "default"


def default_model(env: Mapping[str, str] | None = None) -> str:
    return environ(env).get("CONVMEM_MODEL") or DEFAULT_MODEL


def openai_api_key(env: Mapping[str, str] | None = None) -> str | None:
    """``OPENAI_API_KEY``, or None when unset or empty."""
    return environ(env).get("OPENAI_API_KEY") or None


def openai_base_url(env: Mapping[str, str] | None = None) -> str | None:
    """``OPENAI_BASE_URL`` (an OpenAI-compatible server), or None for OpenAI itself."""
    return environ(env).get("OPENAI_BASE_URL") or None


def models_file(env: Mapping[str, str] | None = None) -> str | None:
    """``CONVMEM_MODELS``: a JSON file of models outside the registry, or None."""
    return environ(env).get("CONVMEM_MODELS") or None
