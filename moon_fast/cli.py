"""The ``moon-fast`` command line: one subcommand per module in :mod:`moon_fast.commands`.

Each command module defines ``add_parser(subparsers)`` which registers its parser and sets
``func`` (called with the parsed arguments, returning an exit code). Command modules keep their
top-level imports light so that ``moon-fast --help`` is fast; heavy imports happen inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("env", "data", "train", "eval", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moon-fast",
        description="Fast training of MOON2.0-style multimodal product embeddings.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moon_fast.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
