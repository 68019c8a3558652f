"""The conversation log's SQL, written once and prepared for each backend.

Every statement about one conversation is a fixed string run on the DBAPI
cursor (see ``Database.cursor``), with positional parameters. Appending a
message and reading what the next context needs run on every turn, and
measured here SQLAlchemy Core spent several times SQLite's own work on them
(statement compilation, parameter processing, result rows); named
parameters cost the driver a dict lookup per value too. The strings are
what Core compiled for the tables in ``schema``, with ``?`` for each value;
PostgreSQL's driver gets ``%s``.
"""

from __future__ import annotations

_COLUMNS = (
    "id, user_id, title, model, system, system_tokens, counter, settings, created_at, "
    "updated_at, forked_from, fork_position, next_position, message_count, total_tokens, key"
)
_ITEMS = "position, role, content, parts, name, tool_calls, tool_call_id, tokens, pinned, complete"
_SUMMARY_COLUMNS = "id, start_position, end_position, text, tokens, level"

# The row, as ConversationRow reads it.
ROW = f"SELECT {_COLUMNS} FROM conversations WHERE id = ? AND user_id = ?"
INSERT_ROW = f"""
INSERT INTO conversations ({_COLUMNS})
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# A lazily created conversation's row, inserted by its first turn; DO NOTHING: two
# threads sharing one new Conversation object may both try, and the second appends;
# two processes creating one new key both try too, and the second appends to the
# first's (ConversationLog._create).
CREATE = """
INSERT INTO conversations (id, user_id, title, model, system, system_tokens, counter, settings,
                           created_at, updated_at, next_position, message_count, total_tokens,
                           key)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, ?)
ON CONFLICT DO NOTHING
"""
KEYED = "SELECT id FROM conversations WHERE user_id = ? AND key = ?"
# Reserves positions, moves the running totals and takes the row's write lock.
# PostgreSQL returns the claim in the same statement. On SQLite, whose writers
# are already one at a time (BEGIN IMMEDIATE), a plain UPDATE and a SELECT of
# the row cost ~5 us less than UPDATE ... RETURNING (measured): an append's
# claim is then CLAIM_UPDATE and CLAIMED.
CLAIM = """
UPDATE conversations
   SET next_position = next_position + ?, message_count = message_count + ?,
       total_tokens = total_tokens + ?, updated_at = ?
 WHERE id = ? AND user_id = ?
RETURNING next_position, message_count, total_tokens
"""
CLAIM_UPDATE = """
UPDATE conversations
   SET next_position = next_position + ?, message_count = message_count + ?,
       total_tokens = total_tokens + ?, updated_at = ?
 WHERE id = ? AND user_id = ?
"""
CLAIMED = "SELECT next_position, message_count, total_tokens FROM conversations WHERE id = ?"
# The same, with the stored calibration: a turn that learns from its reply reads
# what it learns from in its own transaction, with no extra statement.
_CALIBRATION_OF_ROW = """
(SELECT factor FROM calibrations k WHERE k.conversation_id = conversations.id AND k.model = ?),
(SELECT margin FROM calibrations k WHERE k.conversation_id = conversations.id AND k.model = ?)
"""
CLAIM_LEARNING = f"""
UPDATE conversations
   SET next_position = next_position + ?, message_count = message_count + ?,
       total_tokens = total_tokens + ?, updated_at = ?
 WHERE id = ? AND user_id = ?
RETURNING next_position, message_count, total_tokens, {_CALIBRATION_OF_ROW}
"""
CLAIMED_LEARNING = f"""
SELECT next_position, message_count, total_tokens, {_CALIBRATION_OF_ROW}
  FROM conversations WHERE id = ?
"""
INSERT_MESSAGE = """
INSERT INTO messages (conversation_id, position, role, content, parts, name, tool_calls,
                      tool_call_id, tokens, created_at, meta, complete, pinned)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# The row and its calibration in one round trip.
HEAD = """
SELECT c.system, c.system_tokens, c.forked_from, c.fork_position, c.next_position,
       c.message_count, c.total_tokens, k.factor, k.margin, c.updated_at
  FROM conversations c
  LEFT JOIN calibrations k ON k.conversation_id = c.id AND k.model = ?
 WHERE c.id = ? AND c.user_id = ?
"""
PARENT = "SELECT forked_from, fork_position FROM conversations WHERE id = ?"
TAIL = f"""
SELECT {_ITEMS} FROM messages
 WHERE conversation_id = ? AND position <= ? AND position > ?
 ORDER BY position DESC LIMIT ?
"""
# "AND pinned" must match the partial index's predicate word for word, or
# SQLite walks every row of the conversation instead of using it.
PINNED = f"""
SELECT {_ITEMS} FROM messages
 WHERE conversation_id = ? AND position <= ? AND pinned
 ORDER BY position
"""
# Tool-call answers: the kinds of the newest messages, newest first.
RECENT = """
SELECT position, role, tool_calls, tool_call_id FROM messages
 WHERE conversation_id = ? AND position <= ?
 ORDER BY position DESC LIMIT ?
"""
ENTRIES = f"""
SELECT {_ITEMS}, created_at, meta FROM messages
 WHERE conversation_id = ? AND position <= ? AND position >= ?
 ORDER BY position
"""
HISTORY = """
SELECT role, content, parts, name, tool_calls, tool_call_id FROM messages
 WHERE conversation_id = ? AND position <= ?
 ORDER BY position
"""
PREFIX_TOTALS = """
SELECT count(*), coalesce(sum(tokens), 0) FROM messages
 WHERE conversation_id = ? AND position <= ?
"""

NEWEST_SUMMARY = f"""
SELECT {_SUMMARY_COLUMNS} FROM summaries
 WHERE conversation_id = ? AND end_position <= ?
 ORDER BY end_position DESC, level DESC LIMIT 1
"""
COVER_STEP = f"""
SELECT {_SUMMARY_COLUMNS} FROM summaries
 WHERE conversation_id = ? AND start_position = ? AND end_position <= ?
 ORDER BY end_position DESC, level DESC LIMIT 1
"""
INSERT_SUMMARY = """
INSERT INTO summaries (conversation_id, start_position, end_position, level, text, tokens,
                       strategy, model, prompt_version, based_on, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
RETURNING id
"""
# PostgreSQL only: a summary's check-and-insert holds the row's lock (SQLite's
# BEGIN IMMEDIATE already serializes writers).
LOCK_ROW = "SELECT id FROM conversations WHERE id = ? FOR UPDATE"

CALIBRATION = "SELECT factor, margin FROM calibrations WHERE conversation_id = ? AND model = ?"
CALIBRATE = """
INSERT INTO calibrations (conversation_id, model, factor, margin, samples, last_counted,
                          last_reported, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (conversation_id, model) DO UPDATE
   SET factor = excluded.factor, margin = excluded.margin,
       samples = calibrations.samples + excluded.samples,
       last_counted = excluded.last_counted, last_reported = excluded.last_reported,
       updated_at = excluded.updated_at
"""

INSERT_USAGE = """
INSERT INTO usage (conversation_id, kind, model, position, prompt_tokens, completion_tokens,
                   counted_prompt_tokens, latency_ms, finish_reason, request_id, error,
                   created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
CALLS = """
SELECT kind, model, prompt_tokens, completion_tokens, counted_prompt_tokens, latency_ms,
       finish_reason, request_id, error, position, created_at
  FROM usage WHERE conversation_id = ? ORDER BY id
"""

TAKE_EXPIRED_LEASE = """
UPDATE compaction_leases SET holder = ?, expires_at = ?
 WHERE conversation_id = ? AND level = ? AND expires_at < ?
"""
LEASE_HOLDER = "SELECT holder FROM compaction_leases WHERE conversation_id = ? AND level = ?"
INSERT_LEASE = """
INSERT INTO compaction_leases (conversation_id, level, holder, expires_at) VALUES (?, ?, ?, ?)
"""
RENEW_LEASE = """
UPDATE compaction_leases SET expires_at = ?
 WHERE conversation_id = ? AND level = ? AND holder = ?
"""
DROP_LEASE = "DELETE FROM compaction_leases WHERE conversation_id = ? AND level = ? AND holder = ?"

# Deleting one conversation: each fork first gets the messages and summaries it
# shares with it, and points past it to its parent.
FORKS_OF = "SELECT id, fork_position FROM conversations WHERE forked_from = ?"
_MESSAGE_DATA = (
    "position, role, content, parts, name, tool_calls, tool_call_id, tokens, created_at, "
    "meta, complete, pinned"
)
COPY_MESSAGES = f"""
INSERT INTO messages (conversation_id, {_MESSAGE_DATA})
SELECT ?, {_MESSAGE_DATA} FROM messages WHERE conversation_id = ? AND position <= ?
"""
_SUMMARY_DATA = (
    "start_position, end_position, level, text, tokens, strategy, model, prompt_version, created_at"
)
COPY_SUMMARIES = f"""
INSERT INTO summaries (conversation_id, {_SUMMARY_DATA})
SELECT ?, {_SUMMARY_DATA} FROM summaries WHERE conversation_id = ? AND end_position <= ?
"""
REPOINT_FORK = "UPDATE conversations SET forked_from = ?, fork_position = ? WHERE id = ?"
# Derived rows go explicitly too: a backend without enforced cascades must not
# keep summaries or usage of erased messages.
DELETE = (
    *(
        f"DELETE FROM {table} WHERE conversation_id = ?"
        for table in ("usage", "summaries", "calibrations", "compaction_leases", "messages")
    ),
    "DELETE FROM conversations WHERE id = ?",
)


class Statements:
    """The statements above in one backend's parameter style."""

    row: str
    insert_row: str
    create: str
    keyed: str
    claim: str
    claim_update: str
    claimed: str
    claim_learning: str
    claimed_learning: str
    insert_message: str
    head: str
    parent: str
    tail: str
    pinned: str
    recent: str
    entries: str
    history: str
    prefix_totals: str
    newest_summary: str
    cover_step: str
    insert_summary: str
    lock_row: str
    calibration: str
    calibrate: str
    insert_usage: str
    calls: str
    take_expired_lease: str
    lease_holder: str
    insert_lease: str
    renew_lease: str
    drop_lease: str
    forks_of: str
    copy_messages: str
    copy_summaries: str
    repoint_fork: str
    delete: tuple[str, ...]

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"
        source = globals()
        for name in self.__annotations__:
            if name != "delete":
                setattr(self, name, self.prepare(source[name.upper()]))
        self.delete = tuple(self.prepare(sql) for sql in DELETE)

    def prepare(self, sql: str) -> str:
        sql = " ".join(sql.split())
        return sql if self.sqlite else sql.replace("?", "%s")
