"""The ``moon-fast`` command line: one subcommand per module in :mod:`moon_fast.commands`.

Each command module defines ``add_parser(subparsers)`` which registers its parser and sets
``func`` (called with the parsed arguments, returning an exit code). Command modules keep their
top-level imports light so that ``moon-fast --help`` is fast; heavy imports happen inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Transparent huge pages for PyTorch's CPU allocations of 2 MiB and more. PyTorch reads this once, at its
# first allocation, so it is set here, before anything imports torch (THP_MEM_ALLOC_ENABLE=0 turns it
# off). Without it every large CPU temporary costs one page fault per 4 KiB on first touch: a gather into
# a fresh (8192 x 1024) fp32 tensor took 20 ms without and 10 ms with it on the development machine
# (python benchmarks/cpu_probes.py thp-gather).
# No effect on CUDA memory, or where the kernel's THP mode is "never".
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# With glibc's malloc, large CPU temporaries page-fault in again every step (it unmaps them on free).
# tcmalloc keeps freed memory for reuse: the `moon-fast` command re-runs itself with it preloaded where it is
# installed (Debian libtcmalloc-minimal4), unless MOON_FAST_MALLOC=glibc. Measured in the README's "Page
# faults" section: the MoE `torch` backend's fp32 step 837 -> 554 ms, the same results.
MALLOC_ENV = "MOON_FAST_MALLOC"
MALLOCS = ("tcmalloc", "glibc")

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


def preload_tcmalloc() -> None:
    """Re-executes this process with tcmalloc in LD_PRELOAD (a preload acts only at process start), where it
    is installed, not preloaded yet, and $MOON_FAST_MALLOC is not "glibc". Returns only if it does not."""
    choice = os.environ.get(MALLOC_ENV, "tcmalloc")
    if choice not in MALLOCS:
        sys.exit(f"moon-fast: {MALLOC_ENV}={choice!r}: must be one of {MALLOCS}")
    preloaded = os.environ.get("LD_PRELOAD", "")
    if choice == "glibc" or "tcmalloc" in preloaded:
        return
    import ctypes.util

    lib = ctypes.util.find_library("tcmalloc_minimal")
    if lib is None:
        return  # `moon-fast env` says which malloc runs
    env = {**os.environ, "LD_PRELOAD": f"{lib} {preloaded}".strip()}
    os.execve(sys.executable, sys.orig_argv, env)


def entry() -> None:
    """The ``moon-fast`` command (and ``python -m moon_fast.cli``)."""
    preload_tcmalloc()
    sys.exit(main())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    entry()
