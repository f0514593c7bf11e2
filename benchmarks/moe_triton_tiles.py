"""Tile sweep of the Triton MoE launches on a GPU (benchmarks/moe_gpu_launches.py lists them), each
against the dense cuBLAS product of its FLOPs. Each (launch, tile config) is timed with
triton.testing.do_bench (median, L2 flushed). Prints a table and the best config per launch, and writes
``best_tiles_<dtype>.json`` in the form ``$MOON_FAST_MOE_TILES`` takes; ``--overhead`` also compares host
and device time of whole op calls and profiles one.

    python benchmarks/moe_triton_tiles.py --out DIR [--shapes 16384x8,4096x8] [--dtype bf16] [--overhead] [--tma]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from moe_gpu_launches import MoeLaunches, device_ms, host_ms

from moon_fast.bench.harness import machine_info

# (BM, BN, BK, num_warps, num_stages); swiglu_up's BN is per projection (its accumulator is (BM, 2 BN): gate and up)
ROWS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)]
# (64, 64, 64, 4, 3|4): the fused dh launch's first tiles that fit 2 programs per SM on sm_90 without spills
# (tests/aot_triton.py ctas_per_sm; its tiles now fit 1), so one program's epilogue traffic can overlap the
# other's MMAs
SWIGLU = [(128, 64, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
          (64, 128, 64, 4, 4), (128, 64, 64, 4, 3), (256, 64, 64, 8, 3), (128, 128, 32, 8, 4),
          (64, 64, 64, 4, 3), (64, 64, 64, 4, 4)]
WGRAD = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 128, 32, 8, 4), (128, 256, 64, 8, 3),
         (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4)]
CANDIDATES = {"swiglu_up": SWIGLU, "down_fwd": ROWS, "dh_swiglu": SWIGLU, "wgrad_down": WGRAD,
              "wgrad_gate_up": WGRAD, "dx": ROWS, "dh": ROWS}  # dh: the split mode's plain GEMM (+ its pass)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _ms(fn) -> float:
    return device_ms(fn, warmup=10, rep=60)


def best_tiles(best: dict, dtype: str) -> dict:
    """``best`` ({(launch, T, E): row}): the first shape's best config per launch, as $MOON_FAST_MOE_TILES
    takes it (kernels/moe.py tile_sizes), keyed by ``dtype`` ("bf16") so that it leaves the other dtypes'
    tiles alone."""
    first = next(iter(best))[1:] if best else None
    return {dtype: {name: row["config"] for (name, *shape), row in best.items() if tuple(shape) == first}}


def sweep_shape(t, h, i, e, k, dtype, dev="cuda", tma=False) -> list[dict]:
    """tma: the launches with TMA descriptor loads ($MOON_FAST_MOE_TMA=1), whose best tiles may differ."""
    m = MoeLaunches(t, h, i, e, k, dtype, dev)
    m.plan = m.plan_variant(tma=tma)
    rows = []
    tag = f"{m.shape['dtype']} T={t} E={e}"
    for name, configs in CANDIDATES.items():
        launch = m.launches[name]
        dense_ms = _ms(launch.dense)
        for cfg in configs:
            row = {**m.shape, "launch": name, "config": list(cfg), "dense_ms": dense_ms}
            try:
                p = m.plan_with(name, cfg)
                launch.run(p)  # compiles; a launch that does not fit fails here
                row["ms"] = _ms(lambda p=p, launch=launch: launch.run(p))
                row["pct_of_dense"] = 100 * dense_ms / row["ms"]
                row["tflops"] = launch.flops / row["ms"] / 1e9
                print(f"{tag} {name:14s} {cfg}: {row['ms']:.3f} ms {row['tflops']:6.1f} TFLOP/s "
                      f"{row['pct_of_dense']:5.1f}% of dense ({dense_ms:.3f} ms)", flush=True)
            except Exception as exc:  # noqa: BLE001  e.g. out of shared memory: recorded, sweep goes on
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"{tag} {name:14s} {cfg}: {row['error']}", flush=True)
            rows.append(row)
    return rows


def overhead(t, h, i, e, k, dtype, backends) -> list[dict]:
    """Host time per fwd+bwd call (no synchronisation inside the loop) against device time: host >= device
    means the op is bound by the host at this size. Prints the host-time ops of one profiled call of the
    first backend."""
    m = MoeLaunches(t, h, i, e, k, dtype)
    out_rows = []
    for b in backends:
        op = m.op_step(b)
        try:
            op()
        except Exception as exc:  # noqa: BLE001  e.g. the cuda backend not built: the others still run
            print(f"overhead {b}: {type(exc).__name__}: {exc}", flush=True)
            continue
        host, dev = host_ms(op), _ms(op)
        print(f"overhead {b} T={t}: host {host:.3f} ms per call, device {dev:.3f} ms", flush=True)
        out_rows.append({"backend": b, "T": t, "E": e, "host_ms": host, "device_ms": dev})
        if b == backends[0] and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                op()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18), flush=True)
    return out_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="moe_tiles_results")
    p.add_argument("--shapes", default="16384x8,4096x8")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--tma", action="store_true", help="sweep the TMA descriptor loads ($MOON_FAST_MOE_TMA=1)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    res = {"machine": machine_info(), "tma": args.tma, "rows": [], "overhead": []}
    tag = f"{args.dtype}_tma" if args.tma else args.dtype
    path = os.path.join(args.out, f"moe_triton_tiles_{tag}.json")
    if args.overhead:
        res["overhead"] = overhead(4096, 1024, 1024, 8, 2, DTYPES[args.dtype], ["triton", "cuda", "torch"])
    for shp in filter(None, args.shapes.split(",")):
        t, e = (int(v) for v in shp.split("x"))
        res["rows"] += sweep_shape(t, 1024, 1024, e, 2, DTYPES[args.dtype], tma=args.tma)
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
    with open(os.path.join(args.out, f"best_tiles_{tag}.json"), "w") as f:
        json.dump(best_tiles(best, args.dtype), f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
