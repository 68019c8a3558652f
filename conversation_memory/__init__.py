"""conversation_memory: a lossless, exact and fast memory for chat models.

Everything public is importable from here. The public subpackages are
``conversation_memory.testing`` (test doubles), ``.llm`` (the client layer),
``.lab`` (the strategy lab), ``.local`` (the local model), ``.admin`` (a
database's location, schema revision, upgrade and check: ``convmem db``) and
``.errors``; every other module is internal and may change without notice
(docs/architecture.md draws the layers). The command line and the lab use
only this surface, which tests/test_public.py checks.
"""

from typing import TYPE_CHECKING

from conversation_memory._config import default_model
from conversation_memory._lazy import loader
from conversation_memory._tiktoken_data import get_encoding
from conversation_memory.budget import (
    Context,
    Report,
    Retrieved,
    budget_for,
    explain,
    summary_message,
)
from conversation_memory.compaction import Outcome
from conversation_memory.embeddings import Embeddings
from conversation_memory.engine import Conversation, Memory
from conversation_memory.errors import (
    AmbiguousReference,
    AuthenticationFailed,
    BadRequest,
    BudgetExceeded,
    ConfigurationError,
    ConnectionFailed,
    ContextLengthExceeded,
    ConversationExists,
    ConversationMemoryError,
    ConversationNotFound,
    ImportFormatError,
    InvalidMessage,
    InvalidPayload,
    LocalModelUnavailable,
    MalformedResponse,
    ModelError,
    ModelTimeout,
    NotADatabase,
    NotFound,
    RateLimited,
    SchemaOutdated,
    SchemaTooNew,
    ServerError,
    StoreError,
    SummarizationFailed,
    TokenizerDataError,
    UnknownModel,
    UserNotFound,
)
from conversation_memory.export import read_export
from conversation_memory.fitting import build, fit
from conversation_memory.llm.retry import RetryPolicy
from conversation_memory.messages import validate
from conversation_memory.recall import Recall
from conversation_memory.registry import (
    ModelInfo,
    ModelRegistry,
    get_model,
    load_models,
    load_models_from_env,
    register_model,
)
from conversation_memory.store.values import ConversationInfo, Entry, SearchHit, StoredMessage
from conversation_memory.strategies import (
    TRUNCATE,
    Strategy,
    Summarize,
    Truncate,
    Window,
    keep_newest,
)
from conversation_memory.strategy_names import as_strategy
from conversation_memory.streams import AsyncTurnStream, TurnStream
from conversation_memory.summarize import (
    DEFAULT_PROMPT,
    ModelSummarizer,
    PromptTemplate,
    Summarizer,
    SummaryText,
)
from conversation_memory.tokens import (
    REPLY_PRIMING,
    FixedCounter,
    TiktokenCounter,
    TokenCounter,
    count_tokens,
    counter_for,
)
from conversation_memory.turns import Reply
from conversation_memory.types import Budget, Correction, Item, Recalled, State, Summary
from conversation_memory.units import Selection
from conversation_memory.usage import UsageTotals

if TYPE_CHECKING:
    from conversation_memory.aio import AsyncConversation, AsyncMemory
    from conversation_memory.llm import Completion, Usage

__getattr__ = loader(
    globals(),
    {
        "AsyncConversation": "conversation_memory.aio",
        "AsyncMemory": "conversation_memory.aio",
        "Completion": "conversation_memory.llm.assembly",
        "Usage": "conversation_memory.llm.assembly",
    },
)


__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_PROMPT",
    "REPLY_PRIMING",
    "TRUNCATE",
    "AmbiguousReference",
    "AsyncConversation",
    "AsyncMemory",
    "AsyncTurnStream",
    "AuthenticationFailed",
    "BadRequest",
    "Budget",
    "BudgetExceeded",
    "Completion",
    "ConfigurationError",
    "ConnectionFailed",
    "Context",
    "ContextLengthExceeded",
    "Conversation",
    "ConversationExists",
    "ConversationInfo",
    "ConversationMemoryError",
    "ConversationNotFound",
    "Correction",
    "Embeddings",
    "Entry",
    "FixedCounter",
    "ImportFormatError",
    "InvalidMessage",
    "InvalidPayload",
    "Item",
    "LocalModelUnavailable",
    "MalformedResponse",
    "Memory",
    "ModelError",
    "ModelInfo",
    "ModelRegistry",
    "ModelSummarizer",
    "ModelTimeout",
    "NotADatabase",
    "NotFound",
    "Outcome",
    "PromptTemplate",
    "RateLimited",
    "Recall",
    "Recalled",
    "Reply",
    "Report",
    "Retrieved",
    "RetryPolicy",
    "SchemaOutdated",
    "SchemaTooNew",
    "SearchHit",
    "Selection",
    "ServerError",
    "State",
    "StoreError",
    "StoredMessage",
    "Strategy",
    "SummarizationFailed",
    "Summarize",
    "Summarizer",
    "Summary",
    "SummaryText",
    "TiktokenCounter",
    "TokenCounter",
    "TokenizerDataError",
    "Truncate",
    "TurnStream",
    "UnknownModel",
    "Usage",
    "UsageTotals",
    "UserNotFound",
    "Window",
    "__version__",
    "as_strategy",
    "budget_for",
    "build",
    "count_tokens",
    "counter_for",
    "default_model",
    "explain",
    "fit",
    "get_encoding",
    "get_model",
    "keep_newest",
    "load_models",
    "load_models_from_env",
    "read_export",
    "register_model",
    "summary_message",
    "validate",
]
