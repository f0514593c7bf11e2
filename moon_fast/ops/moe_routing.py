"""Routing metadata of ``moe_mlp`` in plain PyTorch, on the device, without host synchronisation.

A routing of T tokens with k choices each has S = T * k *slots*; slot ``s = t * k + j`` is token t's
j-th choice. Every backend processes the slots in *expert-contiguous* order: all slots of expert 0
(in token order), then expert 1, ... The order is a stable sort of the flat expert ids, so it is
deterministic and equal to what ``csrc/moe.cu`` computes with a histogram, a scan and a stable scatter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Expert-contiguous order of the S = T * k slots of a (T, k) routing over E experts.

    perm (S,) int64: sorted position -> slot (t * k + j). token (S,) int64: sorted position -> token t.
    inv_perm (S,) int64: slot -> sorted position. offsets (E,) int32: cumulative ends of each
    expert's rows in sorted order (``offsets[-1] == S``; the layout ``grouped_mm`` takes).
    """

    perm: torch.Tensor
    token: torch.Tensor
    inv_perm: torch.Tensor
    offsets: torch.Tensor
    num_experts: int
    top_k: int
    _bounds: list[int] | None = None

    @property
    def num_slots(self) -> int:
        return self.perm.numel()

    def counts(self) -> torch.Tensor:
        """(E,) int64 number of slots per expert (on the device)."""
        ends = self.offsets.long()
        return torch.diff(ends, prepend=ends.new_zeros(1))

    def host_bounds(self) -> list[int]:
        """[0, end_0, ..., end_{E-1}] as Python ints. This synchronises with the device: only the
        per-expert-loop fallbacks use it (free on the CPU), never the grouped_mm fast path."""
        if self._bounds is None:
            self._bounds = [0, *self.offsets.tolist()]
        return self._bounds


def route(expert_idx: torch.Tensor, num_experts: int) -> Routing:
    """Expert-contiguous order of ``expert_idx`` (T, k). Asserts on the device that every id is in
    [0, num_experts) (asynchronous on a GPU: the error surfaces at the next synchronisation)."""
    top_k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    # ends[1 + e] = number of slots with id <= e: a binary search per expert, no histogram atomics and no
    # data-dependent output size (torch.bincount on CUDA reads the max back to the host). ends[0] = the
    # number of negative ids, for the range check.
    probes = torch.arange(-1, num_experts, device=flat.device, dtype=sorted_ids.dtype)
    ends = torch.searchsorted(sorted_ids, probes, right=True)
    if flat.numel():  # no id below 0 and none above E - 1; 3 small launches (a range check of its own took 5)
        torch._assert_async(ends[-1] - ends[0] == flat.numel(), expert_range_message(num_experts))
    offsets = ends[1:].to(torch.int32)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=perm.device)
    return Routing(perm=perm, token=torch.div(perm, top_k, rounding_mode="floor"), inv_perm=inv_perm,
                   offsets=offsets, num_experts=num_experts, top_k=top_k)


def expert_range_message(num_experts: int) -> str:
    return f"moe_mlp: expert_idx has values outside [0, {num_experts}) (E = {num_experts})"


def assert_all_routed(routing: Routing) -> None:
    """Asserts on the device that every slot found its expert. The triton and csrc routing kernels skip ids
    outside [0, E), so the last offset falls short of S exactly when some id is out of range. Two launches
    (a compare and an assert), asynchronous on a GPU: the error surfaces at the next synchronisation."""
    if routing.num_slots:
        torch._assert_async(routing.offsets[-1] == routing.num_slots, expert_range_message(routing.num_experts))
