"""MoonConfig: everything that defines a MOON2.0 model beyond the backbone's own transformers config.

The backbone (Qwen2-VL / Qwen2.5-VL) keeps its transformers config (``config.json`` when saved); this
module holds the rest: the modality-driven MoE, the objectives and their coefficients, the embedding
head and the op backends. Every value the paper leaves open has a default here with the reason.

Ablation flags named by the contract: ``moe.enabled``, ``loss.intra``, ``loss.dsf``,
``loss.learned_objective_weights``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

# The alignment objectives, in the column order of the dual-alignment matrix W* (Z x M, M = 4).
OBJECTIVES = ("inter_t", "inter_i", "inter_mm", "intra")


@dataclass
class MoEConfig:
    """The modality-driven Mixture-of-Experts that replaces decoder FFNs.

    enabled:             False = keep the dense MLPs (the "plain MLP" ablation).
    layers:              decoder layer indices whose FFN becomes a ModalityMoE; None = all (the paper
                         does not say which; all is the simplest reading of "replaces the FFN").
    num_experts:         Z routed experts. Default 4: the paper gives no number; 4 keeps the tiny demo
                         cheap. (The restricted modes need top_k experts per group or more: with
                         top_k=2, 6 for composition-restricted routing.)
    top_k:               experts per token (default 2, as Mixtral / the paper's "top-k").
    num_shared_experts:  experts every token always uses (default 0: the paper has none).
    shared_expert_weight: share of the output given to the shared experts (the routed experts get the
                         rest), so that all of a token's weights sum to one and upcycling is exact.
                         None = S / (top_k + S), every active expert an equal share at uniform routing.
    restrict:            None (learned router over all experts), "composition" (each sample's
                         composition t / i / mm may use only its own experts) or "token" (text tokens
                         and image tokens each only their own), always plus the shared experts.
    expert_groups:       for ``restrict``: {group name: [expert ids]}; group names t, i, mm
                         ("composition") or text, image ("token"). None = split the Z experts evenly
                         in that order. Each group needs at least top_k experts.
    upcycle:             initialise every expert from the dense MLP's weights (sparse upcycling).
                         None = automatic: yes when built from a pretrained checkpoint, no (independent
                         random experts) for a randomly initialised preset.
    routing_for_objective_weights: which MoE layers' routing G~ feeds the objective weights w_m and
                         the routing statistics: "mean" over MoE layers (default: every MoE layer has
                         its own W*, so each contributes) or "last".
    """

    enabled: bool = True
    layers: list[int] | None = None
    num_experts: int = 4
    top_k: int = 2
    num_shared_experts: int = 0
    shared_expert_weight: float | None = None
    restrict: str | None = None
    expert_groups: dict[str, list[int]] | None = None
    upcycle: bool | None = None
    routing_for_objective_weights: str = "mean"

    def group_names(self) -> tuple[str, ...]:
        if self.restrict == "composition":
            return ("t", "i", "mm")
        if self.restrict == "token":
            return ("text", "image")
        return ()

    def resolved_groups(self) -> dict[str, list[int]] | None:
        """{group: expert ids} for the restricted mode (None when unrestricted)."""
        names = self.group_names()
        if not names:
            return None
        if self.expert_groups is not None:
            return {k: list(v) for k, v in self.expert_groups.items()}
        n, z = len(names), self.num_experts
        bounds = [round(i * z / n) for i in range(n + 1)]
        return {name: list(range(bounds[i], bounds[i + 1])) for i, name in enumerate(names)}

    def validate(self) -> None:
        for name in ("num_experts", "top_k", "num_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"moe.{name} must be an integer, got {value!r}")
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.top_k == 1 and self.num_experts > 1:
            warnings.warn("moe.top_k=1: the renormalised routing weight of the one chosen expert is always 1, so "
                          "the training loss gives the router no gradient; it learns from the load-balancing "
                          "loss (loss.aux_coef) alone. Use top_k >= 2 for a router the objectives train.",
                          stacklevel=2)
        if self.num_shared_experts < 0:
            raise ValueError(f"moe.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_weight is not None and not 0.0 <= self.shared_expert_weight < 1.0:
            raise ValueError(f"moe.shared_expert_weight must be in [0, 1), got {self.shared_expert_weight}")
        if self.restrict not in (None, "composition", "token"):
            raise ValueError(f"moe.restrict must be None, 'composition' or 'token', got {self.restrict!r}")
        if self.routing_for_objective_weights not in ("mean", "last"):
            raise ValueError("moe.routing_for_objective_weights must be 'mean' or 'last', "
                             f"got {self.routing_for_objective_weights!r}")
        groups = self.resolved_groups()
        if groups is not None:
            names = self.group_names()
            if set(groups) != set(names):
                raise ValueError(f"moe.expert_groups for restrict={self.restrict!r} must name exactly the groups "
                                 f"{list(names)}, got {sorted(groups)}")
            for name, ids in groups.items():
                bad = [e for e in ids if not 0 <= e < self.num_experts]
                if bad:
                    raise ValueError(f"moe.expert_groups[{name!r}] has expert ids {bad} outside [0, {self.num_experts})")
                if len(set(ids)) < self.top_k:
                    raise ValueError(
                        f"moe.expert_groups[{name!r}] has {len(set(ids))} experts but top_k={self.top_k}: in the "
                        f"restricted mode every group needs at least top_k experts. Raise moe.num_experts "
                        f"(e.g. {self.top_k * len(names)}), lower moe.top_k, or set moe.expert_groups.")

    def shared_weight(self) -> float:
        if self.num_shared_experts == 0:
            return 0.0
        if self.shared_expert_weight is not None:
            return float(self.shared_expert_weight)
        return self.num_shared_experts / (self.top_k + self.num_shared_experts)


@dataclass
class LossConfig:
    """The objectives and their coefficients.

    L = sum_m w_m L_m + aux_coef * L_aux + sparsity_coef * L_sparsity, m over OBJECTIVES.

    intra:               include intra-product image-text alignment (ablation flag).
    intra_symmetric:     image->text and text->image (CLIP-style) averaged. Default True: the paper does
                         not say; the symmetric form is the CLIP standard and trains both towers.
    dsf:                 Dynamic Sample Filtering (ablation flag); parameters dsf_*.
    learned_objective_weights: w_m from the dual-alignment matrix W* and the routing (ablation flag);
                         False (or MoE disabled) = ``fixed_objective_weights``.
    fixed_objective_weights: {objective: weight}; default 1 each (a plain sum, the paper's
                         L_inter + L_intra with equal query modalities).
    objective_weight_scale: learned w_m are multiplied by this. None = M (the number of objectives), so
                         that at initialisation (W* = 0, p uniform) every w_m = 1 and the loss starts at
                         the same scale as the fixed-weight baseline. (The paper's w_m sum to 1 per sample.
                         AdamW's steps do not depend on the loss's scale, but a quarter of it would
                         quadruple the weight of L_aux and L_sparsity against the objectives.)
    detach_routing_in_objective_weights: the objective weights take G~ without gradient, so the
                         weighting trains W* but does not pull the router towards the easiest objective
                         (the router is trained by the expert outputs and L_aux). Default True.
    aux_coef:            rho, load-balancing loss coefficient. Default 0.01 (Switch Transformer's value).
    sparsity_coef:       varsigma, entropy of p_z. Default 0.01 ("small" in the paper).
    logit_scale_init:    1 / temperature at start, 1/0.07 as CLIP; learnable when learnable_logit_scale;
                         clamped at logit_scale_max = 100 (CLIP). Inter and intra have separate scales
                         (the paper has separate eps and eps2).
    dsf_kappa:           phi = sigmoid(kappa * (s(q,p) - s(q,n) - m)). Default 10: similarities are in
                         [-1, 1] and typical positive/negative gaps 0.05..0.5, so kappa=10 maps a gap of
                         0.1 above the margin to phi ~ 0.73.
    dsf_margin_start, dsf_margin_end, dsf_schedule: m decays from start to end over training progress
                         ("linear" or "cosine"). Defaults 0.1 -> 0.0 linear. A triplet keeps full weight
                         when phi >= dsf_threshold, i.e. a gap above m + ln(t / (1 - t)) / kappa (0.041
                         at t = 0.6, kappa = 10): 0.141 early in training, 0.041 at the end.
    dsf_threshold:       0.6 (paper).
    dsf_mode:            what happens below the threshold: "soft" (weight = phi; default: the paper says
                         "down-weighted", not dropped, and a randomly initialised model sees no clear
                         triplets early, so hard dropping would stop learning), "hard" (weight 0), or
                         "phi" (weight = phi for every triplet). At or above the threshold the weight is 1
                         (soft/hard). Weights are detached and the loss is divided by the number of
                         queries, not by the sum of weights, so down-weighting really reduces a triplet's
                         share.
    """

    intra: bool = True
    intra_symmetric: bool = True
    dsf: bool = True
    learned_objective_weights: bool = True
    fixed_objective_weights: dict[str, float] = field(default_factory=lambda: {m: 1.0 for m in OBJECTIVES})
    objective_weight_scale: float | None = None
    detach_routing_in_objective_weights: bool = True
    aux_coef: float = 0.01
    sparsity_coef: float = 0.01
    learnable_logit_scale: bool = True
    logit_scale_init: float = 1.0 / 0.07
    logit_scale_max: float = 100.0
    dsf_kappa: float = 10.0
    dsf_margin_start: float = 0.1
    dsf_margin_end: float = 0.0
    dsf_schedule: str = "linear"
    dsf_threshold: float = 0.6
    dsf_mode: str = "soft"

    def validate(self) -> None:
        unknown = set(self.fixed_objective_weights) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"loss.fixed_objective_weights has unknown objectives {sorted(unknown)}; "
                             f"known: {list(OBJECTIVES)}")
        if self.dsf_mode not in ("soft", "hard", "phi"):
            raise ValueError(f"loss.dsf_mode must be 'soft', 'hard' or 'phi', got {self.dsf_mode!r}")
        if self.dsf_schedule not in ("linear", "cosine"):
            raise ValueError(f"loss.dsf_schedule must be 'linear' or 'cosine', got {self.dsf_schedule!r}")
        if not 0.0 < self.dsf_threshold < 1.0:
            raise ValueError(f"loss.dsf_threshold must be in (0, 1), got {self.dsf_threshold}")
        if self.logit_scale_init <= 0 or self.logit_scale_max <= 0:
            raise ValueError("loss.logit_scale_init and loss.logit_scale_max must be > 0")

    def objective_scale(self) -> float:
        return float(len(OBJECTIVES) if self.objective_weight_scale is None else self.objective_weight_scale)


@dataclass
class EmbeddingConfig:
    """head: "none" (default; the paper's embedding is the mean-pooled last hidden state) or "linear"
    (a projection to ``dim``). normalize: L2-normalise (always on in the paper)."""

    head: str = "none"
    dim: int | None = None
    normalize: bool = True

    def validate(self) -> None:
        if self.head not in ("none", "linear"):
            raise ValueError(f"embedding.head must be 'none' or 'linear', got {self.head!r}")
        if self.head == "linear" and (self.dim is None or self.dim < 1):
            raise ValueError("embedding.head='linear' needs embedding.dim >= 1")


@dataclass
class BackendConfig:
    """Op backends (see moon_fast.backends): "auto", "reference", "torch", "triton", "cuda", ...

    attn_implementation: the transformers attention implementation of the backbone: "moon_fast" (our
    flash_attention via moon_fast.ops.attention_hf; the language model runs varlen by sample),
    or transformers' "sdpa" / "eager" (the packed batch then uses a block-diagonal causal mask).
    attention: the flash_attention backend used under "moon_fast" ("auto" = its own choice).
    """

    moe: str = "auto"
    attention: str = "auto"
    contrastive: str = "auto"
    attn_implementation: str = "moon_fast"

    def validate(self) -> None:
        """Each op backend named must be one its op knows (whether it runs here is decided per call), so a
        typo fails when the config is loaded, not at the first forward pass."""
        from moon_fast.ops import attention, contrastive, moe

        attention._import_backends()
        for field_name, registry in (("moe", moe.BACKENDS), ("attention", attention.BACKENDS),
                                     ("contrastive", contrastive.BACKENDS)):
            name = getattr(self, field_name)
            if name != "auto" and name not in registry.backends:
                raise ValueError(f"backends.{field_name} {name!r} is not a {registry.op} backend; known: auto, "
                                 f"{', '.join(registry.backends)}")


@dataclass
class MoonConfig:
    """backbone: the transformers config (Qwen2VLConfig / Qwen2_5_VLConfig) or its dict.
    preset: the preset name this config came from, if any (informational)."""

    backbone: Any = None
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    backends: BackendConfig = field(default_factory=BackendConfig)
    preset: str | None = None
    validate_inputs: bool = True

    def validate(self) -> None:
        self.moe.validate()
        self.loss.validate()
        self.embedding.validate()
        self.backends.validate()
        if self.backbone is not None and self.moe.enabled and self.moe.layers is not None:
            n = _num_layers(self.backbone)
            bad = [i for i in self.moe.layers if not -n <= i < n]
            if bad:
                raise ValueError(f"moe.layers {bad} out of range for a backbone with {n} decoder layers")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self, *, include_backbone: bool = False) -> dict:
        out = {
            "moe": dataclasses.asdict(self.moe),
            "loss": dataclasses.asdict(self.loss),
            "embedding": dataclasses.asdict(self.embedding),
            "backends": dataclasses.asdict(self.backends),
            "preset": self.preset,
            "validate_inputs": self.validate_inputs,
        }
        if include_backbone and self.backbone is not None:
            bb = self.backbone
            out["backbone"] = bb.to_dict() if hasattr(bb, "to_dict") else copy.deepcopy(bb)
        return out

    @classmethod
    def from_dict(cls, d: dict, backbone: Any = None) -> MoonConfig:
        d = dict(d)
        cfg = cls(backbone=backbone if backbone is not None else d.pop("backbone", None))
        d.pop("backbone", None)
        apply_overrides(cfg, d)
        return cfg

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str, backbone: Any = None) -> MoonConfig:
        with open(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a JSON object (it holds a {type(raw).__name__})")
        return cls.from_dict(raw, backbone=backbone)


_SECTIONS = {"moe": MoEConfig, "loss": LossConfig, "embedding": EmbeddingConfig, "backends": BackendConfig}


def apply_overrides(cfg: MoonConfig, overrides: dict) -> MoonConfig:
    """Applies overrides in place: sections as dicts or dataclasses (``moe={"enabled": False}``),
    dotted keys (``{"loss.dsf": False}``) or top-level fields. Unknown names raise."""
    for key, value in overrides.items():
        if "." in key:
            section, name = key.split(".", 1)
            apply_overrides(cfg, {section: {name: value}})
            continue
        if key in _SECTIONS:
            target = getattr(cfg, key)
            if isinstance(value, _SECTIONS[key]):
                setattr(cfg, key, copy.deepcopy(value))
                continue
            if not isinstance(value, dict):
                raise TypeError(f"override {key!r} must be a dict or {_SECTIONS[key].__name__}, got {type(value).__name__}")
            known = {f.name for f in dataclasses.fields(target)}
            for name, v in value.items():
                if name not in known:
                    raise ValueError(f"unknown option {key}.{name}; known: {sorted(known)}")
                setattr(target, name, copy.deepcopy(v))
        elif key in ("preset", "validate_inputs", "backbone"):
            setattr(cfg, key, value)
        else:
            raise ValueError(f"unknown MoonConfig option {key!r}; sections: {sorted(_SECTIONS)}, or dotted keys "
                             "such as 'moe.enabled'")
    return cfg


def _num_layers(backbone: Any) -> int:
    text = backbone.get("text_config") if isinstance(backbone, dict) else getattr(backbone, "text_config", None)
    if isinstance(text, dict):
        return int(text["num_hidden_layers"])
    return int(text.num_hidden_layers)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    with open(path) as f:
        return json.load(f)
