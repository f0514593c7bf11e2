"""How much of a Triton MoE launch's time goes to re-reading its row operand from HBM: a fit over a tile
sweep already measured (benchmarks/moe_triton_tiles.py's output), no GPU needed.

A row-tile launch (swiglu_up, down_fwd, dh_swiglu, dx, dh) computes C (S, N) one (BM, BN) tile per program.
Each program reads a (BM, K) block of the row operand A, so A is read once per column tile: N / BN times.
With the programs ordered row tile fastest (kernels/moe.py before 7fff34c, which made the column tile
fastest), the programs that share an A block ran a whole grid row apart, and the block had left L2 by then,
so each of those reads came from HBM. If so, a launch's time grows by |A| / (HBM rate) per extra column tile. This script fits
time = a + b * (N / BN) * |A| over a launch's tile candidates and prints 1 / b, the rate at which the extra
reads were paid: near the HBM copy rate (about 3 TB/s on an H100) says the re-reads were the cost.

The weight-gradient launches (before 7fff34c: grid expert fastest, then M, then N) re-read their A operand
N / BN times the same way; printed with the same fit. On a sweep taken since 7fff34c, slopes near zero say
the new order removed the re-reads.

    python benchmarks/moe_tile_rereads.py benchmarks/results/2026-11-22-h100/moe_triton_tiles_bf16.txt
"""

from __future__ import annotations

import argparse
import re

import numpy as np

LINE = re.compile(r"(?P<dtype>\w+) T=(?P<t>\d+) E=(?P<e>\d+) (?P<launch>\w+)\s+\((?P<tiles>[\d, ]+)\): "
                  r"(?P<ms>[\d.]+|nan) ms")  # nan: a sweep run without a GPU (logic check)
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def row_operand(launch: str, s: int, h: int, i: int) -> tuple[int, int]:
    """(elements of the operand re-read per column tile, N: the width cut into column tiles)."""
    return {"swiglu_up": (s * h, i),      # x[token] (S, H); N = I per projection
            "down_fwd": (s * i, h),       # h (S, I)
            "dh_swiglu": (s * h, i),      # dout[token] (S, H)
            "dh": (s * h, i),
            "dx": (s * 2 * i, h),         # dgu (S, 2I)
            "wgrad_down": (s * h, i),     # A = dout[token] (S, H) per (M = H) block; N = I
            "wgrad_gate_up": (s * 2 * i, h)}[launch]  # A = dgu (S, 2I); N = H


def fit(path: str, width: int, k: int) -> list[str]:
    groups: dict[tuple, list[tuple]] = {}
    for line in open(path):
        m = LINE.search(line)
        if m and m["ms"] != "nan":
            tiles = tuple(int(x) for x in m["tiles"].split(","))
            key = (m["dtype"], int(m["t"]), int(m["e"]), m["launch"])
            groups.setdefault(key, []).append((tiles, float(m["ms"])))
    out = []
    for (dtype, t, e, launch), rows in groups.items():
        elems, n = row_operand(launch, t * k, width, width)
        a_bytes = elems * BYTES[dtype]
        x = np.array([n / tiles[1] * a_bytes for tiles, _ in rows])  # bytes read of A over the launch
        y = np.array([ms for _, ms in rows]) * 1e-3
        if len(set(x)) < 2:
            continue
        slope, icpt = np.polyfit(x, y, 1)
        r = np.corrcoef(x, y)[0, 1]
        out.append(f"{dtype} T={t} E={e} {launch:<14} |A| {a_bytes / 1e6:6.1f} MB, column tiles "
                   f"{sorted({n // tiles[1] for tiles, _ in rows})}: extra A reads paid at "
                   f"{1 / slope / 1e12:5.2f} TB/s (r = {r:.2f}), intercept {icpt * 1e3:.3f} ms")
        for tiles, ms in sorted(rows, key=lambda row: row[0][1]):
            out.append(f"    {tiles}: {n // tiles[1]:2d} reads of A = {n / tiles[1] * a_bytes / 1e9:5.2f} GB, "
                       f"{ms:.3f} ms")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", help="a moe_triton_tiles.py output (lines 'dtype T= E= launch (tiles): ms')")
    p.add_argument("--width", type=int, default=1024, help="H = I of the sweep")
    p.add_argument("--k", type=int, default=2)
    args = p.parse_args(argv)
    print("\n".join(fit(args.sweep, args.width, args.k)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
