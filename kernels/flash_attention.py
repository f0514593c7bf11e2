"""FlashAttention-2 in Triton: forward, backward (dq, dk, dv), causal, varlen, GQA (issue 5).

Shapes: every input is handled in the packed layout. q (total_q, Hq, D), k/v (total_k, Hkv, D), sequences
delimited by ``cu_seqlens_q/k`` (n + 1,) int32; a dense (B, S, H, D) batch is the packed case with
``cu_seqlens = [0, S, 2S, ...]`` (a view when batch and sequence dims merge, as in (B, S, H, D)
views of a projection). ``lse`` (Hq, total_q) fp32 holds the log-sum-exp of
each query row in base 2 of the scaled scores (``m + log2(l)``), saved by the forward for the backward;
rows that see no key (bottom-right causal with Sq > Sk, or Sk = 0) store +inf so that the backward's
``exp2(s - lse)`` is exactly 0 for them, and their output is 0.

Kernels (grids are (blocks of the longest sequence, heads, sequences); programs past the end of a shorter
sequence exit at once):

* ``_fwd_kernel``: one program per (query block, query head, sequence): online softmax over key blocks
  (exp2, scale folded into log2(e) * scale), causal blocks past the diagonal skipped. Each kernel runs
  its loop in stages: blocks every row sees completely (no score mask) and the diagonal / ragged
  blocks (masked); tests sweep every diagonal offset modulo the tile sizes to pin those boundaries.
* ``_bwd_preprocess``: delta = rowsum(dO * O) per (row, head), fp32.
* ``_bwd_dkdv_kernel``: one program per (key block, KV head, sequence); loops over the query heads of its
  GQA group and the query blocks that can see the key block, accumulating dk, dv in registers (no atomics,
  deterministic; the group sum happens in fp32 before the single store).
* ``_bwd_dq_kernel``: one program per (query block, query head, sequence); loops over key blocks. It
  recomputes Q K^T and dO V^T (7 block products per pair in the backward instead of FA2's 5 with atomic
  dq), the price of a deterministic dq without atomics.

The Triton fused-attention tutorial's backward is reported wrong for non-causal and bf16 inputs (see
/work/shared/ANCHORS.md); this file does not reuse its structure: dk/dv and dq are separate kernels
with explicit masks, and the tests cover non-causal, bf16, GQA, odd head dims and Sq != Sk.

Precision: on a GPU, tl.dot takes fp16/bf16 operands and accumulates in fp32; fp32 inputs use
``input_precision="ieee"`` (no TF32) so fp32 is a reference-grade path for tests. Under the CPU
interpreter bf16 arithmetic is wrong, so tiles are upcast to fp32 after loading (``UPCAST``).
Head dims: Triton's blocks are powers of two, so a head dim is covered by one chunk of the next power of two
(at least 16) or, where less padding results, by two chunks D1 + D2 (80 = 64 + 16, 96 = 64 + 32; see
``head_dim_chunks``), every product over it then made in two parts; loads past the head dim are masked.

Status: correct under the interpreter against the fp32 reference (tests/test_attention_triton.py); every
kernel compiles ahead of time for sm_80 and sm_90 (bf16/fp16/fp32, head dims 64-256). Not yet run or
timed on a GPU (none was available while writing it): GPU tiles come from register reports, not timings.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moon_fast.kernels._utils import interpreting, next_power_of_2

LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N) under the CPU interpreter, where cost grows with programs x loop steps.
INTERPRETER_TILES = (64, 64)
# Tests set this to fill every output buffer with NaN before the kernels write it (catches unwritten rows).
POISON_OUTPUTS = False


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _sequence(CU_Q, CU_K, b):
    """Sequence b of the packed batch: (first query row, query length, first key row, key length)."""
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    return q_start, tl.load(CU_Q + b + 1) - q_start, k_start, tl.load(CU_K + b + 1) - k_start


@triton.jit
def _load_cols(base, rows, row_ok, stride, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
               UPCAST: tl.constexpr):
    """(rows, WIDTH) tile of head-dim columns [COL0, COL0 + WIDTH): zero past HEAD_DIM and in bad rows."""
    cols = COL0 + tl.arange(0, WIDTH)
    t = tl.load(base + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :],
                other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _load_chunks(base, rows, row_ok, stride, HEAD_DIM: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                 SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    """A tile a program holds for its whole loop, as its two head-dim chunks: (rows, D1) and (rows, D2);
    the second is zeros, unused, unless SPLIT."""
    t = _load_cols(base, rows, row_ok, stride, 0, D1, HEAD_DIM, UPCAST)
    t2 = tl.zeros([t.shape[0], D2], dtype=t.dtype)
    if SPLIT:
        t2 = _load_cols(base, rows, row_ok, stride, D1, D2, HEAD_DIM, UPCAST)
    return t, t2


@triton.jit
def _store_cols(base, rows, row_ok, stride, val, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    tl.store(base + rows[:, None] * stride + cols[None, :], val.to(base.dtype.element_ty),
             mask=row_ok[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _fwd_inner(acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_n, len_k,
               diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr, SPLIT: tl.constexpr):
    """Key blocks [lo, hi) of one query block. MASKED=False: blocks every row sees completely (no
    bounds or causal mask on the scores); MASKED=True: the diagonal / ragged-end blocks. SPLIT: the head
    dim is two column chunks, D1 and D2 wide (acc2, q2: the second); otherwise acc2 and q2 are unused."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < len_k
        k = _load_cols(k_base, cols, n_ok, stride_kt, 0, D1, HEAD_DIM, UPCAST)  # (BLOCK_N, D1)
        v = _load_cols(v_base, cols, n_ok, stride_vt, 0, D1, HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SPLIT:
            k2 = _load_cols(k_base, cols, n_ok, stride_kt, D1, D2, HEAD_DIM, UPCAST)  # (BLOCK_N, D2)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
        s = s * qk_scale
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only masked keys keeps m = -inf: shift by 0 so nothing is NaN.
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new_safe = m_new
        p = tl.math.exp2(s - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if SPLIT:
            v2 = _load_cols(v_base, cols, n_ok, stride_vt, D1, D2, HEAD_DIM, UPCAST)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=PRECISION)
        m_i = m_new
    return acc, acc2, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    q_start, len_q, k_start, len_k = _sequence(CU_Q, CU_K, b)
    if pid_m * BLOCK_M >= len_q:
        return
    qk_scale = tl.cast(qk_scale, tl.float32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < len_q
    q_base = Q + q_start * stride_qt + h * stride_qh
    q, q2 = _load_chunks(q_base, offs_m, m_ok, stride_qt, HEAD_DIM, D1, D2, SPLIT, UPCAST)  # (BLOCK_M, D1 / D2)

    # Bottom-right causal: row i sees keys j <= i + (len_k - len_q). Keys [0, full) are seen completely
    # by every row of the block; [full, hi) need the mask.
    diag = len_k - len_q
    hi = len_k
    full = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, pid_m * BLOCK_M + BLOCK_M + diag)
        full = tl.minimum(len_k, pid_m * BLOCK_M + diag + 1)
    full = (tl.maximum(full, 0) // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh
    acc, acc2, l_i, m_i = _fwd_inner(acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kt, stride_vt, 0, full,
                                     offs_m, offs_n, len_k, diag, qk_scale, False, CAUSAL, UPCAST, PRECISION,
                                     BLOCK_N, HEAD_DIM, D1, D2, SPLIT)
    acc, acc2, l_i, m_i = _fwd_inner(acc, acc2, l_i, m_i, q, q2, k_base, v_base, stride_kt, stride_vt, full, hi,
                                     offs_m, offs_n, len_k, diag, qk_scale, True, CAUSAL, UPCAST, PRECISION,
                                     BLOCK_N, HEAD_DIM, D1, D2, SPLIT)

    dead = l_i == 0.0
    inv_l = 1.0 / tl.where(dead, 1.0, l_i)
    lse = tl.where(dead, float("inf"), m_i + tl.math.log2(tl.where(dead, 1.0, l_i)))
    out_base = OUT + q_start * stride_ot + h * stride_oh
    _store_cols(out_base, offs_m, m_ok, stride_ot, acc * inv_l[:, None], 0, D1, HEAD_DIM)
    if SPLIT:
        _store_cols(out_base, offs_m, m_ok, stride_ot, acc2 * inv_l[:, None], D1, D2, HEAD_DIM)
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=m_ok)


@triton.jit
def _bwd_preprocess(
    OUT, DO, DELTA, CU_Q,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    len_q = tl.load(CU_Q + b + 1) - q_start
    if pid_m * BLOCK_M >= len_q:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (q_start + offs_m)[:, None]
    o = tl.load(OUT + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + h * stride_dh + q_start + offs_m, tl.sum(o * do, 1), mask=offs_m < len_q)


@triton.jit
def _dkdv_inner(dk, dv, dk2, dv2, k, v, k2, v2, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, lo, hi,
                offs_n, offs_m, n_ok, len_q, diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                D1: tl.constexpr, D2: tl.constexpr, SPLIT: tl.constexpr):
    """Query blocks [lo, hi) against one key block, in the transposed form (keys x queries). SPLIT: the
    second head-dim chunk's k2, v2 (held) and dk2, dv2 (accumulated); otherwise unused."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < len_q
        q = _load_cols(q_base, rows, m_ok, stride_qt, 0, D1, HEAD_DIM, UPCAST)  # (BLOCK_M, D1)
        do = _load_cols(do_base, rows, m_ok, stride_dot, 0, D1, HEAD_DIM, UPCAST)
        lse = tl.load(lse_base + rows, mask=m_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
        if SPLIT:
            q2 = _load_cols(q_base, rows, m_ok, stride_qt, D1, D2, HEAD_DIM, UPCAST)  # (BLOCK_M, D2)
            do2 = _load_cols(do_base, rows, m_ok, stride_dot, D1, D2, HEAD_DIM, UPCAST)
            st = tl.dot(k2, tl.trans(q2), st, input_precision=PRECISION)
        st = st * qk_scale
        if MASKED:
            keep = n_ok[:, None] & m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= rows[None, :] + diag)
            pt = tl.where(keep, tl.math.exp2(st - lse[None, :]), 0.0)
        else:
            pt = tl.math.exp2(st - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        if SPLIT:
            dv2 += tl.dot(pt.to(do2.dtype), do2, input_precision=PRECISION)
            dpt = tl.dot(v2, tl.trans(do2), dpt, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        if SPLIT:
            dk2 += tl.dot(dst.to(q2.dtype), q2, input_precision=PRECISION)
    return dk, dv, dk2, dv2


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, len_q, k_start, len_k = _sequence(CU_Q, CU_K, b)
    if pid_n * BLOCK_N >= len_k:
        return
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_ok = offs_n < len_k
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh
    k, k2 = _load_chunks(k_base, offs_n, n_ok, stride_kt, HEAD_DIM, D1, D2, SPLIT, UPCAST)  # (BLOCK_N, D1 / D2)
    v, v2 = _load_chunks(v_base, offs_n, n_ok, stride_vt, HEAD_DIM, D1, D2, SPLIT, UPCAST)
    dk = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, D2], dtype=tl.float32)

    # Query rows in [lo, mid) and [full_end, len_q) need the mask; [mid, full_end) see the whole key block.
    diag = len_k - len_q
    lo = 0
    mid = 0
    if CAUSAL:
        lo = (tl.maximum(0, n0 - diag) // BLOCK_M) * BLOCK_M  # first block with a row that sees key n0
        mid = tl.maximum(0, n0 + BLOCK_N - 1 - diag)  # first row that sees the block's last key
        mid = tl.maximum(lo, tl.minimum(len_q, ((mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M))
    # (Keys past len_k in a ragged last block need no mask here: dk/dv rows depend only on their own
    # key, and those rows are never stored.)
    full_end = tl.maximum(mid, (len_q // BLOCK_M) * BLOCK_M)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + q_start * stride_qt + h * stride_qh
        do_base = DO + q_start * stride_dot + h * stride_doh
        lse_base = LSE + h * stride_lh + q_start
        delta_base = DELTA + h * stride_lh + q_start
        dk, dv, dk2, dv2 = _dkdv_inner(dk, dv, dk2, dv2, k, v, k2, v2, q_base, do_base, lse_base, delta_base,
                                       stride_qt, stride_dot, lo, mid, offs_n, offs_m, n_ok, len_q, diag, qk_scale,
                                       True, CAUSAL, UPCAST, PRECISION, BLOCK_M, HEAD_DIM, D1, D2, SPLIT)
        dk, dv, dk2, dv2 = _dkdv_inner(dk, dv, dk2, dv2, k, v, k2, v2, q_base, do_base, lse_base, delta_base,
                                       stride_qt, stride_dot, mid, full_end, offs_n, offs_m, n_ok, len_q, diag,
                                       qk_scale, False, CAUSAL, UPCAST, PRECISION, BLOCK_M, HEAD_DIM, D1, D2, SPLIT)
        dk, dv, dk2, dv2 = _dkdv_inner(dk, dv, dk2, dv2, k, v, k2, v2, q_base, do_base, lse_base, delta_base,
                                       stride_qt, stride_dot, full_end, len_q, offs_n, offs_m, n_ok, len_q, diag,
                                       qk_scale, True, CAUSAL, UPCAST, PRECISION, BLOCK_M, HEAD_DIM, D1, D2, SPLIT)
    dk_base = DK + k_start * stride_dkt + hk * stride_dkh
    dv_base = DV + k_start * stride_dvt + hk * stride_dvh
    _store_cols(dk_base, offs_n, n_ok, stride_dkt, dk * sm_scale, 0, D1, HEAD_DIM)
    _store_cols(dv_base, offs_n, n_ok, stride_dvt, dv, 0, D1, HEAD_DIM)
    if SPLIT:
        _store_cols(dk_base, offs_n, n_ok, stride_dkt, dk2 * sm_scale, D1, D2, HEAD_DIM)
        _store_cols(dv_base, offs_n, n_ok, stride_dvt, dv2, D1, D2, HEAD_DIM)


@triton.jit
def _dq_inner(dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m, offs_n, m_ok,
              len_k, diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D1: tl.constexpr,
              D2: tl.constexpr, SPLIT: tl.constexpr):
    """Key blocks [lo, hi) of one query block's dq (SPLIT: dq2, q2, do2 are the second head-dim chunk's)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < len_k
        k = _load_cols(k_base, cols, n_ok, stride_kt, 0, D1, HEAD_DIM, UPCAST)  # (BLOCK_N, D1)
        v = _load_cols(v_base, cols, n_ok, stride_vt, 0, D1, HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if SPLIT:
            k2 = _load_cols(k_base, cols, n_ok, stride_kt, D1, D2, HEAD_DIM, UPCAST)  # (BLOCK_N, D2)
            v2 = _load_cols(v_base, cols, n_ok, stride_vt, D1, D2, HEAD_DIM, UPCAST)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=PRECISION)
        s = s * qk_scale
        if MASKED:
            keep = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
        else:
            p = tl.math.exp2(s - lse[:, None])
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if SPLIT:
            dq2 += tl.dot(ds.to(k2.dtype), k2, input_precision=PRECISION)
    return dq, dq2


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, SPLIT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    q_start, len_q, k_start, len_k = _sequence(CU_Q, CU_K, b)
    if pid_m * BLOCK_M >= len_q:
        return
    qk_scale = tl.cast(qk_scale, tl.float32)
    sm_scale = tl.cast(sm_scale, tl.float32)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    m_ok = offs_m < len_q
    q_base = Q + q_start * stride_qt + h * stride_qh
    do_base = DO + q_start * stride_dot + h * stride_doh
    q, q2 = _load_chunks(q_base, offs_m, m_ok, stride_qt, HEAD_DIM, D1, D2, SPLIT, UPCAST)  # (BLOCK_M, D1 / D2)
    do, do2 = _load_chunks(do_base, offs_m, m_ok, stride_dot, HEAD_DIM, D1, D2, SPLIT, UPCAST)
    rows = q_start + offs_m
    lse = tl.load(LSE + h * stride_lh + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + h * stride_lh + rows, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)

    diag = len_k - len_q
    hi = len_k
    full = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, pid_m * BLOCK_M + BLOCK_M + diag)
        full = tl.minimum(len_k, pid_m * BLOCK_M + diag + 1)
    full = (tl.maximum(full, 0) // BLOCK_N) * BLOCK_N
    k_base = K + k_start * stride_kt + hk * stride_kh
    v_base = V + k_start * stride_vt + hk * stride_vh
    dq, dq2 = _dq_inner(dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kt, stride_vt, 0, full, offs_m,
                        offs_n, m_ok, len_k, diag, qk_scale, False, CAUSAL, UPCAST, PRECISION, BLOCK_N, HEAD_DIM, D1,
                        D2, SPLIT)
    dq, dq2 = _dq_inner(dq, dq2, q, q2, do, do2, lse, delta, k_base, v_base, stride_kt, stride_vt, full, hi, offs_m,
                        offs_n, m_ok, len_k, diag, qk_scale, True, CAUSAL, UPCAST, PRECISION, BLOCK_N, HEAD_DIM, D1,
                        D2, SPLIT)
    dq_base = DQ + q_start * stride_dqt + h * stride_dqh
    _store_cols(dq_base, offs_m, m_ok, stride_dqt, dq * sm_scale, 0, D1, HEAD_DIM)
    if SPLIT:
        _store_cols(dq_base, offs_m, m_ok, stride_dqt, dq2 * sm_scale, D1, D2, HEAD_DIM)


# ----------------------------------------------------------------------------- launch configuration

def head_dim_chunks(head_dim: int) -> tuple[int, int, bool]:
    """(D1, D2, SPLIT): how the kernels cover the head dim with power-of-two column tiles (Triton's blocks).

    Where two chunks cover it with less padding than one (D1 = the largest power of two <= head_dim, D2 =
    the rest rounded up to a power of two >= 16), every product over the head dim is made in two parts:
    80 = 64 + 16 (the Qwen2-VL vision encoder's), 96 = 64 + 32, 40 = 32 + 16, 160 = 128 + 32. Padded to 128
    instead, 80 made every product 1.6x wider than needed and doubled the forward's shared memory; on the
    H100 the d=80 forward ran at 93 TFLOP/s against d=64's 159 (README, "Other ops"). Otherwise one chunk
    of the next power of two (D2 is then a placeholder: SPLIT False)."""
    padded = max(16, next_power_of_2(head_dim))
    d1 = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - d1
    if rest <= 0:
        return padded, 16, False
    d2 = max(16, next_power_of_2(rest))
    if d1 + d2 >= padded:
        return padded, 16, False
    return d1, d2, True


def _width(head_dim: int) -> int:
    """The columns the kernels' tiles cover: D1 (+ D2 when split)."""
    d1, d2, split = head_dim_chunks(head_dim)
    return d1 + d2 if split else d1


def _tiles(kind: str, head_dim_block: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kind`` in fwd / dkdv / dq.

    Interpreter: ``INTERPRETER_TILES`` (cost = programs x loop steps). GPU: chosen from sm_90 register
    reports of kernels compiled ahead of time without the JIT's argument specialisation, not from timings:
    no GPU was available to tune them. dk/dv programs hold a large key block and step through small query
    blocks; dq programs the reverse. fp32 (tests) and head dims above 128 take small tiles (register
    pressure). Compiled as the JIT compiles them (``python tests/aot_triton.py --arch 90 --full``,
    benchmarks/results/2026-11-22-aot/), the 16-bit forward and dq kernels spill nothing at head dims
    64-128 but the dk/dv kernel spills 312-316 bytes per thread at 80-128 on sm_90 with Triton 3.8 and
    636-640 with Triton 3.6, the GPU image's (72-80 on sm_80). Ten other dk/dv tiles compiled for sm_90 with
    Triton 3.6 all spilled too (the least: (16, 128), 8 warps, 24-28 bytes), and none was timed, so these
    stay until a GPU can time them. fp32 kernels spill kilobytes, which is why ``auto`` does not pick this
    backend for fp32. tests/test_attention_triton.py holds the 16-bit spills (none; dk/dv at most 640).
    ``head_dim_block`` is the width the tiles cover (``_width``): 80 for d=80 since the split head dim, which
    on sm_90 cut the d=80 kernels' shared memory from 96-97 KB to 60-61 KB and let two dq programs share an
    SM (benchmarks/results/2026-11-23-aot/triton_aot_sm90_attention_full_triton3{6,8}_{664ef9f,split}.txt)."""
    if interpreting():
        return INTERPRETER_TILES[0], INTERPRETER_TILES[1], 4, 1
    if dtype == torch.float32 or head_dim_block > 128:
        return {"fwd": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2)}[kind]
    if head_dim_block <= 64:
        return {"fwd": (128, 64, 8, 2), "dkdv": (32, 128, 8, 2), "dq": (128, 32, 8, 2)}[kind]
    return {"fwd": (128, 64, 8, 2), "dkdv": (64, 64, 8, 2), "dq": (128, 32, 8, 2)}[kind]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _alloc_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, device=t.device, dtype=t.dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _alloc(shape, device) -> torch.Tensor:
    out = torch.empty(shape, device=device, dtype=torch.float32)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _fwd(q, k, v, cu_q, cu_k, max_q, n_seq, causal, scale):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    out = _alloc_like(q)
    lse = _alloc((hq, total_q), q.device)
    d1, d2, split = head_dim_chunks(d)
    bm, bn, warps, stages = _tiles("fwd", _width(d), q.dtype)
    grid = (triton.cdiv(max(max_q, 1), bm), hq, n_seq)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0), scale * LOG2E, GROUP=hq // hkv, HEAD_DIM=d, CAUSAL=causal, UPCAST=_upcast(q.dtype),
        PRECISION=_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, D1=d1, D2=d2, SPLIT=split, num_warps=warps,
        num_stages=stages,
    )
    return out, lse


def _bwd(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, n_seq, causal, scale):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    block_d = max(16, next_power_of_2(d))
    delta = _alloc(tuple(lse.shape), lse.device)
    bm_pre = 32 if interpreting() else 64
    _bwd_preprocess[(triton.cdiv(max(max_q, 1), bm_pre), hq, n_seq)](
        out, do, delta, cu_q, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        HEAD_DIM=d, BLOCK_M=bm_pre, BLOCK_D=block_d,
    )
    dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
    d1, d2, split = head_dim_chunks(d)
    common = dict(HEAD_DIM=d, CAUSAL=causal, UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype), D1=d1, D2=d2,
                  SPLIT=split)
    bm, bn, warps, stages = _tiles("dkdv", _width(d), q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(max(max_k, 1), bn), hkv, n_seq)](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), scale * LOG2E, scale,
        GROUP=group, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
    )
    bm, bn, warps, stages = _tiles("dq", _width(d), q.dtype)
    _bwd_dq_kernel[(triton.cdiv(max(max_q, 1), bm), hq, n_seq)](
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), lse.stride(0), scale * LOG2E, scale, GROUP=group, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages, **common,
    )
    return dq, dk, dv


class _FlashAttnFunction(torch.autograd.Function):
    """Packed q (total_q, Hq, D), k/v (total_k, Hkv, D) -> (total_q, Hq, D)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        n_seq = cu_q.numel() - 1
        out, lse = _fwd(q, k, v, cu_q, cu_k, max_q, n_seq, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, n_seq, causal, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, n_seq, causal, scale = ctx.args
        dq, dk, dv = _bwd(_last_dim_contiguous(do), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, n_seq, causal,
                          scale)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention_triton(p) -> torch.Tensor:
    """The ``triton`` backend of :func:`moon_fast.ops.flash_attention` (a validated AttnProblem)."""
    q, k, v = p.q, p.k, p.v
    n_seq = len(p.seqlens_q) if p.packed else q.shape[0]
    if n_seq > 65535:
        raise ValueError(f"flash_attention (triton): at most 65535 sequences per call (CUDA grid limit), got {n_seq}; "
                         "split the batch")
    if p.packed:
        cu_q = p.cu_seqlens_q.to(torch.int32)
        cu_k = p.cu_seqlens_k.to(torch.int32)
        return _FlashAttnFunction.apply(q, k, v, cu_q, cu_k, p.max_seqlen_q, p.max_seqlen_k, p.causal, p.scale)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    cu_q = torch.arange(0, b + 1, device=q.device, dtype=torch.int32) * sq
    cu_k = torch.arange(0, b + 1, device=q.device, dtype=torch.int32) * sk
    out = _FlashAttnFunction.apply(q.reshape(b * sq, hq, d), k.reshape(b * sk, k.shape[2], d),
                                   v.reshape(b * sk, v.shape[2], d), cu_q, cu_k, sq, sk, p.causal, p.scale)
    return out.view(b, sq, hq, d)
