"""The image processor that matches a model: transformers' Qwen2VLImageProcessor.

For a model built from a checkpoint directory that has a ``preprocessor_config.json`` (a real
Qwen2(.5)-VL checkpoint, or a model saved by ``MoonModel.save_pretrained``) that file is loaded, so
resizing and normalisation are the checkpoint's own. Otherwise the processor is built from the vision
config (patch size, temporal patch size, merge size) with a pixel budget suited to the small
synthetic images: min 56*56, max 112*112 pixels, so a 112x112 image stays 112x112 (an 8x8 patch grid,
16 image tokens after the 2x2 merge) and larger images are scaled down to about that area.
"""

from __future__ import annotations

import os

# Pixel budget for presets (synthetic 112x112 images). Real checkpoints bring their own.
PRESET_MIN_PIXELS = 56 * 56
PRESET_MAX_PIXELS = 112 * 112


def _vision_config(obj):
    from moon_fast.model.config import MoonConfig

    if isinstance(obj, MoonConfig):
        obj = obj.backbone
    elif hasattr(obj, "moon_config"):
        obj = obj.moon_config.backbone
    if isinstance(obj, dict):
        vc = obj.get("vision_config", {})
        return vc if isinstance(vc, dict) else vc.to_dict()
    vc = getattr(obj, "vision_config", None)
    if vc is None:
        raise TypeError(f"image_processor_for: expected a MoonModel, MoonConfig or Qwen-VL config, got {type(obj).__name__}")
    return vc.to_dict()


def image_processor_for(model_or_config, *, min_pixels: int | None = None, max_pixels: int | None = None):
    """A ``transformers.Qwen2VLImageProcessor`` for a MoonModel / MoonConfig / backbone config."""
    from transformers import Qwen2VLImageProcessor

    source = getattr(model_or_config, "source_dir", None)
    if source and os.path.isfile(os.path.join(source, "preprocessor_config.json")) and min_pixels is None \
            and max_pixels is None:
        return Qwen2VLImageProcessor.from_pretrained(source)
    vc = _vision_config(model_or_config)
    patch = vc.get("patch_size", 14)
    temporal = vc.get("temporal_patch_size", 2)
    merge = vc.get("spatial_merge_size", 2)
    return Qwen2VLImageProcessor(
        patch_size=patch,
        temporal_patch_size=temporal,
        merge_size=merge,
        min_pixels=min_pixels if min_pixels is not None else PRESET_MIN_PIXELS,
        max_pixels=max_pixels if max_pixels is not None else PRESET_MAX_PIXELS,
    )
