"""Token counting for OpenAI chat requests, exact where OpenAI publishes the rule.

The model
---------
A chat request costs the sum of its messages, plus :data:`REPLY_PRIMING`
(3 tokens that start the assistant's reply, once per request), plus the tool
definitions. One message costs, per OpenAI's cookbook "How to count tokens
with tiktoken":

- 3 tokens of framing, plus the tokens of every string value (``role``,
  ``content``, ``name``, ``tool_call_id``, ...), plus 1 more when it has a
  ``name``. Special-token text such as ``<|endoftext|>`` in a message is
  ordinary text to the API, so it is encoded as ordinary text here.
- ``content`` given as a list of parts: the text of text parts, and for each
  image the published tile rule: ``detail: low`` costs ``base`` (85); ``high``
  and ``auto`` are fitted into 2048x2048, scaled so the shortest side is at
  most 768, and cost ``base + tile * (512px tiles)`` (85 + 170 * tiles). We
  never fetch URLs: the size is read from the header of a ``data:`` URL
  (PNG, GIF, WebP, JPEG) and otherwise assumed to be 1024x1024 (765 tokens),
  the size the API documentation uses as its example (``unknown_image_size=``
  changes it). ``auto`` is counted as ``high``, which never undercounts.
- An assistant's ``tool_calls``: each call's function name and arguments, plus
  :data:`TOOL_CALL_OVERHEAD` tokens of framing (an estimate, like the
  per-message framing; call ids and ``type`` are not shown to the model).
- Any other shape (new part types, audio, unknown keys) is not an error here
  (validation lives elsewhere): every string found in it is counted, which
  overcounts rather than undercounts.

Tool definitions follow the cookbook's ``num_tokens_for_tools``
approximation: per-function and per-property constants that differ between
the gpt-3.5/gpt-4 and gpt-4o families (see :mod:`conversation_memory.registry`).
Nested schemas, which that formula ignores, are charged for their strings.

The encodings are tiktoken's own; :mod:`conversation_memory._tiktoken_data`
makes them load without network (:func:`get_encoding`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import tiktoken

from conversation_memory._tiktoken_data import get_encoding
from conversation_memory.errors import ConfigurationError
from conversation_memory.registry import (
    CL100K_TOOLS,
    O200K_TOOLS,
    ImageCost,
    ModelInfo,
    ModelRegistry,
    ToolConstants,
    default_registry,
)

__all__ = [
    "REPLY_PRIMING",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "TOOL_CALL_OVERHEAD",
    "FixedCounter",
    "TiktokenCounter",
    "TokenCounter",
    "count_tokens",
    "counter_for",
    "image_tokens",
]

TOKENS_PER_MESSAGE = 3
"""Framing of every message (``<|start|>{role}<|message|>...<|end|>``)."""
TOKENS_PER_NAME = 1
"""Extra framing when a message has a ``name``."""
REPLY_PRIMING = 3
"""Tokens that prime the reply (``<|start|>assistant<|message|>``), once per request."""
TOOL_CALL_OVERHEAD = 3
"""Estimated framing per tool call in an assistant message (not published)."""


@runtime_checkable
class TokenCounter(Protocol):
    """Counts what a request will cost in prompt tokens."""

    name: str
    """Identifies the counting rule (``tiktoken:o200k_base``); stored with each count."""

    def count_message(self, message: Mapping[str, Any]) -> int:
        """Tokens of one message, its framing included."""
        ...

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        """Tokens of the tool definitions of a request (0 for none)."""
        ...

    def count_text(self, text: str) -> int:
        """Tokens of a bare string, no framing."""
        ...


# ---------------------------------------------------------------------------
# Walking messages: shared by every counter, parameterized by how text counts.


def _strings(value: object, count: Callable[[str], int]) -> int:
    """Tokens of every string inside an arbitrary JSON-like value."""
    if isinstance(value, str):
        return count(value)
    if isinstance(value, Mapping):
        return sum(_strings(item, count) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_strings(item, count) for item in value)
    return 0


class _MessageCounter:
    """The message and tool-definition rules; subclasses say what text and images cost."""

    name: str
    _count: Callable[[str], int]
    _tool_constants: ToolConstants

    def count_text(self, text: str) -> int:
        return self._count(text)

    def _image(self, image_url: object) -> int:
        raise NotImplementedError

    def count_message(self, message: Mapping[str, Any]) -> int:
        count = self._count
        total = TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):  # the common case first: role, content, name, ids
                total += count(value)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif value is None:
                continue
            elif key == "content" and isinstance(value, list | tuple):
                total += self._count_parts(value)
            elif key == "tool_calls" and isinstance(value, list | tuple):
                total += self._count_tool_calls(value)
            else:
                total += _strings(value, count)
        return total

    def _count_parts(self, parts: Sequence[Any]) -> int:
        count = self._count
        total = 0
        for part in parts:
            if not isinstance(part, Mapping):
                total += _strings(part, count)
                continue
            kind = part.get("type")
            if kind == "text":
                total += _strings(part.get("text"), count)
            elif kind == "image_url":
                total += self._image(part.get("image_url"))
            else:
                # refusal, audio, files, future kinds: every string but the tag itself
                total += sum(_strings(v, count) for k, v in part.items() if k != "type")
        return total

    def _count_tool_calls(self, calls: Sequence[Any]) -> int:
        count = self._count
        total = 0
        for call in calls:
            total += TOOL_CALL_OVERHEAD
            if isinstance(call, Mapping):
                # id and type are routing data the model doesn't read; the rest
                # (function name and arguments, or a custom tool's input) it does.
                total += sum(_strings(v, count) for k, v in call.items() if k not in {"id", "type"})
            else:
                total += _strings(call, count)
        return total

    def count_tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        if not tools:
            return 0
        count = self._count
        c = self._tool_constants
        total = c.func_end
        for tool in tools:
            total += c.func_init
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(function, Mapping):
                total += _strings(tool, count)
                continue
            name = function.get("name")
            description = function.get("description")
            name = name if isinstance(name, str) else ""
            description = description if isinstance(description, str) else ""
            total += count(f"{name}:{description.removesuffix('.')}")
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
            if not isinstance(properties, Mapping) or not properties:
                continue
            total += c.prop_init
            for key, raw in properties.items():
                total += c.prop_key
                schema: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
                enum = schema.get("enum")
                if isinstance(enum, list | tuple):
                    total += c.enum_init
                    for item in enum:
                        total += c.enum_item + count(str(item))
                kind = schema.get("type", "")
                if isinstance(kind, list | tuple):
                    kind = " | ".join(map(str, kind))
                text = schema.get("description")
                text = text.removesuffix(".") if isinstance(text, str) else ""
                total += count(f"{key}:{kind}:{text}")
                # Nested objects, arrays, defaults: beyond the cookbook formula, so
                # charge their strings rather than let them be free.
                total += sum(
                    _strings(v, count)
                    for k, v in schema.items()
                    if k not in {"type", "description", "enum"}
                )
        return total


# ---------------------------------------------------------------------------
# Images


def image_tokens(
    width: float | None,
    height: float | None,
    *,
    detail: str = "auto",
    cost: ImageCost = ImageCost(),  # noqa: B008  (frozen, shared on purpose)
) -> int:
    """Tokens of one image under the published tile rule (see the module docstring)."""
    if detail == "low":
        return cost.base
    if not width or not height or width <= 0 or height <= 0:
        width, height = _UNKNOWN_IMAGE_SIZE
    if max(width, height) > 2048:
        scale = 2048 / max(width, height)
        width, height = width * scale, height * scale
    if min(width, height) > 768:
        scale = 768 / min(width, height)
        width, height = width * scale, height * scale
    tiles = math.ceil(width / 512) * math.ceil(height / 512)
    return cost.base + cost.tile * tiles


_UNKNOWN_IMAGE_SIZE = (1024, 1024)
# Enough of a base64 payload to hold the size of any PNG/GIF/WebP and most JPEGs.
_IMAGE_HEADER_CHARS = 64 * 1024


def _image_size(url: str) -> tuple[int, int] | None:
    """Width and height from a ``data:`` URL's image header; None when unknown."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url[: _IMAGE_HEADER_CHARS + 256].partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    payload = payload[: len(payload) // 4 * 4]
    try:
        data = base64.b64decode(payload)
    except (binascii.Error, ValueError):
        return None
    return _header_size(data)


def _header_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            return (
                int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF,
            )
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return (
                int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1,
            )
        return None
    if data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


# JPEG start-of-frame markers (C4, C8 and CC are other segments with the same prefix).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


# ---------------------------------------------------------------------------
# Counters


class TiktokenCounter(_MessageCounter):
    """Exact counts for OpenAI models from tiktoken and the published chat format."""

    def __init__(
        self,
        encoding: str = "o200k_base",
        *,
        tool_constants: ToolConstants | None = None,
        image_cost: ImageCost | None = None,
        unknown_image_size: tuple[int, int] = _UNKNOWN_IMAGE_SIZE,
    ) -> None:
        self.encoding = get_encoding(encoding)
        # Bound once: count_message runs on every append, so no lookups per string.
        self._count = _ordinary_counter(self.encoding)
        self._tool_constants = tool_constants or (
            O200K_TOOLS if encoding.startswith("o200k") else CL100K_TOOLS
        )
        self.image_cost = image_cost or ImageCost()
        self.unknown_image_size = unknown_image_size
        self.name = f"tiktoken:{encoding}"
        if self.image_cost != ImageCost():
            # Image counts differ, so counts stored under this name must not mix.
            self.name += f";image={self.image_cost.base}/{self.image_cost.tile}"

    def _image(self, image_url: object) -> int:
        url: object = image_url
        if isinstance(image_url, Mapping):
            url = image_url.get("url")
            if image_url.get("detail") == "low":
                return self.image_cost.base
        size = _image_size(url) if isinstance(url, str) else None
        width, height = size or self.unknown_image_size
        return image_tokens(width, height, detail="high", cost=self.image_cost)

    def __repr__(self) -> str:
        return f"TiktokenCounter({self.name!r})"


_SHORT = 24
"""Strings up to this length (roles, names, ids) are memoized: they repeat on every message."""
_SHORT_CACHE_SIZE = 4096


def _ordinary_counter(encoding: tiktoken.Encoding) -> Callable[[str], int]:
    encode = encoding.encode_ordinary
    short: dict[str, int] = {}

    def count(text: str) -> int:
        if len(text) > _SHORT:
            return len(encode(text))
        n = short.get(text)
        if n is None:
            if len(short) >= _SHORT_CACHE_SIZE:
                short.clear()  # crude bound; the hot entries come straight back
            n = short[text] = len(encode(text))
        return n

    return count


class FixedCounter(_MessageCounter):
    """A deterministic, tokenizer-free counter: a test double, or a rough estimate.

    A string costs ``ceil(len / chars_per_token)`` tokens; messages, names,
    tools and images follow the same rules as :class:`TiktokenCounter`, with
    fixed costs for images (``image_tokens``) and tools (``per_tool``).
    """

    def __init__(
        self,
        *,
        chars_per_token: int = 4,
        image_tokens: int = 85,
        per_tool: int = 10,
    ) -> None:
        for argument, value, low in (
            ("chars_per_token", chars_per_token, 1),
            ("image_tokens", image_tokens, 0),
            ("per_tool", per_tool, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(
                    f"{argument} must be an integer >= {low}, got {value!r}.", argument=argument
                )
        self.chars_per_token = chars_per_token
        self.image_tokens = image_tokens
        self.name = f"fixed:{chars_per_token}"
        if image_tokens != 85:
            self.name += f";image={image_tokens}"
        self._count = lambda text: -(-len(text) // chars_per_token)
        self._tool_constants = ToolConstants(
            func_init=per_tool, prop_init=0, prop_key=0, enum_init=0, enum_item=0, func_end=0
        )

    def _image(self, image_url: object) -> int:
        return self.image_tokens

    def __repr__(self) -> str:
        return f"FixedCounter(chars_per_token={self.chars_per_token})"


@functools.cache
def _counter_for_info(info: ModelInfo) -> TiktokenCounter:
    return TiktokenCounter(
        info.encoding, tool_constants=info.tool_constants, image_cost=info.image_cost
    )


def counter_for(model: str, *, registry: ModelRegistry | None = None) -> TiktokenCounter:
    """The counter for an OpenAI model; raises ``UnknownModel`` for others."""
    info = (registry or default_registry).get(model)
    return _counter_for_info(info)


def count_tokens(
    messages: Sequence[Mapping[str, Any]],
    *,
    model: str = "gpt-4o",
    tools: Sequence[Mapping[str, Any]] | None = None,
    counter: TokenCounter | None = None,
) -> int:
    """Prompt tokens of a chat request: messages, reply priming and tool definitions."""
    counter = counter or counter_for(model)
    return (
        sum(counter.count_message(message) for message in messages)
        + REPLY_PRIMING
        + counter.count_tools(tools)
    )
