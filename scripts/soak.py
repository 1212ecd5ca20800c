#!/usr/bin/env python3
"""The long form of the fault-injection suite (issue 6): the bounded kill points, then a randomized
soak of take / apply / delete / forced merge with a kill -9 of the worker at a random point of each.

    .venv/bin/python scripts/soak.py [--long] [--seconds N] [--seed S]

Without --long only the randomized soak runs for --seconds (default 600); --long runs the bounded
suite first as well. Prints the table of every kill point and its checks; exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", action="store_true", help="also run every bounded kill point first")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    env = dict(os.environ, SNAPTREE_SOAK="1", SNAPTREE_SOAK_SECONDS=str(args.seconds))
    if args.seed is not None:
        env["SNAPTREE_SOAK_SEED"] = str(args.seed)
    select = [] if args.long else ["-k", "soak"]
    cmd = [str(ROOT / ".venv" / "bin" / "pytest"), "-s", "-q", "-rxXs",
           "tests/test_fault_injection.py", *select]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
