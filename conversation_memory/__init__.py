"""conversation_memory: a lossless, exact and fast memory for chat models.

Everything public is importable from here; the modules behind it are
implementation detail (see DESIGN in the README for the layers).
"""

from conversation_memory.budget import (
    Context,
    Report,
    Selection,
    build,
    explain,
    fit,
    summary_message,
    validate,
)
from conversation_memory.engine import (
    Conversation,
    ConversationInfo,
    Memory,
    StoredMessage,
)
from conversation_memory.errors import (
    BudgetExceeded,
    ConfigurationError,
    ConversationExists,
    ConversationMemoryError,
    ConversationNotFound,
    ImportFormatError,
    InvalidMessage,
    InvalidPayload,
    NotADatabase,
    NotFound,
    SchemaOutdated,
    SchemaTooNew,
    StoreError,
    TokenizerDataError,
    UnknownModel,
    UserNotFound,
)
from conversation_memory.registry import ModelInfo, ModelRegistry, get_model, register_model
from conversation_memory.store.repository import Entry
from conversation_memory.strategies import (
    TRUNCATE,
    Strategy,
    Truncate,
    Window,
    as_strategy,
    keep_newest,
)
from conversation_memory.tokens import (
    REPLY_PRIMING,
    FixedCounter,
    TiktokenCounter,
    TokenCounter,
    count_tokens,
    counter_for,
    get_encoding,
)
from conversation_memory.types import Budget, Correction, Item, State, Summary

__version__ = "0.1.0.dev0"

__all__ = [
    "REPLY_PRIMING",
    "TRUNCATE",
    "Budget",
    "BudgetExceeded",
    "ConfigurationError",
    "Context",
    "Conversation",
    "ConversationExists",
    "ConversationInfo",
    "ConversationMemoryError",
    "ConversationNotFound",
    "Correction",
    "Entry",
    "FixedCounter",
    "ImportFormatError",
    "InvalidMessage",
    "InvalidPayload",
    "Item",
    "Memory",
    "ModelInfo",
    "ModelRegistry",
    "NotADatabase",
    "NotFound",
    "Report",
    "SchemaOutdated",
    "SchemaTooNew",
    "Selection",
    "State",
    "StoreError",
    "StoredMessage",
    "Strategy",
    "Summary",
    "TiktokenCounter",
    "TokenCounter",
    "TokenizerDataError",
    "Truncate",
    "UnknownModel",
    "UserNotFound",
    "Window",
    "__version__",
    "as_strategy",
    "build",
    "count_tokens",
    "counter_for",
    "explain",
    "fit",
    "get_encoding",
    "get_model",
    "keep_newest",
    "register_model",
    "summary_message",
    "validate",
]
