"""Every error this library raises, under one root.

Each error says what was wrong and how to fix it, and carries the context a
caller needs (conversation id, model, limits) as attributes. Where a builtin
describes the same kind of failure, the error inherits it too, so
``except LookupError`` keeps working for callers who don't know our names::

    ConversationMemoryError
    ├── ConfigurationError (ValueError)      bad argument to a constructor or call
    │   ├── UnknownModel (LookupError)       model not in the registry
    │   └── TokenizerDataError               tokenizer files missing or corrupt
    ├── InvalidMessage (ValueError)          a message the store refuses; nothing written
    ├── InvalidPayload (ValueError)          a message list the API would reject
    ├── BudgetExceeded (ValueError)          cannot fit inside the prompt budget
    ├── NotFound (LookupError)
    │   ├── ConversationNotFound             absent, or owned by another user
    │   └── UserNotFound                     a user with no stored data
    ├── ConversationExists (ValueError)      an import whose id is taken
    ├── ImportFormatError (ValueError)       an export file that can't be read
    └── StoreError                           the database itself
        ├── NotADatabase                     corrupt, empty, foreign or a directory
        ├── SchemaOutdated                   older revision: run the upgrade
        └── SchemaTooNew                     written by a newer version: refused
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BudgetExceeded",
    "ConfigurationError",
    "ConversationExists",
    "ConversationMemoryError",
    "ConversationNotFound",
    "ImportFormatError",
    "InvalidMessage",
    "InvalidPayload",
    "NotADatabase",
    "NotFound",
    "SchemaOutdated",
    "SchemaTooNew",
    "StoreError",
    "TokenizerDataError",
    "UnknownModel",
    "UserNotFound",
]


class ConversationMemoryError(Exception):
    """Root of every error raised by conversation_memory.

    Keyword arguments become attributes (``err.conversation_id``, ``err.limit``)
    so callers can react without parsing the message.
    """

    def __init__(self, message: str, **context: Any) -> None:
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


class InvalidMessage(ConversationMemoryError, ValueError):
    """A message does not follow the OpenAI chat format (field named in the message)."""


class InvalidPayload(ConversationMemoryError, ValueError):
    """A message list breaks the API's rules (e.g. a tool result without its call)."""


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
