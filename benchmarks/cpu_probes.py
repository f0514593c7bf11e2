"""Small CPU measurements behind statements in the README and the benchmark notes.

    python benchmarks/cpu_probes.py gemm-drift [--processes 4]   # one bf16 GEMM, timed in fresh processes
    python benchmarks/cpu_probes.py thp-gather                   # a large gather with / without huge pages
    python benchmarks/cpu_probes.py moe-profile [--dtype bf16] [--backend torch]   # torch.profiler table of moe_mlp
    python benchmarks/cpu_probes.py gemm-layouts [--dtype bf16]  # GEMM shapes / layouts / thread counts of the MoE
    python benchmarks/cpu_probes.py small-experts                # bf16 per-expert GEMM calls: where small ones lose
    python benchmarks/cpu_probes.py torch-floor                  # the least time any torch-GEMM MoE step can take
    python benchmarks/cpu_probes.py malloc-cache                 # MoE steps with / without keeping freed memory

* gemm-drift: the median time of a (1024 x 1024) @ (1024 x 1024) bf16 matmul in each of several fresh
  processes. Why ``moon-fast bench --interleave`` exists: the same call differs between processes.
* thp-gather: a gather into a fresh (8192 x 1024) fp32 tensor in a process with THP_MEM_ALLOC_ENABLE=0 and
  one with 1 (why ``moon-fast`` sets it).
* gemm-layouts: why the ``cpu`` backend runs its own grouped GEMMs (csrc/cpu/grouped_gemm_cpu.cpp): the
  median time of one expert's share of the headline case's GEMMs on 1 and on all threads, of a twice
  taller one, of the weight gradient with A transposed against row-major, and of the blocked transposed
  copy the ``cpu`` backend makes instead (one process, calls interleaved, 15 rounds).
* small-experts: why the ``cpu`` backend falls behind a dense GEMM when experts get few rows (the E=64 and
  T=1024 points of the sweep): one thread, bf16, the gate_up forward GEMM (rows @ W^T, W (2048 x 1024)) cut
  into E calls of M rows, at E x M = 8192 rows (same FLOPs): with E distinct weights, with one weight E
  times, with weights packed beforehand by oneDNN (``torch.ops.mkldnn._linear_pointwise``), and as one call.
  The packing itself is timed too. 7 interleaved rounds, medians.
* torch-floor: whether the ``torch`` backend can reach issue 4's bf16 CPU target (1.25x ``dense_gemm``) at the
  headline shape. Interleaved (9 rounds, medians, process settings as ``moon-fast`` makes them; glibc keeping
  freed memory where ``CPU_PROBES_KEEP_FREED=1``, see malloc-cache; run it under LD_PRELOAD for another
  malloc): ``dense_gemm``,
  ``grouped_gemm_floor`` (the six grouped GEMMs the ``torch`` backend runs, nothing else), the ``torch``
  backend, and a plain bf16 copy of (8192 x 1024), this machine's memory bandwidth for a pass. The floor adds
  to the grouped GEMMs the least memory traffic the work around them needs (``TORCH_DISPATCH_MIB``: each
  tensor read or written once, every pass fused) at the copy's bandwidth.
* malloc-cache: what large CPU temporaries cost in page faults, and what removes them. The settings, each in
  its own processes: torch's allocator as is; glibc's malloc set to keep freed memory (``mallopt``: no mmap for
  large blocks, no trimming; ``CPU_PROBES_KEEP_FREED=1``); and jemalloc and tcmalloc in place of glibc's
  malloc (``LD_PRELOAD``), where installed. (Until commit 806dd60 it also measured our own caching CPU
  allocator, removed since: tcmalloc did the same, see the README.) (1) The headline MoE step (fp32 and bf16; the
  ``torch`` and ``cpu`` backends and ``dense_gemm``), huge pages on: per step, the median time, minor page
  faults and system (kernel) time over 9 steps after 2 untimed ones, and the process's peak RSS. (2) Eight
  rounds of a 64 MiB tensor freed after a small tensor that stays alive was allocated: page faults per round
  and how much the data segment grew, three processes each. With glibc's setting, glibc 2.36's
  ``posix_memalign`` (which torch uses) cannot reuse the freed exact-size block, so the heap can grow every
  round.
* moe-profile: per-op CPU time of two forward+backward steps of ``moe_mlp`` (``--backend`` torch or cpu) at the
  benchmark's headline shape (T=4096, H=I=1024, E=8, k=2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

_GEMM = """
import statistics, time, torch
a = torch.randn(1024, 1024, dtype=torch.bfloat16); b = torch.randn(1024, 1024, dtype=torch.bfloat16)
ts = []
for _ in range(20):
    t0 = time.perf_counter(); a @ b.t(); ts.append(time.perf_counter() - t0)
print(f"{statistics.median(ts[5:]) * 1e3:.2f}")
"""

_GATHER = """
import statistics, time, torch
x = torch.randn(8192, 1024); idx = torch.randperm(8192)
ts = []
for _ in range(15):
    t0 = time.perf_counter(); x.index_select(0, idx); ts.append(time.perf_counter() - t0)
print(f"{statistics.median(ts[3:]) * 1e3:.2f}")
"""

# glibc's malloc set to keep freed memory in the process: large blocks from the heap, not mmap (M_MMAP_MAX = 0),
# and the heap never trimmed (M_TRIM_THRESHOLD = 2^31 - 1). Only where CPU_PROBES_KEEP_FREED=1.
_KEEP_FREED = """
import ctypes, os
if os.environ.get("CPU_PROBES_KEEP_FREED") == "1":
    _libc = ctypes.CDLL(None)
    assert _libc.mallopt(-4, 0) == 1 and _libc.mallopt(-1, 2**31 - 1) == 1
"""

_MOE_STEPS = _KEEP_FREED + """
import os, resource, statistics, sys, time
import torch
from moon_fast.bench import moe
from moon_fast.bench.harness import DTYPES
dtype, backend = sys.argv[1], sys.argv[2]
work = moe.build(backend=backend, dtype=DTYPES[dtype], device=torch.device("cpu"), T=4096, H=1024, I=1024, E=8,
                 k=2)
work.step(); work.step()
ts, faults, system = [], [], []
for _ in range(9):
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    work.step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ts.append(time.perf_counter() - t0); faults.append(r1.ru_minflt - r0.ru_minflt)
    system.append(r1.ru_stime - r0.ru_stime)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{statistics.median(ts) * 1e3:7.0f} ms  {statistics.median(faults):6.0f} faults  "
      f"{statistics.median(system) * 1e3:5.0f} ms system  (system per step {min(system) * 1e3:.0f}-"
      f"{max(system) * 1e3:.0f} ms)  peak RSS {peak:5.0f} MiB")
"""

_HEAP_GROWTH = _KEEP_FREED + """
import resource
import torch
def data_mib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmData:")[1].split()[0]) // 1024
keep, faults, start = [], [], data_mib()
for _ in range(8):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 1024 * 1024); x.fill_(1.0)  # 64 MiB
    keep.append(torch.empty(1024))  # a small tensor that stays alive, allocated after the large one
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(f"page faults per round {faults}; data segment grew {data_mib() - start} MiB")
"""


def _as_moon_fast() -> None:
    """The process settings ``moon-fast`` makes (moon_fast/cli.py): huge pages, before torch allocates; and
    glibc keeping freed memory where CPU_PROBES_KEEP_FREED=1 (see malloc-cache)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    exec(_KEEP_FREED, {})


def _child(code: str, *args: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


def gemm_drift(processes: int) -> None:
    times = [_child(_GEMM) for _ in range(processes)]
    print("bf16 (1024x1024) @ (1024x1024), median ms per fresh process:", ", ".join(times))


def thp_gather() -> None:
    for flag in ("0", "1"):
        print(f"THP_MEM_ALLOC_ENABLE={flag}: gather into a fresh (8192 x 1024) fp32 tensor, median "
              f"{_child(_GATHER, THP_MEM_ALLOC_ENABLE=flag)} ms")


def moe_profile(dtype: str, backend: str) -> None:
    _as_moon_fast()
    import torch
    from torch.profiler import profile

    from moon_fast.bench import moe
    from moon_fast.bench.harness import DTYPES

    work = moe.build(backend=backend, dtype=DTYPES[dtype], device=torch.device("cpu"), T=4096, H=1024, I=1024,
                     E=8, k=2)
    work.step()
    with profile() as prof:
        work.step()
        work.step()
    print(f"moe_mlp {backend} {dtype}, two forward+backward steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def _print_interleaved_medians(cases: dict, rounds: int) -> dict:
    """Runs every case once per round, in turn (so each comparison is between calls made seconds apart),
    and prints each case's median time; returns {case: median seconds}."""
    import statistics
    import time

    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"  {statistics.median(ts) * 1e3:7.2f} ms  {name}")
    return {name: statistics.median(ts) for name, ts in times.items()}


# MiB of memory traffic around the grouped GEMMs of one bf16 forward+backward at T=4096, H=I=1024, k=2
# (S = 8192 slots; 1 MiB = one (512 x 1024) bf16 tensor), each tensor read or written once:
#   forward:  gather hidden -> xs 8 + 16; SwiGLU gu -> h 32 + 16; unpermute + combine y -> out 16 + 8
#   backward: gather + weight dout -> dy 8 + 16; SwiGLU backward dh, gu -> dgu, h 16 + 32 + 32 + 16;
#             unpermute + sum dx 16 + 8; routing-weight gradient y, dout 16 + 8
# (xs saved, not gathered again; routing and the k-sized tensors left out.)
TORCH_DISPATCH_MIB = (8 + 16) + (32 + 16) + (16 + 8) + (8 + 16) + (16 + 32 + 32 + 16) + (16 + 8) + (16 + 8)


# (label, environment): torch's allocator as is (glibc's malloc); glibc keeping freed memory; and, where their
# Debian packages are installed (libjemalloc2, libtcmalloc-minimal4), jemalloc and tcmalloc in place of glibc's
# malloc (LD_PRELOAD), the usual advice for torch on CPUs.
_ALLOCATOR_SETTINGS = (("torch's allocator", {}), ("glibc keeps freed", {"CPU_PROBES_KEEP_FREED": "1"}))
_PRELOADS = (("jemalloc", "jemalloc"), ("tcmalloc", "tcmalloc_minimal"))


def _allocator_settings() -> list[tuple[str, dict]]:
    import ctypes.util

    found = [(name, ctypes.util.find_library(lib)) for name, lib in _PRELOADS]
    return list(_ALLOCATOR_SETTINGS) + [(f"{name} (LD_PRELOAD)", {"LD_PRELOAD": so}) for name, so in found if so]


def malloc_cache() -> None:
    print("(1) moe_mlp forward+backward, T=4096, H=I=1024, E=8, k=2, THP_MEM_ALLOC_ENABLE=1; one process per line")
    for dtype in ("fp32", "bf16"):
        for backend in ("torch", "cpu", "dense_gemm"):
            for label, env in _allocator_settings():
                line = _child(_MOE_STEPS, dtype, backend, THP_MEM_ALLOC_ENABLE="1", **env)
                print(f"{dtype:4s} {backend:10s} {label:18s}: {line}", flush=True)
    print("(2) 8 rounds: a 64 MiB tensor, then a small one kept alive, then the large one freed; THP on")
    for label, env in _allocator_settings():
        for _ in range(3):
            print(f"{label:18s}: {_child(_HEAP_GROWTH, THP_MEM_ALLOC_ENABLE='1', **env)}", flush=True)


def torch_floor() -> None:
    _as_moon_fast()
    import torch

    from moon_fast.bench import moe

    shape = {"T": 4096, "H": 1024, "I": 1024, "E": 8, "k": 2}
    work = {b: moe.build(backend=b, dtype=torch.bfloat16, device=torch.device("cpu"), **shape)
            for b in ("dense_gemm", "grouped_gemm_floor", "torch")}
    src, dst = torch.randn(8192, 1024, dtype=torch.bfloat16), torch.empty(8192, 1024, dtype=torch.bfloat16)
    cases = {b: w.step for b, w in work.items()}
    cases["copy (8192 x 1024) bf16"] = lambda: dst.copy_(src)
    print(f"bf16 moe_mlp forward+backward, {shape}, {torch.get_num_threads()} threads, median of 9 interleaved rounds:")
    med = _print_interleaved_medians(cases, rounds=9)
    bandwidth = 2 * 16 / med["copy (8192 x 1024) bf16"]  # MiB/s: 16 MiB read + 16 MiB written
    dispatch = TORCH_DISPATCH_MIB / bandwidth
    floor = med["grouped_gemm_floor"] + dispatch
    dense = med["dense_gemm"]
    print(f"copy bandwidth {bandwidth / 1024:.1f} GiB/s; {TORCH_DISPATCH_MIB} MiB of dispatch traffic take at least "
          f"{dispatch * 1e3:.1f} ms")
    print(f"grouped GEMMs / dense_gemm {med['grouped_gemm_floor'] / dense:.2f}x; floor (grouped GEMMs + least "
          f"traffic) / dense_gemm {floor / dense:.2f}x; torch backend / dense_gemm {med['torch'] / dense:.2f}x; "
          f"target 1.25x")


def gemm_layouts(dtype: str) -> None:

    import torch

    from moon_fast._ext import cpu_ops
    from moon_fast.bench.harness import DTYPES

    dt = DTYPES[dtype]
    threads = torch.get_num_threads()
    a, a2, b = torch.randn(1024, 1024, dtype=dt), torch.randn(2048, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    dgu, xs = torch.randn(1024, 2048, dtype=dt), torch.randn(1024, 1024, dtype=dt)  # one expert's rows
    dgu_t = dgu.t().contiguous()
    one = torch.tensor([1024], dtype=torch.int32)
    out = torch.empty(1, 2048, 1024, dtype=dt)

    def single_thread(fn):
        def run():
            torch.set_num_threads(1)
            try:
                fn()
            finally:
                torch.set_num_threads(threads)
        return run

    cases = {
        f"(1024 x 1024) @ (1024 x 1024), {threads} threads": lambda: a @ b,
        "(1024 x 1024) @ (1024 x 1024), 1 thread": single_thread(lambda: a @ b),
        f"(2048 x 1024) @ (1024 x 1024), {threads} threads": lambda: a2 @ b,
        f"weight grad dgu^T @ xs (2048 x 1024 x 1024), A transposed view, {threads} threads": lambda: dgu.t() @ xs,
        f"weight grad dgu^T @ xs, A row-major (copy made beforehand), {threads} threads": lambda: dgu_t @ xs,
        "weight grad dgu^T @ xs, A transposed view, 1 thread": single_thread(lambda: dgu.t() @ xs),
        "torch transposed copy of dgu (1024 x 2048), .t().contiguous()": lambda: dgu.t().contiguous(),
        "cpu backend weight grad, 1 thread (bf16: transposed copy of A + GEMM; fp32: GEMM on the view)": single_thread(
            lambda: cpu_ops().moe_grouped_mm_wgrad(dgu, xs, one, out)),
    }
    print(f"{dtype} GEMMs of one expert's share (T=4096, H=I=1024, E=8, k=2), median of 15 interleaved calls:")
    _print_interleaved_medians(cases, rounds=15)


def _small_experts_case(experts: int, rows: int = 8192, k_dim: int = 1024, n_dim: int = 2048) -> None:

    import torch

    dt, m, mkldnn = torch.bfloat16, rows // experts, torch.ops.mkldnn
    a = torch.randn(rows, k_dim, dtype=dt)
    w = torch.randn(experts, n_dim, k_dim, dtype=dt)
    out = torch.empty(rows, n_dim, dtype=dt)
    packed = [mkldnn._reorder_linear_weight(w[e], m) for e in range(experts)]

    def calls(weight_of):
        return lambda: [torch.mm(a[e * m:(e + 1) * m], weight_of(e).t(), out=out[e * m:(e + 1) * m])
                        for e in range(experts)]

    cases = {
        f"{experts} calls of {m} rows, {experts} distinct weights": calls(lambda e: w[e]),
        f"{experts} calls of {m} rows, one weight": calls(lambda e: w[0]),
        f"{experts} calls of {m} rows, weights packed beforehand (oneDNN linear)": lambda: [
            mkldnn._linear_pointwise(a[e * m:(e + 1) * m], packed[e], None, "none", [], "") for e in range(experts)],
        f"packing the {experts} weights (oneDNN reorder)": lambda: [
            mkldnn._reorder_linear_weight(w[e], m) for e in range(experts)],
        f"one call of {rows} rows": lambda: torch.mm(a, w[0].t(), out=out),
    }
    print(f"bf16 (rows x {k_dim}) @ W^T, W ({n_dim} x {k_dim}), {rows} rows in all, 1 thread, "
          "median of 7 interleaved:")
    _print_interleaved_medians(cases, rounds=7)


def small_experts() -> None:
    import torch

    torch.set_num_threads(1)  # each cpu-backend GEMM task runs on one thread
    for experts in (8, 64):
        _small_experts_case(experts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    sub.add_parser("gemm-drift").add_argument("--processes", type=int, default=4)
    sub.add_parser("thp-gather")
    profile_args = sub.add_parser("moe-profile")
    profile_args.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    profile_args.add_argument("--backend", default="torch", choices=("torch", "cpu"))
    sub.add_parser("gemm-layouts").add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    sub.add_parser("small-experts")
    sub.add_parser("torch-floor")
    sub.add_parser("malloc-cache")
    args = parser.parse_args()
    if args.probe == "gemm-drift":
        gemm_drift(args.processes)
    elif args.probe == "thp-gather":
        thp_gather()
    elif args.probe == "gemm-layouts":
        gemm_layouts(args.dtype)
    elif args.probe == "small-experts":
        small_experts()
    elif args.probe == "torch-floor":
        torch_floor()
    elif args.probe == "malloc-cache":
        malloc_cache()
    else:
        moe_profile(args.dtype, args.backend)


if __name__ == "__main__":
    main()
