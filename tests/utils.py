"""Helpers for comparing fast paths with their references."""

from __future__ import annotations

import zlib

import torch

# (atol, rtol) per dtype for element-wise comparisons of outputs computed in that dtype.
# fp32 paths differ from the reference only by summation order; fp16 has a 10-bit mantissa
# (eps ~1e-3), bf16 a 7-bit one (eps ~8e-3).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def case_seed(case) -> int:
    """A seed for a parametrised case's inputs: the same in every run, different across cases. (Python's
    ``hash`` of a tuple with strings changes with every process, so a failure drawn with it could not be
    reproduced from the log.)"""
    return zlib.crc32(repr(case).encode()) % 1000


def tolerance(dtype: torch.dtype, scale: float = 1.0) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol * scale, "rtol": rtol * scale}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills a buffer with NaN (or the max int) so a kernel that fails to write an element is caught."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(torch.iinfo(t.dtype).max)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, name: str = "tensor"):
    """torch.testing-style check that reports how many elements mismatch and the worst one."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    assert not torch.isnan(a).any() or torch.isnan(e).any(), f"{name}: NaN in result (unwritten output?)"
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        err = (a - e).abs().nan_to_num(float("inf"))
        worst = int(err.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements mismatch (atol={atol}, rtol={rtol}); "
            f"worst at {idx}: got {a.reshape(-1)[worst].item():.6g}, expected {e.reshape(-1)[worst].item():.6g} "
            f"(abs err {err.reshape(-1)[worst].item():.3g})"
        )


def low_precision_error_bound(out_lp: torch.Tensor, out_ref_lp: torch.Tensor, out_ref_fp32: torch.Tensor,
                              *, factor: float = 2.0, floor: float = 1e-5) -> tuple[float, float]:
    """FlashAttention's criterion: returns (kernel error, allowed error) where the allowed error is
    ``factor`` times PyTorch's own low-precision error against the fp32 reference, plus ``floor``."""
    kernel_err = (out_lp.float() - out_ref_fp32.float()).abs().max().item()
    torch_err = (out_ref_lp.float() - out_ref_fp32.float()).abs().max().item()
    return kernel_err, factor * torch_err + floor


def unit(*rows) -> torch.Tensor:
    """L2-normalised float32 rows, for hand-computed embedding cases."""
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


class OneCpuProcess:
    """What moon_fast.train.distributed.setup returns for a run in this process: rank 0 of 1, on the CPU."""
    rank, world, local_rank, initialized_here, is_main = 0, 1, 0, False, True
    device = torch.device("cpu")
