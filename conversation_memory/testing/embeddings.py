"""The test server's embeddings model: deterministic vectors, OpenAI's wire shape (pure).

``POST /v1/embeddings`` answers as OpenAI does: ``{"object": "list", "data":
[{"object": "embedding", "index": i, "embedding": ...}], "model", "usage"}``,
each embedding a list of floats, or with ``encoding_format="base64"`` (what
the ``openai`` SDK asks for unless told otherwise) the base64 of its
little-endian float32 bytes.

:func:`hashed_embedding` is the default model: a hashed bag of words. Each
word (lower-cased run of letters and digits) adds ±1 at a place its hash
picks, and the sum is normalized. Texts sharing words are similar (cosine
above 0), texts sharing none are nearly orthogonal, and the same text always
gives the same vector, so tests can predict what vector search finds. It
knows no meaning: "car" and "automobile" are unrelated to it. A real model
can stand in (``ChatServer(embedder=...)``).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from conversation_memory.testing import refusals
from conversation_memory.testing.tokenizer import count_text

__all__ = ["DIMENSIONS", "Embedder", "answer", "hashed_embedding", "hashed_model", "invalid"]

DIMENSIONS = 64
"""Dimensions of the default model's vectors (a request's ``dimensions`` overrides)."""

Embedder = Callable[[Sequence[str], int | None], Sequence[Sequence[float]]]
"""A model for the server: the texts and the ``dimensions`` asked for (None: its own),
to one vector per text."""

_WORD = re.compile(r"\w+")


def hashed_embedding(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The default model's vector for ``text`` (see the module)."""
    vector = [0.0] * dimensions
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        place = int.from_bytes(digest[:4], "little") % dimensions
        vector[place] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


def hashed_model(texts: Sequence[str], dimensions: int | None) -> list[list[float]]:
    """:func:`hashed_embedding` as an :data:`Embedder`."""
    return [hashed_embedding(text, dimensions or DIMENSIONS) for text in texts]


def invalid(body: Any) -> str | None:
    """Why OpenAI would refuse this embeddings request (a 400's message), or None."""
    if not isinstance(body, Mapping):
        return "The request body must be a JSON object."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    given = body.get("input")
    texts = [given] if isinstance(given, str) else given
    if not isinstance(texts, list) or not texts:
        return "'input' is a required property and must be a string or an array of strings"
    if not all(isinstance(text, str) for text in texts):
        return "This test server embeds text only: 'input' must hold strings, not token arrays."
    if len(texts) > 2048:
        return "'$.input' is invalid: an array must hold at most 2048 inputs."
    if any(not text for text in texts):
        return "'$.input' is invalid. Please check the API reference: an input must not be empty."
    if body.get("encoding_format", "float") not in ("float", "base64"):
        return (
            f"'{body.get('encoding_format')}' is not one of ['float', 'base64'] - 'encoding_format'"
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        return f"{dimensions!r} is less than the minimum of 1 - 'dimensions'"
    return None


def answer(body: Mapping[str, Any], model: Embedder) -> tuple[int, dict[str, Any]]:
    """The status and body answering a request :func:`invalid` passed."""
    given = body["input"]
    texts = [given] if isinstance(given, str) else list(given)
    vectors = model(texts, body.get("dimensions"))
    if len(vectors) != len(texts):
        message = f"the embedder answered {len(vectors)} vectors for {len(texts)} inputs"
        return 500, refusals.error_body(message, type="server_error")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, vector in enumerate(vectors):
        values = [float(x) for x in vector]
        encoded: Any = values
        if as_base64:
            packed = struct.pack(f"<{len(values)}f", *values)
            encoded = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(count_text(text) for text in texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return 200, {"object": "list", "data": data, "model": body["model"], "usage": usage}
