"""Collects the benchmark cases of the requested ops, runs them, adds roofline figures, writes files.

Op name -> module with ``cases(quick: bool) -> list[Case]``. A module that cannot be imported (not
written yet, a missing dependency) becomes one ``unavailable`` row instead of stopping the run.
"""

from __future__ import annotations

import csv
import importlib
import json
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import torch

from moon_fast.bench import harness
from moon_fast.bench.harness import Case, Result
from moon_fast.bench.peaks import attainable_tflops

OP_MODULES = {
    "contrastive": "moon_fast.bench.contrastive",
    "attention": "moon_fast.bench.attention",
    "moe": "moon_fast.bench.moe",
    "train": "moon_fast.bench.train_e2e",
    "gemm": "moon_fast.bench.gemm",  # the harness self-check (not in the default list)
}
DEFAULT_OPS = ("contrastive", "attention", "moe", "train")

CSV_COLUMNS = (
    "op", "backend", "dtype", "label", "mode", "status", "p50_ms", "p20_ms", "p80_ms", "peak_mem_mb",
    "gflop", "tflops", "gbps", "pct_peak", "bound", "samples_per_s", "tokens_per_s", "params", "extra",
    "device", "host_cpu", "host_cpu_isa", "cpu_threads", "torch", "cuda", "triton", "transformers", "open_clip", "commit",
    "date",
)


def collect_cases(ops: list[str], *, quick: bool, tiny: bool = False, backends: list[str] | None = None,
                  dtypes: list[str] | None = None) -> tuple[list[Case], list[dict]]:
    """(cases to run, rows for ops that could not provide cases). ``tiny`` keeps only the first case of
    each (op, backend, dtype): a smoke run of every code path in the least time."""
    cases: list[Case] = []
    missing: list[dict] = []
    for op in ops:
        if op not in OP_MODULES:
            raise ValueError(f"unknown op {op!r} in --ops; known: {', '.join(OP_MODULES)}")
        try:
            mod = importlib.import_module(OP_MODULES[op])
            op_cases = list(mod.cases(quick))
        except Exception as exc:  # noqa: BLE001  an op's module failing must not stop the others
            missing.append(asdict(Result(op=op, backend="-", dtype="-", label="-", params={}, mode="fwd+bwd",
                                         status=f"unavailable: {OP_MODULES[op]}: {type(exc).__name__}: {exc}"[:400])))
            continue
        if backends:
            op_cases = [c for c in op_cases if c.backend in backends]
        if dtypes:
            op_cases = [c for c in op_cases if c.dtype in dtypes]
        if tiny:
            seen, kept = set(), []
            for c in op_cases:
                if (c.backend, c.dtype) not in seen:
                    seen.add((c.backend, c.dtype))
                    kept.append(c)
            op_cases = kept
        cases.extend(op_cases)
    return cases, missing


class SharedWorker:
    """One Python process that measures cases one after another (``--quick`` on a CPU: saves the ~4 s
    interpreter + torch start-up per case). Memory stays comparable: before each case the worker
    collects garbage, and the harness trims the heap and resets the peak mark before measuring. A case
    that times out or kills the process is re-run alone through :func:`harness.run_case`, which records
    its status (oom, error, timeout); the next case starts a new worker."""

    def __init__(self, warmup: int, repeats: int):
        self.warmup, self.repeats = warmup, repeats
        self.proc = None
        self.lines: queue.Queue = queue.Queue()

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "moon_fast.bench.runner"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        out, lines = self.proc.stdout, self.lines

        def pump():
            for line in out:
                lines.put(line)
            lines.put(None)  # EOF: the process ended

        threading.Thread(target=pump, daemon=True).start()

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.lines = queue.Queue()

    def run(self, case: Case, timeout_s: float) -> list[Result]:
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            self._start()
        payload = json.dumps({"case": asdict(case), "warmup": self.warmup, "repeats": self.repeats})
        try:
            self.proc.stdin.write(payload + "\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout_s
            while True:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    raise EOFError
                if line.startswith("MOON_FAST_BENCH "):
                    return [Result(**r) for r in json.loads(line[len("MOON_FAST_BENCH "):])]
        except (queue.Empty, EOFError, BrokenPipeError, OSError):
            self.stop()  # hung or died: measure this case alone to learn why
            return harness.run_case(case, warmup=self.warmup, repeats=self.repeats, timeout_s=timeout_s)


REGISTRY_NAMES = {"contrastive": "contrastive_loss", "moe": "moe_mlp", "attention": "flash_attention"}


def unavailable_reason(case: Case, device: torch.device) -> str | None:
    """Why a case's backend cannot run here, when the op's backend registry knows that backend (saves
    starting a process just to learn that, e.g., flash_attn is not installed); None otherwise."""
    reg_name = REGISTRY_NAMES.get(case.op)
    if reg_name is None:
        return None
    try:
        import moon_fast.ops  # noqa: F401  (registers every backend)
        from moon_fast.backends import REGISTRY

        reg = REGISTRY.get(reg_name)
        if reg is None or case.backend not in reg.backends:
            return None
        return reg.why_unavailable(case.backend, device)
    except Exception:  # noqa: BLE001  never let the pre-check stop a run; the case then runs and says
        return None


def run_cases(cases: list[Case], *, warmup: int, repeats: int, timeout_s: float, log=sys.stderr,
              time_budget_s: float | None = None, on_progress=None, shared_process: bool = False) -> list[dict]:
    """Runs every case and returns the results as dicts: each case in its own process (clean memory,
    the default), or with ``shared_process`` in one :class:`SharedWorker`. Triton on a GPU-less machine
    is never timed and needs no process. Past ``time_budget_s`` the remaining cases are recorded as
    ``skipped: time budget`` (not run); ``on_progress(rows)`` is called after each case (the bench
    command saves partial files with it)."""
    rows: list[dict] = []
    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    worker = SharedWorker(warmup, repeats) if shared_process else None
    try:
        for i, case in enumerate(cases, 1):
            t0 = time.perf_counter()
            if time_budget_s is not None and t0 - start > time_budget_s:
                rows.append(asdict(Result(op=case.op, backend=case.backend, dtype=case.dtype, label=case.label,
                                          params=case.params, mode="fwd+bwd",
                                          status=f"skipped: time budget of {time_budget_s:.0f} s spent")))
                continue
            timeout = timeout_s if time_budget_s is None else max(30.0, min(timeout_s,
                                                                            time_budget_s - (t0 - start) + 30))
            why = unavailable_reason(case, torch.device("cuda" if gpu else "cpu"))
            if case.backend == "triton" and not gpu:
                results = harness.measure(case)  # returns "not timed" without building anything
            elif why:
                results = [Result(op=case.op, backend=case.backend, dtype=case.dtype, label=case.label,
                                  params=case.params, mode="fwd+bwd", status=f"unavailable: {why}"[:500])]
            elif worker is not None:
                results = worker.run(case, timeout)
            else:
                results = harness.run_case(case, warmup=warmup, repeats=repeats, timeout_s=timeout)
            full = next((r for r in results if r.mode == "fwd+bwd"), results[-1])
            what = f"{full.p50_s * 1e3:.3f} ms" if full.p50_s is not None else full.status
            print(f"[{i}/{len(cases)}] {case.key()} {full.mode}: {what} ({time.perf_counter() - t0:.1f} s)",
                  file=log, flush=True)
            rows.extend(asdict(r) for r in results)
            if on_progress is not None:
                on_progress(rows)
    finally:
        if worker is not None:
            worker.stop()
    return rows


def _shared_worker_main() -> None:
    """``python -m moon_fast.bench.runner``: reads one JSON case per stdin line, prints its results."""
    import gc

    for line in sys.stdin:
        if not line.strip():
            continue
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        harness._worker(line)  # prints "MOON_FAST_BENCH [...]" (failures included) and flushes


def add_derived(rows: list[dict], peaks: dict | None) -> list[dict]:
    """Adds pct_peak / bound / attainable_tflops (roofline against the measured peaks) and, where a
    workload declared samples or tokens per call, samples_per_s and tokens_per_s."""
    for r in rows:
        r.setdefault("pct_peak", None)
        r.setdefault("bound", "")
        p50 = r.get("p50_s")
        extra = r.get("extra") or {}
        if r.get("status") == "ok" and p50:
            if peaks:
                roof, bound = attainable_tflops(peaks, r["dtype"], r.get("flops"), extra.get("bytes"))
                if roof and r.get("tflops") is not None:
                    r["pct_peak"] = 100.0 * r["tflops"] / roof
                    r["bound"] = bound
                    r["attainable_tflops"] = roof
                elif r.get("gbps") and peaks.get("bandwidth_gbps"):
                    r["pct_peak"] = 100.0 * r["gbps"] / peaks["bandwidth_gbps"]
                    r["bound"] = "memory"
            for unit in ("samples", "tokens"):
                if extra.get(unit):
                    r[f"{unit}_per_s"] = extra[unit] / p50
    return rows


def _fmt(x, scale=1.0, digits=4):
    return "" if x is None else f"{x * scale:.{digits}g}"


def write_csv(path, rows: list[dict], machine: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({
                "op": r["op"], "backend": r["backend"], "dtype": r["dtype"], "label": r["label"], "mode": r["mode"],
                "status": r["status"], "p50_ms": _fmt(r.get("p50_s"), 1e3, 6), "p20_ms": _fmt(r.get("p20_s"), 1e3, 6),
                "p80_ms": _fmt(r.get("p80_s"), 1e3, 6), "peak_mem_mb": _fmt(r.get("peak_mem_bytes"), 2.0 ** -20, 6),
                "gflop": _fmt(r.get("flops"), 1e-9, 6), "tflops": _fmt(r.get("tflops"), 1, 5),
                "gbps": _fmt(r.get("gbps"), 1, 5), "pct_peak": _fmt(r.get("pct_peak"), 1, 4), "bound": r.get("bound", ""),
                "samples_per_s": _fmt(r.get("samples_per_s"), 1, 6), "tokens_per_s": _fmt(r.get("tokens_per_s"), 1, 6),
                "params": json.dumps(r.get("params", {}), sort_keys=True),
                "extra": json.dumps(r.get("extra", {}), sort_keys=True),
                **{k: machine.get(k) for k in ("device", "host_cpu", "host_cpu_isa", "cpu_threads", "torch", "cuda", "triton",
                                               "transformers", "open_clip", "commit", "date")},
            })


def write_json(path, rows: list[dict], machine: dict, settings: dict) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "settings": settings, "results": rows}, f, indent=1, default=str)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of all rows (one per case x mode)."""
    head = ("op", "backend", "dtype", "label", "mode", "p50 ms", "p20-p80 ms", "peak MB", "TFLOP/s", "GB/s",
            "%peak", "status")
    body = []
    for r in rows:
        spread = (f"{r['p20_s'] * 1e3:.3g}-{r['p80_s'] * 1e3:.3g}" if r.get("p20_s") is not None else "")
        pct = f"{r['pct_peak']:.1f} {r.get('bound', '')[:3]}" if r.get("pct_peak") is not None else ""
        body.append((r["op"], r["backend"], r["dtype"], str(r["label"]), r["mode"], _fmt(r.get("p50_s"), 1e3),
                     spread, _fmt(r.get("peak_mem_bytes"), 2.0 ** -20), _fmt(r.get("tflops")), _fmt(r.get("gbps")),
                     pct, "" if r["status"] == "ok" else r["status"][:70]))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


if __name__ == "__main__":
    _shared_worker_main()
