"""Full-text search over stored messages: one conversation's lineage, or a user's.

The index is made by migration 0003 and kept by the database itself in the
transaction of every insert and delete: an FTS5 table on SQLite, a generated
``tsvector`` column under a GIN index on PostgreSQL. What is indexed, per
message, is its text content, the text of its text parts and the name and
arguments of its tool calls (the first 100,000 characters of that). These
functions only read the index, on a connection whose transaction the caller
owns (``Catalogue.search`` and ``Catalogue.search_conversation``, which the
public ``Memory.search`` and ``Conversation.search`` call).

**A query is words, not operators.** The text is split at white space; each
piece is handed to the index as a literal string, never as query syntax, so
quotes, ``*``, ``-``, parentheses, ``AND``/``OR``/``NOT``/``NEAR`` and
``column:`` prefixes are just characters, and no text can cause a syntax
error. The backend's tokenizer then splits a piece as it split the stored
text (``don't`` is the two words "don" and "t", in that order). Pieces without
a letter or digit, and pieces longer than ``MAX_WORD_LENGTH`` characters, are
left out; of the rest only the first ``MAX_WORDS`` distinct ones count. An
empty query finds nothing.

**Words are OR-ed, and ranking decides.** A message matches when it holds any
of the words, and the ranking puts first the messages holding more of the
words, rarer ones, more often, in shorter text. SQLite ranks by BM25 (FTS5's
``bm25()``). PostgreSQL's ``ts_rank_cd`` (cover density) ignores rarity and,
for OR-ed words, counts occurrences, so there each word a message holds also
adds that word's inverse document frequency (from the counts below). ``SearchHit.score``
is higher for better matches; it compares hits of one search, not scores
across searches or backends. Equal scores put newer messages first.

**Common words cost, and say little.** Ranking reads every message a word
occurs in, so a word found in thousands of messages ("the", "what") would
make every search slow while adding almost nothing to BM25 (its weight tends
to zero). Before ranking, each word's occurrences are counted up to
``CANDIDATES`` (a bounded probe); words are then taken rarest first while
their messages add up to at most ``CANDIDATES``, and the more common rest is
left out of the ranking. When even the rarest word occurs in more than
``CANDIDATES`` messages, there is nothing distinctive to rank by: the newest
messages holding any of the words come first, with ``score`` 0. Counts are
over the whole store, as BM25's statistics are. On PostgreSQL, where a probe
reads a table row per match, a word that ANALYZE (autovacuum) found among the
column's commonest is not probed: its sampled frequency stands in.

**Snippets** show up to a dozen words around the matches, each matched word
between ``MARK_START`` and ``MARK_END`` (markdown bold: ``**word**``), with
``ELLIPSIS`` where text was cut (FTS5's ``snippet()``, PostgreSQL's
``ts_headline``; they cut slightly differently). On SQLite, newest-first
results mark only the least common word: marking every common one costs a
few milliseconds per message shown.

**Language.** Both backends index words as written, lower-cased, with no
stemming and no stop words (PostgreSQL's ``simple`` configuration, SQLite's
``unicode61`` tokenizer): conversations mix languages, and a stemmer for the
wrong one mangles words. It is fixed for now (a generated column's
configuration is chosen when the column is made). SQLite also folds
diacritics ("cafe" finds "café"); PostgreSQL's ``simple`` does not. Neither
splits text written without spaces (Chinese, Japanese, Thai) into words: a
run of such characters is one word.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, text

from conversation_memory.errors import ConfigurationError
from conversation_memory.messages import from_row
from conversation_memory.store.schema import (
    SEARCH_COLUMN,
    SEARCH_FUNCTION,
    SEARCH_TABLE,
    SEARCH_VIEW,
    messages,
)
from conversation_memory.store.values import SearchHit, Segment, aware

MAX_WORDS = 32
"""Distinct words of a query that count; the rest of a long text is ignored."""
MAX_WORD_LENGTH = 100
"""Longer pieces (pasted blobs, not words anyone types) are left out of a query."""
MAX_LIMIT = 1000
CANDIDATES = 2000
"""At most this many messages are ranked per search (see "Common words")."""

MARK_START = "**"
MARK_END = "**"
ELLIPSIS = "…"
_SNIPPET_TOKENS = 12
_HEADLINE = (
    f"StartSel={MARK_START}, StopSel={MARK_END}, MaxWords={_SNIPPET_TOKENS}, "
    f'MinWords=6, ShortWord=1, MaxFragments=2, FragmentDelimiter=" {ELLIPSIS} "'
)


def query_words(text: str) -> list[str]:
    """The pieces of ``text`` a search looks for, in order (see the module docstring)."""
    words: list[str] = []
    seen: set[str] = set()
    for piece in text.replace("\x00", " ").split():
        if len(piece) > MAX_WORD_LENGTH or not any(ch.isalnum() for ch in piece):
            continue
        # A lone surrogate (text decoded with errors="surrogateescape") can't
        # be sent to either database.
        word = piece.encode("utf-8", "ignore").decode("utf-8")
        key = word.casefold()
        if key in seen:
            continue
        seen.add(key)
        words.append(word)
        if len(words) == MAX_WORDS:
            break
    return words


def check_limit(limit: Any) -> int:
    """``limit`` if it is a whole number from 1 to ``MAX_LIMIT``, else ConfigurationError."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigurationError(
            f"limit must be a whole number from 1 to {MAX_LIMIT}, got {limit!r}"
        )
    return limit


@dataclass(frozen=True)
class _Scope:
    """Which messages a search may return, as SQL over ``messages AS m``."""

    where: str
    params: dict[str, Any]
    conversations: tuple[str, ...] = ()
    """SQLite: the conversations to intersect with inside the index (empty: any)."""
    user_join: bool = False
    latest: str = "id"
    """PostgreSQL: the column that orders unranked hits, latest first. In a
    lineage, positions: the index on (conversation, position) then stops at
    the first few matches, where walking ids back would pass every newer
    message of other conversations."""


def lineage_where(segments: Sequence[Segment]) -> tuple[str, dict[str, Any]]:
    """The SQL condition (on messages ``m``) and parameters for a lineage's messages:
    each segment's conversation, up to its fork point."""
    clauses, params = [], {}
    for n, (conversation_id, upto) in enumerate(segments):
        params[f"c{n}"] = conversation_id
        if upto is None:
            clauses.append(f"m.conversation_id = :c{n}")
        else:
            params[f"u{n}"] = upto
            clauses.append(f"(m.conversation_id = :c{n} AND m.position <= :u{n})")
    return "(" + " OR ".join(clauses) + ")", params


def search_lineage(
    conn: Connection,
    segments: Sequence[Segment],
    text: str,
    *,
    before: int | None = None,
    limit: int = 10,
    ranked_only: bool = False,
) -> list[SearchHit]:
    """The best matches for ``text`` in one conversation and the history it shares.

    ``segments`` is the conversation's lineage, itself first (as
    ``ConversationLog.lineage`` returns it): a fork finds its parent's messages up
    to the fork point, not the ones the parent added later. ``before`` keeps
    only positions below it (say, the tail already in the context).
    ``ranked_only`` finds nothing when the words are too common to rank,
    instead of the newest messages holding them (recall has no use for those).
    """
    limit = check_limit(limit)
    if not segments:
        return []
    where, params = lineage_where(segments)
    if before is not None:
        where += " AND m.position < :before"
        params["before"] = before
    scope = _Scope(where, params, conversations=tuple(c for c, _ in segments), latest="position")
    return _search(conn, text, scope, limit, ranked_only=ranked_only)


def search_user(
    conn: Connection, text: str, *, user: str | None, limit: int = 10
) -> list[SearchHit]:
    """The best matches for ``text`` across one user's conversations (None: every user's).

    A message shared by forks is stored once, by the conversation that wrote
    it, so it is found once, under that conversation.
    """
    limit = check_limit(limit)
    if user is None:
        return _search(conn, text, _Scope("1 = 1", {}), limit)
    return _search(conn, text, _Scope("c.user_id = :user", {"user": user}, user_join=True), limit)


def _search(
    conn: Connection, text: str, scope: _Scope, limit: int, *, ranked_only: bool = False
) -> list[SearchHit]:
    words = query_words(text)
    if not words:
        return []
    backend = _Postgres() if conn.dialect.name == "postgresql" else _Sqlite()
    counts = backend.counts(conn, words)
    present = sorted(
        ((count, word) for count, word in zip(counts, words, strict=True) if count),
        key=lambda pair: pair[0],
    )
    if not present:
        return []
    kept: list[tuple[int, str]] = []
    total = 0
    for count, word in present:
        if kept and total + count > CANDIDATES:
            break
        kept.append((count, word))
        total += count
    if total <= CANDIDATES:
        return backend.ranked(conn, kept, scope, limit)
    if ranked_only:
        return []
    # Rarest first: newest() snippets show the first word.
    return backend.newest(conn, [word for _, word in present], scope, limit)


def _message_text(content: str | None, parts: str | None, tool_calls: str | None) -> str:
    pieces = [content] if content else []
    if parts is not None:
        pieces += [p["text"] for p in json.loads(parts) if p.get("type") == "text"]
    if tool_calls is not None:
        for call in json.loads(tool_calls):
            function = call.get("function") or {}
            pieces.append(f"{function.get('name', '')}({function.get('arguments', '')})")
    return "\n".join(pieces)


def _hit(row: Any, score: float) -> SearchHit:
    return SearchHit(
        conversation_id=row.conversation_id,
        title=row.title,
        position=row.position,
        role=row.role,
        message=from_row(
            row.role, row.content, row.parts, row.name, row.tool_calls, row.tool_call_id
        ),
        text=_message_text(row.content, row.parts, row.tool_calls),
        created_at=aware(row.created_at),
        score=score,
        snippet=row.snippet,
    )


_ROW = (
    "m.conversation_id, m.position, m.role, m.content, m.parts, m.name, m.tool_calls, "
    "m.tool_call_id, m.created_at"
)
_TITLE = "(SELECT title FROM conversations WHERE id = {t}.conversation_id) AS title"
"""The title of a hit's conversation: a primary-key lookup per chosen row."""
_TYPES = {"created_at": messages.c.created_at.type}


class _Sqlite:
    """FTS5: ``MATCH`` expressions built from quoted strings only."""

    FROM = f"{SEARCH_TABLE} CROSS JOIN messages AS m ON m.id = {SEARCH_TABLE}.rowid"
    USER = " CROSS JOIN conversations AS c ON c.id = m.conversation_id"

    @staticmethod
    def phrase(word: str) -> str:
        return '"' + word.replace('"', '""') + '"'

    def body(self, words: Sequence[str]) -> str:
        return "body : (" + " OR ".join(self.phrase(w) for w in words) + ")"

    def counts(self, conn: Connection, words: Sequence[str]) -> list[int]:
        # Each count stops at CANDIDATES + 1: past that, a word is common, and
        # counting further would cost what the ranking is spared.
        probes = ", ".join(
            f"(SELECT count(*) FROM (SELECT 1 FROM {SEARCH_TABLE} "
            f"WHERE {SEARCH_TABLE} MATCH :w{n} LIMIT :cap))"
            for n in range(len(words))
        )
        params: dict[str, Any] = {f"w{n}": self.body([w]) for n, w in enumerate(words)}
        params["cap"] = CANDIDATES + 1
        return list(conn.execute(text(f"SELECT {probes}"), params).one())

    def _from(self, scope: _Scope) -> str:
        return self.FROM + (self.USER if scope.user_join else "")

    def ranked(
        self, conn: Connection, words: Sequence[tuple[int, str]], scope: _Scope, limit: int
    ) -> list[SearchHit]:
        # CROSS JOIN keeps the index as the outer loop: the other order probes
        # the index once per message of the scope. bm25's weights: the body
        # counts, the conversation column does not.
        match = self.body([word for _, word in words])
        top = conn.execute(
            text(
                f"SELECT {SEARCH_TABLE}.rowid, bm25({SEARCH_TABLE}, 1.0, 0.0) AS weight "
                f"FROM {self._from(scope)} "
                f"WHERE {SEARCH_TABLE} MATCH :match AND {scope.where} "
                f"ORDER BY weight, {SEARCH_TABLE}.rowid DESC LIMIT :limit"
            ),
            {**scope.params, "match": match, "limit": limit},
        ).all()
        # bm25() is lower for better matches; a hit's score is higher.
        return self.details(conn, match, [(rowid, -rank) for rowid, rank in top])

    def newest(
        self, conn: Connection, words: Sequence[str], scope: _Scope, limit: int
    ) -> list[SearchHit]:
        match = self.body(words)
        if scope.conversations:
            # Inside the index, the conversations' postings are intersected
            # with the words' (a small conversation in a large store is not
            # found by walking every message that says "the").
            ids = " OR ".join(self.phrase(c.encode("utf-8").hex()) for c in scope.conversations)
            match = f"scope : ({ids}) AND {match}"
        top = conn.execute(
            text(
                f"SELECT {SEARCH_TABLE}.rowid FROM {self._from(scope)} "
                f"WHERE {SEARCH_TABLE} MATCH :match AND {scope.where} "
                f"ORDER BY {SEARCH_TABLE}.rowid DESC LIMIT :limit"
            ),
            {**scope.params, "match": match, "limit": limit},
        ).all()
        # Snippets look up each row in every common word's long posting lists
        # (measured: 3-4 ms a row for eight such words); the rarest word alone
        # finds the place to show.
        return self.details(conn, self.body(words[:1]), [(rowid, 0.0) for (rowid,) in top])

    def details(
        self, conn: Connection, match: str, ranked: Sequence[tuple[int, float]]
    ) -> list[SearchHit]:
        """The rows and snippets of the chosen messages only (snippet() reads and
        tokenizes the text: not something to do for every candidate)."""
        if not ranked:
            return []
        query = (
            text(
                f"SELECT {SEARCH_TABLE}.rowid AS id, {_ROW}, {_TITLE.format(t='m')}, "
                f"snippet({SEARCH_TABLE}, 0, :start, :end, :ellipsis, :tokens) AS snippet "
                f"FROM {self.FROM} WHERE {SEARCH_TABLE} MATCH :match "
                f"AND {SEARCH_TABLE}.rowid IN :ids"
            )
            .bindparams(bindparam("ids", expanding=True))
            .columns(**_TYPES)
        )
        rows = conn.execute(
            query,
            {
                "match": match,
                "ids": [rowid for rowid, _ in ranked],
                "start": MARK_START,
                "end": MARK_END,
                "ellipsis": ELLIPSIS,
                "tokens": _SNIPPET_TOKENS,
            },
        )
        found = {row.id: row for row in rows}
        return [_hit(found[rowid], score) for rowid, score in ranked if rowid in found]


# The commonest words of the search column and their frequencies, as ANALYZE
# (autovacuum) last sampled them; no row before the first ANALYZE.
_COMMON = f"""
SELECT CAST(CAST(most_common_elems AS text) AS text[]) AS words, most_common_elem_freqs AS freqs,
       (SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = to_regclass('messages')) AS rows
  FROM pg_stats
 WHERE schemaname = current_schema() AND tablename = 'messages' AND attname = '{SEARCH_COLUMN}'
"""
"""(The migrations made the tables in the current schema. Naming it, rather
than joining ``pg_class`` to find it, keeps this at ~1 ms instead of ~10.)"""


class _Postgres:
    """``tsvector @@ tsquery``: each word through ``plainto_tsquery``, which has no syntax."""

    USER = " JOIN conversations AS c ON c.id = m.conversation_id"

    def __init__(self) -> None:
        self.size = 1
        self.parsed: dict[str, str] = {}
        """Each word's tsquery, as text (see ``query``)."""

    def query(self, words: Sequence[str]) -> tuple[str, dict[str, str]]:
        # Constants, not plainto_tsquery() calls: the planner estimates from a
        # constant's value (a stale estimate once made a user's search take
        # minutes), and a condition checked row by row does not parse the
        # words again for every row.
        sql = " || ".join(f"CAST(:q{n} AS tsquery)" for n in range(len(words)))
        return f"({sql})", {f"q{n}": self.parsed[w] for n, w in enumerate(words)}

    def counts(self, conn: Connection, words: Sequence[str]) -> list[int]:
        # A capped probe reads a table row per match here (not just the GIN
        # index): 5-30 ms for a word in a few percent of the messages. A word
        # whose every lexeme ANALYZE found among the commonest is not probed:
        # its sampled frequency stands in (only words above CANDIDATES need
        # no exact count, and those are the common ones). Rarer words, and
        # all of them before the first ANALYZE, are probed.
        columns = []
        for n in range(len(words)):
            lexemes = f"unnest(tsvector_to_array(to_tsvector('simple', :w{n}))) AS x"
            probe = (
                f"(SELECT count(*) FROM (SELECT 1 FROM messages WHERE {SEARCH_COLUMN} @@ "
                f"plainto_tsquery('simple', :w{n}) LIMIT :cap) AS s{n})"
            )
            columns += [
                f"CAST(plainto_tsquery('simple', :w{n}) AS text)",
                f"CASE WHEN (SELECT bool_and(array_position(c.words, x) IS NOT NULL) "
                f"FROM {lexemes}) THEN (SELECT CAST(min(c.freqs[array_position(c.words, x)]) "
                f"* c.rows AS integer) FROM {lexemes}) ELSE {probe} END",
            ]
        params: dict[str, Any] = {f"w{n}": w for n, w in enumerate(words)}
        params["cap"] = CANDIDATES + 1
        # psycopg prepares a statement run five times, and PostgreSQL may then
        # plan it once for any values: a plan that cannot know how rare the
        # words are walks the whole conversation (measured: 150-200 ms instead
        # of 5). Plans made for the actual words, for the rest of the caller's
        # transaction (generated columns need PostgreSQL 12, which has this).
        conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
        # The highest id stands in for the number of messages (an index lookup,
        # where count(*) reads them all); IDF is a logarithm, and forgiving.
        found = conn.execute(
            text(
                "SELECT (SELECT coalesce(max(id), 0) FROM messages), "
                + ", ".join(columns)
                + f" FROM (SELECT 1) AS one LEFT JOIN ({_COMMON}) AS c ON true"
            ),
            params,
        ).one()
        self.size = max(found[0], 1)
        self.parsed = dict(zip(words, found[1::2], strict=True))
        return list(found[2::2])

    def ranked(
        self, conn: Connection, words: Sequence[tuple[int, str]], scope: _Scope, limit: int
    ) -> list[SearchHit]:
        # ts_rank_cd over OR-ed words counts occurrences (three "apple"s score as
        # "apple banana cherry"), with no regard to rarity. Each word the message
        # holds adds its IDF, so that more of the words, and rarer ones, come first.
        tsquery, params = self.query([word for _, word in words])
        terms = []
        for n, (count, _) in enumerate(words):
            params[f"idf{n}"] = math.log(1 + (self.size - count + 0.5) / (count + 0.5))
            terms.append(
                f"CASE WHEN m.{SEARCH_COLUMN} @@ CAST(:q{n} AS tsquery) THEN :idf{n} ELSE 0 END"
            )
        score = f"ts_rank_cd(m.{SEARCH_COLUMN}, {tsquery}) + " + " + ".join(terms)
        return self.search(conn, tsquery, params, scope, limit, score, "score DESC, {t}.id DESC")

    def newest(
        self, conn: Connection, words: Sequence[str], scope: _Scope, limit: int
    ) -> list[SearchHit]:
        tsquery, params = self.query(words)
        return self.search(conn, tsquery, params, scope, limit, "0.0", f"{{t}}.{scope.latest} DESC")

    def search(  # noqa: PLR0917 - private; ranked() and newest() call it
        self,
        conn: Connection,
        tsquery: str,
        params: dict[str, Any],
        scope: _Scope,
        limit: int,
        score: str,
        order: str,
    ) -> list[SearchHit]:
        # ts_headline parses the whole text: only for the chosen rows, outside
        # the ranked subquery.
        query = text(
            f"SELECT top.*, {_TITLE.format(t='top')}, ts_headline('simple', "
            f"{SEARCH_FUNCTION}(top.content, top.parts, top.tool_calls), {tsquery}, "
            f":options) AS snippet FROM ("
            f"SELECT m.id, {_ROW}, {score} AS score FROM messages AS m"
            f"{self.USER if scope.user_join else ''} "
            f"WHERE m.{SEARCH_COLUMN} @@ {tsquery} AND {scope.where} "
            f"ORDER BY {order.format(t='m')} LIMIT :limit) AS top "
            f"ORDER BY {order.format(t='top')}"
        ).columns(**_TYPES)
        rows = conn.execute(query, {**params, **scope.params, "limit": limit, "options": _HEADLINE})
        return [_hit(row, float(row.score)) for row in rows]


def check_index(conn: Connection) -> list[str]:
    """Differences between the search index and the stored messages (empty when they agree).

    For tests and repairs: it reads every message. On SQLite it needs a write
    transaction (FTS5's integrity check is an ``INSERT`` command).
    """
    if conn.dialect.name == "postgresql":
        stale = conn.execute(
            text(
                f"SELECT count(*) FROM messages WHERE {SEARCH_COLUMN} IS DISTINCT FROM "
                f"to_tsvector('simple', {SEARCH_FUNCTION}(content, parts, tool_calls))"
            )
        ).scalar_one()
        return [f"{stale} messages have a stale search vector"] if stale else []
    problems = []
    try:
        # FTS5 compares its index with the content (the view) for external content.
        conn.execute(
            text(f"INSERT INTO {SEARCH_TABLE} ({SEARCH_TABLE}) VALUES ('integrity-check')")
        )
    except Exception as exc:  # sqlite3.DatabaseError, wrapped by SQLAlchemy
        problems.append(f"FTS5 integrity-check failed: {exc}")
    indexed = conn.execute(text(f"SELECT count(*) FROM {SEARCH_TABLE}_docsize")).scalar_one()
    stored = conn.execute(text(f"SELECT count(*) FROM {SEARCH_VIEW}")).scalar_one()
    if indexed != stored:
        problems.append(f"{indexed} messages indexed, {stored} stored")
    return problems
