"""Persistence, and the only place with SQL.

- ``opening``: the one way to open a store (file checks, creation, migration
  preflight, ``create=False``, ``upgrade=``), for ``Memory``, ``AsyncMemory``
  and ``convmem db``;
- ``log``: every statement about one conversation (the snapshot read, the
  turn commit, summaries, usage, calibration, forks), on the DBAPI cursor with
  the fixed SQL of ``statements``; ``leases``: compaction leases;
- ``catalogue``: what spans conversations (create, list, count, find, erase a
  user, import);
- ``values``: the plain values going in and out (never a row);
- ``database``: URLs, connection hygiene, transactions; ``schema`` and
  ``migrate``: the tables and their migrations.

Only ``opening``, ``values``, ``database`` (its ``Database`` and
``parse_target``) and ``migrate`` are used from outside the store (``migrate``
by ``conversation_memory.admin``, the public door of ``convmem db``); nothing
outside it imports SQLAlchemy or the schema.
"""
