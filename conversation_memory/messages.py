"""Checking one incoming OpenAI chat message and turning it into a stored row.

A message is accepted only if the API would accept it in some conversation:
known role, content of the right type for that role, well-formed tool calls,
and text that every backend stores byte for byte. That last rule is one
decision for SQLite and PostgreSQL alike: NUL characters and lone surrogates
are refused (PostgreSQL can't store NUL in text, and neither can be encoded
as UTF-8), so whatever is accepted round-trips exactly.

Keys the API defines but that carry nothing (``"refusal": None`` as the SDK's
``model_dump()`` produces) are ignored; any other key is refused, so a typo
doesn't silently vanish.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from conversation_memory.errors import InvalidMessage

ROLES = ("system", "developer", "user", "assistant", "tool")
KEYS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
PART_TYPES = {
    "text": "text",
    "image_url": "image_url",
    "input_audio": "input_audio",
    "file": "file",
    "refusal": "refusal",
}
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def dumps(value: Any) -> str:
    """The one JSON encoding used for stored values (compact, order kept, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _fail(index: int | None, field: str, problem: str, fix: str) -> InvalidMessage:
    where = f"message {index}" if index is not None else "message"
    return InvalidMessage(f"{where}: {field} {problem}; {fix}", field=field, index=index)


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


def _check_parts(parts: list[Any], role: str, index: int | None) -> None:
    if not parts:
        raise _fail(index, "content", "is an empty list", "send a string or at least one part")
    allowed = {"text"} if role in ("system", "developer", "tool") else set(PART_TYPES)
    if role == "assistant":
        allowed = {"text", "refusal"}
    for n, part in enumerate(parts):
        field = f"content[{n}]"
        if not isinstance(part, Mapping):
            raise _fail(index, field, f"is a {type(part).__name__}", 'use {"type": "text", ...}')
        kind = part.get("type")
        if kind not in allowed:
            raise _fail(
                index,
                f"{field}.type",
                f"is {kind!r}, not allowed in a {role} message",
                f"use one of {sorted(allowed)}",
            )
        payload = part.get(PART_TYPES[kind])
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
        _check_json(part, field, index)


def _check_tool_calls(calls: Any, index: int | None) -> None:
    if not isinstance(calls, list | tuple) or not calls:
        raise _fail(index, "tool_calls", "must be a non-empty list", "omit it if there are none")
    seen: set[str] = set()
    for n, call in enumerate(calls):
        field = f"tool_calls[{n}]"
        if not isinstance(call, Mapping):
            raise _fail(index, field, f"is a {type(call).__name__}", "use the API's call objects")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise _fail(index, f"{field}.id", "must be a non-empty string", "copy the call's id")
        if call_id in seen:
            raise _fail(index, f"{field}.id", f"repeats {call_id!r}", "give every call its own id")
        seen.add(call_id)
        if call.get("type", "function") != "function":
            raise _fail(index, f"{field}.type", "must be 'function'", "only functions are called")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise _fail(
                index, f"{field}.function", "is missing", 'use {"name": ..., "arguments": "{}"}'
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
        _check_json(call, field, index)


def normalize(message: Any, *, index: int | None = None) -> dict[str, Any]:
    """Check one message and return it as a plain dict with the empty keys dropped."""
    if not isinstance(message, Mapping):
        raise InvalidMessage(
            f"a message must be a dict like {{'role': 'user', 'content': 'hi'}}, "
            f"got {type(message).__name__}",
            index=index,
        )
    for key in message:
        if key not in KEYS and message[key] is not None:
            raise _fail(
                index,
                repr(key),
                "is not a chat message field",
                f"use only {sorted(KEYS)} (pass your own data as metadata=...)",
            )
    role = message.get("role")
    if role not in ROLES:
        raise _fail(index, "role", f"is {role!r}", f"use one of {', '.join(ROLES)}")
    out: dict[str, Any] = {"role": role}
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if content is None:
        if not (role == "assistant" and tool_calls):
            raise _fail(
                index,
                "content",
                "is missing",
                "give text (only an assistant message with tool_calls may omit it)",
            )
        out["content"] = None
    elif isinstance(content, str):
        _check_text(content, "content", index)
        out["content"] = content
    elif isinstance(content, list | tuple):
        _check_parts(list(content), role, index)
        out["content"] = [dict(part) for part in content]
    else:
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
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _fail(
                index,
                "name",
                f"is {name!r}",
                "use 1-64 letters, digits, '_' or '-' (the API's rule)",
            )
        out["name"] = name
    if tool_calls is not None:
        if role != "assistant":
            raise _fail(index, "tool_calls", f"is not allowed on a {role} message", "drop it")
        _check_tool_calls(tool_calls, index)
        # The API requires "type": "function"; callers often leave it out.
        out["tool_calls"] = [{"type": "function", **_plain(call)} for call in tool_calls]
    call_id = message.get("tool_call_id")
    if role == "tool":
        if not isinstance(call_id, str) or not call_id:
            raise _fail(
                index,
                "tool_call_id",
                "is missing",
                "a tool message must name the call it answers",
            )
        _check_text(call_id, "tool_call_id", index)
        out["tool_call_id"] = call_id
    elif call_id is not None:
        raise _fail(index, "tool_call_id", f"is not allowed on a {role} message", "drop it")
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
