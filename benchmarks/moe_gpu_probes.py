"""Two GPU probes behind open questions of the Triton MoE backend (issue 4), bf16, H=I=1024, k=2, E=8.

``split-swiglu``: the backward's first launch (dh = (w * dout[token]) @ down[e], with the SwiGLU backward
fused into its epilogue: reads gu, writes dgu and h) ran at 14-20% of its dense product in every tile
configuration. Timed here against the same work split in two: the plain grouped GEMM (no epilogue, the
"dh" tiles) and the SwiGLU backward either in torch (moon_fast.ops.moe_torch.swiglu_backward, plus
h = silu(g) * u: several passes) or as kernels/moe_swiglu.py's one pass (the op's split mode).

``launch-cost``: host time of one launch (no synchronisation in the loop), for a Triton grouped GEMM, a
cuBLAS matmul and a torch elementwise op, to see where the op's host time per call goes.

``routing``: device time of the three routings (torch's stable sort, moon_fast.ops.moe_routing.route; the
Triton counting sort, kernels/moe_routing.py; the csrc histogram / scan / scatter, csrc/moe.cu) up to large
S = T * k, checked equal to each other first. The csrc scan was made parallel over chunks without a GPU.

    python benchmarks/moe_gpu_probes.py [--t 16384] [--route-t 16384,131072,524288]      # needs a CUDA GPU
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F
from moe_gpu_launches import MoeLaunches, device_ms, host_ms

from moon_fast.bench.harness import machine_info


def main(argv=None) -> int:
    from moon_fast.kernels.moe import grouped_rows
    from moon_fast.kernels.moe_swiglu import swiglu_backward as one_pass

    from moon_fast.ops.moe_torch import swiglu_backward

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--t", type=int, default=16384)
    p.add_argument("--width", type=int, default=1024, help="H = I")
    p.add_argument("--route-t", default="16384,131072,524288", help="token counts of the routing probe (k = 2)")
    p.add_argument("--device", default="cuda", help="cpu: a logic check under TRITON_INTERPRET=1 (no timings)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("moe_gpu_probes: needs a CUDA GPU", file=sys.stderr)
        return 2
    info = machine_info()
    print({k: info[k] for k in ("device", "torch", "triton", "commit")})
    t, i = args.t, args.width
    m = MoeLaunches(t, i, i, 8, 2, torch.bfloat16, args.device)
    grad, down, r = m.problem[5], m.problem[4], m.plan.routing
    w_sorted, gu = m.saved["w_sorted"], m.saved["gu"]
    dh_swiglu = m.launches["dh_swiglu"]

    def fused():
        return dh_swiglu.run(m.plan)

    def plain():  # the same GEMM without the SwiGLU epilogue (the plain rows kernel, the "dh" tiles)
        return grouped_rows(m.plan, "dh", grad, down, i, a_idx=r.token, a_scale=w_sorted)

    def split_torch():
        dh = plain()
        g = F.silu(gu[:, :i])
        return g * gu[:, i:] * w_sorted[:, None], swiglu_backward(dh, gu, silu_gate=g)  # h as the kernels give it

    def split_one_pass():
        return one_pass(plain(), gu, w_sorted)

    (h1, d1), (h2, d2), (h3, d3) = fused(), split_torch(), split_one_pass()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    print(f"split-swiglu T={t}: relative difference to the torch split: fused dgu {rel(d1, d2):.2e} h "
          f"{rel(h1, h2):.2e}; one-pass split dgu {rel(d3, d2):.2e} h {rel(h3, h2):.2e}")
    dh = plain()
    print(f"split-swiglu T={t}: fused {device_ms(fused):.3f} ms, split with torch {device_ms(split_torch):.3f} ms, "
          f"split with the one pass {device_ms(split_one_pass):.3f} ms (the pass alone "
          f"{device_ms(lambda: one_pass(dh, gu, w_sorted)):.3f} ms), plain GEMM alone {device_ms(plain):.3f} ms, "
          f"dense {device_ms(dh_swiglu.dense):.3f} ms", flush=True)

    small = torch.randn(64, 64, device=args.device)
    for name, fn in (("triton grouped GEMM launch", plain),
                     ("cuBLAS matmul (64x64)", lambda: small @ small),
                     ("torch add (64x64)", lambda: small + small)):
        print(f"launch-cost: {name}: {host_ms(fn, n=200) * 1e3:.1f} us of host time per call", flush=True)
    routing_probe([int(x) for x in args.route_t.split(",")], args.device)
    return 0


def routing_probe(token_counts: list[int], device: str) -> None:
    from moon_fast.kernels.moe_routing import route_triton

    from moon_fast.ops.moe_cuda import csrc_route
    from moon_fast.ops.moe_routing import route

    for t in token_counts:
        for e in (8, 64):
            idx = torch.rand(t, e, device=device).argsort(dim=1)[:, :2].contiguous()  # distinct top-2 experts
            ways = {"torch": functools.partial(route, idx, e),
                    "triton": functools.partial(lambda i, n: route_triton(i, n)[0], idx, e),
                    "csrc": functools.partial(csrc_route, idx, e)}
            want = ways["torch"]()
            for name, fn in ways.items():
                got = fn()
                assert torch.equal(got.perm, want.perm) and torch.equal(got.offsets, want.offsets), name
            times = ", ".join(f"{name} {device_ms(fn):.3f} ms" for name, fn in ways.items())
            print(f"routing T={t} k=2 E={e} (S={2 * t}): {times}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
