"""The projections' tables, in the event store's own database, and the one transaction that writes them.

Exactly-once: a batch's view rows and the tracking position (an `eventsourcing` tracking record)
commit in the same database transaction, so after a crash either both landed or neither did.
The transaction first takes a writer lock and checks that the position is still the one the batch
was computed from: two runners (a reader catching up, `projections update`) never apply the same
notifications twice; the loser gets `StalePosition` and starts again from the new position.

SQLite and PostgreSQL differ only in placeholders, table qualification and the lock; the rows are
plain text and integers so both stores hold byte-identical views.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from eventsourcing.application import Application
from eventsourcing.persistence import Tracking, TrackingRecorder

from projections.schema import MERGES, SCHEMA, TIMELINE, TRACKING_NAME, TREE, VIEW_TABLES  # noqa: F401

TABLES = (
    f"CREATE TABLE IF NOT EXISTS {{p}}{TREE} ("
    "vm_id TEXT PRIMARY KEY, vm TEXT NOT NULL, host TEXT NOT NULL, version INTEGER NOT NULL, "
    "doc TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {{p}}{MERGES} ("
    "vm_id TEXT NOT NULL, node TEXT NOT NULL, vm TEXT NOT NULL, seq INTEGER NOT NULL, "
    "item TEXT NOT NULL, calc TEXT NOT NULL, PRIMARY KEY (vm_id, node))",
    f"CREATE TABLE IF NOT EXISTS {{p}}{TIMELINE} ("
    "notification_id BIGINT PRIMARY KEY, vm_id TEXT NOT NULL, vm TEXT NOT NULL, "
    "version INTEGER NOT NULL, at TEXT NOT NULL, at_us BIGINT NOT NULL, event TEXT NOT NULL, "
    "request_id TEXT, summary TEXT NOT NULL)",
    f"CREATE INDEX IF NOT EXISTS {TIMELINE}_vm ON {{p}}{TIMELINE} (vm_id, version)",
)

TIMELINE_COLUMNS = (
    "notification_id", "vm_id", "vm", "version", "at", "at_us", "event", "request_id", "summary",
)


class StalePosition(Exception):
    """Another runner committed since this batch was read: recompute from the new position."""


@dataclass
class TreeRow:
    vm_id: str
    vm: str
    host: str  # not in the stable JSON; the text rendering shows it
    version: int
    doc: dict[str, Any]  # `tree_json(vm)` without byte counts


@dataclass
class MergeRow:
    node: str
    seq: int  # display order (the `merges --json` order)
    row: dict[str, Any]  # a `merges --json` row without byte counts
    calc: dict[str, Any]  # what a reader needs to add byte counts: layer files, dependents' files


@dataclass
class ViewBatch:
    """Every view change that one run of notifications makes."""

    trees: list[TreeRow] = field(default_factory=list)
    merges: dict[str, tuple[str, list[MergeRow]]] = field(default_factory=dict)  # vm_id -> (vm, rows)
    timeline: list[tuple[Any, ...]] = field(default_factory=list)  # TIMELINE_COLUMNS


def dumps(obj: Any) -> str:
    # Compact and key-order preserving: what is stored is exactly what is served.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class ViewStore(ABC):
    """The views of one application's event store."""

    placeholder = "?"

    def __init__(self, app: Application[Any]) -> None:
        self.app = app
        self.datastore: Any = app.factory.datastore  # type: ignore[attr-defined]
        # The library's own tracking table and upsert (it refuses to move a position backwards).
        self.tracking: TrackingRecorder = app.factory.tracking_recorder()
        self.prefix = self._table_prefix()
        with self.datastore.transaction(commit=True) as cur:
            for statement in TABLES:
                cur.execute(statement.format(p=self.prefix))

    # --- dialect ---

    @abstractmethod
    def _table_prefix(self) -> str: ...

    @abstractmethod
    def _tracking_table(self) -> str: ...

    @abstractmethod
    @contextmanager
    def _locked_transaction(self) -> Iterator[Any]:
        """A write transaction that holds the projections' writer lock from its first statement."""

    def _sql(self, statement: str) -> str:
        sql = statement.format(p=self.prefix, tracking=self._tracking_table())
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    # --- writing ---

    def position(self) -> int:
        return self.tracking.max_tracking_id(TRACKING_NAME) or 0

    def commit(self, batch: ViewBatch, expected: int, upto: int) -> None:
        """Write the batch and move the position from `expected` to `upto`, atomically."""
        with self._locked_transaction() as cur:
            if self._position(cur) != expected:
                raise StalePosition(f"position moved from {expected}")
            self._write(cur, batch)
            self._after_views_written()
            self.tracking._insert_tracking(cur, Tracking(TRACKING_NAME, upto))  # type: ignore[attr-defined]

    def _after_views_written(self) -> None:
        """A seam for tests: raising here must leave neither the views nor the position changed."""

    def reset(self) -> None:
        """Empty every view and forget the position, in one transaction (the start of a rebuild)."""
        with self._locked_transaction() as cur:
            for table in VIEW_TABLES:
                cur.execute(self._sql(f"DELETE FROM {{p}}{table}"))
            cur.execute(self._sql("DELETE FROM {tracking} WHERE application_name = ?"), (TRACKING_NAME,))

    def _position(self, cur: Any) -> int:
        cur.execute(
            self._sql("SELECT MAX(notification_id) AS n FROM {tracking} WHERE application_name = ?"),
            (TRACKING_NAME,),
        )
        row = cur.fetchone()
        return (row["n"] if row is not None else None) or 0

    def _write(self, cur: Any, batch: ViewBatch) -> None:
        if batch.trees:
            cur.executemany(
                self._sql(
                    f"INSERT INTO {{p}}{TREE} (vm_id, vm, host, version, doc) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (vm_id) DO UPDATE SET vm = excluded.vm, host = excluded.host, "
                    "version = excluded.version, doc = excluded.doc"
                ),
                [(t.vm_id, t.vm, t.host, t.version, dumps(t.doc)) for t in batch.trees],
            )
        for vm_id, (vm, rows) in batch.merges.items():
            cur.execute(self._sql(f"DELETE FROM {{p}}{MERGES} WHERE vm_id = ?"), (vm_id,))
            if rows:
                cur.executemany(
                    self._sql(
                        f"INSERT INTO {{p}}{MERGES} (vm_id, node, vm, seq, item, calc) "
                        "VALUES (?, ?, ?, ?, ?, ?)"
                    ),
                    [(vm_id, r.node, vm, r.seq, dumps(r.row), dumps(r.calc)) for r in rows],
                )
        if batch.timeline:
            cols = ", ".join(TIMELINE_COLUMNS)
            marks = ", ".join("?" * len(TIMELINE_COLUMNS))
            cur.executemany(
                self._sql(f"INSERT INTO {{p}}{TIMELINE} ({cols}) VALUES ({marks})"), batch.timeline
            )

    # --- reading ---

    def _select(self, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
        with self.datastore.transaction(commit=False) as cur:
            cur.execute(self._sql(statement), params)
            return list(cur.fetchall())

    def tree_row(self, vm_id: str) -> tuple[str, str, int] | None:
        """(doc JSON, host, version) of the VM's tree."""
        rows = self._select(f"SELECT doc, host, version FROM {{p}}{TREE} WHERE vm_id = ?", (vm_id,))
        return (rows[0]["doc"], rows[0]["host"], rows[0]["version"]) if rows else None

    def merge_rows(self, vm_id: str | None) -> list[tuple[str, str]]:
        """(item, calc) JSON texts, by VM name then display order."""
        if vm_id is None:
            rows = self._select(f"SELECT item, calc FROM {{p}}{MERGES} ORDER BY vm, seq")
        else:
            rows = self._select(
                f"SELECT item, calc FROM {{p}}{MERGES} WHERE vm_id = ? ORDER BY seq", (vm_id,)
            )
        return [(r["item"], r["calc"]) for r in rows]

    def timeline(self, vm_id: str) -> list[dict[str, Any]]:
        cols = ", ".join(TIMELINE_COLUMNS)
        rows = self._select(
            f"SELECT {cols} FROM {{p}}{TIMELINE} WHERE vm_id = ? ORDER BY version", (vm_id,)
        )
        return [{c: r[c] for c in TIMELINE_COLUMNS} for r in rows]

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every view, in key order (rebuild equivalence)."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table, key in ((TREE, "vm_id"), (MERGES, "vm_id, node"), (TIMELINE, "notification_id")):
            rows = self._select(f"SELECT * FROM {{p}}{table} ORDER BY {key}")
            out[table] = [tuple(r[k] for k in r.keys()) for r in rows]
        return out


class SQLiteViewStore(ViewStore):
    def _table_prefix(self) -> str:
        return ""

    def _tracking_table(self) -> str:
        return "tracking"

    @contextmanager
    def _locked_transaction(self) -> Iterator[Any]:
        # BEGIN IMMEDIATE takes SQLite's write lock up front, so the position read next is current
        # (a deferred BEGIN would read an older snapshot and fail only at the first write).
        with self.datastore.get_connection(commit=True) as conn:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
                conn.commit()
            except BaseException:
                conn.rollback()
                raise


class PostgresViewStore(ViewStore):
    placeholder = "%s"

    def _table_prefix(self) -> str:
        return f'"{self.datastore.schema}".'

    def _tracking_table(self) -> str:
        return f'"{self.datastore.schema}"."{self.tracking.tracking_table_name}"'  # type: ignore[attr-defined]

    @contextmanager
    def _locked_transaction(self) -> Iterator[Any]:
        # A transaction-scoped advisory lock: released by the commit or rollback, never leaked.
        with self.datastore.transaction(commit=True) as cur:
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))",
                (f"{self.datastore.schema}.{TRACKING_NAME}",),
            )
            yield cur


def open_store(app: Application[Any]) -> ViewStore:
    from eventsourcing.sqlite import SQLiteDatastore

    datastore = getattr(app.factory, "datastore", None)
    if isinstance(datastore, SQLiteDatastore):
        return SQLiteViewStore(app)
    from eventsourcing.postgres import PostgresDatastore  # 0.2 s of imports: only when it is used

    if isinstance(datastore, PostgresDatastore):
        return PostgresViewStore(app)
    raise RuntimeError(f"projections need the SQLite or PostgreSQL store, not {type(datastore).__name__}")
