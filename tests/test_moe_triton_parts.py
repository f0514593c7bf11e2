"""The Triton MoE backend's helper kernels on their own: the routing (stable counting sort) against torch's
sort-based ``route``, each GEMM program's row tile, the weighted combine and its weight gradient, and the
split SwiGLU backward against torch. Outputs start poisoned. (The whole op against the reference: tests/test_moe_op.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.utils import DTYPES, assert_close, poison_, tolerance

triton = pytest.importorskip("triton")
import moon_fast.kernels._utils as kernel_utils  # noqa: E402
import moon_fast.kernels.moe_routing as moe_routing  # noqa: E402
import triton.language as tl  # noqa: E402
from moon_fast.kernels._utils import next_power_of_2  # noqa: E402
from moon_fast.kernels.moe import _row_tile, _tile_of_program, _wgrad_grid  # noqa: E402
from moon_fast.kernels.moe_combine import choice_weight_grad, combine  # noqa: E402
from moon_fast.kernels.moe_swiglu import swiglu_backward  # noqa: E402

from moon_fast.ops.moe_routing import assert_all_routed, route  # noqa: E402


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(kernel_utils, "new_output", lambda shape, like, dtype=None: poison_(
        torch.empty(shape, dtype=dtype or like.dtype, device=like.device)))


def expert_ids(t, k, e, kind, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "lower_half":  # the upper experts get no slot
        idx = torch.randint(0, max(1, e // 2), (t, k), generator=gen)
    elif kind == "one_expert":
        idx = torch.full((t, k), e - 1)
    else:
        idx = torch.randint(0, e, (t, k), generator=gen)
    return idx.to(device)


# (T, k, E, max_chunks, ids): no slot; one slot; E = 1; empty experts; E not a power of two and > 16 lanes; several
# chunks of several one-hot blocks each (S = 3000, 256-slot blocks, 2 chunks); more chunks than the cap
# allows at one block each; E = 200 (256 lanes, 16-slot blocks).
ROUTINGS = [(0, 2, 3, 128, "random"), (1, 1, 4, 128, "random"), (64, 1, 1, 128, "random"), (37, 2, 5, 128, "lower_half"),
            (200, 3, 7, 2, "random"), (50, 2, 40, 4, "lower_half"), (1500, 2, 8, 2, "random"),
            (300, 2, 3, 4, "one_expert"), (120, 2, 200, 128, "random")]


@pytest.mark.parametrize("t, k, e, max_chunks, kind", ROUTINGS)
def test_route_triton_matches_torch_route(t, k, e, max_chunks, kind, device):
    idx = expert_ids(t, k, e, kind, device)
    got, bounds = moe_routing.route_triton(idx, e, max_chunks=max_chunks)
    want = route(idx, e)
    for name in ("perm", "token", "inv_perm", "offsets"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} differs from torch's stable sort"
    assert bounds.tolist() == [0, *want.offsets.tolist()]


@pytest.mark.parametrize("bad", [-1, 5, 2**40])
def test_route_triton_skips_bad_ids_and_the_assert_catches_them(bad, device):
    """A bad id is never written through (the other slots still land where a stable sort puts them), so
    the last bound counts the good slots only, and assert_all_routed (the range check moe_mlp relies on
    for this backend on a GPU) fails. On a GPU the failing assert itself is not run: a device-side assert
    would leave the CUDA context unusable for the tests after it."""
    idx = torch.tensor([[0, 1], [2, bad], [4, 3]], device=device)  # slot 3 is bad
    got, bounds = moe_routing.route_triton(idx, 5)
    assert bounds.tolist() == [0, 1, 2, 3, 4, 5] and got.perm[:5].tolist() == [0, 1, 2, 5, 4]
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match=r"expert_idx has values outside \[0, 5\)"):
            assert_all_routed(got)


# A row-tile launch's program: writes its row tile, column tile, expert (E or more for a surplus program),
# first row and row count.
@triton.jit
def _row_tile_probe(bounds_ptr, out_ptr, N, E: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    EP: tl.constexpr):
    tile, col_tile = _tile_of_program(N, BN)
    e, rows, rmask = _row_tile(bounds_ptr, tile, E, BM, EP)
    out = out_ptr + tl.program_id(0) * 5
    tl.store(out, tile)
    tl.store(out + 1, col_tile)
    tl.store(out + 2, e)
    tl.store(out + 3, tl.min(rows, 0).to(tl.int64))
    tl.store(out + 4, tl.sum(rmask.to(tl.int64), 0))


@pytest.mark.parametrize("t, k, e, block_m, n", [(37, 2, 5, 16, 16), (1, 1, 9, 16, 40), (200, 3, 7, 32, 8),
                                                 (64, 1, 1, 64, 33), (50, 2, 40, 8, 16), (40, 2, 3, 16, 64)])
def test_row_tiles_cover_every_row_once(t, k, e, block_m, n, device):
    """Over a row-tile launch's grid of (cdiv(S, BM) + E) * cdiv(N, BN) programs (BN = 16), each row of each
    expert lies in exactly one row tile, of that expert, in order; every other row tile is marked surplus
    (expert >= E) and covers nothing. Each (row tile, column tile) is one program's, and the programs of one
    row tile are consecutive (they share its A block through L2 on a GPU: kernels/moe.py _tile_of_program)."""
    idx = expert_ids(t, k, e, "lower_half" if e > 2 else "random", device)
    r, bounds = moe_routing.route_triton(idx, e)
    n_rows, n_cols = triton.cdiv(t * k, block_m) + e, triton.cdiv(n, 16)
    out = poison_(torch.empty(n_rows * n_cols, 5, dtype=torch.int64, device=device))
    _row_tile_probe[(n_rows * n_cols,)](bounds, out, n, E=e, BM=block_m, BN=16, EP=max(16, next_power_of_2(e)))
    out = out.cpu()
    order = [(tile, col) for tile, col in out[:, :2].tolist()]
    assert order == [(p // n_cols, p % n_cols) for p in range(n_rows * n_cols)], "not row tile by row tile"
    per_tile = out.view(n_rows, n_cols, 5)[:, :, 2:]
    assert (per_tile == per_tile[:, :1]).all(), "the column tiles of one row tile disagree on its rows"
    ends = [0, *r.offsets.tolist()]
    owner = torch.full((t * k,), -1)
    tiles = 0
    for te, first, count in per_tile[:, 0].tolist():
        if te >= e:
            assert count == 0, "a surplus program covers rows"
            continue
        tiles += 1
        assert 0 < count <= block_m and ends[te] <= first and first + count <= ends[te + 1]
        assert (owner[first:first + count] == -1).all(), "a row is covered twice"
        owner[first:first + count] = te
    assert torch.equal(owner, idx.reshape(-1)[r.perm].cpu()), "rows not covered by their expert's tiles"
    assert tiles == sum(-(-(ends[i + 1] - ends[i]) // block_m) for i in range(e))


@pytest.mark.parametrize("experts, m, n", [(8, 2048, 1024), (64, 1024, 1024), (3, 40, 72), (1, 16, 16)])
def test_wgrad_grid_runs_one_expert_at_a_time(experts, m, n):
    """A GPU starts a grid's programs x fastest, then y, then z. The expert must be z, the slowest axis, so
    that the programs of one expert run together and share its operand blocks through L2; the kernel reads
    it from program_id(2) (the launches' results are checked in test_moe_triton.py)."""
    assert _wgrad_grid(experts, m, n, {"BM": 128, "BN": 64}) == (triton.cdiv(n, 64), triton.cdiv(m, 128), experts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t, k, h", [(1, 1, 8), (17, 2, 131), (5, 4, 20), (33, 3, 256)])
def test_combine_and_choice_grad_match_torch(t, k, h, dtype, device):
    """combine: out[t] = sum_j w[t, j] y[t k + j]; choice_weight_grad: dw[t, j] = <y[t k + j], dout[t]>; both
    against the same sums in fp64 from the same rounded inputs, within one rounding of the output dtype.
    (17 tokens and H = 131 leave partial blocks of 16 tokens and 128 columns.)"""
    gen = torch.Generator().manual_seed(t * 100 + h)
    y = torch.randn(t * k, h, generator=gen).to(dtype).to(device)
    w = torch.rand(t, k, generator=gen).to(dtype).to(device)
    dout = torch.randn(t, h, generator=gen).to(dtype).to(device)
    out = combine(y, w, poison_(torch.empty(t, h, dtype=dtype, device=device)))
    want = (y.double().view(t, k, h) * w.double()[:, :, None]).sum(1)
    assert_close(out.double(), want, **tolerance(dtype), name="combine")
    dw = choice_weight_grad(y, dout, poison_(torch.empty(t, k, dtype=dtype, device=device)))
    want_dw = (y.double().view(t, k, h) * dout.double()[:, None, :]).sum(-1)
    # a dot of h terms: fp32 accumulation error grows with sqrt(h) x the terms' size
    assert_close(dw.double(), want_dw, **tolerance(dtype, scale=max(1.0, h**0.5 / 4)), name="choice_weight_grad")



@pytest.mark.parametrize("scaled", [False, True], ids=["h", "w_h"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, inter", [(1, 1), (9, 300), (16, 256), (3, 7)])
def test_swiglu_backward_pass_matches_autograd(rows, inter, dtype, scaled, device):
    """kernels/moe_swiglu.py: (h, dgu) from (dh, gu) against fp64 autograd of h = silu(g) * u on the same
    rounded inputs, within one rounding of the output dtype; with h_scale (the routing weights) h comes out
    scaled row by row. 9 x 300 leaves partial blocks of 8 rows and 256 columns; the gate's tails (-120, 95)
    are where a careless silu' overflows or loses its 1."""
    gen = torch.Generator().manual_seed(rows * 1000 + inter)
    gu = (torch.randn(rows, 2 * inter, generator=gen) * 3).to(dtype)
    gu[0, 0] = -120.0
    gu[-1, inter - 1] = 95.0
    dh = torch.randn(rows, inter, generator=gen).to(dtype)
    w = torch.rand(rows, generator=gen).to(dtype)
    gu, dh = gu.to(device), dh.to(device)
    h, dgu = swiglu_backward(dh, gu, w.to(device) if scaled else None)
    g64 = gu.double().cpu().requires_grad_()
    h64 = torch.nn.functional.silu(g64[:, :inter]) * g64[:, inter:]
    h64.backward(dh.double().cpu())
    want_h = h64.detach() * w.double()[:, None] if scaled else h64.detach()
    assert h.dtype == dgu.dtype == dtype
    assert_close(h, want_h, **tolerance(dtype), name="h")
    assert_close(dgu, g64.grad, **tolerance(dtype), name="dgu")


def test_swiglu_backward_pass_rejects_mismatched_inputs(device):
    dh = torch.zeros(4, 6, device=device)
    with pytest.raises(ValueError, match=r"dh \(S, I\) and gu \(S, 2I\)"):
        swiglu_backward(dh, torch.zeros(4, 6, device=device))
    with pytest.raises(ValueError, match="one dtype"):
        swiglu_backward(dh, torch.zeros(4, 12, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"h_scale must be contiguous \(S,\) = \(4,\)"):
        swiglu_backward(dh, torch.zeros(4, 12, device=device), torch.ones(5, device=device))
    h, dgu = swiglu_backward(dh[:0], torch.zeros(0, 12, device=device))  # no rows: no launch, empty outputs
    assert h.shape == (0, 6) and dgu.shape == (0, 12)
