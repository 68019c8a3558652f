"""Compaction leases: one compaction per conversation and level at a time.

A lease is a row that lasts ``LEASE_SECONDS`` (a few seconds), and its holder
renews it from a background thread every third of that for as long as it
compacts, through the long summarizer call included. A holder that dies
(kill -9, a power cut, a lost host) stops renewing, so its lease lapses
within seconds and the next compaction takes over; with a lease sized for
the slowest summarizer call, a crash loop would never get a summary made.
We chose a short renewed lease over checking whether the holder's pid is
alive: a pid means nothing on another host, or in another container, and
PostgreSQL serves many of both; the lease needs only the database and
clocks that agree to within a second or two.

The lease only saves work. Should it lapse under a live holder (a renewal
stalled past ``LEASE_SECONDS``, a skewed clock), two compactions may call
the summarizer for one range, but only one summary is stored: storing a
summary takes the conversation row's lock and succeeds only if the summary
it was built on is still the newest (``ConversationLog.store_summary``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from conversation_memory.errors import StoreError
from conversation_memory.store.statements import Statements

LEASE_SECONDS = 6.0
"""How long a lease lasts unless its holder renews it (every third of this):
how long a dead holder can block the compaction of its conversation."""
IN_PROCESS_LEASE_SECONDS = 86_400.0
"""The lease on an in-memory database, which dies with the process holding it:
never renewed (all threads share its one connection), dropped when done."""


class Lease:
    """A lease this process holds; renewed by a thread of its own until dropped."""

    def __init__(
        self,
        conversation_id: str,
        level: int,
        holder: str,
        *,
        renew: Callable[[Lease], bool] | None,
    ) -> None:
        self.conversation_id = conversation_id
        self.level = level
        self.holder = holder
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        if renew is not None:
            self._renewer = threading.Thread(
                target=self._renew_until_stopped,
                args=(renew,),
                name=f"convmem-lease-{conversation_id[:8]}",
                daemon=True,  # never keeps the interpreter alive; the lease then lapses
            )
            self._renewer.start()

    def _renew_until_stopped(self, renew: Callable[[Lease], bool]) -> None:
        """Push the expiry forward every third of ``LEASE_SECONDS`` until stopped."""
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                kept = renew(self)
            except StoreError:
                continue  # e.g. locked past busy_timeout: the next beat tries again
            if not kept:
                return  # it lapsed and was taken over; storing a summary stays safe

    def stop(self) -> None:
        """Stop renewing (no I/O): a lease nobody drops lapses within ``LEASE_SECONDS``."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join()
            self._renewer = None


def take(
    cur: Any,
    sql: Statements,
    conversation_id: str,
    level: int,
    holder: str,
    *,
    expires: Any,
    now: Any,
) -> bool:
    """Take the lease for ``holder`` if it is free or has lapsed; False if another holds it.

    Two processes inserting a free lease at once: the second's insert fails
    (the caller treats that as held by another).
    """
    cur.execute(sql.take_expired_lease, (holder, expires, conversation_id, level, now))
    if cur.rowcount:
        return True
    cur.execute(sql.lease_holder, (conversation_id, level))
    if cur.fetchone() is not None:
        return False
    cur.execute(sql.insert_lease, (conversation_id, level, holder, expires))
    return True


__all__ = ["IN_PROCESS_LEASE_SECONDS", "LEASE_SECONDS", "Lease", "take"]
