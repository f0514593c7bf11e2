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
* ``_bwd_cols``  grid over column blocks: the same G tiles, transposed, dCols = scale * G.T @ rows.

Every S tile is a small GEMM (``_logits``): a K loop over D in chunks of BD, so a block's embedding is
never held whole and the blocks can be as tall as the tensor cores want at any D <= 1024 (the backward
holds a block's (rows, D) float32 gradient in registers, hence the bound).

Memory: O((Nr + Nc)·D). Matrix products: forward 1 (2 symmetric), backward 4 (S recomputed in both
backward kernels, as the Triton FlashAttention tutorial does instead of atomics).

Status: tested under TRITON_INTERPRET=1 against the reference (fp32/fp16/bf16), with the interpreter's
blocks and with the GPU's. The kernels before the K loop over D ran on an H100 (stop 14: 62 TFLOP/s in
bf16 at D=512, 11x the time of the same matmuls in cuBLAS); these have only been compiled offline.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moon_fast.kernels._utils import compute_dtype_for, interpreting, next_power_of_2

from moon_fast.ops.contrastive_core import Problem


@triton.jit
def _logits(r_ptr, r_offs, r_mask, c_ptr, c_offs, c_mask, D, stride_r, stride_c,
            COMPUTE: tl.constexpr, PRECISION: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
            BD: tl.constexpr):
    """rows[r_offs] (BR, D) @ cols[c_offs].T (D, BC) -> P (BR, BC) float32, unscaled; 0 where masked.

    A GEMM's K loop over D in chunks of BD. Neither block is held whole, so 64-128-row blocks fit on chip at
    D = 512 and the product takes the tensor cores' large tiles (wgmma on sm_90). The row block's chunks are
    re-read for every column block (from L2), as a GEMM re-reads its A tiles for every column tile."""
    p = tl.zeros((BR, BC), tl.float32)
    for d0 in range(0, D, BD):
        d_offs = d0 + tl.arange(0, BD)
        d_in = d_offs < D
        r = tl.load(r_ptr + r_offs[:, None] * stride_r + d_offs[None, :], mask=r_mask[:, None] & d_in[None, :],
                    other=0.0).to(COMPUTE)
        c = tl.load(c_ptr + c_offs[:, None] * stride_c + d_offs[None, :], mask=c_mask[:, None] & d_in[None, :],
                    other=0.0).to(COMPUTE)
        p = tl.dot(r, tl.trans(c), p, input_precision=PRECISION)
    return p


@triton.jit
def _groups(g_ptr, id_ptr, offs, mask, HAS_GROUPS: tl.constexpr):
    """Group and id (B,) of rows or columns ``offs``; without groups ``offs`` twice (not read then)."""
    grp = offs
    gid = offs
    if HAS_GROUPS:
        grp = tl.load(g_ptr + offs, mask=mask, other=0)
        gid = tl.load(id_ptr + offs, mask=mask, other=-1)
    return grp, gid


@triton.jit
def _logits_masked(p, scale, r_mask, c_mask, r_grp, r_id, c_grp, c_id, HAS_GROUPS: tl.constexpr):
    """S = scale * P (BR, BC) with out-of-range and excluded (same group, other id) entries at -inf."""
    s = tl.where(r_mask[:, None] & c_mask[None, :], p * scale, float("-inf"))
    if HAS_GROUPS:
        excl = (r_grp[:, None] == c_grp[None, :]) & (r_id[:, None] != c_id[None, :])
        s = tl.where(excl, float("-inf"), s)
    return s


# rows (Nr, D), cols (Nc, D), pos/rg/rid (Nr,), cg/cid (Nc,) -> lse (Nr,), spos (Nr,)
@triton.jit
def _fwd_rows(r_ptr, c_ptr, scale_ptr, pos_ptr, rg_ptr, rid_ptr, cg_ptr, cid_ptr, lse_ptr, spos_ptr,
              Nr, Nc, D, stride_r, stride_c,
              HAS_GROUPS: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    r_offs = pid * BR + tl.arange(0, BR)
    r_mask = r_offs < Nr
    scale = tl.load(scale_ptr).to(tl.float32)
    pos = tl.load(pos_ptr + r_offs, mask=r_mask, other=-1)
    r_grp, r_id = _groups(rg_ptr, rid_ptr, r_offs, r_mask, HAS_GROUPS)
    m_i = tl.full((BR,), float("-inf"), tl.float32)
    l_i = tl.zeros((BR,), tl.float32)
    sp = tl.zeros((BR,), tl.float32)
    for c0 in range(0, Nc, BC):
        c_offs = c0 + tl.arange(0, BC)
        c_mask = c_offs < Nc
        c_grp, c_id = _groups(cg_ptr, cid_ptr, c_offs, c_mask, HAS_GROUPS)
        p = _logits(r_ptr, r_offs, r_mask, c_ptr, c_offs, c_mask, D, stride_r, stride_c, COMPUTE, PRECISION,
                    BR, BC, BD)
        s = _logits_masked(p, scale, r_mask, c_mask, r_grp, r_id, c_grp, c_id, HAS_GROUPS)
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
              BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    c_offs = pid * BC + tl.arange(0, BC)
    c_mask = c_offs < ncol
    scale = tl.load(scale_ptr).to(tl.float32)
    c_grp, c_id = _groups(cg_ptr, cid_ptr, c_offs, c_mask, HAS_GROUPS)
    m_j = tl.full((BC,), float("-inf"), tl.float32)
    l_j = tl.zeros((BC,), tl.float32)
    for r0 in range(0, Nr, BR):
        r_offs = r0 + tl.arange(0, BR)
        r_mask = r_offs < Nr
        r_grp, r_id = _groups(rg_ptr, rid_ptr, r_offs, r_mask, HAS_GROUPS)
        p = _logits(r_ptr, r_offs, r_mask, c_ptr, c_offs, c_mask, D, stride_r, stride_c, COMPUTE, PRECISION,
                    BR, BC, BD)
        s = _logits_masked(p, scale, r_mask, c_mask, r_grp, r_id, c_grp, c_id, HAS_GROUPS)
        m_new = tl.maximum(m_j, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_j = l_j * tl.exp(m_j - m_safe) + tl.sum(tl.exp(s - m_safe[None, :]), 0)
        m_j = m_new
    tl.store(clse_ptr + c_offs, m_j + tl.log(tl.maximum(l_j, 1e-30)), mask=c_mask)


@triton.jit
def _grad_tile(s, a, lse, pc, is_pos, b, clse, in_col, SYM: tl.constexpr):
    """dLoss/dS: G = a_r exp(S - lse_r) [+ b_c exp(S - clse_c) where c < ncol] - pc_r where c = pos_r.

    Every argument but ``s`` comes broadcastable to its shape: the row kernels pass row vectors as
    (BR, 1) and column vectors as (1, BC), _bwd_cols the transpose, so both take the tile their own
    block is the M side of. 0 where S is -inf (out of range or excluded), except at a positive."""
    g = a * tl.exp(s - lse)
    if SYM:
        # where, not a multiply by b = 0: exp(S) alone can overflow beyond ncol
        g += tl.where(in_col, b * tl.exp(s - clse), 0.0)
    return g - tl.where(is_pos, pc, 0.0)


@triton.jit
def _col_terms(clse_ptr, b_ptr, c_offs, ncol, SYM: tl.constexpr):
    """The symmetric loss's column terms for columns c_offs (BC,): clse (-inf -> 0), b, and c < ncol.
    Without SYM, clse and b are placeholders of the right shape that _grad_tile does not read."""
    in_col = c_offs < ncol
    clse = c_offs.to(tl.float32)
    b = clse
    if SYM:
        clse = tl.load(clse_ptr + c_offs, mask=in_col, other=0.0)
        clse = tl.where(clse == float("-inf"), 0.0, clse)
        b = tl.load(b_ptr + c_offs, mask=in_col, other=0.0)
    return clse, b, in_col


# -> dR (Nr, D) float32 = scale * G @ cols, v (Nr,) = sum_c G_rc P_rc (P = rows @ cols.T)
@triton.jit
def _bwd_rows(r_ptr, c_ptr, scale_ptr, pos_ptr, rg_ptr, rid_ptr, cg_ptr, cid_ptr, lse_ptr, a_ptr, pc_ptr,
              clse_ptr, b_ptr, dr_ptr, v_ptr, Nr, Nc, ncol, D, stride_r, stride_c,
              HAS_GROUPS: tl.constexpr, SYM: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr):
    pid = tl.program_id(0)
    r_offs = pid * BR + tl.arange(0, BR)
    r_mask = r_offs < Nr
    d_offs = tl.arange(0, DP)
    scale = tl.load(scale_ptr).to(tl.float32)
    pos = tl.load(pos_ptr + r_offs, mask=r_mask, other=-1)
    r_grp, r_id = _groups(rg_ptr, rid_ptr, r_offs, r_mask, HAS_GROUPS)
    lse = tl.load(lse_ptr + r_offs, mask=r_mask, other=0.0)
    a = tl.load(a_ptr + r_offs, mask=r_mask, other=0.0)
    pc = tl.load(pc_ptr + r_offs, mask=r_mask, other=0.0)
    acc = tl.zeros((BR, DP), tl.float32)
    v = tl.zeros((BR,), tl.float32)
    for c0 in range(0, Nc, BC):
        c_offs = c0 + tl.arange(0, BC)
        c_mask = c_offs < Nc
        c_grp, c_id = _groups(cg_ptr, cid_ptr, c_offs, c_mask, HAS_GROUPS)
        p = _logits(r_ptr, r_offs, r_mask, c_ptr, c_offs, c_mask, D, stride_r, stride_c, COMPUTE, PRECISION,
                    BR, BC, BD)
        s = _logits_masked(p, scale, r_mask, c_mask, r_grp, r_id, c_grp, c_id, HAS_GROUPS)
        clse, b, in_col = _col_terms(clse_ptr, b_ptr, c_offs, ncol, SYM)
        g = _grad_tile(s, a[:, None], lse[:, None], pc[:, None], c_offs[None, :] == pos[:, None], b[None, :],
                       clse[None, :], in_col[None, :], SYM)
        # dLoss/dscale's share of these rows: sum_c G P (P is finite everywhere, unlike S)
        v += tl.sum(g * p, 1)
        c = tl.load(c_ptr + c_offs[:, None] * stride_c + d_offs[None, :],
                    mask=c_mask[:, None] & (d_offs[None, :] < D), other=0.0).to(COMPUTE)
        acc = tl.dot(g.to(COMPUTE), c, acc, input_precision=PRECISION)
    d_mask = r_mask[:, None] & (d_offs[None, :] < D)
    tl.store(dr_ptr + r_offs[:, None] * D + d_offs[None, :], acc * scale, mask=d_mask)
    tl.store(v_ptr + r_offs, v, mask=r_mask)


# -> dC (Nc, D) float32 = scale * G.T @ rows. Works on transposed tiles (columns x rows, from cols @ rows.T), so
# that its column block is both products' M side (wgmma on sm_90 needs M >= 64) and G.T needs no transpose.
@triton.jit
def _bwd_cols(r_ptr, c_ptr, scale_ptr, pos_ptr, rg_ptr, rid_ptr, cg_ptr, cid_ptr, lse_ptr, a_ptr, pc_ptr,
              clse_ptr, b_ptr, dc_ptr, Nr, Nc, ncol, D, stride_r, stride_c,
              HAS_GROUPS: tl.constexpr, SYM: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
              BR: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, DP: tl.constexpr):
    pid = tl.program_id(0)
    c_offs = pid * BC + tl.arange(0, BC)
    c_mask = c_offs < Nc
    d_offs = tl.arange(0, DP)
    scale = tl.load(scale_ptr).to(tl.float32)
    c_grp, c_id = _groups(cg_ptr, cid_ptr, c_offs, c_mask, HAS_GROUPS)
    clse, b, in_col = _col_terms(clse_ptr, b_ptr, c_offs, ncol, SYM)
    acc = tl.zeros((BC, DP), tl.float32)
    for r0 in range(0, Nr, BR):
        r_offs = r0 + tl.arange(0, BR)
        r_mask = r_offs < Nr
        pos = tl.load(pos_ptr + r_offs, mask=r_mask, other=-1)
        r_grp, r_id = _groups(rg_ptr, rid_ptr, r_offs, r_mask, HAS_GROUPS)
        lse = tl.load(lse_ptr + r_offs, mask=r_mask, other=0.0)
        a = tl.load(a_ptr + r_offs, mask=r_mask, other=0.0)
        pc = tl.load(pc_ptr + r_offs, mask=r_mask, other=0.0)
        p_t = _logits(c_ptr, c_offs, c_mask, r_ptr, r_offs, r_mask, D, stride_c, stride_r, COMPUTE, PRECISION,
                      BC, BR, BD)
        s_t = _logits_masked(p_t, scale, c_mask, r_mask, c_grp, c_id, r_grp, r_id, HAS_GROUPS)
        g_t = _grad_tile(s_t, a[None, :], lse[None, :], pc[None, :], c_offs[:, None] == pos[None, :], b[:, None],
                         clse[:, None], in_col[:, None], SYM)
        r = tl.load(r_ptr + r_offs[:, None] * stride_r + d_offs[None, :],
                    mask=r_mask[:, None] & (d_offs[None, :] < D), other=0.0).to(COMPUTE)
        acc = tl.dot(g_t.to(COMPUTE), r, acc, input_precision=PRECISION)
    tl.store(dc_ptr + c_offs[:, None] * D + d_offs[None, :], acc * scale,
             mask=c_mask[:, None] & (d_offs[None, :] < D))


# ----------------------------------------------------------------------------- launchers

def _config(D: int, dtype: torch.dtype) -> dict:
    """Block sizes for embedding width D: {"DP": D padded to a power of two (>= 16), "fwd": the forward
    kernels' blocks, "bwd": the backward kernels'}. A block is a dict of BR (rows per program of a row
    kernel), BC (columns per step), BD (the chunk of D of the K loop), num_warps, num_stages; the column
    kernels take it transposed (_col_launch). Under the interpreter, small blocks with BD < DP at the tests'
    widths, so the K loop runs several chunks, the last partial; on a GPU, _gpu_config."""
    dp = max(16, next_power_of_2(D))
    if interpreting():
        blocks = dict(BR=32, BC=32, BD=16, num_warps=4, num_stages=1)
        return dict(DP=dp, fwd=blocks, bwd=dict(blocks))
    return _gpu_config(D, dtype)


def _gpu_config(D: int, dtype: torch.dtype) -> dict:
    """_config on a GPU. Chosen by compiling every launch offline as the JIT would (tests/aot_triton.py
    --full, Triton 3.6 and 3.8, sm_80 and sm_90), not by timing: no GPU was lent since the K loop over D.

    * 16-bit forward: (128 rows, 64 columns, D in chunks of 64), 8 warps, 3 stages. The old kernels held a
      32-row block's whole embedding, too few rows for Hopper's wgmma (which takes 64 per warp group): on an
      H100 they ran at 62 TFLOP/s against 618 for the same matmuls in cuBLAS (bf16, D=512, B=16384;
      benchmarks/results/2026-11-22-h100/bench_results_7f37d48.csv).
    * 16-bit backward: 64-row blocks (the (64, D) float32 gradient block is held in registers: 128 per
      thread at D=512 over 8 warps) stepping 32 columns; at D=1024, 32-row blocks stepping 16 (no wgmma).
    * fp32: exact products (FMA, no tensor cores) with 32-row blocks and 8 warps, the sizes that kept ptxas
      from spilling kilobytes of registers (README, "Offline compile checks")."""
    dp = max(16, next_power_of_2(D))
    if dp > 1024:
        raise ValueError(f"contrastive_loss(backend='triton'): embedding dimension {D} > 1024 is not supported "
                         "by the fused kernels (the backward holds a block's whole gradient); use "
                         "backend='torch' or 'cuda'")
    # The backward's K loop takes chunks of 32: with 64 ptxas spilled 8-36 bytes (fp32 at D=128, 16-bit at
    # D=1024 and, on sm_80, 16-bit at D=512), with 32 nothing.
    bd_fwd, bd_bwd = min(dp, 64), min(dp, 32)
    if torch.empty((), dtype=dtype).element_size() >= 4:
        fwd = dict(BR=32, BC=32, BD=bd_fwd, num_warps=8, num_stages=2)
        bwd = dict(BR=32 if dp <= 512 else 16, BC=16, BD=bd_bwd, num_warps=8, num_stages=2)
    else:
        fwd = dict(BR=128, BC=64, BD=bd_fwd, num_warps=8, num_stages=3)
        bwd = (dict(BR=64, BC=32, BD=bd_bwd, num_warps=8, num_stages=2) if dp <= 512
               else dict(BR=32, BC=16, BD=bd_bwd, num_warps=8, num_stages=2))
    return dict(DP=dp, fwd=fwd, bwd=bwd)


def _common(p: Problem):
    rows, cols = p.rows.contiguous(), p.cols.contiguous()
    dummy = p.pos
    groups = (p.row_group, p.row_id, p.col_group, p.col_id) if p.has_groups else (dummy,) * 4
    return rows, cols, groups


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products (not tf32), so results match the reference in fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _col_launch(blocks: dict) -> dict:
    """A column kernel's meta-parameters from a _config block: its column block (BC) takes the row block's
    height and its step over rows (BR) the row kernels' step over columns, so both kernels hold tiles of the
    same shape (_bwd_cols computes its tiles transposed, its block on the M side)."""
    return {**blocks, "BR": blocks["BC"], "BC": blocks["BR"]}


class TritonLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_in, cols_in, scale, p: Problem):
        rows, cols, (rg, rid, cg, cid) = _common(p)
        Nr, D = rows.shape
        Nc = cols.shape[0]
        cfg = _config(D, rows.dtype)
        flags = dict(HAS_GROUPS=p.has_groups, COMPUTE=compute_dtype_for(rows.dtype), PRECISION=_precision(rows.dtype))
        scale_f = scale.detach().float().reshape(1).contiguous()
        lse = torch.full((Nr,), float("nan"), dtype=torch.float32, device=rows.device)
        spos = torch.full((Nr,), float("nan"), dtype=torch.float32, device=rows.device)
        meta = cfg["fwd"]
        _fwd_rows[(triton.cdiv(Nr, meta["BR"]),)](rows, cols, scale_f, p.pos, rg, rid, cg, cid, lse, spos,
                                                  Nr, Nc, D, rows.stride(0), cols.stride(0), **flags, **meta)
        per_row = p.row_coef * (lse - spos)
        ncol = 0
        clse = lse.new_empty(0)
        if p.symmetric:
            ncol = int(p.pos.max()) + 1
            clse = torch.full((ncol,), float("nan"), dtype=torch.float32, device=rows.device)
            meta = _col_launch(cfg["fwd"])
            _fwd_cols[(triton.cdiv(ncol, meta["BC"]),)](rows, cols, scale_f, rg, rid, cg, cid, clse,
                                                        Nr, ncol, D, rows.stride(0), cols.stride(0), **flags, **meta)
            per_row = per_row + p.col_coef * (clse[p.pos] - spos)
        ctx.p, ctx.flags, ctx.cfg, ctx.ncol = p, flags, cfg, ncol
        ctx.save_for_backward(rows, cols, scale, scale_f, lse, clse)
        return p.segment_sum(per_row)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        p, flags, cfg, ncol = ctx.p, ctx.flags, ctx.cfg, ctx.ncol
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
        flags = {**flags, "SYM": p.symmetric, "DP": cfg["DP"]}
        meta = cfg["bwd"]
        _bwd_rows[(triton.cdiv(Nr, meta["BR"]),)](*args, dr, v, Nr, Nc, ncol, D, rows.stride(0), cols.stride(0),
                                                  **flags, **meta)
        meta = _col_launch(cfg["bwd"])
        _bwd_cols[(triton.cdiv(Nc, meta["BC"]),)](*args, dc, Nr, Nc, ncol, D, rows.stride(0), cols.stride(0),
                                                  **flags, **meta)
        dscale = v.sum().to(scale.dtype).reshape(scale.shape)
        return dr.to(rows.dtype), dc.to(cols.dtype), dscale, None


def triton_problem(p: Problem) -> torch.Tensor:
    """(n_seg,) float32 losses of ``p`` with the fused kernels."""
    return TritonLoss.apply(p.rows, p.cols, p.scale, p)
