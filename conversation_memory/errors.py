"""Every error this library raises, under one root.

Each error says what was wrong and how to fix it, and carries the context a
caller needs (conversation id, model, limits) as attributes. Where a builtin
describes the same kind of failure, the error inherits it too, so
``except LookupError`` keeps working for callers who don't know our names::

    ConversationMemoryError
    ├── ConfigurationError (ValueError)      bad argument to a constructor or call
    │   ├── UnknownModel (LookupError)       model not in the registry
    │   ├── TokenizerDataError               tokenizer files missing or corrupt
    │   ├── LocalModelUnavailable            local model not installed (xllamacpp, GGUF file)
    │   └── AmbiguousReference               an id prefix several conversations start with
    ├── InvalidMessage (ValueError)          a message we were given breaks the chat format
    ├── InvalidPayload (ValueError)          a request built wrongly (tool-call pairs, order, turns)
    ├── BudgetExceeded (ValueError)          cannot fit inside the prompt budget
    ├── NotFound (LookupError)
    │   ├── ConversationNotFound             absent, or owned by another user
    │   └── UserNotFound                     a user with no stored data
    ├── ConversationExists (ValueError)      an import whose id is taken
    ├── ImportFormatError (ValueError)       an export file that can't be read
    ├── StoreError                           the database itself
    │   ├── NotADatabase                     corrupt, empty, foreign or a directory
    │   ├── SchemaOutdated                   older revision: run the upgrade
    │   └── SchemaTooNew                     written by a newer version: refused
    ├── ModelError                           a model call failed (after any retries)
    │   ├── AuthenticationFailed (PermissionError)   401/403: key or base URL
    │   ├── RateLimited                      429 that outlasted the retries
    │   ├── ContextLengthExceeded            the server says the prompt is too long
    │   ├── BadRequest (ValueError)          400/404/422: the request itself is wrong
    │   ├── ServerError                      5xx that outlasted the retries
    │   ├── ModelTimeout (TimeoutError)      the call's total deadline passed
    │   ├── ConnectionFailed (ConnectionError)  the server could not be reached
    │   └── MalformedResponse                a reply that isn't the API's format
    └── SummarizationFailed                  a summary was refused (empty, refusal, too long)

No message carries a secret. Every error's message passes through
:func:`redact`, which hides what is shaped like one (``Bearer`` tokens,
``sk-`` keys, JWTs, ``api-key: ...`` / ``password=...`` values, the password
of a URL); the model-call layer also hides the key its client was configured
with, whatever its shape, because servers and proxies echo it in their error
bodies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "AmbiguousReference",
    "AuthenticationFailed",
    "BadRequest",
    "BudgetExceeded",
    "ConfigurationError",
    "ConnectionFailed",
    "ContextLengthExceeded",
    "ConversationExists",
    "ConversationMemoryError",
    "ConversationNotFound",
    "ImportFormatError",
    "InvalidMessage",
    "InvalidPayload",
    "LocalModelUnavailable",
    "MalformedResponse",
    "ModelError",
    "ModelTimeout",
    "NotADatabase",
    "NotFound",
    "RateLimited",
    "SchemaOutdated",
    "SchemaTooNew",
    "ServerError",
    "StoreError",
    "SummarizationFailed",
    "TokenizerDataError",
    "UnknownModel",
    "UserNotFound",
]


REDACTED = "<redacted>"

# Values that are secrets by their shape, whoever configured them. Each keeps its
# label and hides the value; a value must hold a letter or digit, so help texts
# such as "OpenAI(api_key=..., base_url=...)" keep their words.
_SECRET_SHAPES = (
    # api-key: X, "api_key": "X", Authorization: Basic X, password=X, ...
    (
        re.compile(
            r"(?i)(?<![a-z])(api[-_]?key|authorization|access[-_]?token|client[-_]?secret"
            r"|password|secret[-_]?key)([\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic)\s+)?"
            r"(?=[^\s\"',;&}<]*[a-z0-9])[^\s\"',;&}<]+"
        ),
        rf"\1\2{REDACTED}",
    ),
    (re.compile(r"(?i)\b(bearer)\s+[a-z0-9._~+/=-]{8,}"), rf"\1 {REDACTED}"),
    # OpenAI-style keys (sk-..., sk-proj-...) and JWTs (Azure AD tokens).
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), REDACTED),
    # scheme://user:password@host
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+@"), rf"\1{REDACTED}@"),
)
_MIN_SECRET = 8
"""Configured secrets shorter than this are not searched for: they would match plain words."""


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with every given secret, and anything shaped like one, replaced."""
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _SECRET_SHAPES:
        text = pattern.sub(replacement, text)
    return text


class ConversationMemoryError(Exception):
    """Root of every error raised by conversation_memory.

    Keyword arguments become attributes (``err.conversation_id``, ``err.limit``)
    so callers can react without parsing the message. The message goes
    through :func:`redact` first.
    """

    def __init__(self, message: str, **context: Any) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.context = context
        for key, value in context.items():
            setattr(self, key, value)


class ConfigurationError(ConversationMemoryError, ValueError):
    """An argument or setting is invalid; the message names it."""


class UnknownModel(ConfigurationError, LookupError):
    """The model is not in the registry; register it with ``register_model``."""


class TokenizerDataError(ConfigurationError):
    """tiktoken's data files could not be found or failed verification."""


class LocalModelUnavailable(ConfigurationError):
    """xllamacpp or the local model's file is missing; the message says how to install them."""


class AmbiguousReference(ConfigurationError):
    """Several conversation ids start with the prefix given; ``candidates`` lists them."""


class InvalidMessage(ConversationMemoryError, ValueError):
    """A message given to us breaks the chat format, or can't go where it was appended.

    The rules of one message (role, content, tool calls, name), wherever the
    message is checked: appended, recorded, imported, given to ``fit`` or
    ``validate``. ``index`` and ``field`` say where; nothing is written.
    """


class InvalidPayload(ConversationMemoryError, ValueError):
    """A request breaks the rules between its messages (tool-call pairs, order, whole turns).

    Raised for a request that was built wrongly: by ``build`` when a strategy
    (ours or your own) chose messages that can't be sent together, or by
    ``validate`` for a list assembled by hand. ``index`` and ``field`` say where.
    """


class BudgetExceeded(ConversationMemoryError, ValueError):
    """What must be sent cannot fit the prompt budget."""


class NotFound(ConversationMemoryError, LookupError):
    """Something asked for does not exist (for this user)."""


class ConversationNotFound(NotFound):
    """No such conversation for this user (another user's id looks the same)."""


class UserNotFound(NotFound):
    """No data is stored for this user."""


class ConversationExists(ConversationMemoryError, ValueError):
    """A conversation with this id already exists."""


class ImportFormatError(ConversationMemoryError, ValueError):
    """An import file is malformed; the message names the line."""


class StoreError(ConversationMemoryError):
    """The database could not be used."""


class NotADatabase(StoreError):
    """The path is not a conversation_memory database; it was left untouched."""


class SchemaOutdated(StoreError):
    """The database schema is older than this library; it must be upgraded."""


class SchemaTooNew(StoreError):
    """The database was written by a newer version; it was left untouched."""


class ModelError(ConversationMemoryError):
    """A call to the model failed; ``status``, ``request_id`` and ``attempts`` say how."""


class AuthenticationFailed(ModelError, PermissionError):
    """The server refused the credentials (401/403)."""


class RateLimited(ModelError):
    """The server kept answering 429 until the retries or the deadline ran out."""


class ContextLengthExceeded(ModelError):
    """The server says the prompt is longer than its window (``limit``, ``requested``)."""


class BadRequest(ModelError, ValueError):
    """The server refused the request itself (400/404/422); retrying can't help."""


class ServerError(ModelError):
    """The server kept failing (5xx) until the retries or the deadline ran out."""


class ModelTimeout(ModelError, TimeoutError):
    """The call's total deadline passed."""


class ConnectionFailed(ModelError, ConnectionError):
    """The server could not be reached."""


class MalformedResponse(ModelError):
    """The server answered with something that is not the API's format."""


class SummarizationFailed(ConversationMemoryError):
    """A summary was refused (empty, a refusal, too long) or its call failed."""
