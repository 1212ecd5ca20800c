"""Builds the application from the environment: the embedded default or the PostgreSQL store.

With no configuration, events go to SQLite in the data directory. Setting the `eventsourcing`
variables (PERSISTENCE_MODULE=eventsourcing.postgres, POSTGRES_DBNAME, POSTGRES_HOST, ...)
selects PostgreSQL instead; everything else stays the same.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from adapters.storage import DataDir

if TYPE_CHECKING:
    from domain.application import Snaptree

TRANSCODER = "adapters.transcoder:MsgpackTranscoder"
SQLITE_FACTORY = "adapters.sqlite_store:Factory"


def store_env(data: DataDir, environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = dict(os.environ if environ is None else environ)
    env = {"TRANSCODER_TOPIC": TRANSCODER}
    module = environ.get("PERSISTENCE_MODULE", "")
    if not module or module in ("eventsourcing.sqlite", SQLITE_FACTORY):
        env["PERSISTENCE_MODULE"] = SQLITE_FACTORY
        env["SQLITE_DBNAME"] = environ.get("SQLITE_DBNAME") or str(data.event_db)
        env.setdefault("SQLITE_LOCK_TIMEOUT", environ.get("SQLITE_LOCK_TIMEOUT", "30"))
        if "SNAPTREE_SQLITE_SYNCHRONOUS" in environ:
            env["SNAPTREE_SQLITE_SYNCHRONOUS"] = environ["SNAPTREE_SQLITE_SYNCHRONOUS"]
    return env


def embedded_db(data: DataDir, environ: dict[str, str] | None = None) -> str | None:
    """The embedded store's database file when that is the store (a plain path), else None."""
    env = store_env(data, environ)
    if env.get("PERSISTENCE_MODULE") != SQLITE_FACTORY or env["SQLITE_DBNAME"].startswith(("file:", ":")):
        return None
    return env["SQLITE_DBNAME"]


def open_app(data: DataDir | None = None, environ: dict[str, str] | None = None) -> Snaptree:
    from domain.application import Snaptree  # the domain and the library: only for a store

    data = data or DataDir.open()
    env = store_env(data, environ)
    for attempt in range(5):
        try:
            app = Snaptree(layout=data, env=env)
            private_store(data)
            return app
        except Exception as exc:  # noqa: BLE001
            # PostgreSQL: processes that start together race on CREATE OR REPLACE FUNCTION
            # ("tuple concurrently updated"); the second try finds it done.
            if "concurrently" in str(exc) and attempt < 4:
                time.sleep(0.1 * (attempt + 1))
                continue
            if env.get("PERSISTENCE_MODULE") == SQLITE_FACTORY and os.path.isfile(data.event_db):
                return _read_only(data, env, exc)
            raise
    raise AssertionError("unreachable")


def _read_only(data: DataDir, env: dict[str, str], cause: Exception) -> Snaptree:
    """The embedded store when it cannot be opened for writing (a full or read-only disk):
    read as it is on disk, so that `tree`, `merges` and the audit still answer. Once no other
    process has it open, SQLite has put every commit into the file itself."""
    from domain.application import Snaptree

    ro = dict(env, SQLITE_DBNAME=f"file:{data.event_db}?immutable=1", CREATE_TABLE="false")
    try:
        app = Snaptree(layout=data, env=ro)
    except Exception:  # noqa: BLE001 - the first error says what is wrong
        raise cause from None
    app.read_only = True
    return app


def private_store(data: DataDir) -> None:
    """The embedded store holds every VM's history: 0600, with its WAL and shared memory."""
    for suffix in ("", "-wal", "-shm"):
        path = f"{data.event_db}{suffix}"
        if os.path.exists(path):
            os.chmod(path, 0o600)


def durable(app: Snaptree) -> None:
    """A barrier before destructive disk work: every recorded event is on stable storage.

    PostgreSQL commits synchronously already; the embedded SQLite store needs a WAL sync.
    """
    barrier = getattr(app.factory, "durable", None)
    if barrier is not None:
        barrier()


def this_host() -> str:
    return os.environ.get("SNAPTREE_HOST") or socket.gethostname()
