"""Throughput accounting and metric sinks (metrics.jsonl, TensorBoard).

TFLOP/s = the model FLOPs of the trained batches (forward + backward, as torchtitan counts them; the
trainer's _flop_counter) over their time;
MFU = TFLOP/s / peak. The peak is the dense bf16 datasheet figure of the GPU (table below) or, on a
CPU or an unknown GPU, a matmul rate MEASURED once at start in the run's dtype (so a CPU MFU is
relative to what this machine's matmul reaches, not to a datasheet).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, SXM parts.
PEAK_TFLOPS_BF16 = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 512, repeats: int = 5) -> float:
    """Best-of-``repeats`` rate of an n x n x n matmul (small: this runs at the start of every run)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def device_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s, how it was obtained)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in PEAK_TFLOPS_BF16.items():
            if key in name:
                return v, f"datasheet dense bf16 peak of {key}"
        return measure_matmul_tflops(device, dtype, 4096), f"measured {dtype} matmul rate on {name}"
    return (measure_matmul_tflops(device, dtype),
            f"measured {str(dtype).replace('torch.', '')} 512^3 matmul rate on CPU ({torch.get_num_threads()} threads)")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or this process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class MetricsWriter:
    """Rank 0's sinks: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume: bool):
        self.enabled = enabled
        self.f = None
        self.tb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        self.f = open(self.path, "a" if resume else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError as e:  # tensorboard not installed: say so once, keep training
                print(f"TensorBoard logging disabled: {e}")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        self.f.close()
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                pass  # a line cut by the crash
        self.path.write_text("".join(x + "\n" for x in keep))
        self.f = open(self.path, "a")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self.tb is not None:
            self.tb.close()
