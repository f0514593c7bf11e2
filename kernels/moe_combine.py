"""The weighted combine of the Triton ``moe_mlp`` and the gradient of its routing weights, one launch each.

y holds the down GEMM's rows in slot order (slot s = t * k + j is token t's j-th choice), so token t's k
rows are adjacent. Both kernels accumulate in fp32 and sum the k choices in order j = 0 .. k-1: deterministic,
no atomics. Each replaces about five elementwise torch launches (casts, a product, a reduction, a cast back),
which counted on an H100 where the op was bound by host time per launch (kernels/moe_routing.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_TOKENS = 16
_BLOCK_WIDTH = 128


# y (T * k, H), w (T, k) -> out (T, H) = sum_j w[t, j] * y[t * k + j]
@triton.jit
def _combine_kernel(y_ptr, w_ptr, out_ptr, T, H, TOP_K: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr):
    ts = tl.program_id(0) * BT + tl.arange(0, BT)
    hs = tl.program_id(1) * BH + tl.arange(0, BH)
    tmask = ts < T
    mask = tmask[:, None] & (hs < H)[None, :]
    acc = tl.zeros((BT, BH), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = ts.to(tl.int64) * TOP_K + j
        w = tl.load(w_ptr + slot, mask=tmask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + slot[:, None] * H + hs[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * y
    tl.store(out_ptr + ts.to(tl.int64)[:, None] * H + hs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# y (T * k, H), dout (T, H) -> dw (T * k,) = <y[s], dout[s // k]>
@triton.jit
def _choice_grad_kernel(y_ptr, dout_ptr, dw_ptr, S, H, TOP_K: tl.constexpr, BS: tl.constexpr, BH: tl.constexpr):
    slots = tl.program_id(0) * BS + tl.arange(0, BS)
    smask = slots < S
    y_rows = slots.to(tl.int64) * H
    d_rows = (slots // TOP_K).to(tl.int64) * H
    acc = tl.zeros((BS,), dtype=tl.float32)
    for h0 in range(0, H, BH):
        hs = h0 + tl.arange(0, BH)
        mask = smask[:, None] & (hs < H)[None, :]
        y = tl.load(y_ptr + y_rows[:, None] + hs[None, :], mask=mask, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + d_rows[:, None] + hs[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(y * d, 1)
    tl.store(dw_ptr + slots, acc.to(dw_ptr.dtype.element_ty), mask=smask)


def combine(y_slot: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """y_slot (T * k, H) contiguous, weight (T, k) contiguous -> out (T, H), written and returned."""
    t, top_k = weight.shape
    hdim = y_slot.shape[1]
    grid = (triton.cdiv(t, _BLOCK_TOKENS), triton.cdiv(hdim, _BLOCK_WIDTH))
    _combine_kernel[grid](y_slot, weight, out, t, hdim, TOP_K=top_k, BT=_BLOCK_TOKENS, BH=_BLOCK_WIDTH)
    return out


def choice_weight_grad(y_slot: torch.Tensor, dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """y_slot (T * k, H), dout (T, H), both contiguous -> out (T, k): d loss / d weight, written and returned."""
    s, hdim = y_slot.shape
    top_k = out.shape[1]
    _choice_grad_kernel[(triton.cdiv(s, _BLOCK_TOKENS),)](y_slot, dout, out, s, hdim, TOP_K=top_k,
                                                          BS=_BLOCK_TOKENS, BH=_BLOCK_WIDTH)
    return out
