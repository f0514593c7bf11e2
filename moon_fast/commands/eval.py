"""`moon-fast eval`: not written yet (see the issue tracker)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="(not available yet)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    print("moon-fast eval is not available in this version yet", file=sys.stderr)
    return 2
