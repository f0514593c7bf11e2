"""Launches per moe_mlp forward and backward, per backend: on a GPU the op was bound by host time per
launch (benchmarks/results/2026-11-22-h100/), so this is the count to keep low.

Counts (moon_fast/bench/launches.py): dispatched torch ops (less views and allocations) and Triton launches,
on any device; on a GPU also the CUDA kernels the profiler records. Without a GPU the Triton kernels run
under TRITON_INTERPRET=1 (set here), so use a small shape there: the counts do not depend on it. The
csrc backends (``cuda``, ``cpu``) call kernels the dispatch mode does not see, so they are counted only
by the profiler, on a GPU.

    python benchmarks/moe_launch_count.py [--out DIR] [--shape T,H,I,E,k] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moon_fast.bench.harness import DTYPES, machine_info, write_rows  # noqa: E402
from moon_fast.bench.launches import count_launches, cuda_kernels  # noqa: E402
from moon_fast.bench.moe import make_problem  # noqa: E402
from moon_fast.ops import moe_mlp  # noqa: E402
from moon_fast.ops.moe import BACKENDS  # noqa: E402

COUNTED = ("triton", "torch", "grouped_mm")  # every launch goes through torch's dispatcher or Triton
PROFILED_ONLY = ("cuda",)


def count_backend(backend: str, problem, dev: torch.device) -> list[dict]:
    """Rows for the forward and the backward of one call, after a warm-up call (compiles, caches)."""
    hidden, idx, weight, gate_up, down, grad = problem
    leaves = [x.detach().requires_grad_() for x in (hidden, weight, gate_up, down)]

    def forward():
        return moe_mlp(leaves[0], idx, *leaves[1:], backend=backend)

    def backward(out):
        for x in leaves:
            x.grad = None  # no gradient accumulation: a fresh step's backward
        out.backward(grad)

    backward(forward())
    rows = []
    if backend in COUNTED:
        with count_launches() as fwd:
            out = forward()
        with count_launches() as bwd:
            backward(out)
        rows = [{"backend": backend, "phase": phase, "launches": c.total, "torch_ops": sum(c.torch.values()),
                 "triton_launches": sum(c.triton.values()), "detail": c.summary()}
                for phase, c in (("forward", fwd), ("backward", bwd))]
    if dev.type == "cuda":
        out_holder = []
        kernels = {"forward": cuda_kernels(lambda: out_holder.append(forward())),
                   "backward": cuda_kernels(lambda: backward(out_holder[0]))}
        if not rows:
            rows = [{"backend": backend, "phase": phase} for phase in ("forward", "backward")]
        for row in rows:
            row["cuda_kernels"] = kernels[row["phase"]]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="write moe_launch_count.{csv,json} here")
    p.add_argument("--shape", default=None, help="T,H,I,E,k (default 4096,1024,1024,8,2 on a GPU, 64,32,32,8,2 off one)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("4096,1024,1024,8,2" if dev.type == "cuda" else "64,32,32,8,2")
    t, h, i, e, k = (int(v) for v in shape.split(","))
    problem = make_problem(t, h, i, e, k, DTYPES[args.dtype], dev)
    info = machine_info()
    print(f"# moe_mlp launches per call, T={t} H={h} I={i} E={e} k={k} {args.dtype}, {info['device']}, "
          f"torch {info['torch']}, triton {info['triton']}, commit {info['commit']}")
    rows = []
    for backend in COUNTED + PROFILED_ONLY:
        if BACKENDS.why_unavailable(backend, dev.type) or (backend in PROFILED_ONLY and dev.type != "cuda"):
            continue
        for row in count_backend(backend, problem, dev):
            rows.append({"T": t, "H": h, "I": i, "E": e, "k": k, "dtype": args.dtype, **row})
            print(f"{backend:10s} {row['phase']:8s} " + (row.get("detail") or "")
                  + (f"; CUDA kernels {row['cuda_kernels']}" if "cuda_kernels" in row else ""), flush=True)
    if args.out:
        write_rows(args.out, "moe_launch_count", info, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
