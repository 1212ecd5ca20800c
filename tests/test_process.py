"""Process liveness as the QEMU adapters see it: a QEMU counts as gone only once every one of its
threads is, because until then it still holds its guest RAM (huge pages) and its image files."""

from __future__ import annotations

import subprocess
import sys
import time

from adapters.qemu.process import alive

# The main thread ends (the leader shows as a zombie) while a second thread runs on for 2 s.
LEADER_FIRST = ("import threading, time, ctypes; threading.Thread(target=time.sleep, args=(2,)).start(); "
                "ctypes.CDLL(None).pthread_exit(None)")


def test_a_process_whose_main_thread_ended_is_alive_while_its_other_threads_run() -> None:
    proc = subprocess.Popen([sys.executable, "-c", LEADER_FIRST])
    try:
        time.sleep(0.5)
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            assert b") Z " in f.read()   # what the kernel shows for the leader meanwhile
        assert alive(proc.pid)
    finally:
        proc.wait(10)
    assert not alive(proc.pid)


def test_a_process_that_ran_to_its_end_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.5)                      # exited, not reaped yet: a zombie with no threads left
    assert not alive(proc.pid)
    proc.wait()
