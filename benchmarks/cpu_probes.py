"""Small CPU measurements behind statements in the README and the benchmark notes.

    python benchmarks/cpu_probes.py gemm-drift [--processes 4]   # one bf16 GEMM, timed in fresh processes
    python benchmarks/cpu_probes.py thp-gather                   # a large gather with / without huge pages
    python benchmarks/cpu_probes.py moe-profile [--dtype bf16] [--backend torch]   # torch.profiler table of moe_mlp

* gemm-drift: the median time of a (1024 x 1024) @ (1024 x 1024) bf16 matmul in each of several fresh
  processes. Why ``moon-fast bench --interleave`` exists: the same call differs between processes.
* thp-gather: a gather into a fresh (8192 x 1024) fp32 tensor in a process with THP_MEM_ALLOC_ENABLE=0 and
  one with 1 (why ``moon-fast`` sets it).
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


def _child(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    sub.add_parser("gemm-drift").add_argument("--processes", type=int, default=4)
    sub.add_parser("thp-gather")
    profile_args = sub.add_parser("moe-profile")
    profile_args.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    profile_args.add_argument("--backend", default="torch", choices=("torch", "cpu"))
    args = parser.parse_args()
    if args.probe == "gemm-drift":
        gemm_drift(args.processes)
    elif args.probe == "thp-gather":
        thp_gather()
    else:
        moe_profile(args.dtype, args.backend)


if __name__ == "__main__":
    main()
