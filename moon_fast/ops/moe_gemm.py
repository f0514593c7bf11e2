"""Grouped matmuls over expert-contiguous rows, in PyTorch.

``torch.nn.functional.grouped_mm`` (torch >= 2.10; ``torch._grouped_mm`` before) takes the group
offsets on the device, so the fast path never synchronises. It needs every non-unit stride to be a
multiple of 16 bytes (e.g. H and I multiples of 4 in fp32, of 8 in fp16/bf16). Where it is missing,
the shapes are not aligned, or (on a GPU) the dtype is not bf16, we fall back to a loop of matmuls over
the groups' row slices, which reads the offsets back to the host once per routing (free on the CPU; a
synchronisation on a GPU).
"""

from __future__ import annotations

import functools

import torch

from moon_fast.ops.moe_routing import Routing


@functools.cache
def grouped_mm_function():
    """``torch.nn.functional.grouped_mm`` or ``torch._grouped_mm``, whichever exists, else None."""
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def _strides_ok(t: torch.Tensor) -> bool:
    """The layout rule of grouped_mm's kernels: in the last two dims one stride is 1 and the other a
    multiple of 16 bytes; the data 16-byte aligned."""
    if t.data_ptr() % 16:
        return False
    s_row, s_col = t.stride()[-2], t.stride()[-1]
    align = 16 // t.element_size()
    if s_col == 1:
        return s_row % align == 0 and s_row >= max(1, t.shape[-1])
    if s_row == 1:
        return s_col % align == 0 and s_col >= max(1, t.shape[-2])
    return False


def _use_grouped_mm(*tensors: torch.Tensor) -> bool:
    fn = grouped_mm_function()
    if fn is None:
        return False
    dev = tensors[0].device
    if dev.type == "cuda":
        # torch's CUDA grouped GEMM kernel is bf16-only (sm80+); other dtypes fall back inside torch to the
        # same per-group loop (with the same host read of the offsets), so take the loop ourselves.
        if tensors[0].dtype != torch.bfloat16 or torch.cuda.get_device_capability(dev) < (8, 0):
            return False
    return all(_strides_ok(t) for t in tensors)


def gmm(a: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
    """a (S, K) rows in expert-contiguous order, b (E, K, N) -> (S, N): rows of expert e times b[e]."""
    if _use_grouped_mm(a, b):
        return grouped_mm_function()(a, b, offs=routing.offsets)
    bounds = routing.host_bounds()
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):  # out= does not record autograd
        parts = [a[bounds[e]:bounds[e + 1]] @ b[e] for e in range(b.shape[0])]
        return torch.cat(parts) if parts else a.new_empty(0, b.shape[-1])
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e in range(b.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a[lo:hi], b[e], out=out[lo:hi])
    return out


def gmm_wgrad(a: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
    """a (S, M), b (S, N), rows in expert-contiguous order -> (E, M, N): a[rows_e]^T @ b[rows_e]
    (zero for an expert with no rows). The weight gradient of a grouped linear layer."""
    at = a.t()
    if _use_grouped_mm(at, b):
        return grouped_mm_function()(at, b, offs=routing.offsets)
    bounds = routing.host_bounds()
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return torch.stack([at[:, bounds[e]:bounds[e + 1]] @ b[bounds[e]:bounds[e + 1]]
                            for e in range(routing.num_experts)])
    out = a.new_empty(routing.num_experts, a.shape[1], b.shape[1])
    for e in range(routing.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(at[:, lo:hi], b[lo:hi], out=out[e])
        else:
            out[e].zero_()
    return out
