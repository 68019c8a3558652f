"""The JSONL export format: a header line, then one OpenAI-format message per line.

Header: ``{"convmem": 1, "type": "conversation", "id", "user", "title",
"model", "system", "settings", "created_at", "updated_at"}``, and ``"key"``
after ``"user"`` for a conversation the application keyed (only then, so
exports of others keep their bytes). Each message line
is the OpenAI message plus a ``convmem`` object holding what the API has no
field for: ``created_at`` always; ``pinned``, ``complete`` and ``metadata``
only when set. A fork is written whole, so an export stands alone.

Reading checks every line before anything is written and names the line of
the first problem. Writing after reading gives the same bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conversation_memory.errors import ImportFormatError, InvalidMessage
from conversation_memory.messages import check_metadata, dumps, normalize
from conversation_memory.registry import get_model
from conversation_memory.store.values import ConversationRow, Entry

FORMAT = 1


def write_export(row: ConversationRow, entries: Iterable[Entry]) -> str:
    header = {
        "convmem": FORMAT,
        "type": "conversation",
        "id": row.id,
        "user": row.user_id,
        **({"key": row.key} if row.key is not None else {}),
        "title": row.title,
        "model": row.model,
        "system": row.system,
        "settings": row.settings,
        "created_at": row.created_at.isoformat(),
        "updated_at": row.updated_at.isoformat(),
    }
    lines = [dumps(header)]
    for entry in entries:
        extra: dict[str, Any] = {"created_at": entry.created_at.isoformat()}
        if entry.pinned:
            extra["pinned"] = True
        if not entry.complete:
            extra["complete"] = False
        if entry.metadata is not None:
            extra["metadata"] = entry.metadata
        lines.append(dumps({**entry.message, "convmem": extra}))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Line:
    message: dict[str, Any]
    created_at: datetime
    metadata: str | None
    """Already serialized for the store."""
    pinned: bool
    complete: bool


@dataclass(frozen=True, slots=True)
class Parsed:
    header: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    lines: list[Line]


def _text(data: str | bytes | io.IOBase) -> str:
    if isinstance(data, io.IOBase):
        data = data.read()
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")  # Windows editors start files with a BOM
        except UnicodeDecodeError as exc:
            raise ImportFormatError(f"the file is not UTF-8 text ({exc})") from None
    if not isinstance(data, str):
        raise ImportFormatError(
            f"import takes JSONL text, bytes or an open file, got {type(data).__name__}"
        )
    return data.removeprefix("\ufeff")


def _object(line: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ImportFormatError(
            f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})", line=number
        ) from None
    if not isinstance(value, dict):
        raise ImportFormatError(f"line {number}: expected a JSON object", line=number)
    return value


def _time(value: Any, what: str, number: int) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise ImportFormatError(
            f"line {number}: {what} must be an ISO 8601 timestamp, got {value!r}", line=number
        ) from None


def _header(lines: list[str]) -> dict[str, Any]:
    if not lines or not lines[0].strip():
        raise ImportFormatError("line 1: the file is empty; expected a header line", line=1)
    header = _object(lines[0], 1)
    if header.get("convmem") != FORMAT or header.get("type") != "conversation":
        raise ImportFormatError(
            'line 1: not a conversation_memory export header (expected {"convmem": 1, '
            '"type": "conversation", ...})',
            line=1,
        )
    if not isinstance(header.get("id"), str) or not header["id"]:
        raise ImportFormatError("line 1: the header has no conversation id", line=1)
    for name in ("user", "model"):
        value = header.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ImportFormatError(
                f"line 1: the header's {name} must be a non-empty string, got {value!r}", line=1
            )
    if header.get("model") is not None:
        get_model(header["model"])  # an unknown model is refused before anything is opened
    return header


class _ToolOrder:
    """Tool results must answer a call of the assistant message just before them."""

    def __init__(self) -> None:
        self.open: set[str] = set()

    def check(self, message: dict[str, Any], number: int) -> None:
        if message["role"] == "tool":
            if message["tool_call_id"] not in self.open:
                raise ImportFormatError(
                    f"line {number}: tool message answers {message['tool_call_id']!r}, "
                    "which no preceding assistant message left open",
                    line=number,
                )
            self.open.discard(message["tool_call_id"])
        elif message["role"] == "assistant" and message.get("tool_calls"):
            self.open = {call["id"] for call in message["tool_calls"]}
        else:
            self.open = set()


def read_export(data: str | bytes | io.IOBase) -> Parsed:
    lines = _text(data).splitlines()
    header = _header(lines)
    created_at = _time(header.get("created_at"), "created_at", 1)
    updated_at = _time(header.get("updated_at"), "updated_at", 1)
    order = _ToolOrder()
    parsed: list[Line] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            raise ImportFormatError(f"line {number}: empty line", line=number)
        record = _object(line, number)
        extra = record.pop("convmem", {})
        if not isinstance(extra, dict):
            raise ImportFormatError(f"line {number}: 'convmem' must be an object", line=number)
        try:
            message = normalize(record, index=len(parsed))
            metadata = check_metadata(extra.get("metadata"))
        except InvalidMessage as exc:
            raise ImportFormatError(f"line {number}: {exc}", line=number) from None
        order.check(message, number)
        parsed.append(
            Line(
                message=message,
                created_at=_time(extra.get("created_at"), "convmem.created_at", number),
                metadata=metadata,
                pinned=bool(extra.get("pinned", False)),
                complete=bool(extra.get("complete", True)),
            )
        )
    return Parsed(header=header, created_at=created_at, updated_at=updated_at, lines=parsed)
