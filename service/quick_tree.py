"""`tree VM` straight from the embedded store's tree view, when the view is current.

The whole read path (the event store library, the aggregate and its event classes, QEMU's
adapters) costs several times what `tree` itself does. When the views have followed every event
the answer is the VM's tree row plus byte counts, so this reads it with sqlite3 alone, in one read
transaction. Anything else — another store, views behind the log (catching up needs the
aggregate), a VM the log does not know, a bad name, any error — answers None and the caller takes
the full path (service/queries.py), which gives the same document.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any
from urllib.parse import quote

from adapters.config import embedded_db, private_store
from adapters.storage import DataDir
from domain.errors import InvalidName
from domain.names import validate_name, vm_id
from projections.schema import TRACKING_NAME, TREE
from projections.tree_doc import fill_bytes
from service.disk_bytes import measure

EVENTS = "stored_events"  # the library's table; its rowid is the notification id
LOCK_TIMEOUT = 30.0  # as the store's SQLITE_LOCK_TIMEOUT


def current_tree(data: DataDir, vm_name: str) -> tuple[dict[str, Any], str] | None:
    """(`tree VM --json` document, the VM's host) when the view has every event, else None."""
    db = embedded_db(data)
    if db is None or not os.path.isfile(db):
        return None
    try:
        name = validate_name(vm_name, "VM name")
    except InvalidName:
        return None
    try:
        row = _read(db, vm_id(name).hex, str(vm_id(name)))
    except sqlite3.Error:
        return None
    if row is None:
        return None
    private_store(data)  # as opening the store does
    doc: dict[str, Any] = json.loads(row[0])
    fill_bytes(doc, measure)
    return doc, row[1]


def _read(db: str, originator: str, view_key: str) -> tuple[str, str] | None:
    conn = sqlite3.connect(f"file:{quote(db)}?mode=ro", uri=True, timeout=LOCK_TIMEOUT,
                           isolation_level=None)
    try:
        conn.execute("BEGIN")  # one snapshot for the checks and the row
        known = conn.execute(f"SELECT 1 FROM {EVENTS} WHERE originator_id = ? LIMIT 1",
                             (originator,)).fetchone()
        position = conn.execute("SELECT MAX(notification_id) FROM tracking WHERE application_name = ?",
                                (TRACKING_NAME,)).fetchone()[0]
        last = conn.execute(f"SELECT MAX(rowid) FROM {EVENTS}").fetchone()[0]
        if known is None or position is None or position != last:
            return None
        row = conn.execute(f"SELECT doc, host FROM {TREE} WHERE vm_id = ?", (view_key,)).fetchone()
        return (row[0], row[1]) if row is not None else None
    finally:
        conn.close()  # a read transaction: nothing to commit
