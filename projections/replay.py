"""Any VM as it was at any version or time, from its stored events.

Two ways, one result (tests hold them equal at every version):
- `events_only=True` folds every event from the VM's registration: nothing but the event log is
  trusted (the auditor's way);
- the default starts from the nearest aggregate snapshot at or below the version (the
  repository's way, through the same decoder), so a past tree costs the same whatever the
  history's length.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from domain.application import Snaptree
from domain.errors import Refused
from domain.names import vm_id
from domain.vm import VirtualMachine
from projections.decoding import Decoder, fold
from projections.event_store import event_chunks, event_rows, latest_snapshot_row, latest_version
from projections.tree_view import tree_json


class OutOfRange(Refused):
    code = "out_of_range"


class BadTime(Refused):
    code = "invalid_time"


class ReplayError(RuntimeError):
    """A stored event that cannot be decoded or applied: the history itself is at fault."""

    code = "replay_failed"


def vm_at(app: Snaptree, name: str, version: int, *, events_only: bool = False) -> VirtualMachine:
    """The VM as it was right after its event number `version` (1 = registration)."""
    last = latest_version(app, name)
    if not 1 <= version <= last:
        raise OutOfRange(f"VM {name!r} has versions 1 to {last}, not {version}")
    vid = vm_id(name)
    decoder = Decoder(app)
    start: VirtualMachine | None = None
    try:
        if not events_only:
            row = latest_snapshot_row(app, vid, version)
            if row is not None:
                start = decoder.event(vid, row).mutate(None)  # the library's Snapshot.mutate
        gt = start.version if start is not None else 0
        agg = fold(decoder.events(vid, event_chunks(app, vid, gt, version)), start)
    except Exception as exc:
        raise ReplayError(f"VM {name!r} cannot be replayed to version {version}: "
                          f"{type(exc).__name__}: {exc}") from exc
    assert isinstance(agg, VirtualMachine)
    return agg


def tree_at(app: Snaptree, name: str, version: int, *, events_only: bool = False) -> dict[str, Any]:
    return tree_json(vm_at(app, name, version, events_only=events_only))


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without a zone is taken as UTC."""
    try:
        when = datetime.fromisoformat(text.strip())  # 3.11 reads "Z" and any offset
    except ValueError:
        raise BadTime(f"not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def version_at_time(app: Snaptree, name: str, when: datetime) -> int:
    """The last version recorded at or before `when` (binary search: O(log history) reads)."""
    last = latest_version(app, name)
    vid = vm_id(name)
    decoder = Decoder(app)

    def stamp(version: int) -> datetime:
        (row,) = event_rows(app, vid, version - 1, version)
        return decoder.event(vid, row).timestamp  # type: ignore[no-any-return]

    if stamp(1) > when:
        raise OutOfRange(f"VM {name!r} did not exist yet at {when.isoformat()}")
    lo, hi = 1, last  # invariant: stamp(lo) <= when
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if stamp(mid) <= when:
            lo = mid
        else:
            hi = mid - 1
    return lo
