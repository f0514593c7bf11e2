"""TileOps backed by csrc/contrastive.cu: the ``cuda`` backend (moon_fast._C) and, on CPU tensors,
``cuda_emu`` (the same kernel source under the CPU emulator). GEMMs stay in torch (cuBLAS)."""

from __future__ import annotations

import torch

from moon_fast import _ext
from moon_fast.ops.contrastive_torch import TileOps


class CsrcTileOps(TileOps):
    def __init__(self, kind: str):
        self.name = kind
        self._ops = _ext.cuda_ops() if kind == "cuda" else _ext.emu_ops()

    def row_lse(self, S: torch.Tensor) -> torch.Tensor:
        return self._ops.contrastive_row_lse(S)

    def row_softmax_grad_(self, S: torch.Tensor, a: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        lse = self._ops.contrastive_row_lse(S)
        a = a.contiguous()
        self._ops.contrastive_tile_grad_(S, lse, a, None, None, pos.contiguous(), a)
        return lse

    def col_merge_(self, S: torch.Tensor, cmax: torch.Tensor, csum: torch.Tensor) -> None:
        self._ops.contrastive_col_merge_(S, cmax, csum)

    def grad_(self, S, lse, a, clse, b, pos, pos_coef) -> None:
        self._ops.contrastive_tile_grad_(S, lse.contiguous(), a.contiguous(),
                                         None if clse is None else clse.contiguous(),
                                         None if b is None else b.contiguous(), pos.contiguous(),
                                         pos_coef.contiguous())
