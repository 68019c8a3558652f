"""Reading transcripts for the lab: OpenAI-format JSONL, ShareGPT JSON, our own export.

Formats, told apart by their content (not their file name):

- **Our export** (``Conversation.export()``, ``convmem export``): a header line
  ``{"convmem": 1, "type": "conversation", ...}`` then one message per line.
- **Messages JSONL**: one OpenAI-format message per line, one conversation per file.
- **Conversations JSONL** (OpenAI's fine-tuning format and the like): one
  conversation per line, ``{"messages": [...], "tools": [...]}``.
- **ShareGPT** JSON: a list of (or one) ``{"conversations": [{"from": ..., "value":
  ...}], "system": ...}``, also accepted one per line as JSONL. ``from`` is
  ``human``/``user``, ``gpt``/``assistant`` (and other assistant names),
  ``system``, ``function_call`` (the value is the call's JSON, or a list of
  them) or ``observation``/``tool`` (a tool result for the open call).
- **Sessions JSONL**: one conversation per line, held over several sessions:
  ``{"sessions": [{"date": "2024-05-14", "messages": [...]}, ...]}``. The
  sessions' messages make one list, each session's first message opening with
  its :func:`~conversation_memory.lab.transcript.session_header`; ``date`` (ISO
  ``YYYY-MM-DD``) is optional.

Any conversation may carry ``"speakers": {"user": "Maya", "assistant": "Sam"}``
(the ``name`` of each message of that role that has none) and ``"probes":
[{"question", "expect", "regex", "answer", "after", "evidence"}]`` (in our
export, in the header). ``evidence`` lists the indexes of the messages that hold
the answer, counted like ``after``: from 0, the system prompt not counted, across
sessions; each must be said before the probe is asked. Every message is checked
with :func:`conversation_memory.validate` (the API's own rules: roles, content,
tool calls answered in order) and only the keys the API defines are kept
(``weight`` and null fields are dropped). A problem raises
:class:`~conversation_memory.errors.ImportFormatError` naming the file and line.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import json.decoder
import json.scanner
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from conversation_memory import validate
from conversation_memory.errors import ImportFormatError, InvalidMessage, InvalidPayload
from conversation_memory.lab.transcript import Probe, Session, Transcript, session_header

__all__ = ["parse_transcripts", "read_transcripts"]

_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
_DROPPED = frozenset({"weight", "refusal", "annotations", "audio", "function_call", "convmem"})
"""Keys other tools write next to a message that carry nothing the replay needs."""
_USER = frozenset({"human", "user"})
_ASSISTANT = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model", "bot"})
_TOOL = frozenset({"observation", "tool", "function_response"})
_SHAPES = ("messages", "conversations", "sessions")
"""The keys that make a JSON object one conversation."""


def read_transcripts(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> list[Transcript]:
    """Every conversation in the given files, in order."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    found: list[Transcript] = []
    for path in paths:
        file = Path(path)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ImportFormatError(f"{file}: cannot read it ({exc.strerror or exc})") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ImportFormatError(f"{file}: not UTF-8 text ({exc})") from None
        found.extend(parse_transcripts(text, name=file.name))
    return found


def parse_transcripts(text: str, *, name: str = "<text>") -> list[Transcript]:
    """The conversations in one file's text; ``name`` names it in errors and results."""
    stripped = text.lstrip()
    if not stripped:
        raise ImportFormatError(f"{name}: the file is empty", line=1)
    lines = text.splitlines()
    first = next(n for n, line in enumerate(lines, start=1) if line.strip())
    if stripped.startswith("{"):
        try:
            value = json.loads(lines[first - 1])
        except json.JSONDecodeError:
            value = None  # not one object per line: a pretty-printed JSON document
        if isinstance(value, dict):
            return _jsonl(lines, name)
    return _document(text, name)


# --- where things are --------------------------------------------------------------


class _Where:
    """Names positions in one file: ``name:line``."""

    def __init__(self, name: str, text: str | None = None) -> None:
        self.name = name
        self._text = text
        self._breaks: list[int] | None = None
        self.starts: dict[int, int] = {}
        """``id()`` of each parsed JSON object -> offset where it starts (documents)."""

    def line_of(self, value: Any, default: int) -> int:
        offset = self.starts.get(id(value))
        if offset is None or self._text is None:
            return default
        if self._breaks is None:
            self._breaks = [n for n, ch in enumerate(self._text) if ch == "\n"]
        return bisect.bisect_left(self._breaks, offset) + 1

    def error(self, line: int, problem: str) -> ImportFormatError:
        return ImportFormatError(f"{self.name}, line {line}: {problem}", line=line, file=self.name)


class _PositionDecoder(json.JSONDecoder):
    """A JSON decoder that notes where every object starts (the pure-Python scanner)."""

    def __init__(self, starts: dict[int, int]) -> None:
        super().__init__()
        parse = json.decoder.JSONObject  # type: ignore[attr-defined]  # not in typeshed

        def parse_object(s_and_end: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
            value, end = parse(s_and_end, *args, **kwargs)
            starts[id(value)] = s_and_end[1] - 1
            return value, end

        self.parse_object = parse_object
        self.scan_once = json.scanner.py_make_scanner(self)  # type: ignore[attr-defined]


# --- the two shapes of file ----------------------------------------------------------


def _jsonl(lines: list[str], name: str) -> list[Transcript]:
    where = _Where(name)
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise where.error(number, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(value, dict):
            raise where.error(number, f"expected a JSON object, got {_kind(value)}")
        records.append((number, value))
    number, head = records[0]
    if any(key in head for key in _SHAPES):
        out = []
        for number, record in records:
            if not any(key in record for key in _SHAPES):
                raise where.error(
                    number,
                    'expected a conversation ({"messages": [...]}, {"conversations": '
                    '[...]} or {"sessions": [...]}) like the first line',
                )
            out.append(_record(record, where, number, f"{name}:{number}"))
        return out
    probes: Any = None
    system: str | None = None
    start = 0
    title = name
    if "convmem" in head:
        if head.get("convmem") != 1 or head.get("type") != "conversation":
            raise where.error(
                number,
                'not a conversation_memory export header ({"convmem": 1, '
                '"type": "conversation", ...})',
            )
        probes = head.get("probes")
        system = _optional_text(head.get("system"), where, number, "system")
        title = head.get("title") or name
        start = 1
    messages: list[dict[str, Any]] = []
    numbers: list[int] = []
    for number, record in records[start:]:
        if any(key in record for key in _SHAPES) or "type" in record:
            raise where.error(number, "expected one message per line, like the lines before")
        messages.append(_message(record, where, number))
        numbers.append(number)
    return [
        _transcript(
            messages,
            numbers,
            where,
            name=str(title),
            source=name,
            system=system,
            probes=probes,
            probes_line=records[0][0],
            tools=None,
        )
    ]


def _document(text: str, name: str) -> list[Transcript]:
    where = _Where(name, text)
    try:
        value = _PositionDecoder(where.starts).decode(text)
    except json.JSONDecodeError as exc:
        raise where.error(exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    items = value if isinstance(value, list) else [value]
    out = []
    for index, record in enumerate(items):
        line = where.line_of(record, 1)
        if not isinstance(record, dict) or not any(key in record for key in _SHAPES):
            raise where.error(
                line,
                f'conversation {index}: expected an object with "conversations" (ShareGPT), '
                f'"messages" (OpenAI) or "sessions", got {_kind(record)}',
            )
        out.append(_record(record, where, line, f"{name}#{index}"))
    return out


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(list(value)[:4])
        return f"an object with keys {keys}" if keys else "an empty object"
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


# --- one conversation ------------------------------------------------------------------


def _record(record: dict[str, Any], where: _Where, line: int, source: str) -> Transcript:
    """One conversation object: OpenAI's ``messages`` or ShareGPT's ``conversations``."""
    name = record.get("id") or record.get("name") or record.get("title") or source
    system = _optional_text(record.get("system"), where, line, "system")
    tools = record.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise where.error(line, '"tools" must be a list of tool definitions')
    messages: list[dict[str, Any]] = []
    numbers: list[int] = []
    sessions: list[tuple[int, dt.date | None]] = []
    if "sessions" in record:
        messages, numbers, sessions = _sessions(record["sessions"], where, line)
    elif "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list):
            raise where.error(line, f'"messages" must be a list, got {_kind(raw)}')
        for index, message in enumerate(raw):
            at = where.line_of(message, line)
            messages.append(_message(message, where, at, index=index))
            numbers.append(at)
    else:
        messages, numbers = _sharegpt(record["conversations"], where, line)
    _name_speakers(messages, record.get("speakers"), where, line)
    return _transcript(
        messages,
        numbers,
        where,
        name=str(name),
        source=source,
        system=system,
        probes=record.get("probes"),
        probes_line=where.line_of(record.get("probes"), line),
        tools=tools,
        sessions=sessions,
    )


def _sessions(
    value: Any, where: _Where, line: int
) -> tuple[list[dict[str, Any]], list[int], list[tuple[int, dt.date | None]]]:
    """The messages of every session in one list, and where each session starts."""
    if not isinstance(value, list) or not value:
        raise where.error(line, f'"sessions" must be a non-empty list, got {_kind(value)}')
    messages: list[dict[str, Any]] = []
    numbers: list[int] = []
    starts: list[tuple[int, dt.date | None]] = []
    for number, session in enumerate(value, start=1):
        at = where.line_of(session, line)
        if not isinstance(session, dict) or not isinstance(session.get("messages"), list):
            raise where.error(
                at,
                f'session {number}: expected {{"date", "messages": [...]}}, got {_kind(session)}',
            )
        date = session.get("date")
        if date is not None:
            try:
                date = dt.date.fromisoformat(date) if isinstance(date, str) else None
            except ValueError:
                date = None
            if date is None:
                raise where.error(
                    at,
                    f'session {number}: "date" must be an ISO date such as "2024-05-14", got '
                    f"{session.get('date')!r}",
                )
        if not session["messages"]:
            raise where.error(at, f"session {number} has no messages")
        starts.append((len(messages), date))
        for message in session["messages"]:
            message_at = where.line_of(message, at)
            messages.append(_message(message, where, message_at, index=len(messages)))
            numbers.append(message_at)
    return messages, numbers, starts


def _name_speakers(messages: list[dict[str, Any]], speakers: Any, where: _Where, line: int) -> None:
    """Give each message of a role in ``speakers`` that speaker's name, unless it has one."""
    if speakers is None:
        return
    if not isinstance(speakers, dict) or not all(
        isinstance(role, str) and isinstance(name, str) for role, name in speakers.items()
    ):
        raise where.error(
            line, '"speakers" must map roles to names, e.g. {"user": "Maya", "assistant": "Sam"}'
        )
    for message in messages:
        name = speakers.get(message.get("role"))
        if name and "name" not in message and message.get("role") != "tool":
            message["name"] = name


def _optional_text(value: Any, where: _Where, line: int, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise where.error(line, f'"{key}" must be a string, got {_kind(value)}')


def _message(value: Any, where: _Where, line: int, *, index: int | None = None) -> dict[str, Any]:
    at = f"message {index}: " if index is not None else ""
    if not isinstance(value, dict):
        raise where.error(line, f"{at}expected a message object, got {_kind(value)}")
    message: dict[str, Any] = {}
    for key, item in value.items():
        if key in _KEYS:
            if item is not None or key == "content":
                message[key] = item
        elif key not in _DROPPED and item is not None:
            raise where.error(
                line,
                f"{at}unknown key {key!r} in a message; an OpenAI chat message has "
                f"{', '.join(_KEYS)}",
            )
    if "role" not in message:
        raise where.error(line, f'{at}the message has no "role"')
    return message


def _sharegpt(turns: Any, where: _Where, line: int) -> tuple[list[dict[str, Any]], list[int]]:
    if not isinstance(turns, list):
        raise where.error(line, f'"conversations" must be a list, got {_kind(turns)}')
    messages: list[dict[str, Any]] = []
    numbers: list[int] = []
    open_calls: list[str] = []
    for index, turn in enumerate(turns):
        at = where.line_of(turn, line)
        if not isinstance(turn, dict):
            raise where.error(at, f'turn {index}: expected {{"from", "value"}}, got {_kind(turn)}')
        sender, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            raise where.error(at, f'turn {index}: "value" must be a string, got {_kind(value)}')
        who = sender.lower() if isinstance(sender, str) else sender
        if who in _USER:
            message: dict[str, Any] = {"role": "user", "content": value}
        elif who in _ASSISTANT:
            message = {"role": "assistant", "content": value}
        elif who == "system":
            message = {"role": "system", "content": value}
        elif who == "function_call":
            message = _call_message(value, where, at, index, call_base=len(messages))
            open_calls = [call["id"] for call in message["tool_calls"]]
        elif who in _TOOL:
            if not open_calls:
                raise where.error(
                    at, f"turn {index}: a tool result ({sender!r}) with no function_call before it"
                )
            message = {"role": "tool", "tool_call_id": open_calls.pop(0), "content": value}
        else:
            raise where.error(
                at,
                f'turn {index}: "from" is {sender!r}; expected human, gpt, system, '
                "function_call or observation",
            )
        if who not in _TOOL and who != "function_call":
            open_calls = []
        messages.append(message)
        numbers.append(at)
    return messages, numbers


def _call_message(
    value: str, where: _Where, line: int, index: int, *, call_base: int
) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise where.error(
            line, f"turn {index}: a function_call's value must be JSON ({exc.msg})"
        ) from None
    calls = parsed if isinstance(parsed, list) else [parsed]
    tool_calls = []
    for n, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise where.error(line, f'turn {index}: a function_call needs {{"name", "arguments"}}')
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        tool_calls.append(
            {
                "id": f"call_{call_base}_{n}",
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            }
        )
    return {"role": "assistant", "content": None, "tool_calls": tool_calls}


def _transcript(
    messages: list[dict[str, Any]],
    numbers: list[int],
    where: _Where,
    *,
    name: str,
    source: str,
    system: str | None,
    probes: Any,
    probes_line: int,
    tools: Sequence[Mapping[str, Any]] | None,
    sessions: Sequence[tuple[int, dt.date | None]] = (),
) -> Transcript:
    if messages and messages[0].get("role") == "system" and system is None:
        content = messages[0].get("content")
        if isinstance(content, str):
            system = content
            messages, numbers = messages[1:], numbers[1:]
            sessions = [(max(start - 1, 0), date) for start, date in sessions]
    found = tuple(
        Session(start=start, date=date, number=number)
        for number, (start, date) in enumerate(sessions, start=1)
        if start < len(messages)
    )
    for session in found:
        messages[session.start] = _with_header(messages[session.start], session)
    if messages:
        full = ([{"role": "system", "content": system}] if system else []) + messages
        try:
            validate(full)
        except (InvalidMessage, InvalidPayload) as exc:
            index = getattr(exc, "index", None)
            offset = 1 if system else 0
            position = (index - offset) if isinstance(index, int) else 0
            line = numbers[min(max(position, 0), len(numbers) - 1)]
            detail = exc.message
            if isinstance(index, int) and detail.startswith(f"message {index}:"):
                detail = f"message {position}:" + detail[len(f"message {index}:") :]
            raise where.error(line, detail) from None
    return Transcript(
        name=name,
        messages=tuple(messages),
        system=system,
        probes=_probes(probes, len(messages), where, probes_line),
        tools=tuple(tools) if tools else None,
        source=source,
        sessions=found,
    )


def _with_header(message: dict[str, Any], session: Session) -> dict[str, Any]:
    """``message`` opening with its session's header line (text content only)."""
    header = session_header(session.number, session.date)
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": f"{header}\n{content}"}
    if isinstance(content, list):
        return {**message, "content": [{"type": "text", "text": header}, *content]}
    return message


def _probes(value: Any, count: int, where: _Where, line: int) -> tuple[Probe, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise where.error(line, f'"probes" must be a list, got {_kind(value)}')
    probes = []
    for index, item in enumerate(value):
        at = where.line_of(item, line)
        bad = f"probe {index}:"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise where.error(at, f'{bad} needs a "question" string')
        after = item.get("after", count)
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after <= count:
            raise where.error(
                at, f'{bad} "after" must be a message count from 0 to {count}, got {after!r}'
            )
        expect = item.get("expect", ())
        if isinstance(expect, str):
            expect = (expect,)
        if not isinstance(expect, list | tuple) or not all(isinstance(e, str) for e in expect):
            raise where.error(at, f'{bad} "expect" must be a string or a list of strings')
        regex = item.get("regex")
        answer = item.get("answer")
        if regex is not None and not isinstance(regex, str):
            raise where.error(at, f'{bad} "regex" must be a string')
        if answer is not None and not isinstance(answer, str):
            raise where.error(at, f'{bad} "answer" must be a string')
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise where.error(at, f'{bad} "regex" does not compile ({exc})') from None
        if not expect and regex is None:
            if not answer:
                raise where.error(at, f'{bad} needs "expect", "regex" or "answer"')
            expect = (answer,)
        evidence = item.get("evidence", ())
        if not isinstance(evidence, list | tuple) or not all(
            isinstance(e, int) and not isinstance(e, bool) for e in evidence
        ):
            raise where.error(at, f'{bad} "evidence" must be a list of message indexes')
        for said in evidence:
            if not 0 <= said < count:
                raise where.error(
                    at,
                    f'{bad} "evidence" names message {said}, but the conversation has '
                    f"{count} messages (0 to {count - 1}, the system prompt not counted)",
                )
            if said >= after:
                raise where.error(
                    at,
                    f'{bad} "evidence" names message {said}, which is said after the probe '
                    f"is asked (after {after} messages)",
                )
        meta = item.get("meta") or {}
        probes.append(
            Probe(
                after=after,
                question=item["question"],
                expect=tuple(expect),
                regex=regex,
                answer=answer,
                meta=dict(meta) if isinstance(meta, dict) else {},
                evidence=tuple(sorted(set(evidence))),
            )
        )
    return tuple(probes)
