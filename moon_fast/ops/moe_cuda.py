"""The csrc backends of ``moe_mlp``: ``cuda`` / ``cuda_emu`` (csrc/moe.cu) and ``cpu`` (csrc/cpu/moe_cpu.cpp).

One dataflow (``MoeMlpCsrc``), two kernel sets (``Kernels``):

* ``cuda`` / ``cuda_emu``: csrc/moe.cu kernels for the routing metadata (histogram, scan, stable
  permutation), the gather of token rows (with the routing-weight scale in the backward), the weighted
  unpermute and its weight gradient, and the SwiGLU and its backward (one launch and one pass over memory
  each, where torch ops took two and five launches). On CPU tensors the same kernels run under the
  emulator (``cuda_emu``, tests only).
* ``cpu``: the same data-movement and SwiGLU ops as native multithreaded CPU kernels (moon_fast._C_cpu,
  csrc/cpu/moe_cpu.cpp), one pass over memory each; the grouped GEMMs as
  single-threaded oneDNN / MKL calls on independent (expert, row chunk) tasks spread over the threads
  (csrc/cpu/grouped_gemm_cpu.cpp, which says why); routing by moe_routing.route (a sort: cheap on the CPU).

The GEMMs of ``cuda`` / ``cuda_emu`` are grouped_mm / cuBLAS (moe_gemm.gmm).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from moon_fast import _ext
from moon_fast.ops.moe_gemm import gmm, gmm_wgrad
from moon_fast.ops.moe_routing import Routing, assert_all_routed, route

ROUTING_CHUNK = 256  # slots per block of the routing kernels (kChunk in csrc/moe.cu)


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Output allocation; tests replace it to poison outputs with NaN before the kernels write them."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def ops_for(device: torch.device):
    ops = _ext.csrc_ops(device)
    if not hasattr(ops, "moe_swiglu"):
        raise RuntimeError("the moon_fast extension was built without csrc/moe.cu's current kernels; rebuild it "
                           "with `make build`")
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
    routing = Routing(perm=perm, token=token, inv_perm=inv_perm, offsets=offsets, num_experts=num_experts, top_k=k)
    assert_all_routed(routing)  # moe_mlp leaves the expert-range check to this on a GPU
    return routing


@dataclass(frozen=True)
class Kernels:
    """The non-GEMM steps of the csrc dataflow. ``ops(device)`` gives the op namespace with moe_permute,
    moe_unpermute, moe_unpermute_weight_grad, moe_swiglu and moe_swiglu_backward_; ``native_gemm``: it also
    has moe_grouped_mm and moe_grouped_mm_wgrad (else moe_gemm's grouped_mm / matmul loop). ``save_gathered``: keep the gathered
    input rows (S, H) for the backward rather than gathering them again (S * H more saved memory, one pass less)."""

    ops: Callable[[torch.device], object]
    route: Callable[[torch.Tensor, int], Routing]
    native_gemm: bool = False
    save_gathered: bool = False

    # The kernels take contiguous rows. grouped_mm pads its output rows to a multiple of 16 bytes (a
    # (10, 6) fp32 result has row stride 8), so a GEMM output of an unaligned width goes through
    # .contiguous(): a copy at such widths only, free otherwise.

    def permute(self, x: torch.Tensor, row_idx: torch.Tensor, scale=None, scale_idx=None) -> torch.Tensor:
        """out[i] = scale[scale_idx[i]] * x[row_idx[i]] (no scale: a plain row gather)."""
        x = x.contiguous()
        out = _empty((row_idx.numel(), x.shape[1]), x)
        self.ops(x.device).moe_permute(x, row_idx, scale, scale_idx, out)
        return out

    def unpermute(self, y: torch.Tensor, inv_perm: torch.Tensor, weight, top_k: int) -> torch.Tensor:
        """y (S, H) sorted -> (T, H): out[t] = sum_j weight[t, j] * y[inv_perm[t * k + j]] (weight None = 1)."""
        y = y.contiguous()
        out = _empty((inv_perm.numel() // top_k, y.shape[1]), y)
        self.ops(y.device).moe_unpermute(y, inv_perm, weight, top_k, out)
        return out

    def unpermute_weight_grad(self, dout: torch.Tensor, y: torch.Tensor, inv_perm: torch.Tensor,
                              top_k: int) -> torch.Tensor:
        """(T, k): dw[t, j] = <dout[t], y[inv_perm[t * k + j]]>."""
        y = y.contiguous()
        dw = _empty((dout.shape[0], top_k), dout)
        self.ops(dout.device).moe_unpermute_weight_grad(dout, y, inv_perm, top_k, dw)
        return dw

    def gmm(self, a: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
        """a (S, K) in expert-contiguous order, b (E, K, N) (any strides) -> (S, N); see moe_gemm.gmm."""
        if not self.native_gemm:
            return gmm(a, b, routing)
        a = a.contiguous()
        out = _empty((a.shape[0], b.shape[2]), a)
        self.ops(a.device).moe_grouped_mm(a, b, routing.offsets, out)
        return out

    def gmm_wgrad(self, a: torch.Tensor, b: torch.Tensor, routing: Routing) -> torch.Tensor:
        """a (S, M), b (S, N) in expert-contiguous order -> (E, M, N); see moe_gemm.gmm_wgrad."""
        if not self.native_gemm:
            return gmm_wgrad(a, b, routing)
        a, b = a.contiguous(), b.contiguous()
        out = _empty((routing.num_experts, a.shape[1], b.shape[1]), a)
        self.ops(a.device).moe_grouped_mm_wgrad(a, b, routing.offsets, out)
        return out

    def swiglu(self, gu: torch.Tensor) -> torch.Tensor:
        """gu (S, 2I) -> h (S, I) = silu(gate) * up."""
        inter = gu.shape[1] // 2
        gu = gu.contiguous()
        h = _empty((gu.shape[0], inter), gu)
        self.ops(gu.device).moe_swiglu(gu, h)
        return h

    def swiglu_backward(self, dh: torch.Tensor, gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dh (S, I), gu (S, 2I) -> (d gu (S, 2I), h (S, I)): the gradient and the recomputed activation.
        Consumes dh: the kernel writes h into its memory."""
        dh, gu = dh.contiguous(), gu.contiguous()
        dgu = _empty(gu.shape, gu)
        self.ops(gu.device).moe_swiglu_backward_(dh, gu, dgu)
        return dgu, dh


def cpu_ops(device: torch.device):
    if device.type != "cpu":
        raise RuntimeError(f"the cpu backend of moe_mlp takes CPU tensors, got {device}")
    return _ext.cpu_ops()


CSRC_KERNELS = Kernels(ops=ops_for, route=csrc_route)
# On the CPU a gather into fresh memory costs several ms (page faults on first touch): keep xs.
CPU_KERNELS = Kernels(ops=cpu_ops, route=route, native_gemm=True, save_gathered=True)


class MoeMlpCsrc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: Kernels, hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
        k = expert_idx.shape[1]
        routing = kernels.route(expert_idx, gate_up_proj.shape[0])
        xs = kernels.permute(hidden, routing.token)
        gu = kernels.gmm(xs, gate_up_proj.transpose(1, 2), routing)
        if not kernels.save_gathered:
            xs = None
        y = kernels.gmm(kernels.swiglu(gu), down_proj.transpose(1, 2), routing)  # (S, H), sorted order
        out = kernels.unpermute(y, routing.inv_perm, expert_weight, k)
        ctx.save_for_backward(hidden, xs, expert_weight, gate_up_proj, down_proj, gu, y,
                              routing.perm, routing.token, routing.inv_perm, routing.offsets)
        ctx.routing_bounds = routing._bounds
        ctx.kernels = kernels
        return out

    @staticmethod
    @once_differentiable  # no double backward: fail loudly rather than give wrong 2nd-order grads
    def backward(ctx, dout):
        hidden, xs, expert_weight, gate_up_proj, down_proj, gu, y, perm, token, inv_perm, offsets = ctx.saved_tensors
        kernels = ctx.kernels
        k = expert_weight.shape[1]
        routing = Routing(perm, token, inv_perm, offsets, gate_up_proj.shape[0], k, ctx.routing_bounds)
        _, need_x, _, need_w, need_gu, need_down = ctx.needs_input_grad
        dout = dout.contiguous()
        d_hidden = d_weight = d_gate_up = d_down = None
        if need_w:
            d_weight = kernels.unpermute_weight_grad(dout, y, inv_perm, k)
        if not (need_x or need_gu or need_down):
            return None, d_hidden, None, d_weight, d_gate_up, d_down
        dys = kernels.permute(dout, token, expert_weight.reshape(-1), perm)  # w[slot] * dout[token], sorted
        dgu, h = kernels.swiglu_backward(kernels.gmm(dys, down_proj, routing), gu)
        if need_down:
            d_down = kernels.gmm_wgrad(dys, h, routing)
        del dys, h
        if need_gu:
            d_gate_up = kernels.gmm_wgrad(dgu, xs if xs is not None else kernels.permute(hidden, token), routing)
        if need_x:
            d_hidden = kernels.unpermute(kernels.gmm(dgu, gate_up_proj, routing), inv_perm, None, k)
        return None, d_hidden, None, d_weight, d_gate_up, d_down


def moe_mlp_cuda(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    """``cuda`` / ``cuda_emu``. See moon_fast.ops.moe.moe_mlp (inputs already checked and contiguous)."""
    return MoeMlpCsrc.apply(CSRC_KERNELS, hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


def moe_mlp_cpu(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    """``cpu``: native CPU kernels for everything but the GEMMs. Inputs already checked and contiguous."""
    return MoeMlpCsrc.apply(CPU_KERNELS, hidden, expert_idx, expert_weight, gate_up_proj, down_proj)
