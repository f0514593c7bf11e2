"""moon_fast.bench.launches counts what a call launches, and the Triton moe_mlp keeps its launch count low
(on an H100 the op was bound by host time per launch: benchmarks/results/2026-11-22-h100/)."""

from __future__ import annotations

import pytest
import torch

from moon_fast.bench.launches import count_launches
from moon_fast.ops import moe_mlp


def test_counts_torch_ops_but_not_views_or_allocations(device):
    x = torch.randn(8, 4, device=device)
    with count_launches() as c:
        y = x.t()  # a view
        z = torch.empty(3, device=device)  # an allocation
        w = (x + 1).sum()
    assert c.torch == {"aten.add": 1, "aten.sum": 1} and not c.triton and c.total == 2
    del y, z, w


def test_counts_each_triton_launch_once_and_not_the_interpreters_own_ops(device):
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def double(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    x = torch.ones(5, device=device)
    with count_launches() as c:
        double[(1,)](x, 5, BLOCK=8)
        double[(1,)](x, 5, BLOCK=8)
    assert dict(c.triton) == {"double": 2} and not c.torch
    assert x.tolist() == [4.0] * 5  # the launches ran


def _moe_problem(device, dtype=torch.bfloat16, t=48, h=32, inter=24, e=8, k=2):
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(t, h, generator=gen), torch.rand(t, k, generator=gen),
              torch.randn(e, 2 * inter, h, generator=gen) / h**0.5, torch.randn(e, h, inter, generator=gen) / inter**0.5]
    leaves = [x.to(dtype).to(device).requires_grad_() for x in leaves]
    idx = torch.rand(t, e, generator=gen).argsort(dim=1)[:, :k].contiguous().to(device)  # as topk gives it
    return leaves, idx


@pytest.mark.parametrize("swiglu_bwd", ["fused", "split"])
def test_triton_moe_forward_backward_launches(device, swiglu_bwd, monkeypatch):
    """Forward: 2 routing launches and the check that every slot was routed, 2 GEMMs, the combine. Backward:
    the weight gradient, one gather of the routing weights, 4 GEMMs, the sum over the k choices. It was 58 launches on the CPU at
    0ab7c78 (a torch sort, about 25 small ops of tile schedule, 10 casts and reductions for the combine and
    its gradient): benchmarks/results/2026-11-22-cpu/moe_launch_count/. Split SwiGLU backward
    ($MOON_FAST_MOE_SWIGLU_BWD): one launch more, its elementwise pass."""
    pytest.importorskip("triton")
    monkeypatch.setenv("MOON_FAST_MOE_SWIGLU_BWD", swiglu_bwd)
    leaves, idx = _moe_problem(device)
    hidden, weight, gate_up, down = leaves
    moe_mlp(hidden, idx, weight, gate_up, down, backend="triton").sum().backward()  # compiles, caches
    for x in leaves:
        x.grad = None  # a fresh step: the backward's gradients are stored, not accumulated
    with count_launches() as fwd:
        out = moe_mlp(hidden, idx, weight, gate_up, down, backend="triton")
    grad = torch.ones_like(out)
    with count_launches() as bwd:
        out.backward(grad)
    assert dict(fwd.triton) == {"_chunk_histogram_kernel": 1, "_chunk_scatter_kernel": 1, "_swiglu_up_kernel": 1,
                                "_grouped_rows_kernel": 1, "_combine_kernel": 1}, fwd.summary()
    split = {"_swiglu_backward_kernel": 1} if swiglu_bwd == "split" else {}
    assert dict(bwd.triton) == {"_choice_grad_kernel": 1, "_grouped_rows_kernel": 2,
                                "_grouped_wgrad_kernel": 2, **split}, bwd.summary()
    # torch ops: the routing's check that every slot found its expert (a compare and an async assert); on
    # the CPU moe_mlp also checks the range itself first (aminmax and two reads), on a GPU it leaves that to
    # the routing. Backward: the routing weights gathered to sorted order, and the sum over the k choices.
    routed_check = {"aten.eq": 1, "aten._assert_async": 1}
    cpu_check = {"aten.aminmax": 1, "aten._local_scalar_dense": 2}
    assert dict(fwd.torch) == (routed_check if device.type == "cuda" else {**routed_check, **cpu_check}), fwd.summary()
    assert dict(bwd.torch) == {"aten.index_select": 1, "aten.sum": 1}, bwd.summary()
