"""The public ops of moon_fast. Each takes ``backend=`` ("auto", "reference", "torch", "triton",
"cuda", "cuda_emu" or a peer library); see :mod:`moon_fast.backends` for how "auto" chooses."""

from moon_fast.ops.attention import flash_attention, flash_attn_func, flash_attn_varlen_func
from moon_fast.ops.contrastive import contrastive_loss, multi_contrastive_loss
from moon_fast.ops.moe import moe_mlp

__all__ = [
    "contrastive_loss",
    "multi_contrastive_loss",
    "moe_mlp",
    "flash_attention",
    "flash_attn_func",
    "flash_attn_varlen_func",
]
