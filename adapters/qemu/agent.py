"""A minimal synchronous QEMU guest agent (qemu-ga) client: the worker freezes and thaws a
guest's filesystems around a snapshot and sets its clock after a restore with it.

    with GuestAgent(socket_path, timeout=10) as ga:     # connects and guest-syncs
        ga.ping()
        ga.fsfreeze_freeze(); ga.fsfreeze_status(); ga.fsfreeze_thaw()
        ga.set_time(); ga.get_time()
        ga.execute("guest-info")                        # any other command

The host side is QEMU's `-chardev socket,path=...,server=on,wait=off` behind the guest's
virtio-serial port org.qemu.guest_agent.0.  The protocol is QMP without a greeting or
capabilities negotiation, one JSON object a line.

Why not a library: `qemu.qmp` (0.0.6, the QEMU project's own, already a dependency) can
talk to qemu-ga (QMPClient with await_greeting=False, negotiate=False is what QEMU's
qemu-ga-client does), but it treats any error reply without an "id" as a fatal
ServerParseError and drops the connection.  qemu-ga sends exactly such replies in the
normal resynchronisation dance: for the 0xFF byte that resets its JSON parser, and for
the leftovers of a previous client's half-sent command.  Its sync wrapper
(qemu.qmp.legacy) also drives a private event loop, which cannot run inside an asyncio
test.  `qmp` (1.1.0 on PyPI) is a 2009-era copy of QEMU's old qmp.py, with no
guest-sync either.  This client is a plain blocking socket, ~100 lines (it was first written
for the Linux test guest, tests/guest/linux).

Resynchronisation (docs/interop/qemu-ga-ref, "guest-sync"): send 0xFF (the agent's
parser resets), then guest-sync with a random id, and skip every line until the reply
carrying that id: stale replies of earlier clients and parse errors are dropped.
Every command also carries a top-level "id", which qemu-ga echoes, and replies are
matched on it.
"""
from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path
from typing import Any

from adapters.qemu.errors import MachineError


class AgentError(MachineError):
    """The agent answered with an error, or the connection broke."""


class AgentTimeout(AgentError, TimeoutError):
    """No (matching) answer in time."""


class GuestAgent:
    def __init__(self, path: str | Path, timeout: float = 10.0, connect: bool = True) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._seq = 0
        self._tag = f"snaptree-{random.getrandbits(32):08x}"
        if connect:
            self.connect()

    # ------------------------------------------------------------ connection
    def connect(self, timeout: float | None = None) -> None:
        """Connect and guest-sync; retries until the agent answers or timeout passes.

        The guest may not have started qemu-ga yet, and a reply lost while no client was
        connected is never resent, so guest-sync is sent again every second."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self.close()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(self.path)
                self._sock, self._buf = sock, b""
                break
            except OSError as e:  # QEMU not listening yet
                sock.close()
                if time.monotonic() >= deadline:
                    raise AgentTimeout(f"cannot connect to the guest agent socket {self.path}: {e}") from e
                time.sleep(0.1)
        try:
            self.sync(deadline)
        except BaseException:
            self.close()
            raise

    def sync(self, deadline: float | None = None) -> int:
        """Flush stale replies: 0xFF + guest-sync with a random id, until that id comes back."""
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        sent: dict[str, int] = {}  # every reply carries its id: any of ours will do
        while True:
            token = random.randrange(1, 2**31)
            msg_id = self._next_id()
            sent[msg_id] = token
            self._send(b"\xff" + self._encode("guest-sync", {"id": token}, msg_id))
            resend_at = min(deadline, time.monotonic() + 1.0)
            while True:
                reply = self._recv_until(resend_at)
                if reply is None:
                    break  # nothing in a second: ask again
                if reply.get("id") in sent and reply.get("return") == sent[reply["id"]]:
                    return reply["return"]
            if time.monotonic() >= deadline:
                raise AgentTimeout(f"the guest agent at {self.path} did not answer guest-sync")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> "GuestAgent":
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ commands
    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Run one command; return its "return" value or raise AgentError."""
        if self._sock is None:
            self.connect()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        msg_id = self._next_id()
        self._send(self._encode(command, arguments, msg_id))
        while True:
            reply = self._recv_until(deadline)
            if reply is None:
                raise AgentTimeout(f"{command}: no answer from the guest agent in "
                                   f"{self.timeout if timeout is None else timeout} s")
            if reply.get("id") != msg_id:
                continue  # stale
            if "error" in reply:
                err = reply["error"]
                raise AgentError(f"{command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def ping(self) -> None:
        self.execute("guest-ping")

    def info(self) -> dict[str, Any]:
        return self.execute("guest-info")

    def fsfreeze_status(self) -> str:
        """"thawed" or "frozen"."""
        return self.execute("guest-fsfreeze-status")

    def fsfreeze_freeze(self, timeout: float | None = None) -> int:
        """Freeze every guest filesystem (FIFREEZE: journal flushed); returns how many."""
        return self.execute("guest-fsfreeze-freeze", timeout=timeout)

    def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        return self.execute("guest-fsfreeze-thaw", timeout=timeout)

    def get_time(self) -> int:
        """The guest's clock, in ns since the epoch."""
        return self.execute("guest-get-time")

    def set_time(self, time_ns: int | None = None) -> None:
        """Set the guest's clock to time_ns (then the RTC from it), or, with None, the
        clock from the RTC."""
        self.execute("guest-set-time", None if time_ns is None else {"time": int(time_ns)})

    # ------------------------------------------------------------ wire
    def _next_id(self) -> str:
        self._seq += 1
        return f"{self._tag}-{self._seq}"

    @staticmethod
    def _encode(command: str, arguments: dict[str, Any] | None, msg_id: str) -> bytes:
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments is not None:
            msg["arguments"] = arguments
        return json.dumps(msg).encode() + b"\n"

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except OSError as e:
            self.close()
            raise AgentError(f"guest agent socket {self.path}: send failed: {e}") from e

    def _recv_until(self, deadline: float) -> dict[str, Any] | None:
        """The next JSON object from the agent, or None at the deadline.
        Lines that are not JSON objects are skipped."""
        while True:
            while b"\n" in self._buf:
                line, _, self._buf = self._buf.partition(b"\n")
                line = line.strip(b"\xff\r\n\t ")
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return obj
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            assert self._sock is not None
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                return None
            except OSError as e:
                self.close()
                raise AgentError(f"guest agent socket {self.path}: receive failed: {e}") from e
            if not chunk:
                self.close()
                raise AgentError(f"guest agent socket {self.path}: closed by QEMU")
            self._buf += chunk
