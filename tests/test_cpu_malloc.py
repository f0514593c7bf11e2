"""Large CPU temporaries and the malloc under torch. With glibc's malloc a freed 64 MiB block goes back to the
system and is faulted in again, page by page, at the next allocation of its size: every training step pays
for its large temporaries again. With tcmalloc preloaded (the README's advice for CPU runs) the block is
reused. Each check runs in a fresh process: LD_PRELOAD acts at process start."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import cpu_probes  # noqa: E402

TCMALLOC = ctypes.util.find_library("tcmalloc_minimal")
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="package libtcmalloc-minimal4 is not installed "
                                    "(apt-get install libtcmalloc-minimal4; `make test` installs it where it can)")


def _run(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "THP_MEM_ALLOC_ENABLE": "1", "LD_PRELOAD": "", **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def _heap_rounds(**env: str) -> tuple[int, int]:
    """benchmarks/cpu_probes.py's rounds (a 64 MiB tensor, a small one kept alive after it, the large one freed;
    8 rounds): (most page faults of a round after the first, MiB the data segment grew)."""
    out = _run(cpu_probes._HEAP_GROWTH, **env)  # "page faults per round [..]; data segment grew N MiB"
    faults = [int(v) for v in out.split("[")[1].split("]")[0].split(",")]
    return max(faults[1:]), int(out.split("grew ")[1].split()[0])


def test_glibc_faults_a_freed_large_block_in_again():
    faults, _ = _heap_rounds()
    assert faults >= 32, faults  # 64 MiB in 2 MiB huge pages: 32 faults at least, every round


@needs_tcmalloc
def test_tcmalloc_reuses_a_freed_large_block():
    faults, grew = _heap_rounds(LD_PRELOAD=TCMALLOC)
    assert faults < 16, faults
    assert grew < 64 + 32, grew  # one block kept, not one per round


@needs_tcmalloc
def test_bench_machine_record_names_the_preloaded_malloc():
    code = "from moon_fast.bench.harness import machine_info; print(machine_info()['ld_preload'])"
    assert _run(code) == "None"
    assert _run(code, LD_PRELOAD=TCMALLOC) == os.path.basename(TCMALLOC)


def _env_json(**env: str) -> dict:
    import json

    return json.loads(_run("import runpy, sys; sys.argv = ['moon-fast', 'env', '--json']; "
                           "runpy.run_module('moon_fast.cli', run_name='__main__')", **env))


@needs_tcmalloc
def test_moon_fast_runs_under_tcmalloc_unless_told_not_to():
    """The `moon-fast` command re-runs itself with tcmalloc preloaded (moon_fast/cli.py preload_tcmalloc)."""
    assert _env_json()["ld_preload"] == TCMALLOC
    assert _env_json(MOON_FAST_MALLOC="glibc")["ld_preload"] is None
    assert _env_json(LD_PRELOAD=TCMALLOC)["ld_preload"] == TCMALLOC  # already preloaded: no second exec


def test_moon_fast_malloc_rejects_unknown_values():
    proc = subprocess.run([sys.executable, "-m", "moon_fast.cli", "env"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "MOON_FAST_MALLOC": "jemalloc"})
    assert proc.returncode != 0
    assert "MOON_FAST_MALLOC='jemalloc': must be one of ('tcmalloc', 'glibc')" in proc.stderr


_PEAK_AFTER_RESET = """
import torch
from moon_fast.bench.harness import _peak_rss_bytes, _reset_peak_rss
x = torch.ones(16 << 20)  # 64 MiB, as a warm-up call would leave freed behind it
del x
_reset_peak_rss()
base = _peak_rss_bytes()
y = torch.ones(16 << 20)  # the measured call's own 64 MiB
print((_peak_rss_bytes() - base) >> 20)
"""


@pytest.mark.parametrize("preload", [pytest.param(TCMALLOC, marks=needs_tcmalloc, id="tcmalloc"),
                                     pytest.param("", id="glibc")])
def test_bench_peak_memory_sees_a_block_the_warm_up_freed(preload):
    """The bench's peak-RSS reset returns freed memory to the OS under either malloc, so a call that allocates
    what its warm-up freed shows it (under tcmalloc, before its release call, it read 0 MiB)."""
    assert int(_run(_PEAK_AFTER_RESET, LD_PRELOAD=preload or "")) >= 60
