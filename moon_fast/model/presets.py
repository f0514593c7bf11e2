"""Named backbone configurations with random weights (for CPU tests and the demo) and the map from a
transformers ``model_type`` to the backbone classes we support.

``tiny`` is a Qwen2-VL with a 128-wide, 2-layer language model and a 2-block vision tower: one
``compute_loss`` forward+backward on ~16 triplets runs well under a second on a laptop CPU, and the
vision geometry is the real one (14-pixel patches, temporal patch 2, 2x2 merge), so a 112x112 image
gives an 8x8 patch grid and 16 image tokens. ``tiny-qwen2.5`` is the same with the Qwen2.5-VL
architecture (windowed vision attention, RMSNorm/SwiGLU vision blocks).
"""

from __future__ import annotations

from moon_fast.data.batch import EOS_ID, IMAGE_PAD_ID, PAD_ID, VISION_END_ID, VISION_START_ID

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

_TINY_TEXT = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=4096,
    # head_dim 32 -> 16 rotary frequencies split over (temporal, height, width).
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    pad_token_id=PAD_ID,
    bos_token_id=EOS_ID,
    eos_token_id=EOS_ID,
    use_cache=False,
)
_TOKENS = dict(image_token_id=IMAGE_PAD_ID, video_token_id=IMAGE_PAD_ID,
               vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)


def backbone_classes(model_type: str):
    """(config class, model class) for a transformers model_type; raises for anything else."""
    if model_type == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLModel

        return Qwen2VLConfig, Qwen2VLModel
    if model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

        return Qwen2_5_VLConfig, Qwen2_5_VLModel
    raise ValueError(f"unsupported backbone model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                     "(a Qwen2-VL or Qwen2.5-VL checkpoint)")


def preset_backbone_config(name: str, overrides: dict | None = None):
    """The transformers config of a named preset. ``overrides``: {"text_config": {...},
    "vision_config": {...}, other top-level config fields} merged into the preset before the config
    is built (so derived fields such as layer_types follow)."""
    overrides = dict(overrides or {})
    text = {**_TINY_TEXT, **overrides.pop("text_config", {})}
    vision_over = overrides.pop("vision_config", {})
    top = {**_TOKENS, **overrides}
    if name == "tiny":
        from transformers import Qwen2VLConfig

        vision = dict(depth=2, embed_dim=64, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        return Qwen2VLConfig(text_config=text, vision_config={**vision, **vision_over}, **top)
    if name == "tiny-qwen2.5":
        from transformers import Qwen2_5_VLConfig

        # window_size 56 px = 4x4 patches per window on a 112-px image; block 1 attends globally.
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=56,
                      fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config={**vision, **vision_over}, **top)
    raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")


PRESETS = ("tiny", "tiny-qwen2.5")
