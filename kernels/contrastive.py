"""Fused contrastive (InfoNCE) loss in Triton, FlashAttention style: no (Nr, Nc) tensor exists.

Solves a :class:`moon_fast.ops.contrastive_core.Problem` (rows against columns, optional column
direction, group exclusions, per-row coefficients, segments). Four kernels, each recomputing
logit tiles ``S = scale * rows[r-tile] @ cols[c-tile].T`` in registers:

* ``_fwd_rows``  grid over row blocks, loop over column tiles: online row log-sum-exp and the
  positive logit -> lse (Nr,), spos (Nr,).
* ``_fwd_cols``  (symmetric only) grid over column blocks of columns 0..max(pos), loop over row
  tiles: online column log-sum-exp -> clse (ncol,).
* ``_bwd_rows``  grid over row blocks: dLoss/dS tile G = a_r exp(S - lse_r) + b_c exp(S - clse_c)
  - coef at the positives; dRows = scale * G @ cols, plus each row's term of dLoss/dscale.
* ``_bwd_cols``  grid over column blocks: the same G tiles, dCols = scale * G.T @ rows.

Memory: O((Nr + Nc)·D). Matrix products: forward 1 (2 symmetric), backward 4 (S recomputed in both
backward kernels, as the Triton FlashAttention tutorial does instead of atomics).

Status: tested under TRITON_INTERPRET=1 against the reference (fp32/fp16/bf16). Not yet run or
timed on a GPU; the block sizes below are first guesses. The whole embedding dimension (padded to a
power of two) is held per tile, so very large D (> 1024) needs smaller row blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moon_fast.kernels._utils import compute_dtype_for, interpreting, next_power_of_2

from moon_fast.ops.contrastive_core import Problem


@triton.jit
def _tile_logits(r, c_ptr, c_offs, c_mask, d_offs, D, stride_c, scale, r_grp, r_id, cg_ptr, cid_ptr,
                 COMPUTE: tl.constexpr, PRECISION: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """r (BR, DP) already loaded; returns (S (BR, BC) float32 with excluded/out-of-range = -inf, c (BC, DP))."""
    c = tl.load(c_ptr + c_offs[:, None] * stride_c + d_offs[None, :],
                mask=c_mask[:, None] & (d_offs[None, :] < D), other=0.0).to(COMPUTE)
    s = tl.dot(r, tl.trans(c), input_precision=PRECISION) * scale
    s = tl.where(c_mask[None, :], s, float("-inf"))
    if HAS_GROUPS:
        cg = tl.load(cg_ptr + c_offs, mask=c_mask, other=0)
        cid = tl.load(cid_ptr + c_offs, mask=c_mask, other=-1)
        excl = (r_grp[:, None] == cg[None, :]) & (r_id[:, None] != cid[None, :])
        s = tl.where(excl, float("-inf"), s)
    return s, c


@triton.jit
def _row_block(r_ptr, rg_ptr, rid_ptr, r_offs, r_mask, d_offs, D, stride_r, no_groups,
               COMPUTE: tl.constexpr, HAS_GROUPS: tl.constexpr):
    """Rows r_offs (BR,): their embeddings r (BR, DP) in COMPUTE, group and id (BR,) each; without groups
    both are ``no_groups`` (any (BR,) int tensor: _tile_logits does not read them then)."""
    r = tl.load(r_ptr + r_offs[:, None] * stride_r + d_offs[None, :],
                mask=r_mask[:, None] & (d_offs[None, :] < D), other=0.0).to(COMPUTE)
    r_grp = no_groups
    r_id = no_groups
    if HAS_GROUPS:
        r_grp = tl.load(rg_ptr + r_offs, mask=r_mask, other=0)
        r_id = tl.load(rid_ptr + r_offs, mask=r_mask, other=-1)
    return r, r_grp, r_id


# rows (Nr, D), cols (Nc, D), pos/rg/rid (Nr,), cg/cid (Nc,) -> lse (Nr,), spos (Nr,)
@triton.jit
def _fwd_rows(r_ptr, c_ptr, scale_ptr, pos_ptr, rg_ptr, rid_ptr, cg_ptr, cid_ptr, lse_ptr, spos_ptr,
              Nr, Nc, D, stride_r, stride_c,
              HAS_GROUPS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr):
    pid = tl.program_id(0)
    r_offs = pid * BR + tl.arange(0, BR)
    r_mask = r_offs < Nr
    d_offs = tl.arange(0, DP)
    scale = tl.load(scale_ptr).to(tl.float32)
    pos = tl.load(pos_ptr + r_offs, mask=r_mask, other=-1)
    r, r_grp, r_id = _row_block(r_ptr, rg_ptr, rid_ptr, r_offs, r_mask, d_offs, D, stride_r, pos, COMPUTE,
                                HAS_GROUPS)
    m_i = tl.full((BR,), float("-inf"), tl.float32)
    l_i = tl.zeros((BR,), tl.float32)
    sp = tl.zeros((BR,), tl.float32)
    for c0 in range(0, Nc, BC):
        c_offs = c0 + tl.arange(0, BC)
        c_mask = c_offs < Nc
        s, c = _tile_logits(r, c_ptr, c_offs, c_mask, d_offs, D, stride_c, scale, r_grp, r_id, cg_ptr, cid_ptr,
                            COMPUTE, PRECISION, HAS_GROUPS)
        sp += tl.sum(tl.where(c_offs[None, :] == pos[:, None], s, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    tl.store(lse_ptr + r_offs, m_i + tl.log(tl.maximum(l_i, 1e-30)), mask=r_mask)
    tl.store(spos_ptr + r_offs, sp, mask=r_mask)


# column log-sum-exp of columns 0..ncol-1 over all rows -> clse (ncol,)
@triton.jit
def _fwd_cols(r_ptr, c_ptr, scale_ptr, rg_ptr, rid_ptr, cg_ptr, cid_ptr, clse_ptr,
              Nr, ncol, D, stride_r, stride_c,
              HAS_GROUPS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr):
    pid = tl.program_id(0)
    c_offs = pid * BC + tl.arange(0, BC)
    c_mask = c_offs < ncol
    d_offs = tl.arange(0, DP)
    scale = tl.load(scale_ptr).to(tl.float32)
    m_j = tl.full((BC,), float("-inf"), tl.float32)
    l_j = tl.zeros((BC,), tl.float32)
    for r0 in range(0, Nr, BR):
        r_offs = r0 + tl.arange(0, BR)
        r_mask = r_offs < Nr
        r, r_grp, r_id = _row_block(r_ptr, rg_ptr, rid_ptr, r_offs, r_mask, d_offs, D, stride_r, r_offs, COMPUTE,
                                    HAS_GROUPS)
        s, c = _tile_logits(r, c_ptr, c_offs, c_mask, d_offs, D, stride_c, scale, r_grp, r_id, cg_ptr, cid_ptr,
                            COMPUTE, PRECISION, HAS_GROUPS)
        s = tl.where(r_mask[:, None], s, float("-inf"))
        m_new = tl.maximum(m_j, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_j = l_j * tl.exp(m_j - m_safe) + tl.sum(tl.exp(s - m_safe[None, :]), 0)
        m_j = m_new
    tl.store(clse_ptr + c_offs, m_j + tl.log(tl.maximum(l_j, 1e-30)), mask=c_mask)


@triton.jit
def _grad_tile(s, lse, a, pos, pos_coef, c_offs, clse_ptr, b_ptr, ncol, SYM: tl.constexpr):
    """G = a_r exp(S - lse_r) [+ b_c exp(S - clse_c) for c < ncol] - pos_coef_r at (r, pos_r)."""
    g = a[:, None] * tl.exp(s - lse[:, None])
    if SYM:
        in_col = c_offs < ncol
        clse = tl.load(clse_ptr + c_offs, mask=in_col, other=0.0)
        clse = tl.where(clse == float("-inf"), 0.0, clse)
        b = tl.load(b_ptr + c_offs, mask=in_col, other=0.0)
        g += tl.where(in_col[None, :], b[None, :] * tl.exp(s - clse[None, :]), 0.0)
    g -= tl.where(c_offs[None, :] == pos[:, None], pos_coef[:, None], 0.0)
    return g


# -> dR (Nr, D) float32 = scale * G @ cols, v (Nr,) = sum_c G_rc (rows @ cols.T)_rc
@triton.jit
def _bwd_rows(r_ptr, c_ptr, scale_ptr, pos_ptr, rg_ptr, rid_ptr, cg_ptr, cid_ptr, lse_ptr, a_ptr, pc_ptr,
              clse_ptr, b_ptr, dr_ptr, v_ptr, Nr, Nc, ncol, D, stride_r, stride_c,
              HAS_GROUPS: tl.constexpr, SYM: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr):
    pid = tl.program_id(0)
    r_offs = pid * BR + tl.arange(0, BR)
    r_mask = r_offs < Nr
    d_offs = tl.arange(0, DP)
    scale = tl.load(scale_ptr).to(tl.float32)
    pos = tl.load(pos_ptr + r_offs, mask=r_mask, other=-1)
    r, r_grp, r_id = _row_block(r_ptr, rg_ptr, rid_ptr, r_offs, r_mask, d_offs, D, stride_r, pos, COMPUTE,
                                HAS_GROUPS)
    lse = tl.load(lse_ptr + r_offs, mask=r_mask, other=0.0)
    a = tl.load(a_ptr + r_offs, mask=r_mask, other=0.0)
    pc = tl.load(pc_ptr + r_offs, mask=r_mask, other=0.0)
    acc = tl.zeros((BR, DP), tl.float32)
    for c0 in range(0, Nc, BC):
        c_offs = c0 + tl.arange(0, BC)
        c_mask = c_offs < Nc
        s, c = _tile_logits(r, c_ptr, c_offs, c_mask, d_offs, D, stride_c, scale, r_grp, r_id, cg_ptr, cid_ptr,
                            COMPUTE, PRECISION, HAS_GROUPS)
        g = _grad_tile(s, lse, a, pos, pc, c_offs, clse_ptr, b_ptr, ncol, SYM)
        g = tl.where(c_mask[None, :], g, 0.0)
        acc += tl.dot(g.to(COMPUTE), c, input_precision=PRECISION)
    v = tl.sum(acc * r.to(tl.float32), 1)
    d_mask = r_mask[:, None] & (d_offs[None, :] < D)
    tl.store(dr_ptr + r_offs[:, None] * D + d_offs[None, :], acc * scale, mask=d_mask)
    tl.store(v_ptr + r_offs, v, mask=r_mask)


# -> dC (Nc, D) float32 = scale * G.T @ rows
@triton.jit
def _bwd_cols(r_ptr, c_ptr, scale_ptr, pos_ptr, rg_ptr, rid_ptr, cg_ptr, cid_ptr, lse_ptr, a_ptr, pc_ptr,
              clse_ptr, b_ptr, dc_ptr, Nr, Nc, ncol, D, stride_r, stride_c,
              HAS_GROUPS: tl.constexpr, SYM: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr, DP: tl.constexpr):
    pid = tl.program_id(0)
    c_offs = pid * BC + tl.arange(0, BC)
    c_mask = c_offs < Nc
    d_offs = tl.arange(0, DP)
    scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros((BC, DP), tl.float32)
    for r0 in range(0, Nr, BR):
        r_offs = r0 + tl.arange(0, BR)
        r_mask = r_offs < Nr
        pos = tl.load(pos_ptr + r_offs, mask=r_mask, other=-1)
        r, r_grp, r_id = _row_block(r_ptr, rg_ptr, rid_ptr, r_offs, r_mask, d_offs, D, stride_r, pos, COMPUTE,
                                    HAS_GROUPS)
        lse = tl.load(lse_ptr + r_offs, mask=r_mask, other=0.0)
        a = tl.load(a_ptr + r_offs, mask=r_mask, other=0.0)
        pc = tl.load(pc_ptr + r_offs, mask=r_mask, other=0.0)
        s, c = _tile_logits(r, c_ptr, c_offs, c_mask, d_offs, D, stride_c, scale, r_grp, r_id, cg_ptr, cid_ptr,
                            COMPUTE, PRECISION, HAS_GROUPS)
        g = _grad_tile(s, lse, a, pos, pc, c_offs, clse_ptr, b_ptr, ncol, SYM)
        g = tl.where(r_mask[:, None] & c_mask[None, :], g, 0.0)
        acc += tl.dot(tl.trans(g.to(COMPUTE)), r, input_precision=PRECISION)
    tl.store(dc_ptr + c_offs[:, None] * D + d_offs[None, :], acc * scale,
             mask=c_mask[:, None] & (d_offs[None, :] < D))


# ----------------------------------------------------------------------------- launchers

def _config(D: int, dtype: torch.dtype) -> dict:
    """Block sizes. On a GPU the whole (padded) embedding of a row/column block is held on chip; these
    choices keep every kernel under 130 KiB of shared memory on sm_80 and sm_90 (checked by compiling each
    launch offline as the JIT would, tests/aot_triton.py with Triton 3.6 and 3.8, not by running it: no GPU
    was available)."""
    dp = max(16, next_power_of_2(D))
    if interpreting():
        return dict(BR=32, BC=32, DP=dp, num_warps=4, num_stages=1, BWD_STEP=None, BWD_WARPS=4)
    if dp > 1024:
        raise ValueError(f"contrastive_loss(backend='triton'): embedding dimension {D} > 1024 is not supported "
                         "by the fused kernels; use backend='torch' or 'cuda'")
    wide = torch.empty((), dtype=dtype).element_size() >= 4
    if wide:
        # Exact fp32 products (FMA, no tensor cores). (32, 64) row x column blocks spilled in the forward
        # kernels, differently in each Triton: with Triton 3.6 (torch 2.11's, pyproject's oldest) 6.1-6.7 KB per
        # thread at D=128 and 4 warps on sm_90 (a 5.3 KB stack frame, 32 registers) and 324 bytes at D=64; with
        # Triton 3.8, 340 bytes at D=256. (32, 32) with 8 warps spills nothing at D = 64-256 with either Triton
        # on sm_80 or sm_90 (tests/aot_triton.py --full; benchmarks/results/2026-11-23-aot/).
        br, bc = (32, 32) if dp <= 512 else (16, 16)
        stages, warps = 2, 8
    else:
        if dp <= 256:
            br, bc, stages = 64, 64, 3
        elif dp <= 512:
            br, bc, stages = 32, 64, 2
        else:
            br, bc, stages = 16, 32, 2
        warps = 4 if dp <= 128 else 8
    # The backward kernels step through columns (_bwd_rows) or rows (_bwd_cols) BWD_STEP at a time. With
    # the forward's block sizes ptxas spilled registers: up to 14 KB per thread in the fp32 _bwd_rows (exact,
    # non-tensor-core products hold bigger operand fragments; sm_80, D=128) and 296 bytes in the 16-bit
    # _bwd_cols (sm_90, D=256). A step of 16 with 8 warps (fp32), 32 (16-bit, D <= 256) spills at most 4 bytes
    # on sm_80 and sm_90 for D up to 1024 (python tests/aot_triton.py --arch 90 --full --ops contrastive;
    # tests/test_contrastive_triton_compile.py checks it). Chosen from compiles, not timings: no GPU here.
    step = 16 if wide else (32 if dp <= 256 else None)
    return dict(BR=br, BC=bc, DP=dp, num_warps=warps, num_stages=stages, BWD_STEP=step,
                BWD_WARPS=8 if wide else warps)


def _common(p: Problem):
    rows, cols = p.rows.contiguous(), p.cols.contiguous()
    dummy = p.pos
    groups = (p.row_group, p.row_id, p.col_group, p.col_id) if p.has_groups else (dummy,) * 4
    return rows, cols, groups


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (not tf32), so results match the reference in fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


class TritonLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_in, cols_in, scale, p: Problem):
        rows, cols, (rg, rid, cg, cid) = _common(p)
        Nr, D = rows.shape
        Nc = cols.shape[0]
        cfg = _config(D, rows.dtype)
        meta = dict(HAS_GROUPS=p.has_groups, COMPUTE=compute_dtype_for(rows.dtype),
                    PRECISION=_precision(rows.dtype), BR=cfg["BR"], BC=cfg["BC"], DP=cfg["DP"],
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        scale_f = scale.detach().float().reshape(1).contiguous()
        lse = torch.full((Nr,), float("nan"), dtype=torch.float32, device=rows.device)
        spos = torch.full((Nr,), float("nan"), dtype=torch.float32, device=rows.device)
        _fwd_rows[(triton.cdiv(Nr, cfg["BR"]),)](rows, cols, scale_f, p.pos, rg, rid, cg, cid, lse, spos,
                                                 Nr, Nc, D, rows.stride(0), cols.stride(0), **meta)
        per_row = p.row_coef * (lse - spos)
        ncol = 0
        clse = lse.new_empty(0)
        if p.symmetric:
            ncol = int(p.pos.max()) + 1
            clse = torch.full((ncol,), float("nan"), dtype=torch.float32, device=rows.device)
            _fwd_cols[(triton.cdiv(ncol, cfg["BC"]),)](rows, cols, scale_f, rg, rid, cg, cid, clse,
                                                       Nr, ncol, D, rows.stride(0), cols.stride(0), **meta)
            per_row = per_row + p.col_coef * (clse[p.pos] - spos)
        ctx.p, ctx.meta, ctx.ncol, ctx.bwd = p, meta, ncol, (cfg["BWD_STEP"], cfg["BWD_WARPS"])
        ctx.save_for_backward(rows, cols, scale, scale_f, lse, clse)
        return p.segment_sum(per_row)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        p, meta, ncol = ctx.p, ctx.meta, ctx.ncol
        rows, cols, scale, scale_f, lse, clse = ctx.saved_tensors
        _, _, (rg, rid, cg, cid) = _common(p)
        Nr, D = rows.shape
        Nc = cols.shape[0]
        gr = go.float()[p.seg]
        a = (gr * p.row_coef).contiguous()
        pos_coef, b = a, a
        if p.symmetric:
            beta = gr * p.col_coef
            b = torch.zeros(ncol, dtype=torch.float32, device=go.device).index_add_(0, p.pos, beta)
            pos_coef = (a + beta).contiguous()
        else:
            clse = a
        dr = torch.full((Nr, D), float("nan"), dtype=torch.float32, device=rows.device)
        v = torch.full((Nr,), float("nan"), dtype=torch.float32, device=rows.device)
        dc = torch.full((Nc, D), float("nan"), dtype=torch.float32, device=rows.device)
        args = (rows, cols, scale_f, p.pos, rg, rid, cg, cid, lse, a, pos_coef, clse, b)
        step, warps = ctx.bwd  # the backward's loop step and warps (_config)
        meta_rows = {**meta, "BC": step or meta["BC"], "num_warps": warps}
        _bwd_rows[(triton.cdiv(Nr, meta["BR"]),)](*args, dr, v, Nr, Nc, ncol, D, rows.stride(0), cols.stride(0),
                                                  SYM=p.symmetric, **meta_rows)
        # _bwd_cols accumulates a (BC, DP) block: give it the row kernels' (register-sized) block height.
        meta_cols = {**meta, "BC": meta["BR"], "BR": step or meta["BR"], "num_warps": warps}
        _bwd_cols[(triton.cdiv(Nc, meta_cols["BC"]),)](*args, dc, Nr, Nc, ncol, D, rows.stride(0), cols.stride(0),
                                                       SYM=p.symmetric, **meta_cols)
        dscale = v.sum().to(scale.dtype).reshape(scale.shape)
        return dr.to(rows.dtype), dc.to(cols.dtype), dscale, None


def triton_problem(p: Problem) -> torch.Tensor:
    """(n_seg,) float32 losses of ``p`` with the fused kernels."""
    return TritonLoss.apply(p.rows, p.cols, p.scale, p)
