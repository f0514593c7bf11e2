"""moon_fast.malloc_cache: with it on, a large freed CPU tensor's memory is reused without page faults; the
moon-fast process turns it on unless $MOON_FAST_MALLOC_CACHE is 0; bad values are refused."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from moon_fast import malloc_cache

# In a fresh process: allocate, touch and free a 64 MiB tensor twice; print the minor page faults of the
# second round (the first warms up whatever the allocator keeps).
_REUSE = """
import resource, sys
from moon_fast import malloc_cache
on = malloc_cache.apply_from_env()
import torch
def touch():
    x = torch.empty(16 * 1024 * 1024)  # 64 MiB of fp32: glibc would mmap it
    x.fill_(1.0)
    del x
touch()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _run(code: str, flag: str) -> str:
    # huge pages on, as moon-fast runs (moon_fast/cli.py). (With THP_MEM_ALLOC_ENABLE=0 torch asks for 64-byte
    # alignment, and glibc 2.36's posix_memalign then still faulted the whole block in again: see
    # moon_fast/malloc_cache.py.)
    env = {**os.environ, malloc_cache.ENV: flag, "THP_MEM_ALLOC_ENABLE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                          timeout=120).stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's malloc (mallopt)")
def test_freed_memory_is_reused_without_page_faults():
    on, faults_on = _run(_REUSE, "1")
    off, faults_off = _run(_REUSE, "0")
    assert (on, off) == ("True", "False")
    # handed back to the kernel on free, 64 MiB faults in again: at least 32 faults in pages of 2 MiB (16384
    # in pages of 4 KiB, where the kernel has no huge page free)
    assert int(faults_off) >= 32, faults_off
    assert int(faults_on) < 16, faults_on


def test_moon_fast_process_turns_it_on_unless_told_not_to():
    code = "import moon_fast.cli; from moon_fast import malloc_cache; print(malloc_cache.applied())"
    want_on = str(platform.libc_ver()[0] == "glibc")
    assert _run(code, "1") == [want_on]
    assert _run(code, "0") == ["False"]


def test_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv(malloc_cache.ENV, "yes")
    with pytest.raises(ValueError, match="MOON_FAST_MALLOC_CACHE must be 0 or 1"):
        malloc_cache.enabled_by_env()
