"""Replies as plain values: a whole reply, or one assembled from stream deltas.

Nothing here does I/O, so the sync and async calls share all of it. Bodies
are read as plain JSON (dicts), never through the SDK's models: the SDK
builds those without validation, so a reply of the wrong shape would
surface later as an ``AttributeError`` (or a pydantic warning) instead of a
clear :class:`~conversation_memory.errors.MalformedResponse`.

A reply a content filter stopped (``finish_reason: "content_filter"``, as
Azure OpenAI sends) is never complete, streamed or not: its text is what the
filter let through. Azure's extra fields (``prompt_filter_results``, a first
stream chunk with no choices, ``content_filter_results`` per choice) need
nothing else.

A streamed reply arrives as chunks whose ``delta`` carries pieces of the
content and of each tool call; tool calls are keyed by their ``index``
(servers that omit it get one per position), their ``id`` and ``name``
come once, and their ``arguments`` arrive in fragments to be joined.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conversation_memory.errors import MalformedResponse, ModelError
from conversation_memory.llm.mapping import error_from_body

__all__ = ["FILTERED", "Assembler", "Completion", "Usage", "completion_from", "plain"]

FILTERED = "content_filter"
"""The finish_reason of a reply a content filter stopped: partial, so never complete."""


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call, as the server reported them."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    reported: bool
    """False when the server sent no usage (the counts are None; count them yourself)."""

    @classmethod
    def unreported(cls) -> Usage:
        return cls(None, None, None, reported=False)

    @classmethod
    def from_body(cls, usage: Any) -> Usage:
        if not isinstance(usage, Mapping):
            return cls.unreported()
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens"))
        if prompt is None and completion is None:
            return cls.unreported()
        total = _count(usage.get("total_tokens"))
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        return cls(prompt, completion, total, reported=True)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True, slots=True)
class Completion:
    """One reply, ready to be stored."""

    text: str
    """The reply's text ("" when it only calls tools)."""
    message: dict[str, Any]
    """The assistant message to store, in the OpenAI format (content, tool_calls)."""
    finish_reason: str | None
    """Why the model stopped (``stop``, ``length``, ``tool_calls``...); None when unknown."""
    usage: Usage
    model: str
    """The model the server says answered, else the one asked for."""
    request_id: str | None
    """The server's ``x-request-id``, for support tickets."""
    latency_ms: float
    """From the call to the end of the reply, retries and waits included."""
    attempts: int
    """Requests made, the successful one included."""
    complete: bool
    """False when a stream ended early, broke, or was abandoned, or a content filter stopped
    the reply (finish_reason ``content_filter``): ``text`` is partial."""


def plain(obj: Any) -> Any:
    """A JSON-like value from an SDK model (or anything already plain)."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        # warnings=False: the SDK builds models without validation, so a field
        # may hold anything and pydantic would warn while dumping it.
        return dump(mode="json", exclude_unset=True, warnings=False)
    return obj


def _tool_calls(calls: Any, *, model: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise MalformedResponse(
            f"the reply's tool_calls is not a list: {calls!r}", model=model, retryable=False
        )
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise MalformedResponse(
                f"a tool call in the reply has no function: {call!r}", model=model, retryable=False
            )
        arguments = function.get("arguments")
        out.append(
            {
                "id": call.get("id"),
                "type": call.get("type") or "function",
                "function": {
                    "name": function.get("name"),
                    "arguments": arguments if isinstance(arguments, str) else "",
                },
            }
        )
    return out


def _assistant_message(
    text: str, tool_calls: list[dict[str, Any]], refusal: str | None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant"}
    if tool_calls:
        message["content"] = text or None
        message["tool_calls"] = tool_calls
    elif not text and refusal:
        message["content"] = [{"type": "refusal", "refusal": refusal}]
    else:
        message["content"] = text
    return message


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Some servers answer with content parts.
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    raise TypeError(type(content).__name__)


def completion_from_body(
    body: Any,
    *,
    model: str,
    request_id: str | None = None,
    latency_ms: float = 0.0,
    attempts: int = 1,
) -> Completion:
    """A :class:`Completion` from a ``chat.completion`` JSON body; raises MalformedResponse."""

    def malformed(detail: str) -> ModelError:
        return MalformedResponse(
            f"the server's reply for model {model!r} is not in the OpenAI chat format: "
            f"{detail}. Check that OPENAI_BASE_URL points at an OpenAI-compatible /v1 endpoint.",
            model=model,
            request_id=request_id,
            attempts=attempts,
            status=None,
            retryable=False,
        )

    if not isinstance(body, Mapping):
        raise malformed(f"expected a JSON object, got {type(body).__name__}")
    choices = body.get("choices")
    if not choices and body.get("error") is not None:
        # An error reported inside a 200 reply (some proxies do this).
        raise error_from_body(
            body, status=None, model=model, attempts=attempts, request_id=request_id
        )
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise malformed(f"'choices' is {choices!r}, expected a non-empty list")
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise malformed(f"choices[0].message is {message!r}")
    try:
        text = _text(message.get("content"))
    except TypeError as exc:
        raise malformed(f"the message content is a {exc}") from None
    calls = message.get("tool_calls")
    tool_calls = _tool_calls(calls, model=model) if calls else []
    refusal = message.get("refusal")
    finish = choice.get("finish_reason")
    served = body.get("model")
    return Completion(
        text=text,
        message=_assistant_message(text, tool_calls, refusal if isinstance(refusal, str) else None),
        finish_reason=finish if isinstance(finish, str) else None,
        usage=Usage.from_body(body.get("usage")),
        model=served if isinstance(served, str) and served else model,
        request_id=request_id,
        latency_ms=latency_ms,
        attempts=attempts,
        complete=finish != FILTERED,
    )


def completion_from(obj: Any, *, model: str) -> Completion:
    """A :class:`Completion` from a reply got with your own client.

    Accepts an ``openai`` ``ChatCompletion``, its ``model_dump()`` dict, an
    assistant message dict, or plain text. Raises MalformedResponse for
    anything else.
    """
    if isinstance(obj, str):
        return Completion(
            text=obj,
            message={"role": "assistant", "content": obj},
            finish_reason=None,
            usage=Usage.unreported(),
            model=model,
            request_id=None,
            latency_ms=0.0,
            attempts=1,
            complete=True,
        )
    request_id = getattr(obj, "_request_id", None)
    body = plain(obj)
    if isinstance(body, Mapping) and "choices" not in body and body.get("role") == "assistant":
        body = {"choices": [{"message": body, "finish_reason": None}]}
    return completion_from_body(
        body, model=model, request_id=request_id if isinstance(request_id, str) else None
    )


@dataclass(slots=True)
class _Call:
    id: str | None = None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class Assembler:
    """Builds one reply from stream chunks (plain dicts); only choice 0 is kept."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.served: str | None = None
        self.pieces: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, _Call] = {}
        self.finish_reason: str | None = None
        self.usage = Usage.unreported()
        self.chunks = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def feed(self, chunk: Any) -> str:
        """Take one chunk; return the text it adds ("" if none).

        Raises MalformedResponse for a chunk that is not a chunk object, or the
        mapped error for an error object sent as a chunk.
        """
        chunk = plain(chunk)
        if not isinstance(chunk, Mapping):
            raise MalformedResponse(
                f"a stream event for model {self.model!r} is not a JSON object: {chunk!r}",
                model=self.model,
                status=None,
                retryable=False,
            )
        if chunk.get("error") is not None and not chunk.get("choices"):
            raise error_from_body(chunk, status=None, model=self.model, attempts=0)
        self.chunks += 1
        served = chunk.get("model")
        if isinstance(served, str) and served:
            self.served = served
        if chunk.get("usage") is not None:
            self.usage = Usage.from_body(chunk["usage"])
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return ""
        added = ""
        for choice in choices:
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                added += self._delta(delta)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                self.finish_reason = finish
        return added

    def _delta(self, delta: Mapping[str, Any]) -> str:
        try:
            piece = _text(delta.get("content"))
        except TypeError:
            piece = ""
        if piece:
            self.pieces.append(piece)
        refusal = delta.get("refusal")
        if isinstance(refusal, str):
            self.refusal.append(refusal)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for position, call in enumerate(calls):
                if isinstance(call, Mapping):
                    self._tool_delta(position, call)
        return piece

    def _tool_delta(self, position: int, call: Mapping[str, Any]) -> None:
        index = call.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            index = position
        slot = self.calls.setdefault(index, _Call())
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id and slot.id is None:
            slot.id = call_id
        function = call.get("function")
        if not isinstance(function, Mapping):
            return
        name = function.get("name")
        # OpenAI sends the name once; some servers repeat it whole in every delta,
        # a few send it in fragments. Join fragments, ignore repeats.
        if isinstance(name, str) and name and name != slot.name:
            slot.name += name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            slot.arguments.append(arguments)

    def tool_calls(self) -> list[dict[str, Any]]:
        return [
            {
                "id": slot.id or f"call_{index}",
                "type": "function",
                "function": {"name": slot.name, "arguments": "".join(slot.arguments)},
            }
            for index, slot in sorted(self.calls.items())
        ]

    def completion(
        self,
        *,
        request_id: str | None,
        latency_ms: float,
        attempts: int,
        complete: bool,
    ) -> Completion:
        text = self.text
        refusal = "".join(self.refusal) or None
        return Completion(
            text=text,
            message=_assistant_message(text, self.tool_calls(), refusal),
            finish_reason=self.finish_reason,
            usage=self.usage,
            model=self.served or self.model,
            request_id=request_id,
            latency_ms=latency_ms,
            attempts=attempts,
            complete=complete and self.finish_reason not in (None, FILTERED),
        )
