"""Message embeddings: stored, found missing, scanned for the nearest (migration 0004).

Optional semantic recall keeps one vector per message and embedding model in
``message_vectors``: little-endian float32, ``dimensions`` values (0 for a
message with no text, stored so that it is not asked for again). Vectors are
derived data, written after the turn that stored the message and outside its
transaction; a message lacking one is what :meth:`VectorStore.pending` finds,
so an embedding run that failed is simply done again later.

**The scan is brute force, kept in memory.** Reading 100,000 blobs out of the
database takes 100-250 ms (measured on SQLite), far above the 20 ms a recall
may cost; multiplying them with the query takes a few ms with numpy. So
:class:`VectorStore` keeps each conversation's vectors as one normalized
float32 matrix and, on every scan, reads only the rows stored since: two
index lookups (the lowest and highest row id of the conversation and model)
and the new rows. A changed lowest id means rows went (the conversation was
deleted, and one with its id imported again): the matrix is read anew.
Vectors are removed only with their messages, and messages only with their
conversation, so nothing else can go missing under the cache. Row ids must
then be committed in order: SQLite's writers are serialized anyway, and on
PostgreSQL :meth:`VectorStore.save` takes a transaction-level advisory lock,
so that a reader never sees a higher id before a lower one.

numpy is needed for the scan (``pip install 'conversation-memory[embeddings]'``);
without an embeddings setting nothing here is used, and recall is lexical.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from conversation_memory.errors import ConfigurationError
from conversation_memory.fusion import fuse
from conversation_memory.store.database import Database
from conversation_memory.store.search import (
    MAX_LIMIT,
    _message_text,
    lineage_where,
    search_lineage,
)
from conversation_memory.store.values import SearchHit, Segment

BATCH = 64
"""Messages :meth:`VectorStore.pending` returns at most, by default (one request's worth)."""
CACHE_BYTES = 512 * 1024 * 1024
"""Memory a :class:`VectorStore` may keep vectors in: the conversations scanned
least recently are dropped past it (the one being scanned always stays)."""
MAX_TEXT = 8000
"""Characters of a message that are embedded (the start; endpoints cap their input)."""
_PG_LOCK = 0x636F6E766D656D  # "convmem": serializes vector writers on PostgreSQL (see module)


def numpy() -> Any:
    """The numpy module, or a ConfigurationError saying how to install it."""
    try:
        import numpy
    except ImportError:
        raise ConfigurationError(
            "semantic recall (embeddings=...) needs numpy for its vector scan: "
            "pip install 'conversation-memory[embeddings]'",
            argument="embeddings",
        ) from None
    return numpy


def pack(values: Sequence[float]) -> bytes:
    """A vector as stored: little-endian float32."""
    import array

    packed = array.array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


@dataclass(frozen=True, slots=True)
class Unembedded:
    """A message still lacking a vector for some model, with the text to embed."""

    conversation_id: str
    position: int
    text: str
    """Its text (as search indexes it), at most ``MAX_TEXT`` characters; may be empty."""


@dataclass(frozen=True, slots=True)
class NewVector:
    conversation_id: str
    position: int
    vector: bytes
    """Little-endian float32 (``pack``); empty for a message with nothing to embed."""


@dataclass(frozen=True, slots=True)
class Near:
    """A message found by its vector."""

    conversation_id: str
    position: int
    similarity: float
    """Cosine similarity with the query, from -1 to 1."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A message found by the fused search (words and meaning)."""

    conversation_id: str
    position: int
    score: float
    """Reciprocal-rank fusion score (see ``fusion``): higher is better."""
    hit: SearchHit | None
    """The full-text hit (text and snippet) when the words found it too."""
    similarity: float | None
    """The cosine similarity when the vector scan found it."""


def pending(
    conn: Connection, segments: Sequence[Segment], model: str, *, after: int = -1, limit: int
) -> list[Unembedded]:
    """The lineage's messages past position ``after`` without a ``model`` vector,
    oldest first, at most ``limit``."""
    if not segments:
        return []
    where, params = lineage_where(segments)
    rows = conn.execute(
        text(
            "SELECT m.conversation_id, m.position, m.content, m.parts, m.tool_calls "
            f"FROM messages AS m WHERE {where} AND m.position > :after AND NOT EXISTS ("
            "SELECT 1 FROM message_vectors AS v WHERE v.conversation_id = m.conversation_id "
            "AND v.position = m.position AND v.model = :model) "
            "ORDER BY m.position LIMIT :limit"
        ),
        {**params, "after": after, "model": model, "limit": limit},
    ).all()
    return [
        Unembedded(row[0], row[1], _message_text(row[2], row[3], row[4])[:MAX_TEXT]) for row in rows
    ]


class _Block:
    """One conversation's vectors of one model, normalized, in a growing matrix."""

    def __init__(self, np: Any, dimensions: int, first: int) -> None:
        self.dimensions = dimensions
        self.first = first
        """The lowest row id when it was read whole (a different one: rows went)."""
        self.last = first - 1
        """The highest row id read so far."""
        self.size = 0
        self.positions = np.empty(64, dtype=np.int64)
        self.matrix = np.empty((64, dimensions), dtype=np.float32)

    def add(self, np: Any, positions: list[int], blobs: list[bytes]) -> None:
        count = len(positions)
        need = self.size + count
        if need > len(self.positions):
            grown = max(need, 2 * len(self.positions))
            self.positions = np.resize(self.positions, grown)
            matrix = np.empty((grown, self.dimensions), dtype=np.float32)
            matrix[: self.size] = self.matrix[: self.size]
            self.matrix = matrix
        rows = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(count, self.dimensions)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        self.matrix[self.size : need] = rows / norms
        self.positions[self.size : need] = positions
        self.size = need


class VectorStore:
    """Vectors of one database: write them, find what lacks one, scan for the nearest."""

    def __init__(self, db: Database, *, cache_bytes: int = CACHE_BYTES) -> None:
        self._db = db
        self._cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple[str, str], _Block] = OrderedDict()

    def pending(
        self, segments: Sequence[Segment], model: str, *, after: int = -1, limit: int = BATCH
    ) -> list[Unembedded]:
        """See :func:`pending` (in a read transaction of its own)."""
        with self._db.read() as conn:
            return pending(conn, segments, model, after=after, limit=limit)

    def save(self, model: str, vectors: Sequence[NewVector]) -> None:
        """Store ``vectors`` in one transaction. A message that already has one, or
        that was deleted meanwhile, is skipped."""
        if not vectors:
            return
        rows = [
            {
                "c": v.conversation_id,
                "p": v.position,
                # The same values again for the check: PostgreSQL would infer one
                # parameter as text (the select list) and varchar (the comparison).
                "mc": v.conversation_id,
                "mp": v.position,
                "m": model,
                "d": len(v.vector) // 4,
                "v": v.vector,
            }
            for v in vectors
        ]
        with self._db.write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
            conn.execute(
                text(
                    "INSERT INTO message_vectors (conversation_id, position, model, dimensions, "
                    "vector) SELECT :c, :p, :m, :d, :v WHERE EXISTS (SELECT 1 FROM messages "
                    "WHERE conversation_id = :mc AND position = :mp) ON CONFLICT DO NOTHING"
                ),
                rows,
            )

    def nearest(
        self,
        conn: Connection,
        segments: Sequence[Segment],
        model: str,
        query: Sequence[float] | bytes,
        *,
        limit: int = 10,
        before: int | None = None,
    ) -> list[Near]:
        """The ``limit`` messages of the lineage most similar to ``query`` (cosine),
        best first; ``before`` keeps only positions below it. Reads on ``conn``,
        whose transaction the caller owns."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit must be a whole number of 1 or more, got {limit!r}")
        np = numpy()
        if isinstance(query, bytes | bytearray):
            vector = np.frombuffer(query, dtype="<f4")
        else:
            vector = np.asarray(query, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if vector.ndim != 1 or not vector.size or not math.isfinite(norm) or norm == 0:
            return []
        vector = vector / norm
        found: list[Near] = []
        for conversation_id, upto in segments:
            bound = math.inf if upto is None else upto
            if before is not None:
                bound = min(bound, before - 1)
            with self._lock:
                block = self._refresh(np, conn, conversation_id, model, vector.size)
                if block is None or not block.size:
                    continue
                # einsum, not matmul: BLAS's matrix-vector product spreads over a
                # thread pool, which on a busy machine waited 10x longer than the
                # work (measured); einsum's own loop runs in this thread.
                scores = np.einsum("ij,j->i", block.matrix[: block.size], vector)
                positions = block.positions[: block.size]
            if bound != math.inf:
                scores = np.where(positions <= bound, scores, -np.inf)
            top = np.argpartition(-scores, limit - 1)[:limit] if limit < scores.size else None
            chosen = np.arange(scores.size) if top is None else top
            found += [
                Near(conversation_id, int(positions[i]), float(scores[i]))
                for i in chosen
                if scores[i] != -np.inf
            ]
        found.sort(key=lambda near: (-near.similarity, -near.position))
        return found[:limit]

    def _refresh(
        self, np: Any, conn: Connection, conversation_id: str, model: str, dimensions: int
    ) -> _Block | None:
        """The conversation's block, brought up to what ``conn`` sees (the lock held)."""
        key = (conversation_id, model)
        where = "conversation_id = :c AND model = :m"
        params = {"c": conversation_id, "m": model}
        # Two subqueries, each one step down the index: min() and max() in one
        # select would walk every entry of the conversation.
        first, last = conn.execute(
            text(
                f"SELECT (SELECT id FROM message_vectors WHERE {where} ORDER BY id LIMIT 1), "
                f"(SELECT id FROM message_vectors WHERE {where} ORDER BY id DESC LIMIT 1)"
            ),
            params,
        ).one()
        block = self._blocks.get(key)
        if first is None:
            self._blocks.pop(key, None)
            return None
        if block is None or block.first != first or block.dimensions != dimensions:
            block = _Block(np, dimensions, first)
            self._blocks[key] = block
        self._blocks.move_to_end(key)
        if last > block.last:
            rows = conn.execute(
                text(
                    f"SELECT position, vector FROM message_vectors WHERE {where} "
                    "AND id > :after AND id <= :last AND dimensions = :d ORDER BY id"
                ),
                {**params, "after": block.last, "last": last, "d": dimensions},
            ).all()
            if rows:
                block.add(np, [row[0] for row in rows], [bytes(row[1]) for row in rows])
            block.last = last
            self._evict()
        return block

    def _evict(self) -> None:
        """Drop the least recently scanned blocks past ``cache_bytes`` (the lock held)."""
        held = sum(block.matrix.nbytes for block in self._blocks.values())
        while held > self._cache_bytes and len(self._blocks) > 1:
            _, dropped = self._blocks.popitem(last=False)
            held -= dropped.matrix.nbytes


def fused_search(
    conn: Connection,
    vectors: VectorStore | None,
    segments: Sequence[Segment],
    text: str,
    *,
    model: str | None = None,
    query: Sequence[float] | bytes | None = None,
    before: int | None = None,
    limit: int = 10,
    depth: int | None = None,
    min_similarity: float = 0.0,
    ranked_only: bool = False,
) -> list[Candidate]:
    """The best candidates for recall in a lineage: full-text hits for ``text`` and,
    given ``vectors``, ``model`` and the ``query`` vector (the same text embedded),
    the nearest messages, fused by reciprocal rank; best first, at most ``limit``.

    Vector hits with a similarity of ``min_similarity`` or less are left out:
    at 0, the unrelated (orthogonal or opposite). Rank fusion ignores how far
    apart scores are, so a list that finds everything slightly (a real model
    gives unrelated texts 0.1-0.2) lets messages that merely share a common
    word with the query, found by both lists, outrank the one message the
    vectors found by far; a threshold suited to the model (0.3 for
    all-MiniLM-L6-v2, say) keeps the vector list to what is related. Each
    list is read ``depth`` deep (default: three times ``limit``), so that an
    item ranked low by one list and high by the other can still make it. Without
    a query vector this is the full-text ranking alone. ``ranked_only`` is
    :func:`~conversation_memory.store.search.search_lineage`'s. Reads on ``conn``,
    whose transaction the caller owns (one snapshot for both lists).
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigurationError(
            f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}"
        )
    depth = min(MAX_LIMIT, 3 * limit) if depth is None else depth
    hits = search_lineage(conn, segments, text, before=before, limit=depth, ranked_only=ranked_only)
    near: list[Near] = []
    if vectors is not None and model is not None and query is not None:
        found = vectors.nearest(conn, segments, model, query, limit=depth, before=before)
        near = [n for n in found if n.similarity > min_similarity]
    by_hit = {(h.conversation_id, h.position): h for h in hits}
    by_near = {(n.conversation_id, n.position): n for n in near}
    fused = fuse(list(by_hit), list(by_near))[:limit]
    return [
        Candidate(
            key[0],
            key[1],
            score,
            by_hit.get(key),
            by_near[key].similarity if key in by_near else None,
        )
        for key, score in fused
    ]


__all__ = [
    "BATCH",
    "Candidate",
    "Near",
    "NewVector",
    "Unembedded",
    "VectorStore",
    "fused_search",
    "numpy",
    "pack",
    "pending",
]
