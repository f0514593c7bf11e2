"""Tile sweep of the six Triton MoE launches on a GPU, each against the dense cuBLAS product of its FLOPs.

The launches (S = T * k routed rows, widths H and I):
  swiglu_up     x[token] (S, H) @ gate_up[e]^T -> h, gu            dense: (S, H) @ (H, 2I)
  down_fwd      h (S, I) @ down[e]^T, scattered to slot order        dense: (S, I) @ (I, H)
  dh_swiglu     (w * dout[token]) (S, H) @ down[e] -> dgu, h         dense: (S, H) @ (H, I)
  wgrad_down    sum_r (w dout[token])^T h -> (E, H, I)               dense: (H, S) @ (S, I)
  wgrad_gate_up sum_r dgu^T x[token] -> (E, 2I, H)                   dense: (2I, S) @ (S, H)
  dx            dgu (S, 2I) @ gate_up[e], scattered                  dense: (S, 2I) @ (2I, H)
Each (launch, tile config) is timed with triton.testing.do_bench (median, L2 flushed). Prints a table
and the best config per launch; ``--overhead`` also profiles one whole op call (host vs device time).

    python benchmarks/moe_triton_tiles.py --out DIR [--shapes 16384x8,4096x8] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moon_fast.bench.harness import machine_info  # noqa: E402
from moon_fast.bench.moe import make_problem  # noqa: E402

# (BM, BN, BK, num_warps, num_stages); the SwiGLU launches' BN is per accumulator (they hold two)
ROWS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
SWIGLU = [(128, 64, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
          (64, 128, 64, 4, 4), (128, 64, 64, 4, 3), (256, 64, 64, 8, 3), (128, 128, 32, 8, 4)]
WGRAD = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
         (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def sweep_shape(t, h, i, e, k, dtype, dev="cuda") -> list[dict]:
    from moon_fast.kernels.moe import _Plan, grouped_rows, grouped_wgrad, swiglu_up

    from moon_fast.ops.moe_routing import route

    dev = torch.device(dev)
    hidden, idx, weight, gate_up, down, grad = make_problem(t, h, i, e, k, dtype, dev)
    s = t * k
    routing = route(idx, e)
    base = _Plan(routing, dtype)
    w_sorted = weight.reshape(-1).index_select(0, routing.perm)
    h_act, gu = swiglu_up(base, hidden, gate_up, store_gu=True)
    _, dgu = grouped_rows(base, "dh_swiglu", grad, down, i, a_idx=routing.token, a_scale=w_sorted, swiglu_gu=gu)
    r = routing

    def plan_for(name, cfg):
        p = _Plan(routing, dtype)
        p.cfg = {**p.cfg, name: dict(zip(("BM", "BN", "BK", "num_warps", "num_stages"), cfg))}
        p.schedule(cfg[0])  # made before timing, as the op makes it once per call
        return p

    rnd = lambda *shape: torch.randn(*shape, dtype=dtype, device=dev)  # noqa: E731
    x, a1, d1, d2 = rnd(s, h), rnd(s, i), rnd(s, 2 * i), rnd(s, h)
    w1, w2 = rnd(h, 2 * i), rnd(i, h)
    launches = {
        "swiglu_up": (SWIGLU, lambda p: swiglu_up(p, hidden, gate_up, store_gu=True), lambda: x @ w1,
                      2 * s * h * 2 * i),
        "down_fwd": (ROWS, lambda p: grouped_rows(p, "down_fwd", h_act, down.transpose(1, 2), h, c_idx=r.perm),
                     lambda: a1 @ w2, 2 * s * i * h),
        "dh_swiglu": (SWIGLU, lambda p: grouped_rows(p, "dh_swiglu", grad, down, i, a_idx=r.token, a_scale=w_sorted,
                                                           swiglu_gu=gu), lambda: d2 @ w2.t(), 2 * s * h * i),
        "wgrad_down": (WGRAD, lambda p: grouped_wgrad(p, "wgrad_down", grad, h_act, a_idx=r.token, a_scale=w_sorted),
                       lambda: a1.t() @ d2, 2 * s * h * i),
        "wgrad_gate_up": (WGRAD, lambda p: grouped_wgrad(p, "wgrad_gate_up", dgu, hidden, b_idx=r.token),
                          lambda: x.t() @ d1, 2 * s * h * 2 * i),
        "dx": (ROWS, lambda p: grouped_rows(p, "dx", dgu, gate_up, h, c_idx=r.perm), lambda: d1 @ w1.t(),
               2 * s * h * 2 * i),
    }
    rows = []
    tag = f"{str(dtype).replace('torch.', '')} T={t} E={e}"
    for name, (configs, launch, dense, flops) in launches.items():
        dense_ms = _ms(dense)
        for cfg in configs:
            p = plan_for(name, cfg)
            row = {"T": t, "H": h, "I": i, "E": e, "k": k, "dtype": str(dtype), "launch": name,
                   "config": list(cfg), "dense_ms": dense_ms}
            try:
                launch(p)  # compiles; a launch that does not fit fails here
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                row["ms"] = _ms(lambda p=p, launch=launch: launch(p))
                row["pct_of_dense"] = 100 * dense_ms / row["ms"]
                row["tflops"] = flops / row["ms"] / 1e9
                print(f"{tag} {name:14s} {cfg}: {row['ms']:.3f} ms {row['tflops']:6.1f} TFLOP/s "
                      f"{row['pct_of_dense']:5.1f}% of dense ({dense_ms:.3f} ms)", flush=True)
            except Exception as exc:  # noqa: BLE001  e.g. out of shared memory: recorded, sweep goes on
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"{tag} {name:14s} {cfg}: {row['error']}", flush=True)
            rows.append(row)
    return rows


def overhead(t, h, i, e, k, dtype, backends) -> list[dict]:
    """Host time per fwd+bwd call (no synchronisation inside the loop) against device time (do_bench):
    host >= device means the op is launch-bound at this size. Also the first backend with its
    expert-range check off (the check is a device assert; this shows whether it blocks the host), and the
    host-time ops of one profiled call, with the Python stacks of the slowest."""
    import moon_fast.ops.moe as moe_op
    from moon_fast.ops import moe_mlp

    hidden, idx, weight, gate_up, down, grad = make_problem(t, h, i, e, k, dtype, torch.device("cuda"))
    leaves = [x.requires_grad_() for x in (hidden, weight, gate_up, down)]
    out_rows = []
    check = moe_op._check_expert_range
    variants = [(b, False) for b in backends] + [(backends[0], True)]
    for b, no_check in variants:
        def op(b=b):
            out = moe_mlp(hidden, idx, weight, gate_up, down, backend=b)
            torch.autograd.grad(out, leaves, grad)
        moe_op._check_expert_range = (lambda *a: None) if no_check else check
        try:
            op()
        except Exception as exc:  # noqa: BLE001  e.g. the cuda backend not built: the others still run
            print(f"overhead {b}: {type(exc).__name__}: {exc}", flush=True)
            continue
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            op()
        host_ms = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        dev_ms = _ms(op)
        name = b + (" (expert-range check off)" if no_check else "")
        print(f"overhead {name} T={t}: host {host_ms:.3f} ms per call, device {dev_ms:.3f} ms", flush=True)
        out_rows.append({"backend": name, "T": t, "E": e, "host_ms": host_ms, "device_ms": dev_ms})
        if b == backends[0] and not no_check:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                op()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
            print(prof.key_averages(group_by_stack_n=8).table(sort_by="self_cpu_time_total", row_limit=4),
                  flush=True)
    moe_op._check_expert_range = check
    return out_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="moe_tiles_results")
    p.add_argument("--shapes", default="16384x8,4096x8")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--overhead", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    res = {"machine": machine_info(), "rows": [], "overhead": []}
    path = os.path.join(args.out, f"moe_triton_tiles_{args.dtype}.json")
    if args.overhead:
        res["overhead"] = overhead(4096, 1024, 1024, 8, 2, DTYPES[args.dtype], ["triton", "cuda", "torch"])
    for shp in filter(None, args.shapes.split(",")):
        t, e = (int(v) for v in shp.split("x"))
        res["rows"] += sweep_shape(t, 1024, 1024, e, 2, DTYPES[args.dtype])
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    best: dict = {}
    for row in res["rows"]:
        key = (row["launch"], row["T"], row["E"])
        if "ms" in row and (key not in best or row["ms"] < best[key]["ms"]):
            best[key] = row
    print("\nbest per launch:")
    for (name, t, e), row in best.items():
        print(f"  {name:14s} T={t} E={e}: {row['config']} {row['ms']:.3f} ms, {row['pct_of_dense']:.1f}% of dense")
    # the first shape's best, as $MOON_FAST_MOE_TILES takes it (kernels/moe.py tile_sizes)
    first = next(iter(best))[1:] if best else None
    with open(os.path.join(args.out, f"best_tiles_{args.dtype}.json"), "w") as f:
        json.dump({name: row["config"] for (name, *shape), row in best.items() if tuple(shape) == first}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
