"""The SwiGLU backward of the Triton ``moe_mlp`` as one elementwise pass: the "split" alternative to the
SwiGLU backward fused into the dh GEMM's epilogue (kernels/moe.py, ``$MOON_FAST_MOE_SWIGLU_BWD``).

With h = silu(g) * u, gu = [g | u] the saved pre-activation and dh the gradient of h:
    d g = dh * u * silu'(g),  silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    d u = dh * silu(g)
and w * h, h recomputed and scaled by each row's routing weight w: the B operand of the down projection's
weight gradient, d down[e] = sum over e's rows of dout[token]^T (w h), which then needs no scaling of its
own (its A tiles go from shared memory straight into the MMA). The fused epilogue calls the same
``swiglu_backward_tile``. One difference: here dh arrives rounded to the input dtype (the plain GEMM
stores it), where the fused epilogue uses its fp32 accumulator.

Why a split exists: on an H100 (bf16, T=16384, H=I=1024) the fused launch took 0.533 ms where the plain
GEMM took 0.147 ms; the epilogue cost 0.39 ms for about 0.11 ms of memory traffic
(benchmarks/results/2026-11-22-h100/moe_gpu_probes_539dfd1.txt). This pass moves 6 * S * I elements
(reads dh, g, u; writes dg, du, h) and the plain GEMM writes dh (S * I) in addition. Whether the two
launches beat the fused one is for benchmarks/moe_gpu_gemm.py (``triton_bwd_split``) to measure.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moon_fast.kernels import _utils

_BLOCK_ROWS = 8
_BLOCK_COLS = 256


@triton.jit
def swiglu_backward_tile(dh, gu_ptr, dgu_ptr, gu_offs, h_ptr, h_offs, h_scale, INTER, mask):
    """One tile of the SwiGLU backward, shared by the elementwise pass below and the dh GEMM's fused
    epilogue (kernels/moe.py): dh (R, C) fp32; gu_offs (R, C) the tile's gate offsets in gu / dgu (the up
    half is INTER further); h_offs (R, C) its offsets in h; h_scale (R, 1) fp32. Stores dg, du and
    h_scale * silu(g) * u."""
    g = tl.load(gu_ptr + gu_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + gu_offs + INTER, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # Everything that needs only g and u first, then one multiply by dh per output. In the fused epilogue dh
    # is the MMA accumulator, in a register layout other than the loads': ordered so, the sm_90 compile of the
    # dh GEMM converts 4 tiles between the two layouts instead of 5 and needs 176-181 registers, not 226-228
    # (tests/aot_triton.py; not yet timed on a GPU).
    tl.store(h_ptr + h_offs, (silu * u * h_scale).to(h_ptr.dtype.element_ty), mask=mask)
    dg_factor = u * (sig + silu * (1.0 - sig))
    tl.store(dgu_ptr + gu_offs, (dh * dg_factor).to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + gu_offs + INTER, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=mask)


# dh (S, I), gu (S, 2I), h_scale (S,) -> dgu (S, 2I), h (S, I); all contiguous
@triton.jit
def _swiglu_backward_kernel(dh_ptr, gu_ptr, h_scale_ptr, dgu_ptr, h_ptr, S, INTER, H_SCALE: tl.constexpr,
                            BS: tl.constexpr, BI: tl.constexpr):
    rows = (tl.program_id(0) * BS + tl.arange(0, BS)).to(tl.int64)
    cols = tl.program_id(1) * BI + tl.arange(0, BI)
    mask = (rows < S)[:, None] & (cols < INTER)[None, :]
    one = rows[:, None] * INTER + cols[None, :]
    dh = tl.load(dh_ptr + one, mask=mask, other=0.0).to(tl.float32)
    if H_SCALE:
        h_scale = tl.load(h_scale_ptr + rows, mask=rows < S, other=0.0).to(tl.float32)[:, None]
    else:
        h_scale = tl.full((BS, 1), 1.0, tl.float32)
    swiglu_backward_tile(dh, gu_ptr, dgu_ptr, rows[:, None] * (2 * INTER) + cols[None, :], h_ptr, one, h_scale,
                         INTER, mask)


def swiglu_backward(dh: torch.Tensor, gu: torch.Tensor, h_scale: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """dh (S, I), gu (S, 2I) gate columns first, both contiguous and of one dtype; h_scale (S,) optional ->
    (h (S, I), scaled row by row by h_scale when given; dgu (S, 2I))."""
    s, inter = dh.shape
    if gu.shape != (s, 2 * inter) or not (dh.is_contiguous() and gu.is_contiguous()) or gu.dtype != dh.dtype:
        raise ValueError(f"swiglu_backward: dh (S, I) and gu (S, 2I), contiguous, one dtype; got dh "
                         f"{tuple(dh.shape)} {dh.dtype}, gu {tuple(gu.shape)} {gu.dtype}")
    if h_scale is not None and (h_scale.shape != (s,) or not h_scale.is_contiguous()):
        raise ValueError(f"swiglu_backward: h_scale must be contiguous (S,) = ({s},); got {tuple(h_scale.shape)}")
    h = _utils.new_output((s, inter), dh)
    dgu = _utils.new_output((s, 2 * inter), dh)
    if s and inter:
        grid = (triton.cdiv(s, _BLOCK_ROWS), triton.cdiv(inter, _BLOCK_COLS))
        _swiglu_backward_kernel[grid](dh, gu, h_scale if h_scale is not None else dh, dgu, h, s, inter,
                                      H_SCALE=h_scale is not None, BS=_BLOCK_ROWS, BI=_BLOCK_COLS)
    return h, dgu
