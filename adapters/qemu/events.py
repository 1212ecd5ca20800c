"""QEMU's QMP events: a numbered, bounded log that can be waited on, and timings between events.

Code that waits for an event takes ``seq = log.seq`` *before* issuing the command that triggers
it and then waits for an event ``after=seq``: no event can be missed between command and wait.
The guest's pause of a live take is measured from QEMU's own STOP/RESUME timestamps, not from
our clock (which also counts the QMP round trips).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, AsyncIterator, Callable, Iterable

from adapters.qemu.errors import MachineError

Event = dict[str, Any]


class EventLog:
    """The last ``maxlen`` events of one QMP connection, numbered from 1."""

    def __init__(self, maxlen: int = 2000) -> None:
        self._events: collections.deque[tuple[int, Event]] = collections.deque(maxlen=maxlen)
        self._seq = 0
        self._cond = asyncio.Condition()

    @property
    def seq(self) -> int:
        """Sequence number of the last event received."""
        return self._seq

    def since(self, after: int, names: Iterable[str] | None = None) -> list[Event]:
        wanted = set(names) if names else None
        return [e for s, e in self._events
                if s > after and (wanted is None or e["event"] in wanted)]

    async def pump(self, source: AsyncIterator[Any], on_event: Callable[[Event], None]) -> None:
        """Append every event of ``source`` (until cancelled) and wake the waiters."""
        try:
            async for event in source:
                self._seq += 1
                self._events.append((self._seq, event))
                on_event(event)
                async with self._cond:
                    self._cond.notify_all()
        except asyncio.CancelledError:
            pass

    async def wake(self) -> None:
        """Wake every waiter (the connection went away: they re-check and give up)."""
        async with self._cond:
            self._cond.notify_all()

    async def wait(self, names: str | Iterable[str], *, after: int,
                   match: Callable[[Event], bool] | None, timeout: float | None,
                   gone: Callable[[], str | None]) -> Event:
        """First event named in ``names`` after ``after`` accepted by ``match``.

        ``gone()`` is None while events can still come, else (QEMU exited, connection closed)
        the detail to add to the MachineError raised then (QEMU's log tail); so is a timeout.
        """
        wanted = {names} if isinstance(names, str) else set(names)

        def find() -> Event | None:
            for s, e in self._events:
                if s > after and e["event"] in wanted and (match is None or match(e)):
                    return e
            return None

        async def waiter() -> Event:
            async with self._cond:
                while True:
                    hit = find()
                    if hit is not None:
                        return hit
                    detail = gone()
                    if detail is not None:
                        raise MachineError(f"QEMU gone while waiting for {sorted(wanted)}{detail}")
                    # re-check liveness now and then: a dead QEMU sends no more events
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), 0.5)

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except asyncio.TimeoutError:
            raise MachineError(f"timeout ({timeout}s) waiting for {sorted(wanted)}") from None


def event_time(e: Event) -> float:
    ts = e["timestamp"]
    return float(ts["seconds"] + ts["microseconds"] / 1e6)


def pause_ms(events: list[Event]) -> float | None:
    """Milliseconds from the first STOP to the RESUME after it, None if either is missing."""
    stop = resume = None
    for e in events:
        if e["event"] == "STOP" and stop is None:
            stop = e
        elif e["event"] == "RESUME" and stop is not None:
            resume = e
    if stop is None or resume is None:
        return None
    return round((event_time(resume) - event_time(stop)) * 1000.0, 3)


def timeline(events: list[Event]) -> dict[str, float]:
    """ms since the first STOP of each event up to RESUME ("MIGRATION <status>" per status)."""
    stops = [e for e in events if e["event"] == "STOP"]
    if not stops:
        return {}
    t0 = event_time(stops[0])
    out: dict[str, float] = {}
    for e in events:
        key = e["event"] if e["event"] != "MIGRATION" else f"MIGRATION {e['data']['status']}"
        out.setdefault(key, round((event_time(e) - t0) * 1000.0, 3))
        if e["event"] == "RESUME":
            break
    return out
