"""The ``torch`` (and ``cuda`` / ``cuda_emu``) backend: chunked online log-sum-exp.

Rows are processed ``chunk`` at a time against all columns, so the only large temporary is one
(chunk, Nc) float32 logits tile; memory is O((Nr + Nc)·D + chunk·Nc).

* Row direction only (queries against keys, the multi-objective form), mean/sum reduction: a row's
  log-sum-exp is complete within its chunk, so the forward also turns the tile into the gradient of
  the logits and does the two gradient products right away (Liger's fused-linear-cross-entropy
  trick): 3 matrix products in all, and backward only scales the stored O((Nr+Nc)·D) gradients by
  grad_output (per objective).
* Symmetric (column direction too), or reduction="none": the forward computes row log-sum-exps and
  merges per-chunk column (max, sum-exp) partials online; backward recomputes each tile once and
  forms the gradient of both directions in it: 4 matrix products in all (open_clip does 6).

float32 inputs on the ``torch`` backend take a faster path (see "Fast float32 path" below): one exp
per tile element and about four passes over each tile per direction pair, so on a CPU the loss is
bound by its 4 (symmetric) or 3 (row-only) matrix products; it makes one host synchronisation per
chunk for its range checks. Other dtypes, and the ``cuda``/``cuda_emu`` backends, take the generic
path, whose element-wise work on a tile (row log-sum-exp, online column merge, gradient formation)
goes through a :class:`TileOps`: ``cuda``/``cuda_emu`` swap in the kernels of csrc/contrastive.cu
while the matrix products stay on torch.mm (cuBLAS on a GPU).
"""

from __future__ import annotations

import math

import torch

from moon_fast.ops.contrastive_core import Problem

# The fused forward keeps one (Nc, D) float32 key gradient per segment; above this many segments
# (reduction="none" has one per row) we recompute in backward instead.
MAX_FUSED_SEGMENTS = 8
_NEG_INF = float("-inf")


def default_chunk(n_cols: int) -> int:
    """Rows per chunk: a (chunk, Nc) float32 tile of about 64 MiB, 128 to 2048 rows. Taller chunks make
    the key-gradient product (Nc, chunk) @ (chunk, D) more efficient (its inner dimension is the chunk)
    and read/write the (Nc, D) key gradient fewer times; the tile and one same-sized temporary are the
    memory this costs."""
    return int(max(128, min(2048, (1 << 24) // max(1, n_cols))))


# ----------------------------------------------------------------------------- element-wise tile ops

class TileOps:
    """Element-wise work on one float32 logits tile S (c, Nc); plain torch. Masked entries are -inf."""

    name = "torch"

    def row_lse(self, S: torch.Tensor) -> torch.Tensor:
        """(c,) log-sum-exp of each row of S (S unchanged)."""
        m = S.amax(1)
        e = torch.sub(S, m[:, None]).exp_()
        return m + e.sum(1).log_()

    def row_softmax_grad_(self, S: torch.Tensor, a: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """S <- a[:, None] * (softmax(S) - onehot(pos)); returns the rows' log-sum-exp."""
        m = S.amax(1)
        S.sub_(m[:, None]).exp_()
        s = S.sum(1)
        S.mul_((a / s)[:, None])
        _sub_at_positives_(S, pos, a)
        return m + s.log_()

    def col_merge_(self, S: torch.Tensor, cmax: torch.Tensor, csum: torch.Tensor) -> None:
        """Online merge of this tile's per-column (max, sum exp(S - max)) into (cmax, csum), in place."""
        new = torch.maximum(cmax, S.amax(0))
        safe = torch.where(new == _NEG_INF, torch.zeros_like(new), new)
        e = torch.sub(S, safe[None, :]).exp_()
        csum.mul_(torch.exp(cmax - safe)).add_(e.sum(0))
        cmax.copy_(new)

    def grad_(self, S: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, clse: torch.Tensor | None,
              b: torch.Tensor | None, pos: torch.Tensor, pos_coef: torch.Tensor) -> None:
        """S <- a_r exp(S - lse_r) + b_c exp(S - clse_c) [first len(clse) columns] - pos_coef_r at (r, pos_r)."""
        pc = None
        if clse is not None:
            ncol = clse.shape[0]
            safe = torch.where(torch.isfinite(clse), clse, torch.zeros_like(clse))
            pc = torch.sub(S[:, :ncol], safe[None, :]).exp_().mul_(b[None, :])
        S.sub_(lse[:, None]).exp_().mul_(a[:, None])
        if pc is not None:
            S[:, :pc.shape[1]].add_(pc)
        _sub_at_positives_(S, pos, pos_coef)


def _sub_at_positives_(S: torch.Tensor, pos: torch.Tensor, coef: torch.Tensor) -> None:
    flat = torch.arange(S.shape[0], device=S.device) * S.shape[1] + pos
    S.view(-1).index_add_(0, flat, -coef.to(S.dtype))


TORCH_TILE_OPS = TileOps()


def csrc_tile_ops(kind: str) -> TileOps:
    """TileOps backed by csrc/contrastive.cu: kind "cuda" (moon_fast._C) or "emu" (CPU emulator)."""
    from moon_fast.ops.contrastive_csrc import CsrcTileOps

    return CsrcTileOps(kind)


# ----------------------------------------------------------------------------- the chunked loss

# Fast float32 path (torch backend): a stabiliser is folded into the matrix product by one extra
# column, [scale*R | -m] @ [C | 1].T = S - m, so a tile needs one exp and no separate subtraction;
# column sums are a matrix-vector product of the row-stabilised tile; the gradient of both directions
# is E * (a 1^T + x y^T) with one exp. Each shortcut checks its float32 range and falls back to the
# exact computation for the chunk (or column) that would lose precision; FALLBACKS counts them.
_LOG_TINY = -50.0  # a sum below e^-50 may have lost its relevant terms to underflow
_LOG_FLAG = -60.0  # column partials below e^-60 of the chunk stabiliser are flagged
_LOG_REL = 17.0  # e^-17 < float32 epsilon / 2: mass that much below a total does not matter
_FACTOR_RANGE = 60.0  # max lse_r - clse_c for the factorised symmetric gradient
FALLBACKS = {"row_chunks": 0, "columns": 0, "grad_chunks": 0}


def _logits(p: Problem, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, r0: int, r1: int):
    """(r1-r0, Nc) float32 logits of rows r0:r1, excluded entries -inf."""
    if rows.dtype == torch.float32:
        S = torch.mm(rows[r0:r1] * scale, cols.T)  # scaling the rows saves a pass over the tile
    else:
        S = torch.mm(rows[r0:r1], cols.T).float().mul_(scale)
    excl = p.exclusion(r0, r1)
    if excl is not None:
        S.masked_fill_(excl, _NEG_INF)
    return S


def _shifted_logits(p: Problem, rows, cols_aug, scale, shift, r0: int, r1: int):
    """(r1-r0, Nc) float32 ``S - shift[:, None]`` in one product (fp32 only), excluded entries -inf."""
    r_aug = torch.cat([rows[r0:r1] * scale, -shift[:, None]], 1)
    T = torch.mm(r_aug, cols_aug.T)
    excl = p.exclusion(r0, r1)
    if excl is not None:
        T.masked_fill_(excl, _NEG_INF)
    return T


class _Grads:
    """Gradient accumulators, float32: dR (Nr, D), dC (n_groups, Nc, D) (unscaled until finish()),
    per-row terms v (Nr,) of the logit-scale gradient."""

    def __init__(self, rows, cols, n_groups: int):
        self.dR = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
        self.dC = torch.zeros((n_groups, *cols.shape), dtype=torch.float32, device=cols.device)
        self.v = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)

    def add(self, G, rows, cols, scale, r0: int, r1: int, groups: list[tuple[int, int, int]],
            row_scale=None, pos=None, pos_coef=None):
        """dLoss/dS for rows r0:r1 is ``diag(row_scale) G - pos_coef at (r, pos_r)`` (G (c, Nc) float32;
        the two optional terms let the fused path skip passes over the tile);
        groups: (g, a, b) row ranges a:b -> dC[g]."""
        Gd = G if cols.dtype == torch.float32 else G.to(cols.dtype)
        U = torch.mm(Gd, cols).float()  # (c, D) = dLoss/d(rows) / scale
        Rc = rows[r0:r1].float()
        if row_scale is not None:
            U.mul_(row_scale[:, None])
            Rs = Rc * row_scale[:, None]
        else:
            Rs = Rc
        if pos is not None:
            U.sub_(pos_coef[:, None] * cols[pos].float())
        self.v[r0:r1] = (U * Rc).sum(1)  # dLoss/dscale = sum_ij G_ij (R C^T)_ij
        torch.mul(U, scale, out=self.dR[r0:r1])
        for g, a, b in groups:
            Ga, Ra = Gd[a - r0:b - r0], Rs[a - r0:b - r0]
            if cols.dtype == torch.float32:
                self.dC[g].addmm_(Ga.T, Ra)
            else:
                self.dC[g].add_(torch.mm(Ga.T, Ra.to(cols.dtype)).float())
            if pos is not None:
                self.dC[g].index_add_(0, pos[a - r0:b - r0], -(pos_coef[a - r0:b - r0, None] * Rc[a - r0:b - r0]))

    def finish(self, scale) -> None:
        self.dC.mul_(scale)


def _seg_groups(bounds, r0: int, r1: int) -> list[tuple[int, int, int]]:
    out = []
    for g in range(len(bounds) - 1):
        a, b = max(bounds[g], r0), min(bounds[g + 1], r1)
        if a < b:
            out.append((g, a, b))
    return out


def _exact_column_lse(p: Problem, rows, cols, scale, cols_idx: torch.Tensor, chunk: int) -> torch.Tensor:
    """Exact log-sum-exp over all rows of the columns ``cols_idx`` (the fallback for columns whose
    fast-path sums lost precision)."""
    sub = cols[cols_idx]
    m = torch.full((cols_idx.numel(),), _NEG_INF, dtype=torch.float32, device=rows.device)
    acc = torch.zeros_like(m)
    for r0 in range(0, rows.shape[0], chunk):
        r1 = min(rows.shape[0], r0 + chunk)
        S = torch.mm(rows[r0:r1] * scale, sub.T)
        if p.has_groups:
            excl = ((p.row_group[r0:r1, None] == p.col_group[cols_idx][None, :])
                    & (p.row_id[r0:r1, None] != p.col_id[cols_idx][None, :]))
            S.masked_fill_(excl, _NEG_INF)
        TORCH_TILE_OPS.col_merge_(S, m, acc)
    return m + acc.log()


def _forward_fast(p: Problem, rows, cols, sc, chunk, fused, grads, ncol):
    """float32 forward: returns lse (Nr,), spos (Nr,), clse (ncol,) or None; fills grads when fused."""
    Nr, dev = rows.shape[0], rows.device
    cols_aug = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype, device=dev)], 1)
    # An upper bound of every row's logits (Cauchy-Schwarz), used as the row stabiliser.
    bound = rows.norm(dim=1) * (cols.norm(dim=1).max() * sc.abs())
    lse = torch.empty(Nr, dtype=torch.float32, device=dev)
    spos = torch.empty(Nr, dtype=torch.float32, device=dev)
    if p.symmetric:
        cmax = torch.full((ncol,), _NEG_INF, dtype=torch.float32, device=dev)
        csum = torch.zeros(ncol, dtype=torch.float32, device=dev)
        err = torch.full((ncol,), _NEG_INF, dtype=torch.float32, device=dev)
    for r0 in range(0, Nr, chunk):
        r1 = min(Nr, r0 + chunk)
        pos = p.pos[r0:r1]
        m = bound[r0:r1]
        E = _shifted_logits(p, rows, cols_aug, sc, m, r0, r1)
        spos[r0:r1] = E.gather(1, pos[:, None]).squeeze(1) + m
        E.exp_()
        s = E.sum(1)
        if bool((s < math.exp(_LOG_TINY)).any()):  # a loose bound: redo the chunk with exact row maxima
            FALLBACKS["row_chunks"] += 1
            E = _logits(p, rows, cols, sc, r0, r1)
            m = E.amax(1)
            E.sub_(m[:, None]).exp_()
            s = E.sum(1)
        lse[r0:r1] = m + s.log()
        if p.symmetric:
            # Column partials sum_r exp(S_rc - M) = sum_r E_rc exp(m_r - M): a matrix-vector product.
            M = m.max()
            z = torch.mv(E[:, :ncol].T, torch.exp(m - M))
            flagged = z < math.exp(_LOG_FLAG)
            torch.maximum(err, torch.where(flagged, M + (_LOG_FLAG + math.log(r1 - r0)), _NEG_INF), out=err)
            new = torch.maximum(cmax, M.expand_as(cmax))
            csum.mul_(torch.exp(cmax - new)).add_(z * torch.exp(M - new))
            cmax = new
        if fused:
            a = p.row_coef[r0:r1]
            grads.add(E, rows, cols, sc, r0, r1, _seg_groups(p.seg_bounds, r0, r1), row_scale=a / s, pos=pos,
                      pos_coef=a)
        del E
    clse = None
    if p.symmetric:
        clse = cmax + csum.log()
        suspect = torch.nonzero(err > clse - _LOG_REL).squeeze(1)
        if suspect.numel():
            FALLBACKS["columns"] += int(suspect.numel())
            clse[suspect] = _exact_column_lse(p, rows, cols, sc, suspect, chunk)
    return lse, spos, clse


def _backward_fast(p: Problem, rows, cols, sc, chunk, lse, clse, a, b, pos_coef, grads):
    Nr, dev = rows.shape[0], rows.device
    cols_aug = torch.cat([cols, torch.ones(cols.shape[0], 1, dtype=cols.dtype, device=dev)], 1)
    if clse is not None:
        ncol = clse.shape[0]
        clse_safe = torch.where(torch.isfinite(clse), clse, torch.zeros_like(clse))
        needed = b != 0
        min_clse = float(clse_safe[needed].min()) if bool(needed.any()) else 0.0
    for r0 in range(0, Nr, chunk):
        r1 = min(Nr, r0 + chunk)
        lr, ar = lse[r0:r1], a[r0:r1]
        E = _shifted_logits(p, rows, cols_aug, sc, lr, r0, r1)  # S - lse_r
        if clse is None:
            E.exp_()
            grads.add(E, rows, cols, sc, r0, r1, [(0, r0, r1)], row_scale=ar, pos=p.pos[r0:r1],
                      pos_coef=pos_coef[r0:r1])
            continue
        L = float(lr.max())
        if L - min_clse < _FACTOR_RANGE:
            # a_r e^(S-lse_r) + b_c e^(S-clse_c) = e^(S-lse_r) (a_r + x_r y_c), x_r = e^(lse_r-L), y_c = b_c e^(L-clse_c)
            E.exp_()
            y = torch.where(needed, b * torch.exp(L - clse_safe), torch.zeros_like(b))  # b = 0: no 0 * inf
            W = torch.addr(ar[:, None], torch.exp(lr - L), y)
            E[:, :ncol].mul_(W)
            if ncol < E.shape[1]:
                E[:, ncol:].mul_(ar[:, None])
        else:
            FALLBACKS["grad_chunks"] += 1
            pc = (E[:, :ncol] + lr[:, None] - clse_safe[None, :]).exp_().mul_(b[None, :])
            E.exp_().mul_(ar[:, None])
            E[:, :ncol].add_(pc)
        grads.add(E, rows, cols, sc, r0, r1, [(0, r0, r1)], pos=p.pos[r0:r1], pos_coef=pos_coef[r0:r1])


class ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, cols, scale, p: Problem, ops: TileOps, chunk: int, fast: bool):
        Nr = rows.shape[0]
        dev = rows.device
        sc = scale.detach().float()
        needs_grad = any(ctx.needs_input_grad[:3])
        fused = (needs_grad and not p.symmetric and p.seg_bounds is not None
                 and p.n_seg <= MAX_FUSED_SEGMENTS)
        ncol = int(p.pos.max()) + 1 if p.symmetric else 0  # the column direction needs columns 0..max(pos)
        grads = _Grads(rows, cols, p.n_seg) if fused else None
        if fast:
            lse, spos, clse = _forward_fast(p, rows, cols, sc, chunk, fused, grads, ncol)
        else:
            lse = torch.empty(Nr, dtype=torch.float32, device=dev)
            spos = torch.empty(Nr, dtype=torch.float32, device=dev)
            if p.symmetric:
                cmax = torch.full((ncol,), _NEG_INF, dtype=torch.float32, device=dev)
                csum = torch.zeros(ncol, dtype=torch.float32, device=dev)
            for r0 in range(0, Nr, chunk):
                r1 = min(Nr, r0 + chunk)
                S = _logits(p, rows, cols, sc, r0, r1)
                pos = p.pos[r0:r1]
                spos[r0:r1] = S.gather(1, pos[:, None]).squeeze(1)
                if p.symmetric:
                    ops.col_merge_(S[:, :ncol], cmax, csum)
                if fused:
                    lse[r0:r1] = ops.row_softmax_grad_(S, p.row_coef[r0:r1], pos)
                    grads.add(S, rows, cols, sc, r0, r1, _seg_groups(p.seg_bounds, r0, r1))
                else:
                    lse[r0:r1] = ops.row_lse(S)
                del S
            clse = cmax + csum.log() if p.symmetric else None
        if fused:
            grads.finish(sc)
        per_row = p.row_coef * (lse - spos)
        if p.symmetric:
            per_row = per_row + p.col_coef * (clse[p.pos] - spos)
        out = p.segment_sum(per_row)
        ctx.p, ctx.ops, ctx.chunk, ctx.fused, ctx.fast = p, ops, chunk, fused, fast
        if fused:
            ctx.grads = grads
            ctx.save_for_backward(scale)
        else:
            ctx.save_for_backward(rows, cols, scale, lse, clse if clse is not None else lse.new_empty(0))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        p = ctx.p
        go = go.float()
        if ctx.fused:
            (scale,) = ctx.saved_tensors
            g = ctx.grads
            gr = go[p.seg]
            dR = g.dR.mul_(gr[:, None])
            dC = (g.dC * go[:, None, None]).sum(0) if p.n_seg > 1 else g.dC[0].mul_(go[0])
            dscale = (g.v * gr).sum()
            ctx.grads = None
        else:
            rows, cols, scale, lse, clse = ctx.saved_tensors
            sc = scale.detach().float()
            gr = go[p.seg]
            a = gr * p.row_coef
            b = None
            pos_coef = a
            if p.symmetric:
                beta = gr * p.col_coef
                b = torch.zeros(clse.shape[0], dtype=torch.float32, device=go.device).index_add_(0, p.pos, beta)
                pos_coef = a + beta
            else:
                clse = None
            grads = _Grads(rows, cols, 1)
            Nr = rows.shape[0]
            if ctx.fast:
                _backward_fast(p, rows, cols, sc, ctx.chunk, lse, clse, a, b, pos_coef, grads)
            else:
                for r0 in range(0, Nr, ctx.chunk):
                    r1 = min(Nr, r0 + ctx.chunk)
                    S = _logits(p, rows, cols, sc, r0, r1)
                    ctx.ops.grad_(S, lse[r0:r1], a[r0:r1], clse, b, p.pos[r0:r1], pos_coef[r0:r1])
                    grads.add(S, rows, cols, sc, r0, r1, [(0, r0, r1)])
                    del S
            grads.finish(sc)
            dR, dC, dscale = grads.dR, grads.dC[0], grads.v.sum()
        rows_dtype, cols_dtype = p.rows.dtype, p.cols.dtype
        return (dR.to(rows_dtype), dC.to(cols_dtype), dscale.to(scale.dtype).reshape(scale.shape),
                None, None, None, None)


def chunked_problem(p: Problem, ops: TileOps, chunk_size: int | None = None, *, fast: bool | None = None):
    """(n_seg,) float32 losses of ``p``; see the module docstring. ``fast`` (default: torch tile ops
    and float32 inputs) selects the single-exp float32 path."""
    chunk = int(chunk_size) if chunk_size is not None else default_chunk(p.cols.shape[0])
    if chunk < 1:
        raise ValueError(f"contrastive_loss: chunk_size must be >= 1, got {chunk_size}")
    if fast is None:
        fast = ops is TORCH_TILE_OPS and p.rows.dtype == torch.float32
    return ChunkedLoss.apply(p.rows, p.cols, p.scale, p, ops, chunk, fast)
