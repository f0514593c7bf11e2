"""Running a Qwen2-VL / Qwen2.5-VL backbone on a packed batch (no padding between samples).

transformers' ``Qwen2VLModel.forward`` expects a padded (B, S) batch; we drive its parts ourselves:

1. token embeddings for the whole packed stream (1, L);
2. the vision tower on all images at once (it packs images by ``cu_seqlens`` itself), its merged
   features scattered into the ``<|image_pad|>`` positions;
3. M-RoPE position ids computed per sample (:func:`packed_mrope_positions`, vectorised; identical to
   transformers' ``get_rope_index`` applied to each sample alone: text positions restart at 0 in
   every sample, an image advances the position by max(h, w) / merge);
4. the language model with ``position_ids`` (4, 1, L): row 0 the 1-D text positions (they tell
   transformers where samples start), rows 1-3 the M-RoPE ids. Under ``attn_implementation="moon_fast"``
   attention is varlen by sample through FlashAttentionKwargs (``cu_seq_lens_q/k``, ``max_length_q/k``)
   and no mask is built; under "sdpa" / "eager" transformers builds a block-diagonal causal mask
   from the restarting text positions (the reference path).

Also: replacing decoder FFNs by ModalityMoE layers, and input validation with clear errors.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moon_fast.data.batch import COMPOSITIONS, IMAGE, MULTIMODAL, TEXT, EncoderBatch
from moon_fast.model.moe_layer import ModalityMoE


def language_model(backbone: nn.Module) -> nn.Module:
    return backbone.language_model


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    return backbone.language_model.layers


def text_config(backbone: nn.Module):
    return backbone.config.text_config


def spatial_merge_size(backbone: nn.Module) -> int:
    return int(backbone.config.vision_config.spatial_merge_size)


# ----------------------------------------------------------------------------- validation

def validate_batch(batch: EncoderBatch, *, image_token_id: int, special_ids: tuple[int, ...],
                   merge: int, vocab_size: int) -> None:
    """Raises ValueError naming the argument and the fix for malformed packed batches."""
    ids, cu = batch.input_ids, batch.cu_seqlens
    if ids.dim() != 1:
        raise ValueError(f"EncoderBatch.input_ids must be 1-D (all samples concatenated), got shape {tuple(ids.shape)}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"EncoderBatch.cu_seqlens must be 1-D with n_samples + 1 >= 2 entries, got shape {tuple(cu.shape)} "
                         "(an empty batch cannot be encoded)")
    n = cu.numel() - 1
    if batch.composition.shape != (n,):
        raise ValueError(f"EncoderBatch.composition must have shape ({n},) (one per sample), got {tuple(batch.composition.shape)}")
    cu_h = cu.tolist()
    if cu_h[0] != 0 or cu_h[-1] != ids.numel() or any(b < a for a, b in zip(cu_h, cu_h[1:])):
        raise ValueError(f"EncoderBatch.cu_seqlens must start at 0, be non-decreasing and end at len(input_ids)="
                         f"{ids.numel()}, got {cu_h[:4]}...{cu_h[-2:]}")
    lengths = [b - a for a, b in zip(cu_h, cu_h[1:])]
    if batch.max_seqlen < max(lengths):
        raise ValueError(f"EncoderBatch.max_seqlen={batch.max_seqlen} is below the longest sample ({max(lengths)})")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"EncoderBatch.input_ids has ids outside [0, vocab_size={vocab_size}): "
                         f"min {int(ids.min())}, max {int(ids.max())} (tokenizer and model do not match?)")
    sample = torch.repeat_interleave(torch.arange(n, device=ids.device), torch.as_tensor(lengths, device=ids.device))
    is_img = ids == image_token_id
    is_special = torch.zeros_like(is_img)
    for s in special_ids:
        is_special |= ids == s
    n_img = torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, sample, is_img.long())
    n_text = torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, sample, (~is_img & ~is_special).long())
    comp = batch.composition.tolist()
    n_img_h, n_text_h = n_img.tolist(), n_text.tolist()
    for j in range(n):
        if n_img_h[j] == 0 and n_text_h[j] == 0:
            raise ValueError(f"sample {j} of the batch has neither image nor text (length {lengths[j]}, only special "
                             "tokens): every sample needs text tokens or an image")
        c = comp[j]
        if c not in (TEXT, IMAGE, MULTIMODAL):
            raise ValueError(f"EncoderBatch.composition[{j}] = {c}; expected 0 (t), 1 (i) or 2 (mm)")
        if c == TEXT and n_img_h[j]:
            raise ValueError(f"sample {j} has composition 't' (text only) but contains {n_img_h[j]} image tokens")
        if c in (IMAGE, MULTIMODAL) and not n_img_h[j]:
            raise ValueError(f"sample {j} has composition {COMPOSITIONS[c]!r} but contains no image tokens")
    total_img = sum(n_img_h)
    if total_img and batch.pixel_values is None:
        raise ValueError(f"EncoderBatch.input_ids contain {total_img} image tokens but pixel_values is None: pass the "
                         "image patches (pixel_values) and image_grid_thw from the image processor")
    if total_img and batch.image_grid_thw is None:
        raise ValueError("EncoderBatch.image_grid_thw is None but the batch has image tokens")
    if batch.pixel_values is not None:
        if batch.image_grid_thw is None:
            raise ValueError("EncoderBatch.pixel_values is set but image_grid_thw is None")
        grid = batch.image_grid_thw
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"EncoderBatch.image_grid_thw must have shape (n_images, 3), got {tuple(grid.shape)}")
        n_patches = int(grid.prod(-1).sum())
        if batch.pixel_values.shape[0] != n_patches:
            raise ValueError(f"EncoderBatch.pixel_values has {batch.pixel_values.shape[0]} patch rows but image_grid_thw "
                             f"describes {n_patches}")
        expected_tokens = n_patches // (merge * merge)
        if expected_tokens != total_img:
            raise ValueError(f"EncoderBatch: image_grid_thw gives {expected_tokens} image tokens (patches / merge^2) but "
                             f"input_ids contain {total_img} <|image_pad|> tokens")
        if not torch.isfinite(batch.pixel_values).all():
            raise ValueError("EncoderBatch.pixel_values contains NaN or inf")


# ----------------------------------------------------------------------------- positions

def packed_mrope_positions(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, image_grid_thw: torch.Tensor | None,
                           *, image_token_id: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions for a packed stream, as transformers' ``get_rope_index`` gives for each sample alone.

    input_ids (L,), cu_seqlens (n+1,), image_grid_thw (n_images, 3) in stream order.
    Returns (text_positions (L,) long, restarting at 0 per sample; mrope (3, L) long).

    Within a sample: a text token's position is the running position; an image block of grid
    (t, h, w) -> (t, h/merge, w/merge) tokens gets (start + ti, start + hi, start + wi) and advances
    the running position by max(h, w) / merge.
    """
    device = input_ids.device
    L = input_ids.numel()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    starts = cu_seqlens[:-1].long()[sample]
    arange = torch.arange(L, device=device)
    text_pos = arange - starts
    is_img = input_ids == image_token_id
    if not bool(is_img.any()):
        return text_pos, text_pos.unsqueeze(0).expand(3, -1).clone()
    if image_grid_thw is None:
        raise ValueError("input_ids contain image tokens but image_grid_thw is None")
    # An image block starts at an image token whose predecessor is not an image token of the same sample.
    prev_img = torch.cat([is_img.new_zeros(1), is_img[:-1]])
    block_start = is_img & ~(prev_img & (text_pos > 0))
    start_idx = torch.nonzero(block_start).flatten()
    grid = image_grid_thw.to(device).long()
    if start_idx.numel() != grid.shape[0]:
        raise ValueError(f"input_ids hold {start_idx.numel()} separate image-token runs but image_grid_thw has "
                         f"{grid.shape[0]} images (each image's <|image_pad|> tokens must be contiguous, images separated)")
    gt, gh, gw = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge
    tokens_per_image = gt * gh * gw
    block = torch.cumsum(block_start.long(), 0) - 1  # image index of each token (valid on image tokens)
    block_c = block.clamp(min=0)
    offset_in_block = arange - start_idx[block_c]
    bad = is_img & (offset_in_block >= tokens_per_image[block_c])
    if bool(bad.any()) or int(is_img.sum()) != int(tokens_per_image.sum()):
        raise ValueError("the <|image_pad|> runs in input_ids do not match image_grid_thw (t * h * w / merge^2 tokens "
                         "per image)")
    # Running position increments: 1 per text token; an image block advances max(h, w)/merge at its start.
    inc = (~is_img).long()
    inc = inc.masked_scatter(block_start, torch.maximum(gh, gw))
    excl = torch.cumsum(inc, 0) - inc
    sample_base = excl[cu_seqlens[:-1].long().clamp(max=max(L - 1, 0))][sample]
    running = excl - sample_base  # exclusive running position within the sample
    base = running[start_idx][block_c]
    hw = (gh * gw)[block_c]
    ti = offset_in_block // hw
    hi = (offset_in_block // gw[block_c]) % gh[block_c]
    wi = offset_in_block % gw[block_c]
    pos = torch.stack([running, running, running])
    img_pos = torch.stack([base + ti, base + hi, base + wi])
    pos = torch.where(is_img.unsqueeze(0), img_pos, pos)
    return text_pos, pos


# ----------------------------------------------------------------------------- forward

def packed_hidden_states(backbone: nn.Module, batch: EncoderBatch) -> torch.Tensor:
    """Last hidden states (L, H) of the packed batch (after the final norm)."""
    cfg = backbone.config
    ids = batch.input_ids
    embed = backbone.get_input_embeddings()
    inputs_embeds = embed(ids)
    if batch.pixel_values is not None:
        image_embeds = _image_embeds(backbone, batch.pixel_values, batch.image_grid_thw).to(inputs_embeds.dtype)
        mask = (ids == cfg.image_token_id).unsqueeze(-1)
        inputs_embeds = inputs_embeds.masked_scatter(mask, image_embeds)
    text_pos, mrope = packed_mrope_positions(ids, batch.cu_seqlens, batch.image_grid_thw,
                                             image_token_id=cfg.image_token_id, merge=spatial_merge_size(backbone))
    position_ids = torch.cat([text_pos.unsqueeze(0), mrope], dim=0).unsqueeze(1)  # (4, 1, L)
    lm = language_model(backbone)
    kwargs = {}
    if lm.config._attn_implementation == "moon_fast" or "flash" in str(lm.config._attn_implementation):
        cu = batch.cu_seqlens.to(device=ids.device, dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(batch.max_seqlen),
                      max_length_k=int(batch.max_seqlen))
        # Varlen attention carries the sample boundaries; a dict skips transformers' mask creation.
        layer_types = getattr(lm.config, "layer_types", None) or ["full_attention"]
        kwargs["attention_mask"] = {t: None for t in set(layer_types) | {"full_attention"}}
    out = lm(inputs_embeds=inputs_embeds.unsqueeze(0), position_ids=position_ids, use_cache=False, **kwargs)
    return out.last_hidden_state[0]


def _image_embeds(backbone: nn.Module, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(n_image_tokens, H) merged vision features in stream order. transformers versions differ in what
    ``get_image_features`` returns (a ModelOutput with pooler_output, a tuple of per-image tensors, or
    one tensor); all are accepted."""
    out = backbone.get_image_features(pixel_values, grid)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, torch.Tensor):
        return feats
    return torch.cat(list(feats), dim=0)


def segment_mean(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """hidden (L, H), cu_seqlens (n+1,) -> (n, H) float32 mean over each sample's tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n = lengths.numel()
    sample = torch.repeat_interleave(torch.arange(n, device=hidden.device), lengths.to(hidden.device))
    sums = torch.zeros(n, hidden.shape[-1], device=hidden.device, dtype=torch.float32)
    sums = sums.index_add(0, sample, hidden.float())
    return sums / lengths.to(hidden.device).clamp(min=1).unsqueeze(1).float()


# ----------------------------------------------------------------------------- MoE installation

def install_moe(backbone: nn.Module, *, layers: list[int] | None, upcycle: bool, num_objectives: int,
                **moe_kwargs) -> list[int]:
    """Replaces ``mlp`` of the chosen decoder layers by ModalityMoE (experts upcycled from the dense
    MLP when ``upcycle``). Returns the layer indices (normalised, sorted)."""
    dec = decoder_layers(backbone)
    n = len(dec)
    chosen = sorted({i % n for i in (range(n) if layers is None else layers)})
    init_range = getattr(text_config(backbone), "initializer_range", 0.02)
    for i in chosen:
        dense = dec[i].mlp
        if isinstance(dense, ModalityMoE):
            continue
        dec[i].mlp = ModalityMoE.from_dense(dense, upcycle=upcycle, num_objectives=num_objectives,
                                            initializer_range=init_range, **moe_kwargs)
    return chosen


def moe_layers(backbone: nn.Module) -> list[ModalityMoE]:
    return [layer.mlp for layer in decoder_layers(backbone) if isinstance(layer.mlp, ModalityMoE)]
