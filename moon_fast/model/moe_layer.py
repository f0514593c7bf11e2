"""ModalityMoE: the modality-driven Mixture-of-Experts FFN of MOON2.0 (issue 4, the layer).

Per token t with hidden h_t (T tokens, hidden H, Z routed experts, S shared experts, k = top_k):

    probs_t   = softmax(W_g h_t)                       (Z,)  float32; -inf outside the token's group
    idx_t     = top-k(probs_t);  G~_t = probs_t[idx_t] / sum(probs_t[idx_t])      renormalised
    out_t     = (1 - a) * sum_j G~_tj f_idx_tj(h_t) + (a / S) * sum_s f_{Z+s}(h_t)

``f_e`` is a SwiGLU expert; all Z + S experts live in one pair of 3-D tensors (transformers v5
layout: ``gate_up_proj`` (Z+S, 2I, H) gate rows first, ``down_proj`` (Z+S, H, I); shared experts are
the last S) and run as one ``moon_fast.ops.moe_mlp`` call. ``a`` is the shared experts' share; every
token's weights sum to one, so an MoE whose experts copy a dense MLP reproduces it exactly.

Restricted mode: each token belongs to a group (its sample's composition t / i / mm, or its own type
text / image token); the router may pick only that group's experts (plus the shared ones).

The layer also owns its slice of the MOON2.0 objective machinery:

* the dual-alignment matrix ``alignment`` = W* (Z, M); p = softmax(W*, dim=1) (per expert, over
  objectives); objective weights w_m = mean_{b in B_m} sum_z p[z, m] G~[b, z] where G~[b] is sample b's
  mean routing weight over its tokens (:meth:`sample_routing`, :meth:`objective_weights`);
* L_sparsity = (1/Z) sum_z entropy(p_z) (:meth:`sparsity_loss`);
* the Switch/Mixtral load-balancing loss (:meth:`load_balancing_loss`);
* routing statistics per token key (:meth:`routing_counts`).

Per-token metadata (sample, group) comes from a :class:`RoutingContext` that the model sets on the
layer before a forward (transformers' decoder-layer signatures stay untouched); the routing of the
last forward is kept in :attr:`last_routing` for the losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from moon_fast.model.param_call import ParamCall, log_softmax_rows
from moon_fast.ops import moe_mlp


@dataclass
class RoutingContext:
    """Per-token metadata for one packed forward (T tokens, n samples).

    token_sample: (T,) long, the sample of each token.
    num_samples:  n.
    token_group:  (T,) long index into the layer's group names (restricted mode), or None.
    token_keys:   {name: (T,) bool} token subsets for routing statistics (e.g. "t", "image_tokens").
    """

    token_sample: torch.Tensor
    num_samples: int
    token_group: torch.Tensor | None = None
    token_keys: dict[str, torch.Tensor] | None = None


@dataclass
class RoutingRecord:
    """What one forward routed. probs (T, Z) float32 router probabilities (after the group mask);
    topk_idx (T, k) long; topk_weight (T, k) float32 renormalised; token_group (T,) long or None."""

    probs: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    token_group: torch.Tensor | None = None


class ModalityMoE(nn.Module):
    """Drop-in replacement for a decoder layer's ``mlp``: (..., H) -> (..., H).

    Args:
        hidden_size, intermediate_size: H and I of every expert.
        num_experts: Z routed experts; top_k: k experts per token.
        num_shared_experts: S experts every token uses; shared_weight: their share a of the output
            (None: S / (k + S)).
        expert_groups: ordered {group name: expert ids} for the restricted mode, or None.
        num_objectives: M, columns of the dual-alignment matrix.
        backend: the moe_mlp backend ("auto", "reference", "torch", ...).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, *, num_experts: int = 4, top_k: int = 2,
                 num_shared_experts: int = 0, shared_weight: float | None = None,
                 expert_groups: dict[str, Sequence[int]] | None = None, num_objectives: int = 4,
                 backend: str = "auto", initializer_range: float = 0.02,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("top_k", top_k), ("num_shared_experts", num_shared_experts)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ModalityMoE: {name} must be an int, got {value!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if num_shared_experts < 0:
            raise ValueError(f"ModalityMoE: num_shared_experts must be >= 0, got {num_shared_experts}")
        if shared_weight is not None and not 0.0 <= shared_weight < 1.0:
            raise ValueError(f"ModalityMoE: shared_weight (the shared experts' share of the output) must be in "
                             f"[0, 1), got {shared_weight}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.num_shared_experts = num_experts, top_k, num_shared_experts
        if shared_weight is None:
            shared_weight = num_shared_experts / (top_k + num_shared_experts) if num_shared_experts else 0.0
        self.shared_weight = float(shared_weight)
        self.backend = backend
        self.initializer_range = initializer_range
        total = num_experts + num_shared_experts
        kw = {"dtype": dtype, "device": device}
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **kw)
        self.gate_up_proj = nn.Parameter(torch.empty(total, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(total, hidden_size, intermediate_size, **kw))
        # W*: zeros = every expert starts uniform over the objectives. Kept in float32 (tiny).
        self.alignment = nn.Parameter(torch.zeros(num_experts, num_objectives, dtype=torch.float32, device=device))
        # The loss reads W* after the forward: through a module call of its own (ZeRO-3, param_call.py).
        self.alignment_call = ParamCall(log_softmax_rows, self.alignment)
        self.group_names: tuple[str, ...] = tuple(expert_groups) if expert_groups else ()
        if expert_groups:
            mask = torch.zeros(len(expert_groups), num_experts, dtype=torch.bool)
            for g, ids in enumerate(expert_groups.values()):
                ids = list(ids)
                if len(set(ids)) < top_k or any(not 0 <= e < num_experts for e in ids):
                    raise ValueError(f"expert group {self.group_names[g]!r} = {ids}: needs >= top_k={top_k} "
                                     f"distinct expert ids in [0, {num_experts})")
                mask[g, ids] = True
            self.register_buffer("group_mask", mask.to(device), persistent=False)
        else:
            self.group_mask = None
        self.context: RoutingContext | None = None
        self.last_routing: RoutingRecord | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        std = self.initializer_range
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)
        nn.init.zeros_(self.alignment)

    @torch.no_grad()
    def upcycle_from(self, dense: nn.Module) -> ModalityMoE:
        """Every expert (routed and shared) copies a dense SwiGLU MLP with ``gate_proj`` (I, H),
        ``up_proj`` (I, H), ``down_proj`` (H, I) linear layers (transformers' Qwen2MLP)."""
        gate, up, down = dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight
        if gate.shape != (self.intermediate_size, self.hidden_size) or down.shape != (self.hidden_size, self.intermediate_size):
            raise ValueError(f"dense MLP shapes gate {tuple(gate.shape)} / down {tuple(down.shape)} do not match "
                             f"the MoE's (I={self.intermediate_size}, H={self.hidden_size})")
        self.gate_up_proj.copy_(torch.cat([gate, up], dim=0).unsqueeze(0).expand_as(self.gate_up_proj))
        self.down_proj.copy_(down.unsqueeze(0).expand_as(self.down_proj))
        return self

    @classmethod
    def from_dense(cls, dense: nn.Module, *, upcycle: bool = True, **kwargs) -> ModalityMoE:
        """A ModalityMoE shaped like ``dense`` (same dtype/device), its experts copied from it when
        ``upcycle`` (else random)."""
        w = dense.gate_proj.weight
        act = getattr(getattr(dense, "config", None), "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"ModalityMoE experts are SwiGLU (silu); the dense MLP uses hidden_act={act!r}")
        moe = cls(w.shape[1], w.shape[0], dtype=w.dtype, device=w.device, **kwargs)
        if upcycle:
            moe.upcycle_from(dense)
        return moe

    # ------------------------------------------------------------------ forward
    def route(self, x: torch.Tensor) -> RoutingRecord:
        """x (T, H) -> the routing of every token (float32 probabilities)."""
        logits = self.router(x).float()
        group = None
        if self.group_mask is not None:
            ctx = self.context
            if ctx is None or ctx.token_group is None:
                raise RuntimeError("ModalityMoE in restricted mode needs a RoutingContext with token_group "
                                   "(MoonModel sets it; when calling the layer directly set layer.context)")
            group = ctx.token_group
            if group.shape != (x.shape[0],):
                raise ValueError(f"context.token_group has shape {tuple(group.shape)}, expected ({x.shape[0]},)")
            logits = logits.masked_fill(~self.group_mask[group], float("-inf"))
        probs = logits.softmax(dim=-1)
        top_w, top_idx = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return RoutingRecord(probs=probs, topk_idx=top_idx, topk_weight=top_w, token_group=group)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        rec = self.route(x)
        self.last_routing = rec
        idx, w = rec.topk_idx, rec.topk_weight
        if self.num_shared_experts:
            t, s = x.shape[0], self.num_shared_experts
            shared_idx = torch.arange(self.num_experts, self.num_experts + s, device=x.device).expand(t, s)
            shared_w = torch.full((t, s), self.shared_weight / s, device=x.device, dtype=w.dtype)
            idx = torch.cat([idx, shared_idx], dim=1)
            w = torch.cat([w * (1.0 - self.shared_weight), shared_w], dim=1)
        # Under torch.autocast, moe_mlp itself runs in the autocast dtype (moon_fast.backends policy).
        out = moe_mlp(x, idx, w, self.gate_up_proj, self.down_proj, backend=self.backend)
        return out.reshape(shape)

    # ------------------------------------------------------------------ losses and objective weights
    def load_balancing_loss(self, record: RoutingRecord | None = None) -> torch.Tensor:
        """Switch/Mixtral auxiliary loss, normalised so that perfect balance gives 1:

            L_aux = E * sum_z f_z * P_z,  f_z = share of the T*k assignments that went to expert z,
                                          P_z = mean router probability of expert z

        (= transformers' ``load_balancing_loss_func`` / top_k). In the restricted mode it is computed
        within each group over that group's tokens and experts (E = the group's size) and averaged
        weighted by tokens. Gradient flows through P only (f is a count)."""
        rec = record if record is not None else self.last_routing
        if rec is None:
            raise RuntimeError("load_balancing_loss: no routing recorded (run a forward first)")
        t, z = rec.probs.shape
        if t == 0:
            return rec.probs.sum() * 0.0
        assign = torch.zeros(t, z, device=rec.probs.device).scatter_(1, rec.topk_idx, 1.0)
        if rec.token_group is None or self.group_mask is None:
            f = assign.mean(0) / self.top_k
            return z * (f * rec.probs.mean(0)).sum()
        n_groups = self.group_mask.shape[0]
        counts = torch.zeros(n_groups, device=assign.device).index_add_(0, rec.token_group, torch.ones(t, device=assign.device))
        a_sum = torch.zeros(n_groups, z, device=assign.device).index_add_(0, rec.token_group, assign)
        p_sum = torch.zeros(n_groups, z, device=assign.device).index_add_(0, rec.token_group, rec.probs)
        denom = counts.clamp(min=1.0)[:, None]
        f = a_sum / (denom * self.top_k)
        p = p_sum / denom
        size = self.group_mask.sum(1).float()
        per_group = size * (f * p * self.group_mask).sum(1)
        return (counts * per_group).sum() / t

    def objective_probs(self) -> torch.Tensor:
        """p = softmax(W*, dim=1): (Z, M), each expert's distribution over the objectives."""
        return self.alignment_call().exp()

    def sparsity_loss(self) -> torch.Tensor:
        """L_sparsity = (1/Z) sum_z entropy(p_z) (natural log)."""
        logp = self.alignment_call()
        return -(logp.exp() * logp).sum(1).mean()

    def sample_routing(self, record: RoutingRecord | None = None, token_sample: torch.Tensor | None = None,
                       num_samples: int | None = None) -> torch.Tensor:
        """G~ (n, Z) float32: each sample's mean (over its tokens) renormalised routing weight per
        routed expert; rows sum to one."""
        rec = record if record is not None else self.last_routing
        if token_sample is None:
            if self.context is None:
                raise RuntimeError("sample_routing needs token_sample (or a RoutingContext on the layer)")
            token_sample, num_samples = self.context.token_sample, self.context.num_samples
        t, z = rec.probs.shape
        dense = torch.zeros(t, z, device=rec.probs.device, dtype=torch.float32).scatter_(1, rec.topk_idx, rec.topk_weight)
        sums = torch.zeros(num_samples, z, device=dense.device).index_add_(0, token_sample, dense)
        counts = torch.zeros(num_samples, device=dense.device).index_add_(0, token_sample, torch.ones(t, device=dense.device))
        return sums / counts.clamp(min=1.0)[:, None]

    def objective_weights(self, sample_routing: torch.Tensor, members: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """w (M,) float32: w_m = (1/|B_m|) sum_{b in B_m} sum_z p[z, m] * G~[b, z].

        sample_routing: (n, Z) G~; members: per objective m, the sample rows B_m (long tensor), or
        None / empty for an objective absent from the batch (its weight is 0)."""
        p = self.objective_probs()
        if len(members) != p.shape[1]:
            raise ValueError(f"objective_weights: {len(members)} member sets for {p.shape[1]} objectives")
        scores = sample_routing.float() @ p  # (n, M)
        out = []
        for m, rows in enumerate(members):
            if rows is None or rows.numel() == 0:
                out.append(scores.new_zeros(()))
            else:
                out.append(scores[rows, m].mean())
        return torch.stack(out)

    @torch.no_grad()
    def routing_counts(self, record: RoutingRecord | None = None,
                       token_keys: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{key: (Z,) float32 number of top-k assignments to each routed expert from the tokens of that
        key} for logging (the model normalises them into load fractions)."""
        rec = record if record is not None else self.last_routing
        keys = token_keys if token_keys is not None else (self.context.token_keys if self.context else None) or {}
        t, z = rec.probs.shape
        assign = torch.zeros(t, z, device=rec.probs.device).scatter_(1, rec.topk_idx, 1.0)
        out = {"all": assign.sum(0)}
        for name, mask in keys.items():
            out[name] = assign[mask].sum(0)
        return out

    def extra_repr(self) -> str:
        groups = ""
        if self.group_names:
            ids = {n: self.group_mask[g].nonzero().flatten().tolist() for g, n in enumerate(self.group_names)}
            groups = f", groups={ids}"
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts}, "
                f"top_k={self.top_k}, shared={self.num_shared_experts} (weight {self.shared_weight:.3g}), "
                f"objectives={self.alignment.shape[1]}{groups}")
