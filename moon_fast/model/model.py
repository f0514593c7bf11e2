"""MoonModel: a Qwen2-VL / Qwen2.5-VL backbone turned into a MOON2.0 product-embedding model.

* ``encode(EncoderBatch) -> (n, D)``: one packed forward over samples of any composition (text only,
  image only, image+text; no padding), the embedding of each sample is the mean of the last hidden
  states over all its tokens (special tokens included: the paper's "all non-padding tokens"),
  optionally projected, L2-normalised, float32.
* ``compute_loss(TripletBatch, progress=, gather=) -> LossOutput``: one encode of the whole batch,
  inter-product alignment per query modality with DSF weights, intra-product alignment, objective
  weights w_m (learned from W* and the routing, or fixed), + rho * L_aux + varsigma * L_sparsity.
* ``save_pretrained(dir)`` / ``from_pretrained(dir)``: transformers format (``config.json`` +
  ``model.safetensors`` of the backbone, MoE weights included under their module names) plus
  ``moon_config.json`` (our config), ``moon_heads.safetensors`` (projection head, logit scales) and
  ``preprocessor_config.json`` (the image processor). A dense model's directory loads in plain
  transformers as ``Qwen2VLModel`` / ``Qwen2_5_VLModel``.
* ``from_preset(name)`` (random weights) and ``from_backbone_checkpoint(dir)`` (a local Qwen2(.5)-VL
  checkpoint; MoE experts upcycled from its dense FFNs; never downloads).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from moon_fast.data.batch import COMPOSITIONS, EncoderBatch, TripletBatch
from moon_fast.model import backbone as bb
from moon_fast.model.config import OBJECTIVES, MoonConfig, apply_overrides
from moon_fast.model.dsf import dsf_weights
from moon_fast.model.moe_layer import RoutingContext
from moon_fast.model.objectives import inter_product_losses, intra_product_loss, objective_members
from moon_fast.model.param_call import ParamCall, capped_float_exp
from moon_fast.model.presets import SUPPORTED_MODEL_TYPES, backbone_classes, preset_backbone_config

logger = logging.getLogger(__name__)

MOON_CONFIG_FILE = "moon_config.json"
WEIGHTS_FILE = "model.safetensors"
HEADS_FILE = "moon_heads.safetensors"


@dataclass
class LossOutput:
    """loss: scalar tensor to backpropagate. metrics: floats for logging (see compute_loss).
    embeddings: (n, D) the batch's embeddings (detached), for callers that want them."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None


class MoonModel(nn.Module):
    """Build with :meth:`from_preset`, :meth:`from_pretrained` or :meth:`from_backbone_checkpoint`.

    ``MoonModel(backbone, config, upcycle=...)`` wraps an existing transformers ``Qwen2VLModel`` /
    ``Qwen2_5_VLModel`` (not the ForConditionalGeneration head model)."""

    def __init__(self, backbone: nn.Module, config: MoonConfig | None = None, *, upcycle: bool = False):
        super().__init__()
        config = config if config is not None else MoonConfig()
        model_type = getattr(backbone.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES or not hasattr(backbone, "language_model"):
            raise TypeError(f"MoonModel wraps a transformers Qwen2VLModel / Qwen2_5_VLModel, got {type(backbone).__name__} "
                            f"(model_type {model_type!r}); for a ...ForConditionalGeneration pass its .model")
        config.backbone = backbone.config
        config.validate()
        self.moon_config = config
        self.backbone = backbone
        self.source_dir: str | None = None
        self._set_attn_implementation(config.backends.attn_implementation)
        self.moe_layer_ids: list[int] = []
        if config.moe.enabled:
            m = config.moe
            self.moe_layer_ids = bb.install_moe(
                backbone, layers=m.layers, upcycle=upcycle, num_objectives=len(OBJECTIVES), num_experts=m.num_experts,
                top_k=m.top_k, num_shared_experts=m.num_shared_experts, shared_weight=m.shared_weight(),
                expert_groups=m.resolved_groups(), backend=config.backends.moe)
        hidden = bb.text_config(backbone).hidden_size
        emb = config.embedding
        p = next(backbone.parameters())
        self.head = nn.Linear(hidden, emb.dim, bias=False, dtype=p.dtype, device=p.device) \
            if emb.head == "linear" else nn.Identity()
        lc = config.loss
        init = torch.tensor(math.log(lc.logit_scale_init), dtype=torch.float32, device=p.device)
        self.logit_scale_inter = nn.Parameter(init.clone(), requires_grad=lc.learnable_logit_scale)
        self.logit_scale_intra = nn.Parameter(init.clone(), requires_grad=lc.learnable_logit_scale)
        # The loss reads the scales outside any forward: through a module call (ZeRO-3, param_call.py).
        self.logit_scale_call = ParamCall(capped_float_exp, self.logit_scale_inter, self.logit_scale_intra)
        self._warned_fixed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str = "tiny", **overrides) -> MoonModel:
        """A randomly initialised model from a named preset (see moon_fast.model.presets).

        overrides: config sections as dicts (``moe={"enabled": False}``, ``loss={...}``,
        ``embedding={...}``, ``backends={...}``), dotted keys (``**{"loss.dsf": False}``), or
        ``backbone={"text_config": {...}, "vision_config": {...}}`` to change the preset's backbone."""
        bb_cfg = preset_backbone_config(name, overrides.pop("backbone", None))
        cfg = apply_overrides(MoonConfig(preset=name), overrides)
        _, model_cls = backbone_classes(bb_cfg.model_type)
        backbone = model_cls(bb_cfg)
        upcycle = bool(cfg.moe.upcycle) if cfg.moe.upcycle is not None else False
        return cls(backbone, cfg, upcycle=upcycle)

    @classmethod
    def from_backbone_checkpoint(cls, path: str, *, dtype: torch.dtype | str | None = None, **overrides) -> MoonModel:
        """A model from a local Qwen2-VL / Qwen2.5-VL checkpoint directory (transformers format,
        e.g. Qwen2.5-VL-3B-Instruct). MoE experts are upcycled from the dense FFNs unless
        ``moe={"upcycle": False}``. A directory saved by :meth:`save_pretrained` is loaded with
        :meth:`from_pretrained` instead. Never downloads."""
        model_type = _check_checkpoint_dir(path)
        if os.path.isfile(os.path.join(path, MOON_CONFIG_FILE)):
            return cls.from_pretrained(path, dtype=dtype, **overrides)
        cfg = apply_overrides(MoonConfig(), overrides)
        _, model_cls = backbone_classes(model_type)
        backbone = _load_backbone(model_cls, path, dtype)
        upcycle = True if cfg.moe.upcycle is None else bool(cfg.moe.upcycle)
        model = cls(backbone, cfg, upcycle=upcycle)
        model.source_dir = os.path.abspath(path)
        return model

    @classmethod
    def from_pretrained(cls, path: str, *, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, **overrides) -> MoonModel:
        """Loads a directory written by :meth:`save_pretrained`. ``overrides`` (e.g.
        ``backends={...}``) change the saved config; ``dtype`` defaults to the saved weights' dtype."""
        from safetensors.torch import load_file

        model_type = _check_checkpoint_dir(path)
        moon_cfg_path = os.path.join(path, MOON_CONFIG_FILE)
        if not os.path.isfile(moon_cfg_path):
            raise ValueError(f"{path} is a {model_type} checkpoint but not a MoonModel save (no {MOON_CONFIG_FILE}); "
                             "load a plain backbone checkpoint with MoonModel.from_backbone_checkpoint(path)")
        config_cls, model_cls = backbone_classes(model_type)
        with _unreadable(path, "config.json"):
            bb_cfg = config_cls.from_pretrained(path, local_files_only=True)
        with _unreadable(path, MOON_CONFIG_FILE):
            cfg = MoonConfig.load(moon_cfg_path, backbone=bb_cfg)
        apply_overrides(cfg, overrides)
        with _unreadable(path, WEIGHTS_FILE):
            state = _load_weights(path, load_file)
        with _unreadable(path, HEADS_FILE):
            heads = load_file(os.path.join(path, HEADS_FILE)) if os.path.isfile(os.path.join(path, HEADS_FILE)) else {}
        if dtype is None:
            dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with _skip_init(dtype):  # every parameter is overwritten below: skip random init, build in dtype
            backbone = model_cls(bb_cfg)
            model = cls(backbone, cfg, upcycle=False)
        model.to(dtype=dtype)
        with _unreadable(path, WEIGHTS_FILE, "do not match the shapes config.json describes"):
            missing, unexpected = model.backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the model described by its config "
                             f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
        own = {k for k in model.state_dict() if not k.startswith("backbone.")}
        if set(heads) != own:
            raise ValueError(f"{path}: {HEADS_FILE} holds {sorted(heads)} but the model expects {sorted(own)}")
        with _unreadable(path, HEADS_FILE, "do not match the shapes config.json describes"):
            model.load_state_dict(heads, strict=False)
        model.source_dir = os.path.abspath(path)
        if device is not None:
            model.to(device)
        return model

    def save_pretrained(self, path: str) -> None:
        """Writes config.json + model.safetensors (backbone, transformers names, MoE included),
        moon_config.json, moon_heads.safetensors and preprocessor_config.json into ``path``."""
        from safetensors.torch import save_file

        from moon_fast.model.processing import image_processor_for

        os.makedirs(path, exist_ok=True)
        bcfg = self.backbone.config
        bcfg.architectures = [type(self.backbone).__name__]
        bcfg.save_pretrained(path)
        state = {k: v.detach().contiguous().cpu() for k, v in self.backbone.state_dict().items()}
        save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
        heads = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("backbone.")}
        save_file(heads, os.path.join(path, HEADS_FILE), metadata={"format": "pt"})
        self.moon_config.save(os.path.join(path, MOON_CONFIG_FILE))
        image_processor_for(self).save_pretrained(path)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> MoonConfig:
        return self.moon_config

    @property
    def embedding_dim(self) -> int:
        e = self.moon_config.embedding
        return e.dim if e.head == "linear" else bb.text_config(self.backbone).hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def moe_layers(self):
        return bb.moe_layers(self.backbone)

    def logit_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inter, intra) = exp(parameter), the parameters clamped at log(loss.logit_scale_max) first (CLIP)."""
        return self.logit_scale_call(math.log(self.moon_config.loss.logit_scale_max))

    def _set_attn_implementation(self, name: str) -> None:
        if name == "moon_fast":
            from moon_fast.ops.attention_hf import register_attention

            register_attention()
        if hasattr(self.backbone, "set_attn_implementation"):
            self.backbone.set_attn_implementation(name)
        else:  # older transformers: set it on every (sub)config
            for cfg in (self.backbone.config, self.backbone.config.text_config, self.backbone.config.vision_config):
                cfg._attn_implementation = name
        from moon_fast.ops.attention_hf import pack_vision_attention

        pack_vision_attention(self.backbone, enabled=name == "moon_fast")  # one varlen call per vision layer

    @contextlib.contextmanager
    def _attention_backend(self):
        name = self.moon_config.backends.attention
        if self.moon_config.backends.attn_implementation != "moon_fast" or name == "auto":
            yield
            return
        from moon_fast.ops import attention_hf

        previous = attention_hf._backend
        attention_hf.set_attention_backend(name)
        try:
            yield
        finally:
            attention_hf.set_attention_backend(previous)

    # ------------------------------------------------------------------ forward
    def _routing_context(self, batch: EncoderBatch) -> RoutingContext:
        ids = batch.input_ids
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long().to(ids.device)
        n = lengths.numel()
        sample = torch.repeat_interleave(torch.arange(n, device=ids.device), lengths)
        comp = batch.composition.to(ids.device).long()[sample]
        is_img = ids == self.backbone.config.image_token_id
        keys = {name: comp == c for c, name in enumerate(COMPOSITIONS)}
        keys["text_tokens"], keys["image_tokens"] = ~is_img, is_img
        group = None
        m = self.moon_config.moe
        if m.restrict is not None:
            names = list(m.resolved_groups())
            if m.restrict == "composition":
                lut = torch.tensor([names.index(c) for c in COMPOSITIONS], device=ids.device)
                group = lut[comp]
            else:
                group = torch.where(is_img, names.index("image"), names.index("text")).long()
        return RoutingContext(token_sample=sample, num_samples=n, token_group=group, token_keys=keys)

    def hidden_states(self, batch: EncoderBatch) -> torch.Tensor:
        """Last hidden states (L, H) of the packed batch (after the final norm)."""
        if self.moon_config.validate_inputs:
            cfg = self.backbone.config
            tc = bb.text_config(self.backbone)
            special = tuple(int(x) for x in (tc.pad_token_id, tc.eos_token_id, tc.bos_token_id,
                                             cfg.vision_start_token_id, cfg.vision_end_token_id)
                            if isinstance(x, int))
            bb.validate_batch(batch, image_token_id=cfg.image_token_id, special_ids=special,
                              merge=bb.spatial_merge_size(self.backbone), vocab_size=tc.vocab_size)
        backends = self.moon_config.backends
        if backends.attn_implementation != bb.language_model(self.backbone).config._attn_implementation:
            self._set_attn_implementation(backends.attn_implementation)  # config edited after construction
        layers = self.moe_layers()
        if layers:
            ctx = self._routing_context(batch)
            for layer in layers:
                layer.context = ctx
                layer.backend = backends.moe
        pixel = batch.pixel_values
        if pixel is not None and pixel.dtype != self.dtype:
            batch = EncoderBatch(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, batch.composition,
                                 pixel.to(self.dtype), batch.image_grid_thw)
        with self._attention_backend():
            return bb.packed_hidden_states(self.backbone, batch)

    def encode(self, batch: EncoderBatch) -> torch.Tensor:
        """(n, D) float32 L2-normalised mean-pooled embeddings, one per sample of ``batch``."""
        emb = self._encode(batch)
        self._clear_routing()
        return emb

    def _clear_routing(self) -> None:
        """Drops the routing records of the last forward (they hold autograd graph: a model holding
        them could not be deep-copied, and they would keep the graph alive)."""
        for layer in self.moe_layers():
            layer.last_routing = None

    def _encode(self, batch: EncoderBatch) -> torch.Tensor:
        hidden = self.hidden_states(batch)
        pooled = bb.segment_mean(hidden, batch.cu_seqlens.to(hidden.device))
        if isinstance(self.head, nn.Linear):
            pooled = self.head(pooled.to(self.head.weight.dtype)).float()
        if self.moon_config.embedding.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled

    forward = encode

    # ------------------------------------------------------------------ objectives
    def objective_weights(self, batch: TripletBatch) -> tuple[torch.Tensor, bool]:
        """(w (M,) float32 over OBJECTIVES, learned?) for the routing of the last forward."""
        lc, layers = self.moon_config.loss, self.moe_layers()
        fixed = torch.tensor([float(lc.fixed_objective_weights.get(m, 1.0)) for m in OBJECTIVES], device=self.device)
        if not lc.learned_objective_weights:
            return fixed, False
        if not layers:
            if not self._warned_fixed:
                logger.warning("loss.learned_objective_weights needs the MoE (moe.enabled); using the fixed weights")
                self._warned_fixed = True
            return fixed, False
        members = objective_members(batch, OBJECTIVES)
        if self.moon_config.moe.routing_for_objective_weights == "last":
            layers = layers[-1:]
        ws = []
        for layer in layers:
            g = layer.sample_routing()
            if lc.detach_routing_in_objective_weights:
                g = g.detach()
            ws.append(layer.objective_weights(g, members))
        return torch.stack(ws).mean(0) * lc.objective_scale(), True

    def compute_loss(self, batch: TripletBatch, *, progress: float, gather: bool = False) -> LossOutput:
        """The MOON2.0 training loss of one batch.

        progress: step / total_steps in [0, 1] (drives the DSF margin). gather: negatives (and the
        intra texts) from every rank under torch.distributed; each objective is then this rank's
        mean over its local queries, with gradients such that DDP / DeepSpeed averaging over ranks
        gives the single-process gradient of the concatenated batch (moon_fast.model.objectives).

        metrics: ``loss/total``, ``loss/<objective>`` and ``weight/<objective>`` for the objectives
        present, ``moe/aux_loss``, ``moe/sparsity_loss``, ``moe/load/<key>/e<z>`` (share of the
        top-k assignments of the tokens of key t / i / mm / text_tokens / image_tokens that went to
        expert z, averaged over MoE layers), ``dsf/kept_frac``, ``dsf/mean_weight``,
        ``dsf/mean_phi``, ``dsf/margin`` (and ``dsf/kept_frac_corrupted`` / ``_clean`` when the
        batch marks corrupted triplets), ``logit_scale/inter``, ``logit_scale/intra``."""
        batch.check()
        if not (isinstance(progress, int | float) and 0.0 <= progress <= 1.0):
            raise ValueError(f"compute_loss: progress (step / total steps) must be a number in [0, 1], got {progress!r}")
        emb = self._encode(batch.encoder)
        try:
            # The objectives run in float32 (embeddings, logit scales, W*, routing statistics are
            # float32); autocast would mix dtypes inside the loss kernels for no speed gain.
            with torch.autocast(emb.device.type, enabled=False):
                return self._loss(batch, emb, progress=progress, gather=gather)
        finally:
            self._clear_routing()

    def _loss(self, batch: TripletBatch, emb: torch.Tensor, *, progress: float, gather: bool) -> LossOutput:
        cfg, lc = self.moon_config, self.moon_config.loss
        backend = cfg.backends.contrastive
        scale_inter, scale_intra = self.logit_scales()
        mt: dict[str, torch.Tensor] = {}
        plain: dict[str, float] = {}

        weight = None
        num_q = batch.query.numel()
        if lc.dsf and num_q:
            res = dsf_weights(emb[batch.query], emb[batch.positive], emb[batch.negative], progress=progress,
                              kappa=lc.dsf_kappa, margin_start=lc.dsf_margin_start, margin_end=lc.dsf_margin_end,
                              schedule=lc.dsf_schedule, threshold=lc.dsf_threshold, mode=lc.dsf_mode)
            weight = res.weight
            mt["dsf/kept_frac"] = res.kept.float().mean()
            mt["dsf/mean_weight"] = res.weight.mean()
            mt["dsf/mean_phi"] = res.phi.mean()
            plain["dsf/margin"] = res.margin
            if batch.corrupted is not None:
                bad = batch.corrupted.to(res.kept.device).bool()
                if bool(bad.any()):
                    mt["dsf/kept_frac_corrupted"] = res.kept[bad].float().mean()
                if bool((~bad).any()):
                    mt["dsf/kept_frac_clean"] = res.kept[~bad].float().mean()

        losses, _ = inter_product_losses(emb, batch, scale_inter.to(emb.dtype), weight=weight, gather=gather,
                                         backend=backend)
        if lc.intra:
            intra = intra_product_loss(emb, batch, scale_intra.to(emb.dtype), symmetric=lc.intra_symmetric,
                                       gather=gather, backend=backend)
            if intra is not None:
                losses["intra"] = intra
        if not losses:
            raise ValueError("compute_loss: the batch has no triplets and no intra-product pairs")

        w, learned = self.objective_weights(batch)
        total = emb.new_zeros(())
        for i, name in enumerate(OBJECTIVES):
            if name in losses:
                total = total + w[i] * losses[name]
                mt[f"loss/{name}"] = losses[name].detach()
                mt[f"weight/{name}"] = w[i].detach()
        plain["weight/learned"] = float(learned)

        layers = self.moe_layers()
        if layers:
            aux = torch.stack([layer.load_balancing_loss() for layer in layers]).mean()
            sparsity = torch.stack([layer.sparsity_loss() for layer in layers]).mean()
            total = total + lc.aux_coef * aux + lc.sparsity_coef * sparsity
            mt["moe/aux_loss"], mt["moe/sparsity_loss"] = aux.detach(), sparsity.detach()
            mt.update(self._load_metrics(layers))
        mt["loss/total"] = total.detach()
        mt["logit_scale/inter"], mt["logit_scale/intra"] = scale_inter.detach(), scale_intra.detach()
        names = list(mt)
        values = torch.stack([mt[k].float().reshape(()) for k in names]).tolist()  # one host sync
        metrics = dict(zip(names, values))
        metrics.update(plain)
        return LossOutput(loss=total, metrics=metrics, embeddings=emb.detach())

    def _load_metrics(self, layers) -> dict[str, torch.Tensor]:
        if self.moon_config.moe.routing_for_objective_weights == "last":
            layers = layers[-1:]
        totals: dict[str, torch.Tensor] = {}
        for layer in layers:
            for key, counts in layer.routing_counts().items():
                totals[key] = totals.get(key, 0) + counts
        out = {}
        for key, counts in totals.items():
            frac = counts / counts.sum().clamp(min=1.0)
            for z in range(frac.numel()):
                out[f"moe/load/{key}/e{z}"] = frac[z]
        return out

    # ------------------------------------------------------------------ accounting
    def num_parameters(self, only_trainable: bool = False, active: bool = False) -> int:
        """Parameter count; ``active`` counts, in each MoE layer, only the experts one token uses
        (top_k routed + shared) instead of all of them."""
        total = sum(_numel(p) for p in self.parameters() if p.requires_grad or not only_trainable)
        if active:
            for layer in self.moe_layers():
                total -= _expert_numel(layer) * (layer.num_experts - layer.top_k)
        return total

    def flops_per_token(self, seq_len: int = 64, image_token_fraction: float = 0.0) -> float:
        """Approximate training FLOPs (forward + backward) per language-model token, for MFU logging:

            6 * N_active (language model without the embedding table, MoE counted at top_k + shared
            experts; router included) + 6 * layers * seq_len * (heads * head_dim) (causal attention
            scores and values: 4*s*d forward, halved by causality, x3 for backward)
            + image_token_fraction * 6 * N_vision * merge^2 (each image token is merge^2 patches
            through the vision tower).

        seq_len: the typical sample length; image_token_fraction: share of tokens that are image
        tokens. Approximate: norms, softmax, rotary, vision attention and the loss are left out."""
        per_token, per_token_and_length, per_image_token = self.flop_terms()
        return per_token + per_token_and_length * seq_len + per_image_token * image_token_fraction

    def flop_terms(self) -> tuple[float, float, float]:
        """flops_per_token's three terms: (6 * N_active, 6 * layers * heads * head_dim, 6 * N_vision *
        merge^2), i.e. per token, per token and unit of its sequence's length, and per image token (the
        trainer counts a packed batch's FLOPs with them)."""
        lm = bb.language_model(self.backbone)
        n_lm = sum(_numel(p) for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
        for layer in self.moe_layers():
            n_lm -= _expert_numel(layer) * (layer.num_experts - layer.top_k)
        tc = bb.text_config(self.backbone)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        n_vis = sum(_numel(p) for p in self.backbone.visual.parameters())
        return (float(6 * n_lm), float(6 * tc.num_hidden_layers * tc.num_attention_heads * head_dim),
                float(6 * n_vis * bb.spatial_merge_size(self.backbone) ** 2))


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _skip_init(dtype: torch.dtype):
    """Builds modules without random initialisation and in ``dtype`` (loading a large checkpoint then
    costs no init time and no float32 copy). Falls back to plain construction on transformers
    versions without these helpers."""
    try:
        from transformers.initialization import no_init_weights
        from transformers.modeling_utils import local_torch_dtype
    except ImportError:
        yield
        return
    with no_init_weights(), local_torch_dtype(dtype):
        yield


def _numel(p: torch.Tensor) -> int:
    """Element count, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


def _expert_numel(layer) -> int:
    return (_numel(layer.gate_up_proj) + _numel(layer.down_proj)) // (layer.num_experts + layer.num_shared_experts)


def _load_backbone(model_cls, path: str, dtype):
    """The backbone (no LM head) of a transformers checkpoint. Weights the checkpoint lacks, or holds in
    another shape, are an error: transformers would initialise them at random and only log it. Its load
    report is silenced: it lists the checkpoint's ``lm_head``, which an embedding model has no use for."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backbone, info = model_cls.from_pretrained(path, dtype=dtype if dtype is not None else "auto",
                                                   local_files_only=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    missing, mismatched = sorted(info.get("missing_keys") or ()), sorted(info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise ValueError(f"{path}: the checkpoint does not hold the whole backbone its config.json describes "
                         f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, other shape "
                         f"{[m[0] if isinstance(m, tuple) else m for m in mismatched[:5]]}); transformers would "
                         "initialise those at random. Is a weight shard missing, or config.json from another model?")
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith("lm_head."))
    if unexpected:
        warnings.warn(f"{path}: ignoring {len(unexpected)} checkpoint weights the backbone does not use "
                      f"({unexpected[:5]}{'...' if len(unexpected) > 5 else ''})", stacklevel=3)
    return backbone


def _check_checkpoint_dir(path: str) -> str:
    """Returns the model_type of a Qwen2-VL / Qwen2.5-VL checkpoint dir; raises a clear error otherwise."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist (models are loaded from local "
                                "directories only; nothing is downloaded)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} is not a Qwen2-VL / Qwen2.5-VL checkpoint: it has no config.json")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} is not a JSON object (it holds a {type(raw).__name__})")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path} is not a Qwen2-VL / Qwen2.5-VL checkpoint: config.json has model_type {model_type!r} "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return model_type


@contextlib.contextmanager
def _unreadable(path: str, name: str, what: str = "cannot be read"):
    """Turns a library's error while reading checkpoint file ``name`` (a truncated safetensors header, a
    config that is not the JSON object it should be, tensors of the wrong shape) into a ValueError that
    names the file. Our own clear errors (ValueError, FileNotFoundError) pass through unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  safetensors, transformers, json and torch raise many types here
        if isinstance(e, (ValueError, FileNotFoundError)) and not isinstance(e, json.JSONDecodeError):
            raise
        raise ValueError(f"{os.path.join(path, name)} {what}: the checkpoint is corrupt or was written by an "
                         f"incompatible version ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e


def _load_weights(path: str, load_file) -> dict[str, torch.Tensor]:
    single = os.path.join(path, WEIGHTS_FILE)
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(path, WEIGHTS_FILE + ".index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for s in shards:
            state.update(load_file(os.path.join(path, s)))
        return state
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE} (or sharded index) found")
