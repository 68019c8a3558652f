"""The conversation log: every statement about one conversation, and nothing else.

A :class:`ConversationLog` is one conversation as the store sees it: an
append-only list of messages numbered by position, the summaries that cover
ranges of it, its usage rows, its calibration and its compaction leases.
Each method is one transaction and gives back plain values
(``store.values``, :class:`~conversation_memory.types.Item`,
:class:`~conversation_memory.types.Summary`); the turn and compaction code
above receives a narrow protocol of it, never a connection.

* **The snapshot read** (:meth:`read`) takes, in one read transaction, the
  head row with its calibration, the lineage, the newest summary (or the
  summary cover), a tail just long enough to cover the budget, and the
  pinned messages before it. How far back the tail reaches depends on the
  calibration the head carries, so the caller passes that rule in.
* **The turn commit** (:meth:`commit`) claims positions, inserts the
  messages, the usage row and the calibration change in one write
  transaction. It is the one writer of calibrations (an upsert that adds
  the observations it carries) and, with :meth:`store_summary` and
  :meth:`record_usage`, of usage rows, all through one statement.
* **Forks** share their parent's messages: the lineage is a list of segments
  ``(conversation_id, last_position)`` from the conversation back to the root,
  read newest first, and cached until the fork pointer changes.
* **A lazy conversation** (``unsaved=True``) has no row until its first
  commit, which inserts the row in the same transaction; until then it reads
  as empty, and a calibration learnt meanwhile is kept here and written with
  that first commit.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from conversation_memory.errors import ConfigurationError, ConversationNotFound
from conversation_memory.messages import from_row
from conversation_memory.store import leases, queries
from conversation_memory.store.database import Database
from conversation_memory.store.recall import candidates
from conversation_memory.store.statements import Statements
from conversation_memory.store.tailcache import TailCache
from conversation_memory.store.values import (
    Calibration,
    Committed,
    ConversationRow,
    Entry,
    Head,
    NewMessage,
    NewSummary,
    Segment,
    Snapshot,
    StoredMessage,
    UsageRecord,
    aware,
    now,
)
from conversation_memory.store.vectors import VectorStore
from conversation_memory.types import Correction, RecallQuery, Summary

Learn = Callable[[Correction | None], Calibration | None]
"""What a commit learns from a reply: given the stored correction (None: nothing
stored yet), the calibration to write, or None to leave it."""


class ConversationLog:
    """One conversation's messages, summaries, usage, calibration and leases."""

    def __init__(
        self,
        db: Database,
        sql: Statements,
        row: ConversationRow,
        *,
        model: str | None = None,
        unsaved: bool = False,
        vectors: VectorStore | None = None,
    ) -> None:
        self._db, self._sql, self._vectors = db, sql, vectors
        self.id = row.id
        self.user = row.user_id
        self.model = model or row.model
        """The model whose calibration is read and written (the conversation's own
        unless it was resumed with another)."""
        self._row = row
        self._unsaved = unsaved
        """The row is still to be inserted, by the first commit."""
        self._unsaved_calibration: Calibration | None = None
        self._lineage: tuple[tuple[str, int | None], list[Segment]] | None = None
        self._tail_cache = TailCache()

    @property
    def stored(self) -> bool:
        """Whether the row exists yet (False for a lazy one before its first commit)."""
        return not self._unsaved

    # -- values of this backend ------------------------------------------------------

    def _stamp(self, when: datetime) -> Any:
        """A timestamp as SQLAlchemy's DateTime stores it on this backend (``when`` is UTC)."""
        if self._sql.sqlite:
            return when.replace(tzinfo=None).isoformat(" ", "microseconds")
        return when

    @staticmethod
    def _time(value: Any) -> datetime:
        if isinstance(value, str):  # SQLite: the text _stamp wrote
            value = datetime.fromisoformat(value)
        return aware(value)

    def _gone(self) -> ConversationNotFound:
        return ConversationNotFound(
            f"conversation {self.id!r} no longer exists (deleted?)", conversation_id=self.id
        )

    # -- the head and the lineage -----------------------------------------------------

    def _head(self, cur: Any) -> Head:
        cur.execute(self._sql.head, (self.model, self.id, self.user))
        found = cur.fetchone()
        if found is not None:
            return Head(*found)
        if not self._unsaved:
            raise self._gone()
        learnt = self._unsaved_calibration
        row = self._row
        return Head(
            system=row.system,
            system_tokens=row.system_tokens,
            forked_from=None,
            fork_position=None,
            next_position=0,
            message_count=0,
            total_tokens=0,
            factor=learnt.factor if learnt else None,
            margin=learnt.margin if learnt else None,
        )

    def _segments(self, cur: Any, head: Head) -> list[Segment]:
        """This conversation's lineage, cached until its fork pointer changes."""
        if head.forked_from is None:
            return [(self.id, None)]
        key = (head.forked_from, head.fork_position)
        if self._lineage is None or self._lineage[0] != key:

            def parent_of(parent: str) -> tuple[str | None, int | None] | None:
                cur.execute(self._sql.parent, (parent,))
                found = cur.fetchone()
                return None if found is None else (found[0], found[1])

            segments = queries.walk_lineage(
                self.id, head.forked_from, head.fork_position, parent_of
            )
            self._lineage = (key, segments)
        return self._lineage[1]

    def _fresh_row(self, cur: Any) -> ConversationRow:
        cur.execute(self._sql.row, (self.id, self.user))
        found = cur.fetchone()
        if found is None:
            if self._unsaved:
                return self._row  # reads as an empty conversation until its first write
            raise self._gone()
        values = list(found)
        values[7] = json.loads(values[7])
        values[8], values[9] = self._time(values[8]), self._time(values[9])
        self._row = ConversationRow(*values)
        return self._row

    def row(self) -> ConversationRow:
        """The conversation's row as stored now."""
        with self._db.cursor(write=False) as cur:
            return self._fresh_row(cur)

    def length(self) -> int:
        """How many positions the conversation has (shared fork prefix included)."""
        with self._db.cursor(write=False) as cur:
            return self._head(cur).next_position

    # -- the snapshot read --------------------------------------------------------------

    def read(
        self,
        tokens: Callable[[Head], int],
        *,
        cover: bool = False,
        overlap: bool = False,
        recall: Callable[[Snapshot], RecallQuery | None] | None = None,
    ) -> Snapshot:
        """The conversation as the next request sees it, in one read transaction.

        ``tokens(head)`` says how many stored tokens the tail must cover (it
        depends on the head's calibration). ``cover`` reads the whole summary
        cover (hierarchical summaries), ``overlap`` reads the tail past the
        newest summary (a strategy that re-sends covered turns beside it).
        ``recall(snapshot)`` may ask for earlier turns, found in the same
        transaction (``store.recall``; by meaning too, with the store's vectors).
        """
        if recall is None:
            with self._db.cursor(write=False) as cur:
                return self._read(cur, tokens, cover, overlap)
        with self._db.read() as conn, closing(conn.connection.cursor()) as cur:
            snapshot = self._read(cur, tokens, cover, overlap)
            if (query := recall(snapshot)) is None:
                return snapshot
            found = candidates(conn, self._segments(cur, snapshot.head), query, self._vectors)
        return replace(snapshot, recalled=found)

    def _read(self, cur: Any, tokens: Callable[[Head], int], cover: bool, lap: bool) -> Snapshot:
        head, sql, cache = self._head(cur), self._sql, self._tail_cache
        segments = self._segments(cur, head)
        return queries.snapshot(cur, sql, head, segments, tokens(head), cover, lap, cache)

    def lineage(self) -> list[Segment]:
        """Itself, then the conversations it was forked from, each up to its fork point."""
        with self._db.cursor(write=False) as cur:
            return self._segments(cur, self._head(cur))

    def summary_cover(self) -> list[Summary]:
        """The stored summaries that together cover the summarized range, oldest first."""
        with self._db.cursor(write=False) as cur:
            return queries.cover(cur, self._sql, self._segments(cur, self._head(cur)))

    # -- the turn commit ----------------------------------------------------------------

    def commit(
        self,
        batch: Sequence[NewMessage],
        *,
        usage: UsageRecord | None = None,
        learn: Learn | None = None,
    ) -> Committed:
        """Store ``batch``, its usage row and what ``learn`` makes of the stored
        calibration, in one transaction; return what was stored.

        A new conversation's row is inserted here too, so it exists only with
        its first turn; a calibration learnt before that (nothing in ``batch``)
        is kept until then.
        """
        if not batch and usage is None and learn is None:
            return Committed([], None)
        if self._unsaved and not batch:
            learnt = learn(self._known_unsaved()) if learn is not None else None
            if learnt is not None:
                previous = self._unsaved_calibration
                self._unsaved_calibration = learnt.following(previous)
            return Committed([], learnt)
        stamp = self._stamp(now())
        stored: list[StoredMessage] = []
        with self._db.cursor(write=True) as cur:
            creating = self._unsaved
            if creating:
                self._create(cur, stamp)
            prior: Correction | None = None
            if batch:
                first, prior, claimed = self._claim(cur, batch, stamp, learning=learn is not None)
                self._insert(cur, batch, first, stamp, stored)
            elif learn is not None:
                cur.execute(self._sql.calibration, (self.id, self.model))
                found = cur.fetchone()
                if found is not None:
                    prior = Correction(factor=found[0], margin=found[1])
            if creating and self._unsaved_calibration is not None:
                prior = self._unsaved_calibration.correction
            learnt = learn(prior) if learn is not None else None
            if creating and self._unsaved_calibration is not None:
                earlier = self._unsaved_calibration
                learnt = learnt.following(earlier) if learnt is not None else earlier
            if usage is not None:
                self._insert_usage(cur, usage, stored[-1].position if stored else None, stamp)
            if learnt is not None:
                cur.execute(
                    self._sql.calibrate,
                    (
                        self.id,
                        self.model,
                        learnt.factor,
                        learnt.margin,
                        learnt.samples,
                        learnt.last_counted,
                        learnt.last_reported,
                        stamp,
                    ),
                )
        self._unsaved, self._unsaved_calibration = False, None
        if batch:
            self._tail_cache.appended(batch, first, claimed, stamp)
        return Committed(stored, learnt)

    def _create(self, cur: Any, stamp: Any) -> None:
        """Insert a lazy conversation's row (with its first commit). If another process
        stored this user's conversation with its key first, this turn goes there."""
        stored = queries.create(cur, self._sql, self._row, stamp)
        if stored != self.id:
            self.id, self._row = stored, replace(self._row, id=stored)
            self._lineage = None
            self._tail_cache.clear()

    def _claim(
        self, cur: Any, batch: Sequence[NewMessage], stamp: Any, *, learning: bool
    ) -> tuple[int, Correction | None, tuple[int, int, int]]:
        """Reserve positions for ``batch``: the first one, and the stored calibration
        when a reply is learnt from (``learning``)."""
        sql = self._sql
        total = 0
        for pending in batch:
            total += pending.row["tokens"]
        count = len(batch)
        claim = (count, count, total, stamp, self.id, self.user)
        if sql.sqlite:  # see statements.CLAIM
            cur.execute(sql.claim_update, claim)
            if not cur.rowcount:
                raise self._gone()
            if learning:
                cur.execute(sql.claimed_learning, (self.model, self.model, self.id))
            else:
                cur.execute(sql.claimed, (self.id,))
        elif learning:
            cur.execute(sql.claim_learning, (*claim, self.model, self.model))
        else:
            cur.execute(sql.claim, claim)
        found = cur.fetchone()
        if found is None:
            raise self._gone()
        prior = None
        if learning and found[3] is not None:
            prior = Correction(factor=found[3], margin=found[4] or 0)
        return found[0] - count, prior, (found[0], found[1], found[2])

    def _known_unsaved(self) -> Correction | None:
        learnt = self._unsaved_calibration
        return learnt.correction if learnt is not None else None

    def _insert(
        self,
        cur: Any,
        batch: Sequence[NewMessage],
        first: int,
        stamp: Any,
        stored: list[StoredMessage],
    ) -> None:
        insert = self._sql.insert_message
        segments: list[Segment] | None = None
        for position, pending in enumerate(batch, start=first):
            row = pending.row
            if row["role"] == "tool":
                if segments is None:
                    segments = self._segments(cur, self._head(cur))
                queries.check_answer(
                    queries.open_calls(cur, self._sql, segments, position), row, self.id
                )
            cur.execute(
                insert,
                (
                    self.id,
                    position,
                    row["role"],
                    row["content"],
                    row["parts"],
                    row["name"],
                    row["tool_calls"],
                    row["tool_call_id"],
                    row["tokens"],
                    stamp,
                    row["meta"],
                    pending.complete,
                    pending.pinned,
                ),
            )
            stored.append(StoredMessage(position=position, tokens=row["tokens"]))

    def _insert_usage(self, cur: Any, usage: UsageRecord, position: int | None, stamp: Any) -> None:
        """The one writer of usage rows."""
        cur.execute(
            self._sql.insert_usage,
            (
                self.id,
                usage.kind,
                usage.model,
                position,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.counted_prompt_tokens,
                usage.latency_ms,
                usage.finish_reason,
                usage.request_id,
                usage.error[:2000] if usage.error is not None else None,
                stamp,
            ),
        )

    def record_usage(self, usage: UsageRecord) -> None:
        """Store a usage row on its own (a failed summarization); nothing while unsaved."""
        if self._unsaved:
            return  # no row to attach it to: a conversation not stored yet has nothing to fold
        with self._db.cursor(write=True) as cur:
            self._insert_usage(cur, usage, usage.position, self._stamp(now()))

    def correction(self) -> Correction | None:
        """The stored calibration of this conversation's model (None: nothing learnt)."""
        if self._unsaved:
            return self._known_unsaved()
        with self._db.cursor(write=False) as cur:
            return self._head(cur).correction

    # -- reading it all -------------------------------------------------------------------

    def entries(self, first: int = 0, last: int | None = None) -> list[Entry]:
        """Stored messages oldest first, optionally only positions ``first..last``."""
        with self._db.cursor(write=False) as cur:
            segments = self._segments(cur, self._head(cur))
            return queries.entries(
                cur, self._sql, segments, first=first, last=last, time=self._time
            )

    def history(self) -> list[dict[str, Any]]:
        """Every stored message, oldest first, as OpenAI-format dicts."""
        with self._db.cursor(write=False) as cur:
            segments = self._segments(cur, self._head(cur))
            found: list[dict[str, Any]] = []
            for conversation_id, upto in reversed(segments):
                limit = queries.NO_LIMIT if upto is None else upto
                cur.execute(self._sql.history, (conversation_id, limit))
                found.extend([from_row(*row) for row in cur.fetchall()])
        return found

    def export(self) -> tuple[ConversationRow, list[Entry]]:
        """The row and every entry, in one snapshot."""
        with self._db.cursor(write=False) as cur:
            row = self._fresh_row(cur)
            segments = self._segments(cur, self._head(cur))
            return row, queries.entries(cur, self._sql, segments, time=self._time)

    def calls(self) -> list[UsageRecord]:
        """Every usage row, oldest first."""
        if self._unsaved:
            return []
        with self._db.cursor(write=False) as cur:
            self._head(cur)
            cur.execute(self._sql.calls, (self.id,))
            rows = cur.fetchall()
        return [UsageRecord(*row[:10], created_at=self._time(row[10])) for row in rows]

    # -- summaries and leases -------------------------------------------------------------

    def store_summary(self, new: NewSummary) -> Summary | None:
        """Insert ``new`` if the summary it extends is still the newest; None if another won.

        A merge (``level`` > 0) replaces no newest summary; the unique range
        rule alone keeps concurrent merges of one range down to one row.
        """
        sql = self._sql
        stamp = self._stamp(now())
        try:
            with self._db.cursor(write=True) as cur:
                if not sql.sqlite:
                    # The row's lock makes the check and the insert one step on
                    # PostgreSQL too (SQLite's BEGIN IMMEDIATE already serializes them).
                    cur.execute(sql.lock_row, (self.id,))
                if new.level == 0:
                    segments = self._segments(cur, self._head(cur))
                    newest = queries.newest_summary(cur, self._sql, segments)
                    if (newest.id if newest else None) != new.based_on:
                        return None
                cur.execute(
                    sql.insert_summary,
                    (
                        self.id,
                        new.start,
                        new.end,
                        new.level,
                        new.text,
                        new.tokens,
                        new.strategy,
                        new.model,
                        new.prompt_version,
                        new.based_on,
                        stamp,
                    ),
                )
                new_id = cur.fetchone()[0]
                if new.usage is not None:
                    self._insert_usage(cur, new.usage, new.end, stamp)
        except Exception as exc:
            if self._db.is_conflict(exc):
                return None  # the same range was stored by a concurrent compaction
            raise
        return Summary(
            id=new_id,
            start=new.start,
            end=new.end,
            text=new.text,
            tokens=new.tokens,
            level=new.level,
        )

    def take_lease(self, level: int) -> leases.Lease | None:
        """The compaction lease of ``level`` (renewed until dropped), or None if another
        holds it (or the conversation is not stored yet: there is nothing to fold)."""
        if self._unsaved:
            return None
        holder = uuid.uuid4().hex
        when = now()
        seconds = leases.IN_PROCESS_LEASE_SECONDS if self._db.in_process else leases.LEASE_SECONDS
        expires = self._stamp(when + timedelta(seconds=seconds))
        try:
            with self._db.cursor(write=True) as cur:
                taken = leases.take(
                    cur, self._sql, self.id, level, holder, expires=expires, now=self._stamp(when)
                )
        except Exception as exc:
            if self._db.is_conflict(exc):
                return None  # another process inserted the lease first
            raise
        if not taken:
            return None
        # An in-memory database dies with this process: nothing to renew.
        renew = None if self._db.in_process else self._renew
        return leases.Lease(self.id, level, holder, renew=renew)

    def _renew(self, lease: leases.Lease) -> bool:
        expires = self._stamp(now() + timedelta(seconds=leases.LEASE_SECONDS))
        with self._db.cursor(write=True) as cur:
            cur.execute(self._sql.renew_lease, (expires, self.id, lease.level, lease.holder))
            return bool(cur.rowcount)

    def drop_lease(self, lease: leases.Lease) -> None:
        lease.stop()
        with self._db.cursor(write=True) as cur:
            cur.execute(self._sql.drop_lease, (self.id, lease.level, lease.holder))

    # -- fork and delete ------------------------------------------------------------------

    def fork(self, at: int | None, *, title: str | None) -> ConversationRow:
        """A new conversation sharing positions ``0..at`` (default: all) with this one."""
        sql = self._sql
        with self._db.cursor(write=True) as cur:
            row = self._fresh_row(cur)
            last = row.next_position - 1
            if at is None:
                at = last
            if isinstance(at, bool) or not isinstance(at, int) or not -1 <= at <= last:
                raise ConfigurationError(
                    f"at must be a position from -1 to {last} (the last message), got {at!r}",
                    conversation_id=self.id,
                )
            count, tokens = queries.prefix_totals(
                cur, sql, self._segments(cur, self._head(cur)), at
            )
            when = now()
            child = ConversationRow(
                id=uuid.uuid4().hex,
                user_id=row.user_id,
                title=title if title is not None else row.title,
                model=row.model,
                system=row.system,
                system_tokens=row.system_tokens,
                counter=row.counter,
                settings=row.settings,
                created_at=when,
                updated_at=when,
                forked_from=self.id if at >= 0 else None,
                fork_position=at if at >= 0 else None,
                next_position=at + 1,
                message_count=count,
                total_tokens=tokens,
            )
            queries.insert_row(cur, sql, child, self._stamp)
        return child

    def delete(self) -> None:
        """Delete the conversation with its summaries and usage; forks keep their messages.

        Each fork first gets the messages (and summaries) it shares with this
        one, and keeps pointing at this one's parent for anything older.
        """
        sql = self._sql
        with self._db.cursor(write=True) as cur:
            queries.delete(cur, sql, self._fresh_row(cur))
        self._tail_cache.clear()
        self._unsaved = False  # a new one deleted before its first turn stays deleted


__all__ = ["ConversationLog", "Learn"]
