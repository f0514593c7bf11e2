"""moon_fast attention as a transformers attention implementation (``attn_implementation="moon_fast"``).

``register_attention()`` registers two things under the name ``"moon_fast"`` (idempotent):

* the attention function with ``transformers.AttentionInterface``;
* a mask function with ``transformers.masking_utils.AttentionMaskInterface`` (FlashAttention 2's
  semantics: a 2-D padding mask, or None when nothing is padded). Without it transformers skips mask creation for a
  custom implementation, and padded batches would silently attend to padding.

What the attention function handles (q arrives (B, H, S, D) from transformers; it returns (B, S, H, D)):

* Qwen2-VL / Qwen2.5-VL vision encoder: transformers splits the packed images by ``cu_seqlens`` and
  calls us once per image, because it passes ``cu_seqlens`` only to implementations whose name contains
  "flash" (and such a name makes it import the flash-attn package). :func:`pack_vision_attention`
  replaces the vision attention's forward of one model (Liger-Kernel style) with one varlen call per
  layer over all images (or all windows, Qwen2.5-VL).
* language model, causal: dense; packed samples through FlashAttentionKwargs ``cu_seq_lens_q/k`` and
  ``max_length_q/k``, or ``position_ids`` that restart (batch 1, as transformers' FA2 path infers them);
  padded batches through the 2-D padding mask (unpadded to varlen: padding is never attended, padded
  query rows give 0); any other mask (a prepared 4-D mask) falls back to masked SDPA.

The backend is ``set_attention_backend(name)`` if called, else ``auto`` (which honours
``MOON_FAST_FLASH_ATTENTION_BACKEND``).
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

from moon_fast.ops.attention import flash_attention

NAME = "moon_fast"
_backend: str | None = None


def set_attention_backend(name: str | None) -> None:
    """Backend of flash_attention used by the transformers integration (None = ``auto``)."""
    global _backend
    _backend = name


def get_attention_backend() -> str:
    return _backend or "auto"


def _cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _cu_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(1, S) positions -> cu_seqlens where a new sample starts wherever positions do not go up by 1;
    None when the positions describe one sequence."""
    pos = position_ids.reshape(-1)
    if pos.numel() <= 1:
        return None
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    end = torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)
    return torch.cat([torch.zeros(1, dtype=torch.int32, device=pos.device), starts.to(torch.int32), end])


def _masked_sdpa(q, k, v, mask, scaling, is_causal):
    """Fallback for masks flash attention cannot express: q/k/v (B, H, S, D), mask bool or additive."""
    hq, hk = q.shape[1], k.shape[1]
    kw = {"enable_gqa": True} if hq != hk else {}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                         is_causal=bool(is_causal and mask is None), **kw)
    return out.transpose(1, 2).contiguous()


def moon_fast_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                sliding_window: int | None = None, softcap: float | None = None,
                                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, Hq, D), None)."""
    if dropout and dropout > 0.0:
        raise NotImplementedError(f"moon_fast attention: attention dropout {dropout} is not supported; set "
                                  "config.attention_dropout=0")
    if softcap:
        raise NotImplementedError("moon_fast attention: logit softcapping is not supported")
    if sliding_window is not None:
        raise NotImplementedError("moon_fast attention: sliding-window attention is not supported")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("moon_fast attention: attention sinks (s_aux) are not supported")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    backend = get_attention_backend()
    b, _, sq, _ = query.shape
    sk = key.shape[2]
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if b != 1:
            raise ValueError(f"moon_fast attention: packed inputs (cu_seq_lens_q/k) need batch size 1, got {b}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("moon_fast attention: packed inputs with a 4-D attention mask are ambiguous")
        out = flash_attention(q[0], k[0], v[0], causal=is_causal, softmax_scale=scaling, cu_seqlens_q=cu_q,
                              cu_seqlens_k=cu_k if cu_k is not None else cu_q, max_seqlen_q=kwargs.get("max_length_q"),
                              max_seqlen_k=kwargs.get("max_length_k"), backend=backend)
        return out[None], None

    if attention_mask is not None:
        if attention_mask.dim() == 2:
            return _unpadded(q, k, v, attention_mask, is_causal, scaling, backend), None
        # A prepared 4-D mask (custom masks, other mask interfaces): exact masked SDPA.
        return _masked_sdpa(query, key, value, attention_mask, scaling, is_causal), None

    position_ids = kwargs.get("position_ids")
    if is_causal and position_ids is not None and b == 1 and sq == sk and sq > 1:
        cu = _cu_from_position_ids(position_ids)
        if cu is not None:
            out = flash_attention(q[0], k[0], v[0], causal=True, softmax_scale=scaling, cu_seqlens_q=cu,
                                  cu_seqlens_k=cu, backend=backend)
            return out[None], None

    return flash_attention(q, k, v, causal=is_causal, softmax_scale=scaling, backend=backend).contiguous(), None


def _unpadded(q, k, v, mask2d, is_causal, scaling, backend) -> torch.Tensor:
    """Padding mask (B, Sk) bool (True = token): gather the real tokens into a packed batch, attend,
    scatter back; padded query rows get 0. Query rows use the last Sq mask columns (KV-cache decode)."""
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    mask_k = mask2d[:, -sk:].bool()
    mask_q = mask2d[:, -sq:].bool()
    idx_q = torch.nonzero(mask_q.reshape(-1)).flatten()
    idx_k = torch.nonzero(mask_k.reshape(-1)).flatten()
    cu_q = _cu_from_lengths(mask_q.sum(1))
    cu_k = _cu_from_lengths(mask_k.sum(1))
    qp = q.reshape(b * sq, hq, d).index_select(0, idx_q)
    kp = k.reshape(b * sk, k.shape[2], d).index_select(0, idx_k)
    vp = v.reshape(b * sk, v.shape[2], d).index_select(0, idx_k)
    out = flash_attention(qp, kp, vp, causal=is_causal, softmax_scale=scaling, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          backend=backend)
    full = out.new_zeros(b * sq, hq, d).index_copy(0, idx_q, out)
    return full.view(b, sq, hq, d)


def padding_mask_for_moon_fast(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                               kv_offset: int = 0, mask_function=None, attention_mask: torch.Tensor | None = None,
                               **kwargs) -> torch.Tensor | None:
    """transformers mask function (FlashAttention 2's semantics): the (B, kv_length) padding mask, or None
    when nothing is padded. Causality and packing are applied by the attention function itself; extra
    mask functions (``or_mask_function``/``and_mask_function`` of other models) are not representable,
    as with FlashAttention 2: Qwen2-VL uses none."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register_attention() -> str:
    """Registers ``"moon_fast"`` with transformers' attention and mask interfaces (idempotent); returns
    the name, for ``attn_implementation=...`` or ``model.set_attn_implementation(...)``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, moon_fast_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask_for_moon_fast)
    return NAME


def _packed_vision_attention_forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                                     max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL vision attention over packed patches: hidden_states (total, dim),
    cu_seqlens (n_images + 1,) or the window boundaries -> (total, dim). The same qkv, rotary embedding
    (the model module's own ``apply_rotary_pos_emb_vision``) and projection as transformers' forward, with
    one varlen flash_attention call instead of one call per image."""
    total = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(total, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = flash_attention(q, k, v, causal=False, softmax_scale=self.scaling, cu_seqlens_q=cu_seqlens,
                          cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
                          backend=get_attention_backend())  # (total, heads, head_dim)
    return self.proj(out.reshape(total, -1))


def _is_vision_attention(module: torch.nn.Module) -> bool:
    """transformers' Qwen2-VL ``VisionAttention`` / Qwen2.5-VL ``Qwen2_5_VLVisionAttention`` (the
    attributes and the module-level rotary function the packed forward relies on)."""
    return (type(module).__name__ in ("VisionAttention", "Qwen2_5_VLVisionAttention")
            and all(hasattr(module, a) for a in ("qkv", "proj", "num_heads", "scaling"))
            and hasattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb_vision"))


def pack_vision_attention(model: torch.nn.Module, enabled: bool = True) -> int:
    """Makes every Qwen2-VL / Qwen2.5-VL vision attention of ``model`` attend over all its images in
    one varlen ``flash_attention`` call (``enabled=False`` restores transformers' forward). Only for
    the "moon_fast" implementation: the patched forward ignores ``config._attn_implementation``.
    Returns how many modules were changed."""
    n = 0
    for module in model.modules():
        if not _is_vision_attention(module):
            continue
        if enabled:
            module.forward = types.MethodType(_packed_vision_attention_forward, module)
            n += 1
        elif "forward" in vars(module):
            del module.forward  # back to the class's forward
            n += 1
    return n
