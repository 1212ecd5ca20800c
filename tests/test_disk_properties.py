"""Random take / apply / delete / rename / revert / forced-merge sequences on real qcow2 files.

After every step the worker drains and every snapshot and the current state must read exactly
their byte patterns; backing files must match the tree; no orphan and no missing file.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from domain import commands as c
from service.bootstrap import open_service
from domain.errors import Refused
from domain.tree import NodeKind
from tests.disk_harness import SLOT, PatternVM

names = itertools.count()


class RealTree(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        svc = open_service(str(Path(self.tmp.name) / "home"), "testhost", environ={})
        self.pv = PatternVM.create(svc, Path(self.tmp.name), ndisks=1)

    def teardown(self) -> None:
        self.tmp.cleanup()

    def snapshots(self) -> list[str]:
        return self.pv.visible()

    def hidden_ids(self) -> list[str]:
        return [str(n.id) for n in self.pv.vm.nodes.values() if n.kind is NodeKind.HIDDEN]

    @rule(big=st.booleans())
    def write(self, big: bool) -> None:
        self.pv.write(slot=None, nbytes=(4 if big else 1) * SLOT)

    @rule(overwrite=st.booleans())
    def take(self, overwrite: bool) -> None:
        if overwrite and self.pv.slots_used:
            self.pv.write(slot=min(self.pv.slots_used))
        self.pv.take(f"s{next(names)}", write=not overwrite)

    @precondition(lambda self: self.snapshots())
    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        self.pv.apply(data.draw(st.sampled_from(self.snapshots())))

    @precondition(lambda self: self.snapshots())
    @rule(data=st.data(), subtree=st.booleans())
    def delete(self, data: st.DataObject, subtree: bool) -> None:
        self.pv.delete(data.draw(st.sampled_from(self.snapshots())), subtree=subtree)

    @precondition(lambda self: self.snapshots())
    @rule(data=st.data())
    def rename(self, data: st.DataObject) -> None:
        self.pv.svc.handle(c.RenameSnapshot(self.pv.name, data.draw(st.sampled_from(self.snapshots())), f"r{next(names)}"))

    @rule()
    def revert(self) -> None:
        try:
            self.pv.revert()
        except Refused:
            pass

    @precondition(lambda self: self.hidden_ids())
    @rule(data=st.data())
    def force_merge(self, data: st.DataObject) -> None:
        try:
            self.pv.force_merge(data.draw(st.sampled_from(self.hidden_ids())))
        except Refused:
            pass  # the VM's own disk

    @invariant()
    def everything_reads_back(self) -> None:
        if hasattr(self, "pv"):
            self.pv.check()


TestRealTree = RealTree.TestCase
TestRealTree.settings = settings(
    max_examples=10,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
