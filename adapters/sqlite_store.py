"""The embedded SQLite event store, with its durability made explicit.

`eventsourcing.sqlite` opens the database in WAL mode with SQLite's default `synchronous=FULL`,
so every command waits for an fsync (1-10 ms on these disks). snaptree runs it with
`synchronous=NORMAL`: a killed process still loses nothing committed, and the database is never
corrupted, but a power cut may drop the last commits. That alone could lose data if a worker had
already deleted or rewritten a file on the strength of such a commit, so `durable()` is a barrier
the worker calls before every destructive step: a WAL checkpoint, which in NORMAL mode syncs the WAL
first. `SNAPTREE_SQLITE_SYNCHRONOUS=FULL` restores an fsync per command.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from eventsourcing.sqlite import Factory as SQLiteFactory
from eventsourcing.sqlite import SQLiteConnection, SQLiteConnectionPool

LEVELS = ("NORMAL", "FULL", "EXTRA")


class TunedConnectionPool(SQLiteConnectionPool):
    synchronous: str = "NORMAL"

    def _create_connection(self) -> SQLiteConnection:
        conn = super()._create_connection()
        conn._sqlite_conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return conn


class Factory(SQLiteFactory):
    SQLITE_SYNCHRONOUS = "SNAPTREE_SQLITE_SYNCHRONOUS"

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        level = (self.env.get(self.SQLITE_SYNCHRONOUS) or "NORMAL").upper()
        if level not in LEVELS:
            raise OSError(f"{self.SQLITE_SYNCHRONOUS} must be one of {', '.join(LEVELS)}, not {level!r}")
        # The pool is built inside the datastore; give it the one behaviour it lacks.
        pool = self.datastore.pool
        pool.__class__ = TunedConnectionPool
        pool.synchronous = level

    def durable(self) -> None:
        """Return once every commit so far is on stable storage."""
        conn = sqlite3.connect(self.datastore.pool.db_name, uri=True, timeout=30)
        try:
            conn.execute(f"PRAGMA synchronous={self.datastore.pool.synchronous}")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()
