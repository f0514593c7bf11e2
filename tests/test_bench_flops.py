"""The benchmark FLOP formulas against torch's FLOP counter and hand counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moon_fast.bench import flops


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_gemm():
    a, b = torch.randn(7, 5), torch.randn(5, 3)
    assert flops.gemm_flops(7, 3, 5) == counted(lambda: a @ b) == 2 * 7 * 3 * 5


@pytest.mark.parametrize("n,m,d", [(6, 6, 4), (5, 9, 3)])
def test_contrastive_matches_counter(n, m, d):
    q = torch.randn(n, d, requires_grad=True)
    k = torch.randn(m, d, requires_grad=True)

    def fwd():
        return torch.nn.functional.cross_entropy(q @ k.T, torch.arange(n) % m)

    f, b = flops.contrastive_flops(n, m, d)
    assert f == counted(fwd)
    loss = fwd()
    assert b == counted(lambda: loss.backward())


def test_contrastive_bytes():
    assert flops.contrastive_bytes(4, 6, 8, 2) == ((4 + 6) * 8 * 2, 2 * (4 + 6) * 8 * 2)


def test_attention_matches_counter_of_explicit_attention():
    b, h, s, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))

    def fwd():  # the math SDPA does (the counter does not see inside CPU SDPA kernels)
        return (torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1) @ v).sum()

    f, b_ = flops.attention_flops([s] * b, h, d)
    assert f == counted(fwd) == 4 * b * s * s * h * d
    loss = fwd()
    # the explicit backward does four products (2 x forward); flash-style kernels also recompute
    # Q K^T, hence the 2.5 x convention.
    assert counted(lambda: loss.backward()) == 2 * f and b_ == 2.5 * f


def test_attention_causal_pairs_by_hand():
    # square 4x4: 4+3+2+1 visible pairs; 2 queries x 4 keys bottom-right aligned: rows see 3 and 4 keys.
    assert flops.attention_pairs([4], causal=True) == 10
    assert flops.attention_pairs([2], [4], causal=True) == 7
    assert flops.attention_pairs([3, 2], causal=False) == 9 + 4
    # query longer than keys: the first rows see nothing
    assert flops.attention_pairs([3], [1], causal=True) == 1


def test_attention_bytes():
    # q, o: 10*2*8*2 bytes each; k, v: 10*1*8*2 bytes each
    q, kv = 10 * 2 * 8 * 2, 10 * 1 * 8 * 2
    assert flops.attention_bytes(10, 10, 2, 1, 8, 2) == (2 * q + 2 * kv, 4 * q + 4 * kv)


def test_moe_matches_per_expert_loop_counter():
    t, k, h, i, e = 6, 2, 8, 5, 3
    x = torch.randn(t, h, requires_grad=True)
    gate_up = torch.randn(e, 2 * i, h, requires_grad=True)
    down = torch.randn(e, h, i, requires_grad=True)
    idx = torch.stack([torch.arange(t) % e, (torch.arange(t) + 1) % e], 1)

    def fwd():
        out = torch.zeros(t, h)
        for z in range(e):
            tok, slot = (idx == z).nonzero(as_tuple=True)
            g, u = (x[tok] @ gate_up[z].T).chunk(2, -1)
            out = out.index_add(0, tok, (torch.nn.functional.silu(g) * u) @ down[z].T)
        return out.sum()

    f, b = flops.moe_flops(t, k, h, i)
    assert f == counted(fwd)
    loss = fwd()
    assert b == counted(lambda: loss.backward())


def test_moe_bytes():
    act, w = 6 * 8 * 4, 3 * 3 * 8 * 5 * 4
    assert flops.moe_bytes(6, 2, 8, 5, 3, 4) == (2 * act + w, 3 * act + 2 * w)
