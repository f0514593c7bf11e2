"""The ``cuda`` / ``cuda_emu`` backends of ``moe_mlp``: csrc/moe.cu kernels for the routing metadata
(histogram, scan, stable permutation), the gather of token rows (with the routing-weight scale in the
backward), the weighted unpermute and its weight gradient; the GEMMs through grouped_mm / cuBLAS
(moe_gemm.gmm). On CPU tensors the same kernels run under the emulator (``cuda_emu``, tests only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moon_fast import _ext
from moon_fast.ops.moe_gemm import gmm, gmm_wgrad
from moon_fast.ops.moe_routing import Routing
from moon_fast.ops.moe_torch import swiglu_backward

ROUTING_CHUNK = 256  # slots per block of the routing kernels (kChunk in csrc/moe.cu)


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Output allocation; tests replace it to poison outputs with NaN before the kernels write them."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def ops_for(device: torch.device):
    ops = _ext.csrc_ops(device)
    if not hasattr(ops, "moe_routing"):
        raise RuntimeError("the moon_fast extension was built without csrc/moe.cu; rebuild it with `make build`")
    return ops


def csrc_route(expert_idx: torch.Tensor, num_experts: int) -> Routing:
    """The Routing of moe_routing.route, computed by the csrc kernels."""
    ops = ops_for(expert_idx.device)
    expert_idx = expert_idx.long().contiguous()
    t, k = expert_idx.shape
    s = t * k
    perm = _empty((s,), expert_idx, torch.int64)
    token = _empty((s,), expert_idx, torch.int64)
    inv_perm = _empty((s,), expert_idx, torch.int64)
    offsets = _empty((num_experts,), expert_idx, torch.int32)
    scratch = torch.empty(((s + ROUTING_CHUNK - 1) // ROUTING_CHUNK, num_experts), dtype=torch.int32,
                          device=expert_idx.device)
    ops.moe_routing(expert_idx, num_experts, perm, token, inv_perm, offsets, scratch)
    return Routing(perm=perm, token=token, inv_perm=inv_perm, offsets=offsets, num_experts=num_experts, top_k=k)


def permute(x: torch.Tensor, row_idx: torch.Tensor, scale=None, scale_idx=None) -> torch.Tensor:
    """out[i] = scale[scale_idx[i]] * x[row_idx[i]] (no scale: a plain row gather)."""
    out = _empty((row_idx.numel(), x.shape[1]), x)
    ops_for(x.device).moe_permute(x, row_idx, scale, scale_idx, out)
    return out


def unpermute(y: torch.Tensor, inv_perm: torch.Tensor, weight, top_k: int) -> torch.Tensor:
    """y (S, H) sorted -> (T, H): out[t] = sum_j weight[t, j] * y[inv_perm[t * k + j]] (weight None = 1)."""
    out = _empty((inv_perm.numel() // top_k, y.shape[1]), y)
    ops_for(y.device).moe_unpermute(y, inv_perm, weight, top_k, out)
    return out


def unpermute_weight_grad(dout: torch.Tensor, y: torch.Tensor, inv_perm: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T, k): dw[t, j] = <dout[t], y[inv_perm[t * k + j]]>."""
    dw = _empty((dout.shape[0], top_k), dout)
    ops_for(dout.device).moe_unpermute_weight_grad(dout, y, inv_perm, top_k, dw)
    return dw


class MoeMlpCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
        k = expert_idx.shape[1]
        routing = csrc_route(expert_idx, gate_up_proj.shape[0])
        inter = down_proj.shape[2]
        xs = permute(hidden, routing.token)
        gu = gmm(xs, gate_up_proj.transpose(1, 2), routing)
        del xs
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        y = gmm(h, down_proj.transpose(1, 2), routing)  # (S, H), sorted order
        out = unpermute(y, routing.inv_perm, expert_weight, k)
        ctx.save_for_backward(hidden, expert_weight, gate_up_proj, down_proj, gu, y,
                              routing.perm, routing.token, routing.inv_perm, routing.offsets)
        ctx.routing_bounds = routing._bounds
        return out

    @staticmethod
    @once_differentiable  # no double backward: fail loudly rather than give wrong 2nd-order grads
    def backward(ctx, dout):
        hidden, expert_weight, gate_up_proj, down_proj, gu, y, perm, token, inv_perm, offsets = ctx.saved_tensors
        k = expert_weight.shape[1]
        routing = Routing(perm, token, inv_perm, offsets, gate_up_proj.shape[0], k, ctx.routing_bounds)
        need_x, _, need_w, need_gu, need_down = ctx.needs_input_grad
        dout = dout.contiguous()
        d_hidden = d_weight = d_gate_up = d_down = None
        if need_w:
            d_weight = unpermute_weight_grad(dout, y, inv_perm, k)
        if not (need_x or need_gu or need_down):
            return d_hidden, None, d_weight, d_gate_up, d_down
        dys = permute(dout, token, expert_weight.reshape(-1), perm)  # w[slot] * dout[token], sorted
        inter = down_proj.shape[2]
        if need_down:
            d_down = gmm_wgrad(dys, F.silu(gu[:, :inter]) * gu[:, inter:], routing)
        dgu = swiglu_backward(gmm(dys, down_proj, routing), gu)
        del dys
        if need_gu:
            d_gate_up = gmm_wgrad(dgu, permute(hidden, token), routing)
        if need_x:
            d_hidden = unpermute(gmm(dgu, gate_up_proj, routing), inv_perm, None, k)
        return d_hidden, None, d_weight, d_gate_up, d_down


def moe_mlp_cuda(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    """See moon_fast.ops.moe.moe_mlp (inputs already checked and contiguous)."""
    return MoeMlpCuda.apply(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)
