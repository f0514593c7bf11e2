"""A caching allocator for CPU tensors (csrc/cpu/caching_allocator.cpp), opt-in.

glibc maps each large block afresh and unmaps it on free, so each CPU training step page-faults its large
temporaries in again. The allocator keeps freed blocks of 1 MiB and more, keyed by their size rounded up to
1/8 of its power of two, and gives a block back only to a request of that rounded size, as CUDA's caching
allocator does on the GPU. Free (cached) bytes are capped; past the cap a freed block goes back to the system.
Measurements (page faults, step time, peak RSS, heap growth): README, "Page faults", and
``python benchmarks/cpu_probes.py malloc-cache``.

It replaces torch's CPU allocator for the whole process, from the call on (tensors allocated before keep
their own deleter). ``moon-fast`` turns it on when ``$MOON_FAST_CPU_CACHE_MB`` is a positive number of MiB
(the cap); unset or 0 leaves torch's allocator alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV = "MOON_FAST_CPU_CACHE_MB"


@dataclass(frozen=True)
class CacheStats:
    cached_bytes: int  # free blocks held for reuse
    live_bytes: int  # large blocks handed out and not yet freed
    hits: int  # large requests served from the cache
    misses: int  # large requests that went to the system
    limit_bytes: int  # the cap on cached_bytes; -1 if the allocator was never enabled


def _ops():
    from moon_fast import _ext

    return _ext.cpu_ops()


def limit_from_env() -> int:
    """``$MOON_FAST_CPU_CACHE_MB`` as MiB (0 when unset); anything but a whole number >= 0 is an error."""
    value = os.environ.get(ENV) or "0"
    if not value.isdigit():
        raise ValueError(f"${ENV} must be a whole number of MiB (0 = off); got {value!r}")
    return int(value)


def enable(limit_mb: int) -> None:
    """Routes torch's CPU allocations through the caching allocator, holding at most ``limit_mb`` MiB of
    free blocks. Callable again to change the cap (a lower cap empties the cache at once)."""
    if limit_mb < 0:
        raise ValueError(f"limit_mb must be >= 0, got {limit_mb}")
    _ops().cpu_cache_enable(limit_mb << 20)


def apply_from_env() -> bool:
    """:func:`enable` with ``$MOON_FAST_CPU_CACHE_MB`` if it is set and positive. Returns whether it did."""
    limit = limit_from_env()
    if limit:
        enable(limit)
    return bool(limit)


def stats() -> CacheStats:
    return CacheStats(*_ops().cpu_cache_stats())


def empty_cache() -> None:
    """Returns every cached free block to the system."""
    _ops().cpu_cache_empty()


def rounded_size(nbytes: int) -> int:
    """The bucket a request of ``nbytes`` falls in (unchanged under 1 MiB)."""
    return int(_ops().cpu_cache_rounded_size(nbytes))
