"""Raw reads of the event store's own tables: a VM's events and aggregate snapshots as plain rows.

The library's `select_events` builds an object (and parses a UUID) per row; replaying 100k events
cannot afford that, so these queries return `(originator_version, topic, state)` tuples straight
from the recorder's table, on SQLite or PostgreSQL.
"""

from __future__ import annotations

from typing import Any, Iterator
from uuid import UUID

from domain.application import Snaptree
from domain.errors import UnknownVM
from domain.names import validate_name
from domain.names import vm_id

Row = tuple[int, str, bytes]  # (originator_version, topic, state)
CHUNK = 20_000  # rows per query: bounded memory for long histories


def event_chunks(
    app: Snaptree, aggregate_id: UUID, gt: int = 0, lte: int | None = None
) -> Iterator[list[Row]]:
    """The aggregate's stored events in version order, as lists of plain tuples (one per query)."""
    while True:
        rows = _select(app.recorder, aggregate_id, gt, lte, limit=CHUNK)
        if rows:
            yield rows
        if len(rows) < CHUNK:
            return
        gt = rows[-1][0]


def latest_snapshot_row(app: Snaptree, aggregate_id: UUID, lte: int) -> Row | None:
    """The newest aggregate snapshot taken at or below version `lte`, if any."""
    if app.snapshots is None:
        return None
    rows = _select(app.snapshots.recorder, aggregate_id, 0, lte, limit=1, desc=True)
    return rows[0] if rows else None


def _select(
    recorder: Any, aggregate_id: UUID, gt: int, lte: int | None, *, limit: int, desc: bool = False
) -> list[Row]:
    # Raw SQL on the recorder's own table: the library's select builds objects per row.
    datastore = recorder.datastore
    table = recorder.events_table_name
    postgres = hasattr(datastore, "schema")
    if postgres:
        table = f'"{datastore.schema}"."{table}"'
    mark = "%s" if postgres else "?"
    key: Any = aggregate_id if postgres else aggregate_id.hex
    sql = (
        f"SELECT originator_version, topic, state FROM {table} WHERE originator_id = {mark} "
        f"AND originator_version > {mark} AND originator_version <= {mark} "
        f"ORDER BY originator_version {'DESC' if desc else 'ASC'} LIMIT {int(limit)}"
    )
    with datastore.transaction(commit=False) as cur:
        if not postgres:
            cur.sqlite_cursor.row_factory = None  # plain tuples: no Row object per event
        cur.execute(sql, (key, gt, lte if lte is not None else 2**62))
        rows = cur.fetchall()
    if postgres:  # dict rows
        return [(r["originator_version"], r["topic"], bytes(r["state"])) for r in rows]
    return list(rows)


def event_rows(app: Snaptree, aggregate_id: UUID, gt: int = 0, lte: int | None = None) -> Iterator[Row]:
    for chunk in event_chunks(app, aggregate_id, gt, lte):
        yield from chunk


def latest_version(app: Snaptree, name: str) -> int:
    """The VM's last version, off the index alone (no aggregate is loaded)."""
    validate_name(name, "VM name")
    rows = _select(app.recorder, vm_id(name), 0, None, limit=1, desc=True)
    if not rows:
        raise UnknownVM(f"no VM named {name!r}")
    return rows[0][0]
