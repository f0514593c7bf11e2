"""The device's MEASURED peaks, the denominators of "percent of peak" (roofline).

Datasheet peaks are not used: they are not reachable by ordinary code (boost clocks, sparsity), and a
CPU has none that applies to a shared machine. Instead, once per ``moon-fast bench`` run:

* dense GEMM rate per dtype (fp32, bf16, fp16): ``torch.matmul`` of square matrices, best of a few runs
  (CPU: n = 2048 fp32/bf16, 1024 fp16; GPU: n = 8192; fp32 on a GPU follows torch's TF32 setting,
  off by default, so it is the true fp32 rate);
* memory bandwidth: a large device-to-device copy, counted as read + write.

An op's percent of peak is achieved / attainable, with the roofline attainable rate
``min(gemm_peak[dtype], bandwidth * flops / bytes)`` when the op's byte count is known.
"""

from __future__ import annotations

import time

import torch

from moon_fast.bench.harness import synchronize


def _best_seconds(fn, device: torch.device, repeats: int, budget_s: float) -> float:
    fn()  # warm-up
    synchronize(device)
    best = float("inf")
    spent = 0.0
    for i in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        if spent > budget_s and i >= 1:
            break
    return best


def measure_peaks(device: torch.device | str | None = None, *, small: bool = False) -> dict:
    """{"gemm_tflops": {dtype: TFLOP/s}, "bandwidth_gbps": GB/s, "method": str}; ``small`` shrinks the
    problem sizes (tests); the numbers are then only rough."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    sizes = {"fp32": 8192, "bf16": 8192, "fp16": 8192} if gpu else {"fp32": 2048, "bf16": 2048, "fp16": 1024}
    if small:
        sizes = dict.fromkeys(sizes, 256)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    gemm = {}
    for name, n in sizes.items():
        try:
            a = torch.randn(n, n, device=dev, dtype=dtypes[name])
            b = torch.randn(n, n, device=dev, dtype=dtypes[name])
            s = _best_seconds(lambda a=a, b=b: torch.matmul(a, b), dev, repeats=5 if gpu else 3, budget_s=3.0)
            gemm[name] = 2.0 * n ** 3 / s / 1e12
            del a, b
        except (RuntimeError, NotImplementedError) as exc:  # a dtype without a GEMM kernel here
            gemm[name] = None
            print(f"peak GEMM {name}: not measured ({exc})")
    n_bytes = (1 << 30) if gpu else (1 << 28)
    if small:
        n_bytes = 1 << 22
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    s = _best_seconds(lambda src=src, dst=dst: dst.copy_(src), dev, repeats=5, budget_s=2.0)
    bw = 2.0 * n_bytes / s / 1e9
    return {
        "gemm_tflops": gemm,
        "bandwidth_gbps": bw,
        "method": (f"best of a few torch.matmul n={sizes} and a {n_bytes >> 20} MiB copy (read+write) on "
                   f"{dev.type}, {torch.get_num_threads()} CPU threads"),
    }


def merge_peaks(a: dict, b: dict) -> dict:
    """The better of two peak measurements per quantity (the bench command probes at the start and
    the end of a run, so one disturbed probe on a shared machine does not set the denominator)."""
    ga, gb = a.get("gemm_tflops") or {}, b.get("gemm_tflops") or {}
    gemm = {k: max((v for v in (ga.get(k), gb.get(k)) if v), default=None) for k in {**ga, **gb}}
    return {"gemm_tflops": gemm, "bandwidth_gbps": max(a.get("bandwidth_gbps") or 0, b.get("bandwidth_gbps") or 0),
            "method": a.get("method", "") + "; best of a probe at the start and one at the end of the run"}


def attainable_tflops(peaks: dict, dtype: str, flops: float | None, n_bytes: float | None) -> tuple[float | None, str]:
    """Roofline bound (TFLOP/s) for an op with ``flops`` and ``n_bytes`` per call, and which roof binds."""
    peak = (peaks.get("gemm_tflops") or {}).get(dtype)
    bw = peaks.get("bandwidth_gbps")
    if not flops or not peak:
        return None, ""
    if n_bytes and bw:
        mem_roof = bw * 1e9 * (flops / n_bytes) / 1e12
        if mem_roof < peak:
            return mem_roof, "memory"
    return peak, "compute"
