"""The CLI's output contract (docs/output.md): results on stdout, one error line on stderr.

Exit status 2: the command was refused and nothing changed. 1: it failed while doing it (what
was recorded is said in the message). With `--json` the same status, and
`{"error": {"code", "message"}}` on stdout as well. 130 / 143: interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, NoReturn

import click

REFUSED = 2
FAILED = 1


def emit(data: Any, as_json: bool, text: str | None = None) -> None:
    if as_json:
        import json

        click.echo(json.dumps(data, indent=2, sort_keys=False))
    elif text is not None:
        click.echo(text)


def fail(status: int, code: str, message: str, as_json: bool) -> NoReturn:
    message = " ".join(str(message).split()) or code
    click.echo(f"snaptree: error: {message}", err=True)
    if as_json:
        import json

        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    sys.exit(status)


def classify(exc: BaseException) -> tuple[int, str, str] | None:
    """(exit status, error code, message) for an error the contract covers; None: a bug."""
    from domain.errors import Refused, SnaptreeError

    if isinstance(exc, Refused):
        return REFUSED, exc.code, exc.message
    if isinstance(exc, SnaptreeError):
        return FAILED, exc.code, exc.message
    import sqlite3

    from eventsourcing.persistence import PersistenceError

    if isinstance(exc, (PersistenceError, sqlite3.Error)):
        if "readonly database" in str(exc) or "disk is full" in str(exc) or "disk I/O error" in str(exc):
            return FAILED, "store", f"the event store cannot be written now (is its disk full or read-only?): {exc}; nothing was recorded"
        return FAILED, "store", f"the event store failed: {exc}"
    if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ in ("QemuImgError", "Qcow2Error"):
        return FAILED, getattr(exc, "code", "failed"), str(exc)
    return None


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds `--json` and maps every error to the exit statuses above."""

    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    @functools.wraps(fn)
    def wrapper(ctx: Any, *args: Any, as_json: bool, **kwargs: Any) -> Any:
        try:
            return fn(ctx, *args, as_json=as_json, **kwargs)
        except Exception as exc:
            found = classify(exc)
            if found is None:
                raise
            fail(found[0], found[1], found[2], as_json)

    return wrapper


def wait_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--no-wait", is_flag=True, help="Return once recorded; a worker does the disk work later."
    )(fn)


def progress_printer(enabled: bool) -> Callable[[str, str, float], None]:
    """A one-line progress display on stderr for long host work (a terminal only)."""

    def show(vm: str, what: str, fraction: float) -> None:
        if enabled:
            end = "\n" if fraction >= 1.0 else "\r"
            sys.stderr.write(f"  {vm}: {what} {fraction * 100:5.1f}%{' ' * 8}{end}")
            sys.stderr.flush()

    return show
