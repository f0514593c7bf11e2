"""Two GPU probes behind open questions of the Triton MoE backend (issue 4), bf16, H=I=1024, k=2, E=8.

``split-swiglu``: the backward's first launch (dh = (w * dout[token]) @ down[e], with the SwiGLU backward
fused into its epilogue: reads gu, writes dgu and h) ran at 14-20% of its dense product in every tile
configuration. Timed here against the same work split in two: the plain grouped GEMM (no epilogue) and
the SwiGLU backward in torch (moon_fast.ops.moe_torch.swiglu_backward, plus h = silu(g) * u).

``launch-cost``: host time of one launch (no synchronisation in the loop), for a Triton grouped GEMM, a
cuBLAS matmul and a torch elementwise op, to see where the op's host time per call goes.

    python benchmarks/moe_gpu_probes.py [--t 16384]      # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moon_fast.bench.harness import machine_info  # noqa: E402
from moon_fast.bench.moe import make_problem  # noqa: E402

DEV = "cuda"


def _ms(fn) -> float:
    if DEV != "cuda":
        return float("nan")
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _host_us(fn, n=200) -> float:
    fn()
    if DEV != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def main(argv=None) -> int:
    from moon_fast.kernels.moe import _Plan, grouped_rows

    from moon_fast.ops.moe_routing import route
    from moon_fast.ops.moe_torch import swiglu_backward

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--t", type=int, default=16384)
    p.add_argument("--device", default="cuda", help="cpu: a logic check under TRITON_INTERPRET=1 (timings meaningless)")
    args = p.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("moe_gpu_probes: needs a CUDA GPU", file=sys.stderr)
        return 2
    info = machine_info()
    print({k: info[k] for k in ("device", "torch", "triton", "commit")})
    t, h, i, e, k = args.t, 1024, 1024, 8, 2
    hidden, idx, weight, gate_up, down, grad = make_problem(t, h, i, e, k, torch.bfloat16, torch.device(DEV))
    plan = _Plan(route(idx, e), torch.bfloat16)
    r = plan.routing
    w_sorted = weight.reshape(-1).index_select(0, r.perm)
    gu = torch.randn(t * k, 2 * i, dtype=torch.bfloat16, device=DEV)

    def fused():
        return grouped_rows(plan, "dh_swiglu", grad, down, i, a_idx=r.token, a_scale=w_sorted, swiglu_gu=gu)

    def plain():
        return grouped_rows(plan, "down_fwd", grad, down, i, a_idx=r.token, a_scale=w_sorted)

    def split():
        dh = plain()
        g = F.silu(gu[:, :i])
        return g * gu[:, i:], swiglu_backward(dh, gu, silu_gate=g)

    (h1, d1), (h2, d2) = fused(), split()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"split-swiglu T={t}: relative difference fused vs split: dgu {rel(d1, d2):.2e}, h {rel(h1, h2):.2e}")
    dense_b = torch.randn(h, i, dtype=torch.bfloat16, device=DEV)
    dense_a = torch.randn(t * k, h, dtype=torch.bfloat16, device=DEV)
    print(f"split-swiglu T={t}: fused {_ms(fused):.3f} ms, split {_ms(split):.3f} ms, "
          f"plain GEMM alone {_ms(plain):.3f} ms, "
          f"dense {_ms(lambda: dense_a @ dense_b):.3f} ms", flush=True)

    small = torch.randn(64, 64, device=DEV)
    for name, fn in (("triton grouped GEMM launch", plain),
                     ("cuBLAS matmul (64x64)", lambda: small @ small),
                     ("torch add (64x64)", lambda: small + small)):
        print(f"launch-cost: {name}: {_host_us(fn):.1f} us of host time per call", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
