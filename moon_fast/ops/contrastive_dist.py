"""Collectives for ``gather=True``, with the gradients a single process would get.

Each rank scores its local rows against gathered columns and back-propagates only its own share of
the global loss; :class:`AllGatherGrad` then sums every rank's column gradients onto the rank that
owns the columns (no world-size factor: open_clip's reported bug was gathering with gradients while
every rank also computed every row). :class:`AllReduceGrad` gives a replicated scalar (the logit
scale) the sum of all ranks' partial gradients, i.e. the full gradient, on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AllGatherGrad(torch.autograd.Function):
    """(n, ...) on every rank -> (world * n, ...) concatenated in rank order; backward sums the
    gradients of all ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, ws = world()
        ctx.rank, ctx.n = rank, x.shape[0]
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty_like(grad[: ctx.n])
            dist.reduce_scatter_tensor(out, grad)
            return out
        # gloo has no reduce_scatter: all-reduce the whole gradient and keep our rows.
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].clone()


class AllReduceGrad(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_grad(x: torch.Tensor) -> torch.Tensor:
    return AllGatherGrad.apply(x)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    _, ws = world()
    out = [torch.empty_like(x) for _ in range(ws)]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, 0)


def all_reduce_nograd(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x


def check_same_sizes(sizes: list[int], names: list[str]) -> None:
    """Every rank must pass the same sizes (all_gather needs equal shapes); say which differ."""
    _, ws = world()
    t = torch.tensor(sizes, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    out = [torch.empty_like(t) for _ in range(ws)]
    dist.all_gather(out, t)
    table = torch.stack(out).cpu()
    for k, name in enumerate(names):
        col = table[:, k]
        if not bool((col == col[0]).all()):
            raise ValueError(
                f"contrastive_loss(gather=True): {name} differs across ranks ({col.tolist()}); every rank "
                "must pass the same local batch shape (pad the batch, or use weight=0 for padding rows)")
