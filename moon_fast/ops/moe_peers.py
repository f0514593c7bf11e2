"""Peer backends of ``moe_mlp`` built on other libraries, for benchmarks (CUDA only, optional).

* ``grouped_gemm``: our routing + the grouped_gemm package's CUTLASS/cuBLAS ``gmm`` (it takes the
  per-expert row counts on the host: one synchronisation per call, that library's design).
* ``megablocks``: MegaBlocks' dropless path (its sort / histogram / gather / weighted scatter kernels)
  with grouped_gemm for the GEMMs, as its ``GroupedGLU`` does.

Both keep our weight layout: ``gmm(x, gate_up_proj, trans_b=True)`` gives (S, 2I) gate-then-up.
Both run bf16 only (grouped_gemm's kernels). Both packages build on the development machine
(``bash benchmarks/peers.sh``) but their kernels run only on a GPU, where they have not run yet. On the CPU,
tests/test_moe_peers_cpu.py runs these wrappers with the packages' own Python (MegaBlocks' Triton gather /
scatter under the interpreter) and torch stand-ins for their CUDA extensions, against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moon_fast.ops.moe_routing import route


def _require_bf16(backend: str, *tensors: torch.Tensor) -> None:
    """The grouped_gemm package's kernels take bfloat16 only (a bare TORCH_CHECK otherwise)."""
    bad = sorted({str(t.dtype).replace("torch.", "") for t in tensors if t.dtype != torch.bfloat16})
    if bad:
        raise TypeError(f"moe_mlp backend {backend!r} runs bfloat16 only (the grouped_gemm package's kernels); "
                        f"got {', '.join(bad)}. Cast to bfloat16, or use backend='triton' or 'cuda'.")


def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    inter = gu.shape[1] // 2
    return F.silu(gu[:, :inter]) * gu[:, inter:]


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Both packages' kernels check for contiguous operands (a bare TORCH_CHECK / assert); moe_mlp takes any
    strides. A no-op for the usual contiguous weights."""
    return [t.contiguous() for t in tensors]


def moe_mlp_grouped_gemm(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    _require_bf16("grouped_gemm", hidden, gate_up_proj, down_proj)
    from grouped_gemm.ops import gmm

    hidden, gate_up_proj, down_proj = _contiguous(hidden, gate_up_proj, down_proj)

    t, k = expert_idx.shape
    routing = route(expert_idx, gate_up_proj.shape[0])
    batch_sizes = routing.counts().cpu()  # grouped_gemm wants int64 sizes on the host
    xs = hidden.index_select(0, routing.token)
    h = _swiglu(gmm(xs, gate_up_proj, batch_sizes, trans_b=True))
    y = gmm(h, down_proj, batch_sizes, trans_b=True)
    y_tok = y.index_select(0, routing.inv_perm).view(t, k, -1)
    return torch.bmm(expert_weight.view(t, 1, k), y_tok).view(t, -1)


def moe_mlp_megablocks(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    _require_bf16("megablocks", hidden, gate_up_proj, down_proj)
    from grouped_gemm.ops import gmm
    from megablocks import ops

    hidden, expert_weight, gate_up_proj, down_proj = _contiguous(hidden, expert_weight, gate_up_proj, down_proj)
    num_experts = gate_up_proj.shape[0]
    top_k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1).int()
    end_bit = max(int(num_experts - 1).bit_length(), 1)
    bin_ids, indices = ops.sort(flat, end_bit)
    tokens_per_expert = ops.histogram(flat, num_experts)
    bins = ops.inclusive_cumsum(tokens_per_expert, 0)
    bins = bins.view(1) if not bins.dim() else bins
    xs = ops.gather(hidden, indices, bin_ids, bins, top_k)
    batch_sizes = tokens_per_expert.cpu().to(torch.long)
    h = _swiglu(gmm(xs, gate_up_proj, batch_sizes, trans_b=True))
    y = gmm(h, down_proj, batch_sizes, trans_b=True)
    return ops.scatter(y, indices, bin_ids, expert_weight.reshape(-1), bins, top_k)
