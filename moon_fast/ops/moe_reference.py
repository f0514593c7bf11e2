"""The reference ``moe_mlp``: a per-expert loop in plain PyTorch (autograd does the backward).

Obviously correct and slow (it synchronises with the host to find each expert's tokens); it is the
oracle every other backend is tested against. Same semantics as transformers' eager
``Qwen2MoeExperts.forward``, except that the k contributions are summed in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_mlp_reference(hidden: torch.Tensor, expert_idx: torch.Tensor, expert_weight: torch.Tensor,
                      gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """hidden (T, H), expert_idx (T, k), expert_weight (T, k), gate_up_proj (E, 2I, H) gate rows
    first, down_proj (E, H, I) -> (T, H) = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t))."""
    num_experts, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for e in range(num_experts):
        token, choice = torch.where(expert_idx == e)
        if token.numel() == 0:
            continue
        x = hidden[token]
        gate_up = F.linear(x, gate_up_proj[e])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = F.linear(act, down_proj[e])
        y = y * expert_weight[token, choice].to(y.dtype)[:, None]
        out = out.index_add(0, token, y.float())
    return out.to(hidden.dtype)
