"""Small helpers shared by the Triton kernels."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs in interpreter mode (CPU tensors; set TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


if interpreting():  # the interpreter truncates fp32 -> bf16; round to nearest-even as a GPU does
    from moon_fast.kernels._interpreter_rounding import install as _round_bf16_as_a_gpu_does

    _round_bf16_as_a_gpu_does()


def compute_dtype_for(dtype: torch.dtype):
    """The dtype a kernel should do arithmetic in.

    The interpreter holds bf16 as raw uint16 and computes garbage with it, so under the interpreter we
    upcast bf16 to fp32 before any arithmetic; on a GPU bf16 operands stay bf16 for the tensor cores.
    """
    import triton.language as tl

    if interpreting() and dtype == torch.bfloat16:
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def new_output(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """An uninitialised buffer for a kernel to fill, on ``like``'s device (``like``'s dtype by default). The
    MoE launchers allocate through this one function, so tests replace it to poison every such buffer."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
