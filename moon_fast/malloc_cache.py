"""Keep freed CPU memory in the process (glibc's malloc), as CUDA's caching allocator does on the GPU.

PyTorch's CPU tensors come from ``posix_memalign``. glibc serves large requests with a fresh ``mmap`` and
unmaps them on free, and trims the heap top back to the kernel, so every large temporary of every training
step (an (8192 x 1024) fp32 activation is 32 MiB) is page-faulted in again on first touch, and with huge
pages on (``THP_MEM_ALLOC_ENABLE``, moon_fast/cli.py) each fault may also stall on the kernel's compaction.
On the development machine the ``torch`` MoE backend's forward+backward (fp32, T=4096, H=I=1024, E=8, k=2)
took about 9,000 page faults and 120-590 ms of system time per step without this, none with it
(``python benchmarks/cpu_probes.py malloc-cache``; figures in the README).

:func:`keep_freed_memory` turns off glibc's ``mmap`` for large blocks (``M_MMAP_MAX`` = 0) and its trimming
(``M_TRIM_THRESHOLD`` = 2 GiB - 1), so freed blocks stay in the heap for the next step. The cost is the
same as a caching allocator's: the process keeps its peak heap (and some fragmentation on top) until it
exits. ``moon-fast`` (and its benchmark worker processes) call it at start-up unless
``$MOON_FAST_MALLOC_CACHE`` is ``0``. It changes nothing on CUDA memory, and is a no-op where the C
library is not glibc. It works with huge pages on (torch then asks for 2 MiB alignment); with
``THP_MEM_ALLOC_ENABLE=0`` (64-byte alignment) glibc 2.36's ``posix_memalign`` still faulted a freed
64 MiB block in again on the development machine, though plain ``malloc`` reused it (checked with ctypes).
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "MOON_FAST_MALLOC_CACHE"

# from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest value, i.e. trim only above 2 GiB of free top


_applied = False


def applied() -> bool:
    """Whether :func:`keep_freed_memory` has set glibc's malloc in this process."""
    return _applied


def enabled_by_env() -> bool:
    """``$MOON_FAST_MALLOC_CACHE``: "1" or unset on, "0" off; anything else is an error."""
    value = os.environ.get(ENV) or "1"
    if value not in ("0", "1"):
        raise ValueError(f"${ENV} must be 0 or 1; got {value!r}")
    return value == "1"


def apply_from_env() -> bool:
    """:func:`keep_freed_memory` unless ``$MOON_FAST_MALLOC_CACHE`` is 0: what ``moon-fast`` and its
    benchmark worker processes call at start-up. Returns whether it is on."""
    return enabled_by_env() and keep_freed_memory()


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory (see the module docstring). Returns True if it did, False
    where the C library is not glibc (or refused the settings)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    global _applied
    libc = ctypes.CDLL(None)  # the process's own C library
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _applied
