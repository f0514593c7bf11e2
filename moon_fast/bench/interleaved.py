"""Interleaved comparison: the backends of one case timed in turn, round after round, in one process.

Why: :func:`moon_fast.bench.harness.run_case` measures each backend in its own process, minutes apart.
On a shared or small machine the speed of the same call drifts between processes: on the 2-vCPU
development machine the median of one (1024 x 1024) @ (1024 x 1024) bf16 product ranged from 6.3 to
8.6 ms over six fresh processes (``python benchmarks/cpu_probes.py gemm-drift --processes 6``). A ratio between two separately measured cases carries that noise. Here every round runs each
backend's forward+backward once, in turn, all in one process, so each per-round ratio compares calls
made a second apart under the same conditions; odd rounds run the backends in reverse order.

Reported per case group (same op, dtype and label): for each backend the median, p20 and p80 of its
forward+backward time over the rounds; and, against the first backend listed (the baseline), the median
and range of the per-round ratios. Memory is not measured here: use the normal run (one process per
case) for peak memory.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from moon_fast.bench.harness import Case, build_workload, not_timed_reason, quantiles, synchronize


def compare(cases: list[Case], *, rounds: int, warmup: int = 1, device: torch.device | None = None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Times forward+backward of every case round-robin: ``warmup`` untimed rounds, then ``rounds``
    timed ones, after one untimed probe call each. ``cases`` share op, dtype and label; ``cases[0]``
    is the baseline of the ratios.
    A backend that cannot be built (unavailable, interpreter-only) is recorded with its reason.

    Returns ``{"op", "dtype", "label", "params", "rounds", "baseline", "backends": {name: {...}}}``
    where each backend has ``status``, ``times_s`` (per round), ``p50_s``, ``p20_s``, ``p80_s``,
    ``flops``, ``tflops`` and, except the baseline, ``ratio_p50`` / ``ratio_min`` / ``ratio_max`` of its
    per-round time over the baseline's.
    """
    if not cases:
        raise ValueError("compare() needs at least one case")
    first = cases[0]
    if any((c.op, c.dtype, c.label) != (first.op, first.dtype, first.label) for c in cases):
        raise ValueError("compare() times backends of one case: op, dtype and label must match")
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    say = progress or (lambda _msg: None)
    runs: dict[str, Callable[[], None]] = {}
    out: dict = {"op": first.op, "dtype": first.dtype, "label": first.label, "params": first.params,
                 "rounds": rounds, "baseline": None, "backends": {}}
    for case in cases:
        entry: dict = {"status": "ok"}
        out["backends"][case.backend] = entry
        if (why := not_timed_reason(case, dev)) is not None:
            entry["status"] = why
            continue
        try:
            work = build_workload(case, dev)
            work.step()  # some builders only fail on the first call; this call is not timed
        except Exception as exc:  # noqa: BLE001  recorded, the others still run
            from moon_fast.backends import BackendUnavailable

            kind = "unavailable" if isinstance(exc, BackendUnavailable) else "error"
            entry["status"] = f"{kind}: {type(exc).__name__}: {exc}"[:400]
            continue
        entry["flops"] = work.flops_fwd + work.flops_bwd
        runs[case.backend] = work.step
    if not runs:
        return out
    out["baseline"] = next(iter(runs))
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for r in range(warmup + rounds):
        # Odd rounds run the backends in reverse order, so that no backend always runs right after the
        # same other one (an allocator or cache state left by the previous call would bias its ratio).
        for name, run in (order if r % 2 == 0 else order[::-1]):
            synchronize(dev)
            t0 = time.perf_counter()
            run()
            synchronize(dev)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
        if r >= warmup:
            say(f"{first.op} {first.dtype} {first.label}: round {r - warmup + 1}/{rounds}")
    base = times[out["baseline"]]
    for name, ts in times.items():
        entry = out["backends"][name]
        entry["times_s"] = ts
        entry["p50_s"], entry["p20_s"], entry["p80_s"] = quantiles(ts)
        entry["tflops"] = entry["flops"] / entry["p50_s"] / 1e12 if entry.get("flops") else None
        if name != out["baseline"]:
            ratios = [t / b for t, b in zip(ts, base)]
            entry["ratio_p50"] = statistics.median(ratios)
            entry["ratio_min"], entry["ratio_max"] = min(ratios), max(ratios)
    return out


def group_cases(cases: list[Case]) -> list[list[Case]]:
    """Cases grouped by (op, dtype, label), in first-seen order; within a group, the listed order."""
    groups: dict[tuple, list[Case]] = {}
    for c in cases:
        groups.setdefault((c.op, c.dtype, c.label), []).append(c)
    return list(groups.values())


def format_table(results: list[dict]) -> str:
    """Markdown table: one row per backend of each group."""
    lines = ["| op | dtype | case | backend | fwd+bwd p50 (p20-p80) | TFLOP/s | vs first: per-round ratio p50 [min-max] |",
             "|---|---|---|---|---|---|---|"]
    for g in results:
        for name, e in g["backends"].items():
            if e["status"] != "ok":
                lines.append(f"| {g['op']} | {g['dtype']} | {g['label']} | {name} | {e['status']} | | |")
                continue
            ms = f"{e['p50_s'] * 1e3:.1f} ms ({e['p20_s'] * 1e3:.1f}-{e['p80_s'] * 1e3:.1f})"
            tf = f"{e['tflops']:.3f}" if e.get("tflops") else ""
            ratio = ("baseline" if name == g["baseline"] else
                     f"{e['ratio_p50']:.2f}x [{e['ratio_min']:.2f}-{e['ratio_max']:.2f}]")
            lines.append(f"| {g['op']} | {g['dtype']} | {g['label']} | {name} | {ms} | {tf} | {ratio} |")
    return "\n".join(lines)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_groups(cases: list[Case], *, rounds: int, warmup: int,
               on_group: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """:func:`compare` for each group of :func:`group_cases`; ``on_group(done)`` after each (to save)."""
    done: list[dict] = []
    for group in group_cases(cases):
        done.append(compare(group, rounds=rounds, warmup=warmup, progress=_stderr))
        if on_group is not None:
            on_group(done)
    return done
