"""The harness's own self-check workload: a plain ``torch.matmul`` (op name ``gemm``).

Not one of the product ops: ``moon-fast bench --ops gemm`` exercises the whole benchmark pipeline
(subprocess per case, CSV/JSON, plots, report) in seconds without any kernel, which the tests use, and
it shows how close a plain GEMM gets to the measured peak on this machine.
"""

from __future__ import annotations

import torch

from moon_fast.bench import flops
from moon_fast.bench.harness import Case, Workload


def build(*, backend: str, dtype: torch.dtype, device: torch.device, n: int) -> Workload:
    """Square (n, n) @ (n, n); backward computes both input gradients."""
    if backend != "torch":
        from moon_fast.backends import BackendUnavailable

        raise BackendUnavailable(f"gemm has only the 'torch' backend, not {backend!r}")
    a = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, n, device=device, dtype=dtype)
    elt = a.element_size()
    return Workload(
        forward=lambda: a @ b,
        backward=lambda out: out.backward(grad),
        flops_fwd=flops.gemm_flops(n, n, n),
        flops_bwd=2 * flops.gemm_flops(n, n, n),
        bytes_fwd=3.0 * n * n * elt,
        bytes_bwd=5.0 * n * n * elt,
    )


def cases(quick: bool) -> list[Case]:
    sizes = (64, 128, 256) if quick else (256, 512, 1024, 2048)
    return [Case("gemm", "torch", dt, {"n": n}, "moon_fast.bench.gemm:build", label=f"n={n}")
            for dt in ("fp32", "bf16") for n in sizes]
