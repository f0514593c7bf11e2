"""Benchmark cases of ``contrastive_loss`` (forward + backward) against its peers, for ``moon-fast bench``.

The workload is CLIP's symmetric loss (default targets, no groups) of B unit-norm queries against B
keys, D=512, learnable logit scale (1/0.07): the one case every peer computes the same way.

Backends: ours (``reference``, ``torch``, ``triton``, ``cuda``) through ``contrastive_loss``; the peer
``open_clip`` (``open_clip.loss.ClipLoss()``: materialised logits, 2 x cross-entropy); and
``matmuls``: the three matrix products the loss cannot avoid (S = Q K^T, dQ = G K, dK = G^T Q) on a
materialised B x B matrix of the same dtype, the floor every backend is judged against (the GPU
target: Triton within 1.6x of it at B=65536). It is timed, not a loss; its memory is B^2.

Note on ``fwd`` timings: with inputs that need gradients, the ``torch`` backend's row-only forward
already computes the gradients (its backward only scales them); the symmetric loss used here is not
that case (its forward is one pass, its backward one more), but compare ``fwd+bwd`` across backends.
FLOPs: :func:`moon_fast.bench.flops.contrastive_flops` (2 B^2 D forward, 4 B^2 D backward).
"""

from __future__ import annotations

import torch

from moon_fast.bench.flops import contrastive_bytes, contrastive_flops
from moon_fast.bench.harness import Case, Workload

OP = "contrastive"
BUILDER = "moon_fast.bench.contrastive:build"
OURS = ("reference", "torch", "triton", "cuda")
PEERS = ("open_clip", "matmuls")
DIM = 512


def cases(quick: bool) -> list[Case]:
    """CPU: fp32, B in {4096, 16384, 32768} (quick: {256, 1024}). GPU (when one is visible): bf16 and
    fp32 up to B=65536. Larger batches (the largest each backend runs): benchmarks/contrastive_memory.py."""
    gpu = torch.cuda.is_available()
    if quick:
        sizes, dtypes = (256, 1024), ("fp32",)
    elif gpu:
        sizes, dtypes = (4096, 16384, 32768, 65536), ("bf16", "fp32")
    else:
        sizes, dtypes = (4096, 16384, 32768), ("fp32",)
    out = []
    for dtype in dtypes:
        for b in sizes:
            for backend in OURS + PEERS:
                out.append(Case(OP, backend, dtype, {"B": b, "D": DIM}, BUILDER, label=f"D={DIM} B={b}"))
    return out


def make_inputs(b: int, d: int, dtype: torch.dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    k = torch.nn.functional.normalize(q + 0.5 * torch.randn(b, d, generator=gen), dim=1)  # correlated pairs
    return q.to(device, dtype), k.to(device, dtype)


def build(*, backend: str, dtype: torch.dtype, device: torch.device, B: int, D: int = DIM) -> Workload:
    q, k = make_inputs(B, D, dtype, device)
    fl_f, fl_b = contrastive_flops(B, B, D)
    by_f, by_b = contrastive_bytes(B, B, D, q.element_size())

    if backend == "matmuls":
        g = torch.empty(B, B, dtype=dtype, device=device)

        def forward():
            return torch.mm(q, k.T, out=g)

        def backward(s):
            s @ k, s.T @ q  # noqa: B018  dQ, dK

        return Workload(forward, backward, fl_f, fl_b, by_f, by_b)

    q.requires_grad_()
    k.requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    leaves = (q, k, scale)
    if backend == "open_clip":
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()

        def forward():
            return loss_fn(q, k, scale)
    else:
        from moon_fast.ops import contrastive_loss

        def forward():
            return contrastive_loss(q, k, scale, symmetric=True, backend=backend)

    def backward(loss):
        torch.autograd.grad(loss, leaves)

    return Workload(forward, backward, fl_f, fl_b, by_f, by_b)
