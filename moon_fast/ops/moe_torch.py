"""The ``torch`` backend of ``moe_mlp``: one sort-based permutation and grouped matmuls.

Forward, with S = T * k slots in expert-contiguous order (see moe_routing):

    xs  = hidden[token]                      (S, H)   gather
    gu  = xs @ gate_up_proj[e]^T             (S, 2I)  grouped matmul
    h   = silu(gu[:, :I]) * gu[:, I:]        (S, I)   SwiGLU
    y   = h @ down_proj[e]^T                 (S, H)   grouped matmul
    out = sum_j w[t, j] * y[slot (t, j)]     (T, H)   weighted unpermute (k fused multiply-adds)

Every step is dense and deterministic (no index_add / atomics). The autograd Function saves the
pre-activation ``gu``, ``silu(gate)`` (S, I) and the token-ordered ``y`` (needed for the gradient of the
routing weights); ``xs`` is gathered again and ``h`` recomputed as one product in the backward. Saving
``silu(gate)`` costs S * I elements of memory and saves recomputing it: in bf16 on the 2-core development
CPU a silu over (8192 x 1024) takes about 7 ms, about 1% of the op's forward+backward at T=4096, H=I=1024,
E=8, k=2 (``python benchmarks/cpu_probes.py moe-profile``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moon_fast.ops.moe_gemm import gmm, gmm_wgrad
from moon_fast.ops.moe_routing import Routing, route


def combine(y_tok: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y_tok (T, k, H), weight (T, k) -> (T, H) = sum_j weight[t, j] * y_tok[t, j].
    A loop of fused multiply-adds over the k choices: on the CPU several times faster than a
    (1 x k) @ (k x H) bmm per token or a reduction over the middle dimension."""
    out = y_tok[:, 0] * weight[:, :1]
    for j in range(1, y_tok.shape[1]):
        out.addcmul_(y_tok[:, j], weight[:, j:j + 1])
    return out


def sum_choices(x_tok: torch.Tensor) -> torch.Tensor:
    """x_tok (T, k, H) -> (T, H) sum over the k choices (adds: faster than .sum(1) on the CPU)."""
    if x_tok.shape[1] == 1:
        return x_tok[:, 0]
    out = torch.add(x_tok[:, 0], x_tok[:, 1])
    for j in range(2, x_tok.shape[1]):
        out.add_(x_tok[:, j])
    return out


def swiglu_backward(dh: torch.Tensor, gu: torch.Tensor, silu_gate: torch.Tensor | None = None) -> torch.Tensor:
    """dh (S, I), gu (S, 2I) pre-activation -> d gu (S, 2I) for h = silu(gate) * up.
    ``silu_gate``: silu(gu[:, :I]) if the caller has it already."""
    inter = dh.shape[1]
    gate, up = gu[:, :inter], gu[:, inter:]
    dgu = torch.empty_like(gu)
    torch.mul(dh, F.silu(gate) if silu_gate is None else silu_gate, out=dgu[:, inter:])
    dgate = dgu[:, :inter]
    torch.mul(dh, up, out=dgate)
    torch.ops.aten.silu_backward.grad_input(dgate, gate, grad_input=dgate)  # in place: no extra buffer
    return dgu


class MoeMlpTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
        t, k = expert_idx.shape
        routing = route(expert_idx, gate_up_proj.shape[0])
        inter = down_proj.shape[2]
        xs = hidden.index_select(0, routing.token)
        gu = gmm(xs, gate_up_proj.transpose(1, 2), routing)
        del xs
        silu_gate = F.silu(gu[:, :inter])
        h = silu_gate * gu[:, inter:]
        y = gmm(h, down_proj.transpose(1, 2), routing)
        del h
        y_tok = y.index_select(0, routing.inv_perm).view(t, k, -1)
        out = combine(y_tok, expert_weight)
        ctx.save_for_backward(hidden, expert_weight, gate_up_proj, down_proj, gu, silu_gate, y_tok,
                              routing.perm, routing.token, routing.inv_perm, routing.offsets)
        ctx.routing_bounds = routing._bounds  # reuse the host copy if a fallback made one
        return out

    @staticmethod
    @once_differentiable  # no double backward: fail loudly rather than give wrong 2nd-order grads
    def backward(ctx, dout):
        (hidden, expert_weight, gate_up_proj, down_proj, gu, silu_gate, y_tok, perm, token, inv_perm,
         offsets) = ctx.saved_tensors
        t, k, hdim = y_tok.shape
        routing = Routing(perm, token, inv_perm, offsets, gate_up_proj.shape[0], k, ctx.routing_bounds)
        need_x, _, need_w, need_gu, need_down = ctx.needs_input_grad
        dout = dout.contiguous()  # grouped_mm's backward kernels reject stride-0 gradients
        d_weight = d_hidden = d_gate_up = d_down = None
        if need_w:
            d_weight = torch.bmm(y_tok, dout.view(t, hdim, 1)).view(t, k)
        if not (need_x or need_gu or need_down):
            return d_hidden, None, d_weight, d_gate_up, d_down
        # d y for each slot in sorted order: w[slot] * dout[token]
        w_sorted = expert_weight.reshape(-1).index_select(0, perm)
        dys = dout.index_select(0, token).mul_(w_sorted[:, None])
        inter = down_proj.shape[2]
        if need_down:
            d_down = gmm_wgrad(dys, silu_gate * gu[:, inter:], routing)
        dh = gmm(dys, down_proj, routing)
        del dys
        dgu = swiglu_backward(dh, gu, silu_gate)
        del dh
        if need_gu:
            d_gate_up = gmm_wgrad(dgu, hidden.index_select(0, token), routing)
        if need_x:
            dxs = gmm(dgu, gate_up_proj, routing)
            d_hidden = sum_choices(dxs.index_select(0, inv_perm).view(t, k, hdim))
        return d_hidden, None, d_weight, d_gate_up, d_down


def moe_mlp_torch(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    return MoeMlpTorch.apply(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


def moe_mlp_grouped_mm_autograd(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    """The ``grouped_mm`` peer: the same dataflow through torch's own autograd (what transformers'
    "grouped_mm" experts do), without our saved-tensor choices."""
    t, k = expert_idx.shape
    routing = route(expert_idx, gate_up_proj.shape[0])
    inter = down_proj.shape[2]
    gu = gmm(hidden.index_select(0, routing.token), gate_up_proj.transpose(1, 2), routing)
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    y = gmm(h, down_proj.transpose(1, 2), routing)
    return combine(y.index_select(0, routing.inv_perm).view(t, k, -1), expert_weight)
