"""Test doubles for code that talks to chat models: use them in your own tests too.

:class:`ChatServer` is a real HTTP server on 127.0.0.1 that speaks OpenAI's
Chat Completions wire format, with a deterministic model, its own tokenizer,
OpenAI's validation errors and scriptable :class:`Fault` s. It serves
deterministic embeddings too (:mod:`~conversation_memory.testing.embeddings`).
:class:`RecordingSummarizer` stands in for a model summarizer without HTTP::

    from conversation_memory.testing import ChatServer, Fault

    with ChatServer(window=4096) as server, server.client() as client:
        server.fail(Fault.status(429, retry_after=1))
        ...  # the first chat request gets the 429, the next one a reply
        assert server.chat_requests[0].fault is not None

The model the server plays is spelled out, pure, in three modules a test may
use to predict its answers: :mod:`~conversation_memory.testing.tokenizer`
(its token counts), :mod:`~conversation_memory.testing.refusals` (what it
refuses, and every error body) and :mod:`~conversation_memory.testing.replies`
(its replies and summaries).
"""

from conversation_memory.testing.faults import ContextStyle, Fault
from conversation_memory.testing.replies import ReplySpec, text_of
from conversation_memory.testing.server import ChatServer, RecordedRequest
from conversation_memory.testing.summarizers import RecordingSummarizer, SummaryCall

__all__ = [
    "ChatServer",
    "ContextStyle",
    "Fault",
    "RecordedRequest",
    "RecordingSummarizer",
    "ReplySpec",
    "SummaryCall",
    "text_of",
]
