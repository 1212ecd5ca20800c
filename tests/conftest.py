"""Shared fixtures. Real binaries and servers only: a missing one fails the run, never skips it."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from service.api import Service
from service.bootstrap import open_service

REQUIRED_BINARIES = ("qemu-img", "qemu-io", "qemu-system-x86_64")

# New VMs default to `--accel auto`, which picks KVM wherever /dev/kvm works. On these machines
# it opens but runs guests ~1000x slower than TCG (nested: DESIGN §4), so every test VM — and
# every CLI or worker process a test starts, which inherits this — runs on TCG. The choice
# itself is unit-tested (tests/test_definition.py).
os.environ.setdefault("SNAPTREE_ACCEL", "tcg")


@pytest.fixture(scope="session", autouse=True)
def required_binaries() -> None:
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(f"missing binaries {missing}: run `make test` (it installs them)", pytrace=False)


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return open_service(str(tmp_path / "home"), "testhost", environ={})


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    """A service for tests that run real QEMUs: none is left running afterwards."""
    s = open_service(str(tmp_path / "home"), "testhost", environ={})
    yield s
    for name in s.app.vm_names():
        live = s.machines.attach(s.app.get_vm(name))
        if live is not None:
            live.stop()


PG_BASE = {
    "PERSISTENCE_MODULE": "eventsourcing.postgres",
    "POSTGRES_DBNAME": os.environ.get("POSTGRES_DBNAME", "test"),
    "POSTGRES_HOST": os.environ.get("POSTGRES_HOST", "127.0.0.1"),
    "POSTGRES_PORT": os.environ.get("POSTGRES_PORT", "5432"),
    "POSTGRES_USER": os.environ.get("POSTGRES_USER", "postgres"),
    "POSTGRES_PASSWORD": os.environ.get("POSTGRES_PASSWORD", ""),
}


def _psql(sql: str) -> None:
    subprocess.run(
        ["psql", "-h", PG_BASE["POSTGRES_HOST"], "-p", PG_BASE["POSTGRES_PORT"],
         "-U", PG_BASE["POSTGRES_USER"], "-d", PG_BASE["POSTGRES_DBNAME"], "-qc", sql],
        check=True, capture_output=True,
    )


@pytest.fixture
def pg_env() -> Iterator[dict[str, str]]:
    """A fresh schema in the real PostgreSQL server, dropped afterwards."""
    schema = f"snaptree_test_{uuid.uuid4().hex[:12]}"
    _psql(f"CREATE SCHEMA {schema}")
    env = dict(PG_BASE, POSTGRES_SCHEMA=schema)
    try:
        yield env
    finally:
        _psql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_service(tmp_path: Path, pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Service:
    for k, v in pg_env.items():
        monkeypatch.setenv(k, v)
    svc = open_service(str(tmp_path / "home"), "testhost")
    assert svc.app.env.get("PERSISTENCE_MODULE") == "eventsourcing.postgres"
    return svc
