"""Largest batch each contrastive-loss backend can run, with time and peak memory of ONE forward+backward.

Each (backend, B) runs in a fresh subprocess (so an out-of-memory kill is recorded, not fatal, and
peak memory is that process's own); CPU peak memory is peak RSS above the RSS after the inputs were
made, CUDA peak memory is max_memory_allocated above the inputs. Doubling B per backend stops at the
first failure. The workload is the same as ``moon-fast bench``'s (moon_fast/bench/contrastive.py):
CLIP's symmetric loss, D=512, unit-norm inputs.

    .venv/bin/python benchmarks/contrastive_memory.py --backends torch open_clip --start 32768 --max 131072
    .venv/bin/python benchmarks/contrastive_memory.py --one torch 131072     # a single measurement

Not a test: nothing here asserts. Keep the machine quiet while it runs (2 threads by default).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure_one(backend: str, b: int, d: int, dtype: str, threads: int) -> dict:
    import torch

    from moon_fast.bench.contrastive import build
    from moon_fast.bench.harness import DTYPES, _peak_rss_bytes, _rss_bytes

    torch.set_num_threads(threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = build(backend=backend, dtype=DTYPES[dtype], device=dev, B=b, D=d)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    t0 = time.perf_counter()
    out = work.forward()
    work.backward(out)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _peak_rss_bytes() - before
    return {"backend": backend, "B": b, "D": d, "dtype": dtype, "status": "ok",
            "seconds": time.perf_counter() - t0, "peak_mem_bytes": int(max(0, peak))}


def run_subprocess(backend: str, b: int, args) -> dict:
    cmd = [sys.executable, __file__, "--one", backend, str(b), "--dim", str(args.dim), "--dtype", args.dtype,
           "--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "B": b, "status": f"timeout after {args.timeout} s"}
    if proc.returncode != 0:
        oom = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        return {"backend": backend, "B": b, "status": "oom" if oom else f"error: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "open_clip", "reference"])
    ap.add_argument("--start", type=int, default=32768)
    ap.add_argument("--max", type=int, default=131072)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--one", nargs=2, metavar=("BACKEND", "B"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.dim, args.dtype, args.threads)))
        return
    for backend in args.backends:
        b = args.start
        while b <= args.max:
            r = run_subprocess(backend, b, args)
            mem = f"{r['peak_mem_bytes'] / 2**30:.2f} GiB" if "peak_mem_bytes" in r else "-"
            secs = f"{r['seconds']:.1f} s" if "seconds" in r else "-"
            print(f"{backend:10s} B={b:7d} {r['status']:10s} fwd+bwd {secs:>9s} peak {mem}", flush=True)
            if r["status"] != "ok":
                break
            b *= 2


if __name__ == "__main__":
    main()
