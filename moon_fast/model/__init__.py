"""The MOON2.0 model: a Qwen2-VL / Qwen2.5-VL backbone with a modality-driven MoE, trained with
dual-level alignment and Dynamic Sample Filtering (issue 6; ModalityMoE layer from issue 4)."""

from moon_fast.model.config import (
    OBJECTIVES,
    BackendConfig,
    EmbeddingConfig,
    LossConfig,
    MoEConfig,
    MoonConfig,
)
from moon_fast.model.dsf import dsf_margin, dsf_weights
from moon_fast.model.model import LossOutput, MoonModel
from moon_fast.model.moe_layer import ModalityMoE, RoutingContext, RoutingRecord
from moon_fast.model.presets import PRESETS
from moon_fast.model.processing import image_processor_for

__all__ = [
    "OBJECTIVES",
    "PRESETS",
    "BackendConfig",
    "EmbeddingConfig",
    "LossConfig",
    "LossOutput",
    "MoEConfig",
    "ModalityMoE",
    "MoonConfig",
    "MoonModel",
    "RoutingContext",
    "RoutingRecord",
    "dsf_margin",
    "dsf_weights",
    "image_processor_for",
]
