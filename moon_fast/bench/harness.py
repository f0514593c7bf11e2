"""Benchmark harness: time and peak memory of one workload, measured the same way for every op.

A benchmark module (``moon_fast/bench/<op>.py``) describes cases; each case names a *builder*
``"module:function"`` that, given ``backend``, ``dtype``, ``device`` and the case's shape parameters,
returns a :class:`Workload` (forward and backward closures plus FLOP/byte counts). :func:`run_case`
measures one case in a fresh subprocess, so that

* CPU peak memory is the child's peak RSS above its RSS just before the first call (no allocator
  caches left by an earlier case), and CUDA peak memory is ``max_memory_allocated`` above baseline;
* a case that runs out of memory or crashes is recorded as such instead of killing the whole run.

Times are medians and p20/p80 over repeats, after warm-up, with device synchronisation.
Triton under the CPU interpreter is never timed (status ``not timed: triton interpreter``).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Workload:
    """What a builder returns. ``forward()`` returns the output(s); ``backward(out)`` back-propagates.
    FLOP and byte counts are for one forward / one backward call (explicit formulas, not measured)."""

    forward: Callable[[], object]
    backward: Callable[[object], None] | None = None
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    bytes_fwd: float = 0.0
    bytes_bwd: float = 0.0
    # Anything to copy into each Result's ``extra`` (e.g. {"samples": 32, "tokens": 4096} per call, from
    # which the bench command derives samples/s and tokens/s).
    meta: dict = field(default_factory=dict)

    def step(self) -> None:
        """One forward and, if there is one, its backward."""
        out = self.forward()
        if self.backward is not None:
            self.backward(out)


@dataclass
class Case:
    op: str
    backend: str
    dtype: str
    params: dict
    builder: str  # "module:function"
    label: str = ""  # short x-axis label, e.g. "B=4096"

    def key(self) -> str:
        return f"{self.op}/{self.backend}/{self.dtype}/{self.label or self.params}"


@dataclass
class Result:
    op: str
    backend: str
    dtype: str
    label: str
    params: dict
    mode: str  # "fwd", "bwd", "fwd+bwd"
    status: str = "ok"  # "ok", "oom", "unavailable: ...", "not timed: ...", "error: ..."
    p50_s: float | None = None
    p20_s: float | None = None
    p80_s: float | None = None
    peak_mem_bytes: int | None = None
    flops: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- machine description

def git_commit() -> str | None:
    """Short HEAD (+"-dirty"); where the tree is a copy without .git (a lent GPU machine), $MOON_FAST_COMMIT."""
    if os.environ.get("MOON_FAST_COMMIT"):
        return os.environ["MOON_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
        return (out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The CPU features that decide the matmul rate: oneDNN runs bf16 GEMMs on AMX tiles where the CPU exposes them
# (several times the AVX-512 rate), so two "Intel Xeon Processor" hosts can differ about 3x in bf16 GEMM speed
# (dense_gemm 0.30 s with AMX against 0.94-0.99 s without: README, MoE section, "Page faults").
_MATMUL_ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_isa() -> str:
    """The flags of _MATMUL_ISA this CPU has, comma-separated ("" where /proc/cpuinfo is unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return ",".join(flag for flag in _MATMUL_ISA if flag in have)
    except OSError:
        pass
    return ""


def machine_info() -> dict:
    import importlib.metadata as md

    def v(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    gpu = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "host_cpu": cpu_model(),
        "host_cpu_isa": cpu_isa(),
        "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": v("triton"),
        "transformers": v("transformers"),
        "deepspeed": v("deepspeed"),
        "open_clip": v("open_clip_torch"),
        # CPU allocation: large temporaries are much cheaper with transparent huge pages (moon_fast/cli.py)
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "thp_mode": _thp_mode(),
        # a malloc put in place of glibc's (e.g. tcmalloc): large CPU temporaries then stop page-faulting every step
        "ld_preload": os.path.basename(os.environ.get("LD_PRELOAD", "")) or None,
    }


def write_rows(out_dir: str, stem: str, info: dict, rows: list[dict]) -> None:
    """For the standalone scripts in benchmarks/: ``stem``.json ({"machine": info, "rows": rows}) and
    ``stem``.csv (one line per row, plus the commit, device, torch and triton of ``info``) under ``out_dir``."""
    import csv

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    stamp = {k: info.get(k) for k in ("commit", "device", "torch", "triton")}
    keys = list(dict.fromkeys(k for r in rows for k in r)) + list(stamp)
    with open(os.path.join(out_dir, f"{stem}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**r, **stamp})


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None if unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


# ----------------------------------------------------------------------------- measuring

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    # VmHWM (the mm's peak RSS) is what _reset_peak_rss resets; getrusage's ru_maxrss also keeps the
    # peak recorded when any thread of the process exited, which a reset does not clear.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_rss() -> None:
    """Returns freed heap memory to the OS (otherwise memory freed by the warm-up call stays resident,
    inflates the baseline and hides the workload's peak) and resets the kernel's peak-RSS mark
    (Linux >= 4.0), so that a transient peak while building the inputs does not hide the workload's own
    peak either. Best effort on other systems.

    Both allocators moon-fast runs under: glibc's ``malloc_trim``, and tcmalloc's (which moon_fast/cli.py
    preloads by default) ``MallocExtension_ReleaseFreeMemory``. Under tcmalloc ``malloc_trim`` does
    nothing, and the CPU memory column read about 0 for every case (the warm-up's freed memory stayed in
    tcmalloc's page heap, and the timed call reused it)."""
    import ctypes

    for lib, fn, args in (("libc.so.6", "malloc_trim", (0,)), (None, "MallocExtension_ReleaseFreeMemory", ())):
        try:
            getattr(ctypes.CDLL(lib), fn)(*args)
        except (OSError, AttributeError):  # not this allocator (or not Linux)
            pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def quantiles(times: list[float]) -> tuple[float, float, float]:
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int,
              setup: Callable[[], object] | None = None, max_seconds: float = 60.0) -> list[float]:
    """Times ``fn(setup())`` (or ``fn()``); ``setup`` runs untimed before each call. Stops early past
    ``max_seconds`` of measured time (at least 3 repeats)."""
    for _ in range(warmup):
        arg = setup() if setup else None
        fn(arg) if setup else fn()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    for i in range(repeats):
        arg = setup() if setup else None
        synchronize(device)
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > max_seconds and i >= 2:
            break
    return times


def not_timed_reason(case: Case, device: torch.device) -> str | None:
    """Why a case must not be timed here (Triton on the CPU runs in its interpreter), else None."""
    return "not timed: triton interpreter on CPU" if case.backend == "triton" and device.type == "cpu" else None


def build_workload(case: Case, device: torch.device) -> Workload:
    """Calls the case's builder ``"module:function"`` for its backend, dtype and shape."""
    mod_name, fn_name = case.builder.split(":")
    builder = getattr(importlib.import_module(mod_name), fn_name)
    return builder(backend=case.backend, dtype=DTYPES[case.dtype], device=device, **case.params)


def measure(case: Case, *, warmup: int = 1, repeats: int = 5, device: str | None = None) -> list[Result]:
    """Measures one case in this process: peak memory of one forward+backward, then time of
    forward, backward and forward+backward. Run it through :func:`run_case` for clean memory figures."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = dict(op=case.op, backend=case.backend, dtype=case.dtype, label=case.label, params=case.params)
    if (why := not_timed_reason(case, dev)) is not None:
        return [Result(**base, mode=m, status=why) for m in ("fwd", "bwd", "fwd+bwd")]
    work = build_workload(case, dev)
    full = work.step

    # One untimed call first: one-time lazy initialisation (library workspaces, thread pools, autograd
    # engine) is not the workload's memory. Then the peak of one forward+backward above what exists
    # now (inputs, weights).
    full()
    synchronize(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        full()
        synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        _reset_peak_rss()
        before = _rss_bytes()
        full()
        peak = max(0, _peak_rss_bytes() - before)

    results = []
    t_fwd = time_call(lambda: work.forward(), dev, warmup=warmup, repeats=repeats)
    results.append(Result(**base, mode="fwd", flops=work.flops_fwd, extra={"bytes": work.bytes_fwd}))
    results[-1].p50_s, results[-1].p20_s, results[-1].p80_s = quantiles(t_fwd)
    if work.backward is not None:
        t_bwd = time_call(work.backward, dev, warmup=warmup, repeats=repeats, setup=work.forward)
        results.append(Result(**base, mode="bwd", flops=work.flops_bwd, extra={"bytes": work.bytes_bwd}))
        results[-1].p50_s, results[-1].p20_s, results[-1].p80_s = quantiles(t_bwd)
        t_full = time_call(full, dev, warmup=warmup, repeats=repeats)
        results.append(Result(**base, mode="fwd+bwd", flops=work.flops_fwd + work.flops_bwd,
                              extra={"bytes": work.bytes_fwd + work.bytes_bwd}))
        results[-1].p50_s, results[-1].p20_s, results[-1].p80_s = quantiles(t_full)
    for r in results:
        r.extra.update(work.meta)
        r.peak_mem_bytes = int(peak)
        if r.flops and r.p50_s:
            r.tflops = r.flops / r.p50_s / 1e12
        if r.extra.get("bytes") and r.p50_s:
            r.gbps = r.extra["bytes"] / r.p50_s / 1e9
    return results


def run_case(case: Case, *, warmup: int = 1, repeats: int = 5, timeout_s: float = 900.0,
             env: dict | None = None) -> list[Result]:
    """Runs :func:`measure` for ``case`` in a fresh Python process and returns its results; an
    out-of-memory kill, a crash or a timeout becomes a result with that status."""
    payload = json.dumps({"case": asdict(case), "warmup": warmup, "repeats": repeats})
    base = dict(op=case.op, backend=case.backend, dtype=case.dtype, label=case.label, params=case.params)
    try:
        proc = subprocess.run([sys.executable, "-m", "moon_fast.bench.harness", payload], capture_output=True,
                              text=True, timeout=timeout_s, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return [Result(**base, mode="fwd+bwd", status=f"error: timed out after {timeout_s:.0f} s")]
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        oom = proc.returncode in (-9, 137) or "out of memory" in proc.stderr.lower() or "MemoryError" in proc.stderr
        status = "oom" if oom else f"error: {tail[0][:300]}"
        return [Result(**base, mode="fwd+bwd", status=status)]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MOON_FAST_BENCH ")][-1]
    return [Result(**r) for r in json.loads(line[len("MOON_FAST_BENCH "):])]


def _worker(payload: str) -> None:
    args = json.loads(payload)
    case = Case(**args["case"])
    try:
        results = measure(case, warmup=args["warmup"], repeats=args["repeats"])
    except Exception as exc:  # report the failure as a result rather than a traceback to parse
        from moon_fast.backends import BackendUnavailable

        status = f"unavailable: {exc}" if isinstance(exc, BackendUnavailable) else f"error: {type(exc).__name__}: {exc}"
        if isinstance(exc, torch.OutOfMemoryError | MemoryError):
            status = "oom"
        results = [Result(op=case.op, backend=case.backend, dtype=case.dtype, label=case.label, params=case.params,
                          mode="fwd+bwd", status=status[:500])]
    print("MOON_FAST_BENCH " + json.dumps([asdict(r) for r in results]), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1])
