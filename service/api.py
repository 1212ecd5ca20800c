"""The Python API: one object, one method for everything (`handle`), the same the CLI and the
queue use.

    from service.bootstrap import open_service
    from domain.commands import CreateVM, TakeSnapshot, DeleteSnapshot, GetTree

    svc = open_service(home="/var/lib/snaptree")
    svc.handle(CreateVM("web", disk=("/srv/web.qcow2",)))
    svc.handle(TakeSnapshot("web", "before-upgrade"))      # waits for its disk work
    svc.handle(DeleteSnapshot("web", "old"), wait=False)     # recorded; a worker does the rest
    svc.settle("web")                                        # ... now, in this process
    tree = svc.handle(GetTree("web")).json()                 # exactly `snaptree tree web --json`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from adapters.storage import DataDir
from domain.application import Snaptree
from domain.commands import Command, Query
from domain.requests import Execution
from domain.vm import VirtualMachine
from service.handlers import HANDLERS, prepare
from service.ports import Disks, Machines
from service.results import Result
from service.worker import Progress, Worker, quiet


@dataclass(frozen=True)
class Options:
    wait: bool = True  # perform the command's host work before returning (embedded)
    progress: Progress = quiet


@dataclass
class Service:
    data: DataDir
    app: Snaptree
    host: str
    disks: Disks
    machines: Machines
    _worker: Worker | None = field(default=None, repr=False)

    def handle(self, request: Command | Query, *, wait: bool = True, progress: Progress = quiet) -> Result:
        try:
            handler = HANDLERS[type(request)]
        except KeyError:
            raise TypeError(f"no handler for {type(request).__name__}") from None
        return handler(request, self, Options(wait, progress))

    def handle_queued(self, vm: str, requests: list[tuple[str, Command]]) -> list[Execution[Any] | Exception]:
        """The queue's commands for one VM: checked like any other, then decided and saved
        together with their request ids. The host's worker does the host work."""
        prepared: list[tuple[str, Command]] = []
        refused: dict[int, Exception] = {}
        undo: list[Callable[[], None]] = []
        for i, (request_id, cmd) in enumerate(requests):
            try:
                p = prepare(cmd, self)
            except Exception as exc:  # noqa: BLE001 - answered, like the domain's refusals
                refused[i] = exc
                continue
            prepared.append((request_id, p.command))
            undo.append(p.undo)
        outcomes = iter(self.app.execute(vm, prepared) if prepared else [])
        results: list[Execution[Any] | Exception] = []
        for i in range(len(requests)):
            if i in refused:
                results.append(refused[i])
                continue
            outcome = next(outcomes)
            results.append(outcome)
        for out, u in zip([r for i, r in enumerate(results) if i not in refused], undo):
            if isinstance(out, Exception) or (isinstance(out, Execution) and out.duplicate):
                u()
        return results

    def worker(self, progress: Progress = quiet) -> Worker:
        if self._worker is None:
            self._worker = Worker(self.app, self.data, self.host, self.disks, self.machines)
        self._worker.progress = progress
        return self._worker

    def settle(self, vm: str | VirtualMachine, progress: Progress = quiet) -> VirtualMachine:
        """Perform the VM's outstanding host work now (the embedded default); returns the VM as
        it stands afterwards. A failed item is recorded on its node and raised (WorkFailed)."""
        return self.worker(progress).settle(vm)
