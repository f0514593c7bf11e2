"""Dynamic Sample Filtering (MOON2.0): a reliability weight per triplet.

    phi = sigmoid(kappa * (s(q, p) - s(q, n) - m(progress)))

s is the dot product of the L2-normalised embeddings; the margin m decays from ``margin_start`` to
``margin_end`` as training progresses (early training trusts only triplets whose positive clearly
beats the negative, later ones admit harder triplets). Below ``threshold`` a triplet is
down-weighted: ``mode="soft"`` weight phi, ``"hard"`` weight 0, ``"phi"`` weight phi everywhere; at or
above it the weight is 1 (soft / hard). The weights carry no gradient (they select samples; a
gradient through them would teach the model to make triplets look unreliable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def dsf_margin(progress: float, start: float, end: float, schedule: str = "linear") -> float:
    """m at ``progress`` in [0, 1] (clamped): linear or cosine from ``start`` to ``end``."""
    t = min(max(float(progress), 0.0), 1.0)
    if schedule == "linear":
        frac = t
    elif schedule == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * t))
    else:
        raise ValueError(f"dsf schedule must be 'linear' or 'cosine', got {schedule!r}")
    return start + (end - start) * frac


@dataclass
class DSFResult:
    """weight (Q,) float32 detached; phi (Q,) float32; kept (Q,) bool (phi >= threshold); margin."""

    weight: torch.Tensor
    phi: torch.Tensor
    kept: torch.Tensor
    margin: float


@torch.no_grad()
def dsf_weights(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, *, progress: float,
                kappa: float = 10.0, margin_start: float = 0.1, margin_end: float = 0.0, schedule: str = "linear",
                threshold: float = 0.6, mode: str = "soft") -> DSFResult:
    """query, positive, negative: (Q, D) normalised embeddings of each triplet."""
    if not (query.shape == positive.shape == negative.shape) or query.dim() != 2:
        raise ValueError(f"dsf_weights: query/positive/negative must share shape (Q, D), got {tuple(query.shape)}, "
                         f"{tuple(positive.shape)}, {tuple(negative.shape)}")
    m = dsf_margin(progress, margin_start, margin_end, schedule)
    q, p, n = query.float(), positive.float(), negative.float()
    gap = (q * p).sum(-1) - (q * n).sum(-1)
    phi = torch.sigmoid(kappa * (gap - m))
    kept = phi >= threshold
    if mode == "soft":
        weight = torch.where(kept, torch.ones_like(phi), phi)
    elif mode == "hard":
        weight = kept.float()
    elif mode == "phi":
        weight = phi.clone()
    else:
        raise ValueError(f"dsf mode must be 'soft', 'hard' or 'phi', got {mode!r}")
    return DSFResult(weight=weight, phi=phi, kept=kept, margin=m)
