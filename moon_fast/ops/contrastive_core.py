"""The problem every contrastive backend solves, and the reference (materialised) solution.

The public functions in :mod:`moon_fast.ops.contrastive` validate inputs, gather across ranks and
turn ``target`` / groups / weights / reduction into one :class:`Problem`; a backend only ever sees
a :class:`Problem` and returns one loss per segment.

A problem is a logits matrix ``S = scale * rows @ cols.T`` (Nr, Nc) that no backend but
``reference`` materialises, with:

* a row direction: row r is a query whose positive is column ``pos[r]``;
  ``l_row[r] = logsumexp_c' S[r, c'] - S[r, pos[r]]`` over the columns not excluded for row r;
* optionally a column direction (CLIP's symmetric loss): column ``pos[r]`` scored against all rows,
  its positive row r: ``l_col[r] = logsumexp_r' S[r', pos[r]] - S[r, pos[r]]`` over the rows not
  excluded for that column;
* exclusion (false negatives): entry (r, c) is left out of both denominators when
  ``row_group[r] == col_group[c]`` and ``row_id[r] != col_id[c]``. For queries against keys,
  ``row_id = target`` and ``col_id = arange(Nc)``: a key with the query's group is excluded unless
  it is the query's positive, so the positive always stays;
* output: ``out[s] = sum over rows r with seg[r] == s of row_coef[r] * l_row[r] + col_coef[r] * l_col[r]``
  (float32, shape (n_seg,)). Reductions are coefficients: mean = w / sum(w), sum = w,
  none = one segment per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Problem:
    """Shapes: rows (Nr, D), cols (Nc, D) same dtype and device; scale () ; pos, seg (Nr,) int64;
    row_group, row_id (Nr,) int64 and col_group, col_id (Nc,) int64, all four or none;
    row_coef (Nr,) float32; col_coef (Nr,) float32 or None (no column direction)."""

    rows: torch.Tensor
    cols: torch.Tensor
    scale: torch.Tensor
    pos: torch.Tensor
    row_coef: torch.Tensor
    seg: torch.Tensor
    n_seg: int
    col_coef: torch.Tensor | None = None
    row_group: torch.Tensor | None = None
    col_group: torch.Tensor | None = None
    row_id: torch.Tensor | None = None
    col_id: torch.Tensor | None = None
    # Rows of one segment are contiguous and segments ascend (lets fused backends split chunks).
    seg_bounds: tuple[int, ...] | None = None

    @property
    def has_groups(self) -> bool:
        return self.row_group is not None

    @property
    def symmetric(self) -> bool:
        return self.col_coef is not None

    def exclusion(self, r0: int = 0, r1: int | None = None) -> torch.Tensor | None:
        """(r1-r0, Nc) bool: True where entry (r, c) is left out of the denominators."""
        if not self.has_groups:
            return None
        r1 = self.rows.shape[0] if r1 is None else r1
        return ((self.row_group[r0:r1, None] == self.col_group[None, :])
                & (self.row_id[r0:r1, None] != self.col_id[None, :]))

    def segment_sum(self, values: torch.Tensor) -> torch.Tensor:
        """(Nr,) float32 -> (n_seg,) float32."""
        out = torch.zeros(self.n_seg, dtype=torch.float32, device=values.device)
        return out.index_add_(0, self.seg, values)


def reference_problem(p: Problem) -> torch.Tensor:
    """Materialised logits and F.cross_entropy: the oracle. Memory O(Nr * Nc).

    The matrix product runs in the inputs' dtype (as open_clip does); the softmax in float32."""
    logits = (p.rows @ p.cols.T).float() * p.scale.float()
    excl = p.exclusion()
    if excl is not None:
        logits = logits.masked_fill(excl, float("-inf"))
    l_row = torch.nn.functional.cross_entropy(logits, p.pos, reduction="none")
    per_row = p.row_coef * l_row
    if p.col_coef is not None:
        # Column pos[r] against every row, positive row r.
        col_logits = logits[:, p.pos].T  # (Nr, Nr)
        target = torch.arange(p.rows.shape[0], device=logits.device)
        l_col = torch.nn.functional.cross_entropy(col_logits, target, reduction="none")
        per_row = per_row + p.col_coef * l_col
    return p.segment_sum(per_row)
