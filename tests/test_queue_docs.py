"""docs/queue.md says what the code does: its reference part is the schema, and it names every
error code the code can answer with."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

from adapters import queue_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "queue.md"


def test_the_reference_in_docs_is_the_schema() -> None:
    text = DOC.read_text()
    assert queue_reference.reference() in text, "run: python -m adapters.queue_reference"


def test_every_error_code_in_the_code_is_documented() -> None:
    codes: set[str] = set()
    for package in ("domain", "adapters", "projections", "service", "workers"):
        for info in pkgutil.walk_packages([str(DOC.parent.parent / package)], prefix=f"{package}."):
            if info.name.startswith("adapters.cli"):
                continue
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                code = cls.__dict__.get("code")
                if isinstance(code, str) and issubclass(cls, BaseException):
                    codes.add(code)
    missing = codes - set(queue_reference.ERROR_CODES)
    assert not missing, f"undocumented error codes: {sorted(missing)}"
