"""Issue 4's GPU target: the Triton grouped GEMMs of moe_mlp against dense cuBLAS GEMMs of the same FLOPs.

For each shape (S = T * k routed rows through H -> 2I -> H, E experts, top-k routing of random logits):
- ``dense_fwd``: x (S, H) @ W1 (H, 2I), then a (S, I) @ W2 (I, H): the forward's FLOPs on cuBLAS.
- ``triton_fwd``: the forward's two Triton launches alone (SwiGLU fused into the first GEMM's epilogue, the
  scatter fused into the second's stores); routing and (fp32) the N-contiguous weight
  copies made beforehand (benchmarks/moe_gpu_launches.py). In runs at commit 7ae495c and before, this row used the stored
  K-contiguous weights.
- ``dense_bwd`` / ``triton_bwd``: the backward's four products (dX2 with the SwiGLU backward epilogue, dW2,
  dW1, dX1 with the scatter) likewise. ``triton_bwd_split``: the same with the SwiGLU backward split out of
  the dX2 GEMM into its own elementwise pass (``$MOON_FAST_MOE_SWIGLU_BWD=split``), and ``op_triton_split``
  the whole op in that mode: which of the two modes should be the default is measured here.
- ``*_tma`` (16-bit, on a GPU with TMA): the same with the plain-tile operands loaded through TMA
  descriptors (``$MOON_FAST_MOE_TMA=1``), against the pointer loads of the rows above. ``*_tma_persistent``:
  with TMA, the row-tile launches persistent too (``$MOON_FAST_MOE_PERSISTENT=1``: one program per SM looping
  over the tiles), against the ``*_tma`` rows.
- ``torch_gmm_fwd`` / ``_bwd``, ``grouped_gemm_fwd`` / ``_bwd``: the same products as other libraries'
  grouped GEMMs (moe_gpu_launches ``peer_products``: torch's grouped_mm, the grouped_gemm package), on
  operands gathered beforehand: the grouped-GEMM peers of the Triton rows. A peer that cannot run here
  (package missing, dtype) gets a row with ``skipped`` saying why.
- ``dense_fwdbwd`` and the whole op, forward+backward, per backend (``triton``, ``cuda``, ``torch``,
  ``grouped_mm``, and the peers ``grouped_gemm`` and ``megablocks``: ``bash benchmarks/peers.sh``), routing
  included.
Each time is the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).
"% of dense" = dense time / our time (the issue asks >= 80% for the grouped GEMM).
- ``hbm_copy`` and ``floor_<launch>``: first, the GPU memory's copy rate, and per launch the lower bound of its
  time: its dense product's time or its bytes at that rate (moe_gpu_launches ``Launch.bytes``), whichever is
  longer. A launch whose epilogue reads and writes more than its GEMM (dh_swiglu: gu in, dgu and w * h out) can
  be bound by memory below "80% of dense". "% of floor" on the Triton rows = the sum of their launches'
  floors / our time.

    python benchmarks/moe_gpu_gemm.py --out results_dir     # needs a CUDA GPU; writes moe_gpu_gemm.{csv,json}
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch
from moe_gpu_launches import BACKWARD, BACKWARD_SPLIT, FORWARD, PEERS, MoeLaunches, copy_gbps, device_ms

from moon_fast.bench.harness import machine_info, write_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def measure_shape(t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype, backends: list[str],
                  dev: str = "cuda") -> list[dict]:
    from moon_fast.kernels.moe import _device_has_tma, persistent_programs

    from moon_fast.ops.moe import BACKENDS

    m = MoeLaunches(t, h, i, e, k, dtype, dev)
    fwd_flops, bwd_flops = m.flops(FORWARD), m.flops(BACKWARD)
    rows = []

    def record(name, fn, flops, baseline=None, launches=()):
        ms = device_ms(fn)
        row = {**m.shape, "what": name, "ms": ms, "tflops": flops / ms / 1e9}
        if baseline is not None:
            row["pct_of_dense"] = 100.0 * baseline / ms
        if launches:
            row["pct_of_floor"] = 100.0 * sum(floors[n]["ms"] for n in launches) / ms
        rows.append(row)
        print(f"{m.shape['dtype']} T={t} E={e}: {name:18s} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s"
              + (f"  {row['pct_of_dense']:5.1f}% of dense" if baseline is not None else "")
              + (f"  {row['pct_of_floor']:5.1f}% of floor" if launches else ""), flush=True)
        return ms

    def skip(name, reason):
        rows.append({**m.shape, "what": name, "skipped": reason})
        print(f"{m.shape['dtype']} T={t} E={e}: {name:18s} skipped: {reason}", flush=True)

    gbps = copy_gbps()
    rows.append({**m.shape, "what": "hbm_copy", "gbps": gbps})
    print(f"{m.shape['dtype']} T={t} E={e}: {'hbm_copy':18s} {gbps:8.0f} GB/s", flush=True)
    floors = m.floors(gbps)
    for name, f in floors.items():
        rows.append({**m.shape, "what": f"floor_{name}", **f, "mbytes": m.launches[name].bytes / 1e6})
        print(f"{m.shape['dtype']} T={t} E={e}: floor_{name:12s} {f['ms']:8.3f} ms ({f['bound']}: dense "
              f"{f['dense_ms']:.3f} ms, {m.launches[name].bytes / 1e6:.0f} MB at the copy rate {f['hbm_ms']:.3f} ms)",
              flush=True)
    base_f = record("dense_fwd", lambda: m.dense(FORWARD), fwd_flops)
    record("triton_fwd", lambda: m.run(FORWARD), fwd_flops, base_f, FORWARD)
    base_b = record("dense_bwd", lambda: m.dense(BACKWARD), bwd_flops)
    record("triton_bwd", lambda: m.run(BACKWARD), bwd_flops, base_b, BACKWARD)
    record("triton_bwd_split", lambda: m.run(BACKWARD_SPLIT), bwd_flops, base_b, BACKWARD_SPLIT)
    tma = dtype != torch.float32 and _device_has_tma(torch.device(dev))
    if tma:
        tma_plan = m.plan_variant(tma=True)
        record("triton_fwd_tma", lambda: m.run(FORWARD, tma_plan), fwd_flops, base_f, FORWARD)
        record("triton_bwd_tma", lambda: m.run(BACKWARD, tma_plan), bwd_flops, base_b, BACKWARD)
        record("triton_bwd_split_tma", lambda: m.run(BACKWARD_SPLIT, tma_plan), bwd_flops, base_b, BACKWARD_SPLIT)
        loop = m.plan_variant(tma=True, programs=persistent_programs(torch.device(dev)))
        record("triton_fwd_tma_persistent", lambda: m.run(FORWARD, loop), fwd_flops, base_f, FORWARD)
        record("triton_bwd_tma_persistent", lambda: m.run(BACKWARD, loop), bwd_flops, base_b, BACKWARD)
        record("triton_bwd_split_tma_persistent", lambda: m.run(BACKWARD_SPLIT, loop), bwd_flops, base_b,
               BACKWARD_SPLIT)
    for peer in PEERS:
        try:
            products = m.peer_products(peer)
        except RuntimeError as exc:
            skip(f"{peer}_fwd", str(exc))
            skip(f"{peer}_bwd", str(exc))
            continue
        record(f"{peer}_fwd", lambda p=products: [p[n]() for n in FORWARD], fwd_flops, base_f)
        record(f"{peer}_bwd", lambda p=products: [p[n]() for n in BACKWARD], bwd_flops, base_b)
    base = record("dense_fwdbwd", lambda: m.dense(FORWARD + BACKWARD), fwd_flops + bwd_flops)
    # (name, backend, environment for the whole measurement of that row)
    ops = [(f"op_{b}", b, {}) for b in backends]
    if "triton" in backends:
        split, on = {"MOON_FAST_MOE_SWIGLU_BWD": "split"}, {"MOON_FAST_MOE_TMA": "1"}
        ops += [("op_triton_split", "triton", split)]
        ops += [("op_triton_tma", "triton", on), ("op_triton_split_tma", "triton", {**on, **split})] * tma
        ops += [("op_triton_tma_persistent", "triton", {**on, "MOON_FAST_MOE_PERSISTENT": "1"})] * tma
    for name, backend, env in ops:
        reason = BACKENDS.why_unavailable(backend, dev)
        if reason:
            skip(name, reason)
            continue
        op = m.op_step(backend)
        with mock.patch.dict(os.environ, env):
            try:
                op()
            except Exception as exc:  # noqa: BLE001  recorded; the other backends still run
                rows.append({**m.shape, "what": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
                print(f"{name}: {rows[-1]['error']}", flush=True)
                continue
            record(name, op, fwd_flops + bwd_flops, base)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="moe_gpu_gemm_results")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--shapes", default="4096x8,16384x8,4096x32,16384x64",
                   help="TxE list at H=I=1024, k=2")
    p.add_argument("--backends", default="triton,cuda,torch,grouped_mm,grouped_gemm,megablocks")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_gpu_gemm: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    info = machine_info()
    for name in args.dtypes.split(","):
        for shp in args.shapes.split(","):
            t, e = (int(v) for v in shp.split("x"))
            rows += measure_shape(t, 1024, 1024, e, 2, DTYPES[name], args.backends.split(","))
            write_rows(args.out, "moe_gpu_gemm", info, rows)  # saved after each shape
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
