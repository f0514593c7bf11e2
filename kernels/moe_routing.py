"""Routing metadata of the Triton ``moe_mlp`` in two launches: a stable counting sort of the slots by expert.

S = T * k slots (slot s = t * k + j is token t's j-th choice), E experts. ``route_triton`` returns exactly
what :func:`moon_fast.ops.moe_routing.route` returns (a stable sort of the flat expert ids), with no host
synchronisation, in two kernel launches. Before, the torch routing, its bounds and the tile schedule the
GEMMs then read took 37 small torch ops per forward (45 in all, less the 3 of the range check and the 5 of
the combine: benchmarks/results/2026-11-22-cpu/moe_launch_count/before_0ab7c78.txt), and on an H100 the
op was bound by host time per launch (benchmarks/results/2026-11-22-h100/: 13-33 us per launch).

1. ``_chunk_histogram_kernel``, grid (C,): the slots are cut into C <= MAX_CHUNKS contiguous chunks of CH
   slots; program c counts its chunk's slots per expert -> hist (C, EP) int32.
2. ``_chunk_scatter_kernel``, grid (C,): program c sums the rows of hist (all of them: where each expert
   starts; those before c: how many of each expert's slots come before its chunk), then walks its chunk in
   blocks of SB slots. A slot's sorted position is its expert's next free position plus its rank among the
   block's slots of that expert (a cumulative sum down a one-hot (SB, EP) block), so equal ids keep slot
   order: the sort is stable. It writes perm[pos] = s, token[pos] = s // k, inv_perm[s] = pos; program 0
   also writes bounds (E + 1,) = [0, end_0, ..., end_{E-1}].

Capping C keeps the hist table each program sums at C x EP entries (linear work in S overall). EP is E
rounded up to a power of two; SB is chosen so that a one-hot block holds at most 4096 entries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moon_fast.kernels import _utils
from moon_fast.kernels._utils import next_power_of_2

from moon_fast.ops.moe_routing import Routing

MAX_CHUNKS = 128
_ONE_HOT_ENTRIES = 4096


# ids (S,) -> hist (C, EP): hist[c, e] = number of slots of chunk c (slots [c * CH, (c + 1) * CH)) on expert e
@triton.jit
def _chunk_histogram_kernel(ids_ptr, hist_ptr, S, CH, EP: tl.constexpr, SB: tl.constexpr):
    c = tl.program_id(0)
    es = tl.arange(0, EP)
    counts = tl.zeros((EP,), dtype=tl.int32)
    lo = c * CH
    hi = tl.minimum(lo + CH, S)
    for s0 in range(lo, hi, SB):
        s = s0 + tl.arange(0, SB)
        ids = tl.load(ids_ptr + s, mask=s < hi, other=-1)
        counts += tl.sum((ids[:, None] == es[None, :]).to(tl.int32), 0)
    tl.store(hist_ptr + c * EP + es, counts)


# ids (S,), hist (C, EP) -> perm, token (S,) by sorted position; inv_perm (S,) by slot; bounds (E + 1,)
@triton.jit
def _chunk_scatter_kernel(ids_ptr, hist_ptr, perm_ptr, token_ptr, inv_perm_ptr, bounds_ptr, S, CH, C, E, TOP_K,
                          EP: tl.constexpr, SB: tl.constexpr, RB: tl.constexpr):
    c = tl.program_id(0)
    es = tl.arange(0, EP)
    total = tl.zeros((EP,), dtype=tl.int32)
    before = tl.zeros((EP,), dtype=tl.int32)
    for r0 in range(0, C, RB):
        rs = r0 + tl.arange(0, RB)
        h = tl.load(hist_ptr + rs[:, None] * EP + es[None, :], mask=(rs < C)[:, None], other=0)
        total += tl.sum(h, 0)
        before += tl.sum(tl.where((rs < c)[:, None], h, 0), 0)
    ends = tl.cumsum(total, 0)
    starts = ends - total
    if c == 0:  # bounds[e] = start of expert e, bounds[e + 1] = its end (the same value where they overlap)
        tl.store(bounds_ptr + es, starts, mask=es < E)
        tl.store(bounds_ptr + 1 + es, ends, mask=es < E)
    nxt = starts + before  # each expert's next free sorted position for this chunk's slots
    lo = c * CH
    hi = tl.minimum(lo + CH, S)
    for s0 in range(lo, hi, SB):
        s = s0 + tl.arange(0, SB)
        ids = tl.load(ids_ptr + s, mask=s < hi, other=-1)
        onehot = (ids[:, None] == es[None, :]).to(tl.int32)
        rank = tl.sum(onehot * tl.cumsum(onehot, 0), 1) - 1  # among this block's slots of the same expert
        pos = tl.sum(onehot * nxt[None, :], 1) + rank
        # ids outside [0, E) were rejected before the launch (moe_mlp); never write through them
        ok = (s < hi) & (ids >= 0) & (ids < E)
        tl.store(perm_ptr + pos, s.to(tl.int64), mask=ok)
        tl.store(token_ptr + pos, (s // TOP_K).to(tl.int64), mask=ok)
        tl.store(inv_perm_ptr + s, pos.to(tl.int64), mask=ok)
        nxt += tl.sum(onehot, 0)


def route_triton(expert_idx: torch.Tensor, num_experts: int, *, max_chunks: int = MAX_CHUNKS
                 ) -> tuple[Routing, torch.Tensor]:
    """expert_idx (T, k) int64 with ids in [0, E) -> (Routing, bounds (E + 1,) int32); Routing.offsets is
    bounds[1:]. ``max_chunks``: at most this many programs per launch (a power of two; tests lower it)."""
    t, top_k = expert_idx.shape
    s = t * top_k
    ids = expert_idx.reshape(-1)
    perm = _utils.new_output((s,), ids, torch.int64)
    token = _utils.new_output((s,), ids, torch.int64)
    inv_perm = _utils.new_output((s,), ids, torch.int64)
    bounds = _utils.new_output((num_experts + 1,), ids, torch.int32)
    routing = Routing(perm=perm, token=token, inv_perm=inv_perm, offsets=bounds[1:], num_experts=num_experts,
                      top_k=top_k)
    if s == 0:  # no slots: every expert is empty
        bounds.zero_()
        return routing, bounds
    ep = max(16, next_power_of_2(num_experts))
    sb = max(16, _ONE_HOT_ENTRIES // ep)
    chunks = min(max_chunks, triton.cdiv(s, sb))
    chunk = triton.cdiv(triton.cdiv(s, chunks), sb) * sb  # slots per chunk: whole blocks
    chunks = triton.cdiv(s, chunk)
    rb = max(2, min(max_chunks, _ONE_HOT_ENTRIES // ep))
    hist = _utils.new_output((chunks, ep), ids, torch.int32)
    _chunk_histogram_kernel[(chunks,)](ids, hist, s, chunk, EP=ep, SB=sb)
    _chunk_scatter_kernel[(chunks,)](ids, hist, perm, token, inv_perm, bounds, s, chunk, chunks, num_experts,
                                     top_k, EP=ep, SB=sb, RB=rb)
    return routing, bounds
