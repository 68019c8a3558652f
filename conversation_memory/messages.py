"""The OpenAI chat-message format: the rules of one message, and of a request.

The rules are written once, here, and applied at two doors:

- :func:`normalize` checks a message coming in (``append``, ``record``, an
  import) and returns the plain dict that is stored. It applies the rules of
  one message (:func:`check_message`) and two more that storing needs: only
  the chat fields are kept, so a key that is not one is refused (a typo must
  not silently vanish; keys the API defines that carry nothing, such as
  ``"refusal": None`` from the SDK's ``model_dump()``, are ignored); and text
  must be storable byte for byte, one decision for SQLite and PostgreSQL
  alike: NUL characters and lone surrogates are refused (PostgreSQL can't
  store NUL in text, and neither can be encoded as UTF-8), so whatever is
  accepted round-trips exactly.
- :func:`validate` checks a whole request before it leaves: every message
  by the same rules of one message, then the rules between messages, which
  no single message can break: the tool-call pairs, their order, and (for a
  conversation's history) whole turns.

One error for each kind of mistake: a message that breaks the rules of one
message is an :class:`~conversation_memory.errors.InvalidMessage`, wherever
it is found; a list of messages that breaks the rules between them is an
:class:`~conversation_memory.errors.InvalidPayload`. Both name the message's
index and the field.

The rules of one message: a known role (:data:`ROLES`); content that is text,
or a non-empty list of parts of the types that role allows (:data:`PARTS`),
and absent only from an assistant message that calls tools; tool calls only
on an assistant message, each a function call with its own id; a ``name``
the API accepts, never on a tool message; and a tool message names the call
it answers (``tool_call_id``), which no other message carries.

Stored rows: :func:`to_row` and :func:`from_row` map a normalized message to
the store's columns and back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from conversation_memory.errors import InvalidMessage, InvalidPayload
from conversation_memory.types import Message

__all__ = [
    "KEYS",
    "PARTS",
    "ROLES",
    "check_message",
    "check_metadata",
    "dumps",
    "from_row",
    "normalize",
    "to_row",
    "validate",
]

ROLES = ("system", "developer", "user", "assistant", "tool")
PARTS: Mapping[str, frozenset[str]] = {
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset({"text"}),
}
"""The content part types each role allows; a part keeps its payload under its type's name."""
KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
"""The fields a stored message keeps."""
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A ``name`` the API accepts (matched whole)."""

# Roles whose message may be plain text with no other field: validate's fast path.
_PLAIN_ROLES = ("user", "assistant", "system", "developer")


def dumps(value: Any) -> str:
    """The one JSON encoding used for stored values (compact, order kept, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --- the rules of one message ---------------------------------------------------------


def _where(index: int | None) -> str:
    return f"message {index}" if index is not None else "message"


def _fail(index: int | None, field: str, problem: str, fix: str) -> InvalidMessage:
    return InvalidMessage(f"{_where(index)}: {field} {problem}; {fix}", field=field, index=index)


def check_message(message: Any, *, index: int | None = None) -> str:
    """Raise :class:`InvalidMessage` unless ``message`` keeps the rules of one message
    (the module docstring lists them); return its role. ``index`` is its place in a
    list, named in the error."""
    if type(message) is dict and len(message) == 2:  # the common case: a role and its text
        role = message.get("role")
        if role in _PLAIN_ROLES and type(message.get("content")) is str:
            return role
    if not isinstance(message, Mapping):
        raise InvalidMessage(
            f"{_where(index)}: is a {type(message).__name__}, not a dict like "
            "{'role': 'user', 'content': 'hi'}",
            index=index,
        )
    role = message.get("role")
    if role not in ROLES:
        raise _fail(index, "role", f"is {role!r}", f"use one of {', '.join(ROLES)}")
    content = message.get("content")
    calls = message.get("tool_calls")
    if content is None:
        if not (role == "assistant" and calls):
            raise _fail(
                index,
                "content",
                "is missing",
                "give text (only an assistant message with tool_calls may omit it)",
            )
    elif isinstance(content, list | tuple):
        _check_parts(content, role, index)
    elif not isinstance(content, str):
        raise _fail(
            index,
            "content",
            f"is a {type(content).__name__}",
            "use a string or a list of content parts",
        )
    name = message.get("name")
    if name is not None:
        if role == "tool":
            raise _fail(index, "name", "is not allowed on a tool message", "drop it")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise _fail(
                index,
                "name",
                f"must be a string of 1-64 letters, digits, '_' or '-', not {name!r}",
                "that is the API's rule for names",
            )
    if calls is not None:
        if role != "assistant":
            raise _fail(index, "tool_calls", f"is not allowed on a {role} message", "drop it")
        _check_tool_calls(calls, index)
    call_id = message.get("tool_call_id")
    if role == "tool":
        if not isinstance(call_id, str) or not call_id:
            raise _fail(
                index,
                "tool_call_id",
                "is missing",
                "a tool message must name the call it answers",
            )
    elif call_id is not None:
        raise _fail(index, "tool_call_id", f"is not allowed on a {role} message", "drop it")
    return role


def _check_parts(parts: Sequence[Any], role: str, index: int | None) -> None:
    if not parts:
        raise _fail(index, "content", "is an empty list", "send a string or at least one part")
    allowed = PARTS[role]
    for n, part in enumerate(parts):
        field = f"content[{n}]"
        if not isinstance(part, Mapping):
            raise _fail(index, field, f"is a {type(part).__name__}", 'use {"type": "text", ...}')
        kind = part.get("type")
        if not isinstance(kind, str) or kind not in allowed:
            raise _fail(
                index,
                field,
                f"has type {kind!r}, which a {role} message does not allow",
                f"use one of {', '.join(sorted(allowed))}",
            )
        payload = part.get(kind)
        if kind in ("text", "refusal") and not isinstance(payload, str):
            raise _fail(index, f"{field}.{kind}", "must be a string", "put the text there")
        if kind == "image_url" and not (
            isinstance(payload, Mapping) and isinstance(payload.get("url"), str)
        ):
            raise _fail(
                index,
                f"{field}.image_url",
                "must be an object with a string url",
                'use {"type": "image_url", "image_url": {"url": "https://..."}}',
            )


def _check_tool_calls(calls: Any, index: int | None) -> None:
    if not isinstance(calls, list | tuple) or not calls:
        raise _fail(index, "tool_calls", "must be a non-empty list", "leave the key out instead")
    seen: set[str] = set()
    for n, call in enumerate(calls):
        field = f"tool_calls[{n}]"
        if not isinstance(call, Mapping):
            raise _fail(index, field, f"is a {type(call).__name__}", "use the API's call objects")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise _fail(index, f"{field}.id", "must be a non-empty string", "copy the call's id")
        if call_id in seen:
            raise _fail(
                index, f"{field}.id", f"repeats {call_id!r} within one message", "give each its own"
            )
        seen.add(call_id)
        if call.get("type", "function") != "function":
            raise _fail(index, f"{field}.type", "must be 'function'", "only functions are called")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise _fail(
                index,
                field,
                "has no 'function' object",
                'use {"type": "function", "function": {"name": ..., "arguments": "{}"}}',
            )
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise _fail(index, f"{field}.function.name", "must be a non-empty string", "name it")
        if not isinstance(function.get("arguments"), str):
            raise _fail(
                index,
                f"{field}.function.arguments",
                "must be a string (JSON text)",
                "pass json.dumps(arguments)",
            )


# --- incoming messages ----------------------------------------------------------------


def _check_text(value: str, field: str, index: int | None) -> None:
    if "\x00" in value:
        raise _fail(
            index,
            field,
            "contains a NUL character (\\x00)",
            "remove it: NUL can't be stored as text on every backend",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(
            index,
            field,
            "contains a lone surrogate (invalid UTF-16 half)",
            "decode the source text with errors='replace' or fix the encoding",
        ) from None


def _check_json(value: Any, field: str, index: int | None) -> None:
    """Every string anywhere inside a JSON value must be storable."""
    if isinstance(value, str):
        _check_text(value, field, index)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(index, field, f"has a non-string key {key!r}", "use string keys")
            _check_text(key, field, index)
            _check_json(item, f"{field}.{key}", index)
    elif isinstance(value, list | tuple):
        for n, item in enumerate(value):
            _check_json(item, f"{field}[{n}]", index)
    elif value is None or isinstance(value, bool | int | float):
        return
    else:
        raise _fail(index, field, f"holds a {type(value).__name__}", "use only JSON values")


def normalize(message: Any, *, index: int | None = None) -> dict[str, Any]:
    """Check an incoming message and return it as the plain dict that is stored.

    Raises :class:`InvalidMessage` when it breaks the rules of one message, has
    a key that is not a chat field, or holds text that can't be stored exactly.
    """
    role = check_message(message, index=index)
    for key in message:
        if key not in KEYS and message[key] is not None:
            raise _fail(
                index,
                repr(key),
                "is not a chat message field",
                f"use only {sorted(KEYS)} (pass your own data as metadata=...)",
            )
    out: dict[str, Any] = {"role": role}
    content = message.get("content")
    if isinstance(content, str):
        _check_text(content, "content", index)
        out["content"] = content
    elif content is None:
        out["content"] = None
    else:
        _check_json(content, "content", index)
        out["content"] = [dict(part) for part in content]
    name = message.get("name")
    if name is not None:
        out["name"] = name  # NAME_RE admits ASCII only: storable as it is
    calls = message.get("tool_calls")
    if calls is not None:
        _check_json(calls, "tool_calls", index)
        # The API requires "type": "function"; callers often leave it out.
        out["tool_calls"] = [{"type": "function", **_plain(call)} for call in calls]
    if role == "tool":
        call_id = message["tool_call_id"]
        _check_text(call_id, "tool_call_id", index)
        out["tool_call_id"] = call_id
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def check_metadata(metadata: Any) -> str | None:
    """Serialize a message's metadata (a JSON object) or refuse it."""
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidMessage(
            f"metadata must be a dict of JSON values, got {type(metadata).__name__}",
            field="metadata",
        )
    _check_json(metadata, "metadata", None)
    return dumps(_plain(metadata))


# --- a whole request ------------------------------------------------------------------


def _out_of_order(index: int, field: str, problem: str) -> InvalidPayload:
    return InvalidPayload(f"message {index}: {field} {problem}", index=index, field=field)


def validate(messages: Sequence[Message], *, history: int | None = None) -> None:
    """Raise unless the API would accept ``messages`` as they are.

    Each message must keep the rules of one message (:func:`check_message`;
    else :class:`InvalidMessage`), and the list the rules between messages
    (else :class:`InvalidPayload`): an assistant message with ``tool_calls`` is
    followed at once by tool messages answering each of its calls exactly once
    (in any order), and every tool message answers a call of the assistant
    message just before its run.

    With ``history``, ``messages[history:]`` is a conversation's history (what
    follows the system prompt, summaries and pinned messages), and it must not
    start mid-turn: after any system messages it begins with a user message, as
    the strict chat templates of local models require, and so no reply goes
    without the question it answers. The one exception is a history with no
    user message at all: the newest turn alone was larger than the budget, and
    only its newest part is sent (see :func:`~conversation_memory.strategies.keep_newest`).
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise InvalidPayload(
            f"messages must be a list of message dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidPayload("messages is empty; a request needs at least one message")
    caller = -1  # index of the assistant message whose calls are being answered
    pending: set[str] = set()
    answered: set[str] = set()
    for index, message in enumerate(messages):
        # Most messages are a plain dict of a role and text, which keeps every rule
        # below; they are recognized at once (this runs for every message of every
        # request).
        if (
            type(message) is dict
            and not pending
            and len(message) == 2
            and type(message.get("content")) is str
            and message.get("role") in _PLAIN_ROLES
        ):
            caller = -1
            continue
        role = check_message(message, index=index)
        if pending and role != "tool":
            raise _out_of_order(
                index,
                "role",
                f"is {role!r}, but the tool calls {sorted(pending)} of message {caller} "
                "are not answered; their tool messages must come first",
            )
        if role == "tool":
            call_id = message["tool_call_id"]
            if caller < 0:
                raise _out_of_order(
                    index,
                    "tool_call_id",
                    f"{call_id!r}: a tool message must follow the assistant message that "
                    "made the call (or another answer to it)",
                )
            if call_id in answered:
                raise _out_of_order(
                    index, "tool_call_id", f"{call_id!r} answers a call that is already answered"
                )
            if call_id not in pending:
                raise _out_of_order(
                    index,
                    "tool_call_id",
                    f"{call_id!r} answers no call of the assistant message {caller}",
                )
            pending.discard(call_id)
            answered.add(call_id)
            continue
        caller = -1
        calls = message.get("tool_calls")
        if calls is not None:  # check_message made sure they are well-formed
            pending = {call["id"] for call in calls}
            answered = set()
            caller = index
    if pending:
        raise _out_of_order(
            caller,
            "tool_calls",
            f"{sorted(pending)} are not answered by tool messages before the end",
        )
    if history is not None:
        _check_turn_start(messages, history)


def _check_turn_start(messages: Sequence[Message], first: int) -> None:
    """The history from ``first`` on begins with a user message, unless it holds none."""
    while first < len(messages) and messages[first].get("role") in ("system", "developer"):
        first += 1
    if first == len(messages) or messages[first].get("role") == "user":
        return
    if any(message.get("role") == "user" for message in messages[first:]):
        raise _out_of_order(
            first,
            "role",
            f"is {messages[first].get('role')!r}, but the history must start with a user "
            "message: this reply would be sent without the question it answers. Keep whole "
            "turns (a user message with everything that answers it).",
        )


# --- stored rows ----------------------------------------------------------------------


def to_row(message: Mapping[str, Any]) -> dict[str, Any]:
    """The stored columns of a normalized message."""
    content = message.get("content")
    calls = message.get("tool_calls")
    return {
        "role": message["role"],
        "content": content if isinstance(content, str) else None,
        "parts": dumps(content) if isinstance(content, list) else None,
        "name": message.get("name"),
        "tool_calls": dumps(calls) if calls is not None else None,
        "tool_call_id": message.get("tool_call_id"),
    }


def from_row(  # noqa: PLR0917 - one argument per stored column, in column order
    role: str,
    content: str | None,
    parts: str | None,
    name: str | None,
    tool_calls: str | None,
    tool_call_id: str | None,
) -> dict[str, Any]:
    """Rebuild the OpenAI message from its stored columns (keys in a fixed order)."""
    if parts is None and name is None and tool_calls is None and tool_call_id is None:
        return {"role": role, "content": content}  # most rows: read on every turn
    message: dict[str, Any] = {"role": role}
    message["content"] = json.loads(parts) if parts is not None else content
    if name is not None:
        message["name"] = name
    if tool_calls is not None:
        message["tool_calls"] = json.loads(tool_calls)
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    return message
