"""Per-round time ratios between any two backends of a ``moon-fast bench --interleave`` run.

    python benchmarks/interleaved_ratios.py RUN/interleaved.json [...] [--pairs torch/dense_gemm,cpu/torch]

The run's own table gives each backend's ratio to the first one listed; this gives A / B for any pair, as
the median over rounds of A's time over B's time in the same round (calls made seconds apart), with the
smallest and largest round. Medians of ratios, not ratios of medians: on a shared machine whose speed drifts
between rounds, only the former compares like with like.
"""

from __future__ import annotations

import argparse
import json
import statistics

DEFAULT_PAIRS = ("torch/dense_gemm,torch/dense_gemm_rowmajor,torch/grouped_gemm_floor,torch/hf_grouped_mm,"
                 "cpu/dense_gemm,cpu/dense_gemm_rowmajor,cpu/cpu_gemm_floor,cpu/torch")


def pair_ratios(group: dict, num: str, den: str) -> tuple[float, float, float] | None:
    """(median, min, max) over rounds of group's ``num`` time / ``den`` time; None if either did not run."""
    backends = group["backends"]
    if any(backends.get(b, {}).get("status") != "ok" for b in (num, den)):
        return None
    ratios = [a / b for a, b in zip(backends[num]["times_s"], backends[den]["times_s"], strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="interleaved.json files")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="comma-separated A/B backend pairs")
    args = parser.parse_args()
    pairs = [p.split("/") for p in args.pairs.split(",")]
    if any(len(p) != 2 for p in pairs):
        parser.error(f"--pairs must be A/B,C/D,...; got {args.pairs!r}")
    for path in args.runs:
        with open(path) as f:
            data = json.load(f)
        m = data["machine"]
        extra = f", malloc_cache {m['malloc_cache']}" if "malloc_cache" in m else ""  # runs at 46d6d33-f1b2bcc
        extra += f", cpu_cache_mb {m['cpu_cache_mb']}" if "cpu_cache_mb" in m else ""  # runs at db90b71-806dd60
        extra += f", LD_PRELOAD {m['ld_preload']}" if m.get("ld_preload") else ""
        print(f"{path}: commit {m.get('commit')}, {m.get('host_cpu_isa') or 'ISA not recorded'}{extra}")
        for g in data["groups"]:
            print(f"  {g['op']} {g['dtype']} {g['label']}, {g['rounds']} rounds:")
            for num, den in pairs:
                r = pair_ratios(g, num, den)
                if r is not None:
                    print(f"    {num} / {den}: {r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]")


if __name__ == "__main__":
    main()
