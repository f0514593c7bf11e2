"""PyTorch backends of flash_attention: ``reference``, ``sdpa``, ``torch``, ``torch_varlen`` (PyTorch's own
varlen FlashAttention op) and the ``flash_attn`` peer.

Every function takes a validated :class:`moon_fast.ops.attention.AttnProblem` (dense q (B, Sq, Hq, D)
or packed q (total_q, Hq, D) with host ``seqlens_q/k``) and returns the output shaped like q.
Autograd differentiates through all of them (no custom backward here).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

# Rows of queries per SDPA call when a bottom-right causal mask must be materialised (Sq != Sk):
# the mask costs chunk x Sk booleans.
_MASK_CHUNK_ROWS = 1024


def causal_keep(sq: int, sk: int, device) -> torch.Tensor:
    """(sq, sk) bool: True where query i may see key j under bottom-right alignment (j <= i + sk - sq)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + (sk - sq)


# ----------------------------------------------------------------------------- reference

def attention_dense_reference(q, k, v, *, causal: bool, scale: float, upcast: bool = True) -> torch.Tensor:
    """Naive attention, q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D) in q's dtype.

    ``upcast=True``: fp32 scores, softmax and products (the oracle). ``upcast=False``: the same
    operations in the input dtype (PyTorch's own low-precision error, FlashAttention's test baseline).
    Rows that see no key give 0, as FlashAttention does.
    """
    out_dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    g = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)  # (B, Hq, Sq, D)
    kh = k.transpose(1, 2).repeat_interleave(g, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(g, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, Hq, Sq, Sk)
    sq, sk = s.shape[-2], s.shape[-1]
    if causal:
        keep = causal_keep(sq, sk, s.device)
        row_ok = keep.any(-1, keepdim=True)  # (Sq, 1)
        # Fully masked rows get finite scores (then zeroed) so that neither softmax nor its gradient is NaN.
        fill = torch.where(row_ok, float("-inf"), 0.0).to(s.dtype)
        s = torch.where(keep, s, fill)
        p = torch.softmax(s, dim=-1) * row_ok.to(s.dtype)
    else:
        p = torch.softmax(s, dim=-1)
    o = torch.matmul(p.to(vh.dtype), vh)
    return o.transpose(1, 2).to(out_dtype)


def _split_packed(p):
    """Per-sequence (1, S_i, H, D) views of packed q, k, v (torch.split: one cat in the backward)."""
    qs = p.q.split(p.seqlens_q)
    ks = p.k.split(p.seqlens_k)
    vs = p.v.split(p.seqlens_k)
    return qs, ks, vs


def attention_reference_backend(p) -> torch.Tensor:
    """fp32 softmax, S x S materialised per sequence."""
    if not p.packed:
        return attention_dense_reference(p.q, p.k, p.v, causal=p.causal, scale=p.scale)
    outs = []
    for qi, ki, vi in zip(*_split_packed(p)):
        if qi.shape[0] == 0:
            outs.append(qi)
        elif ki.shape[0] == 0:
            outs.append(qi * 0.0)
        else:
            outs.append(attention_dense_reference(qi[None], ki[None], vi[None], causal=p.causal, scale=p.scale)[0])
    return torch.cat(outs, dim=0)


# ----------------------------------------------------------------------------- sdpa (the peer, as users call it)

def _gqa_kwargs(hq: int, hk: int) -> dict:
    return {"enable_gqa": True} if hq != hk else {}


def attention_sdpa_backend(p) -> torch.Tensor:
    """torch SDPA. Dense: ``is_causal`` (or an explicit bottom-right mask when Sq != Sk).
    Packed: one sequence with a (total_q x total_k) block-diagonal mask, which is what SDPA needs for
    packed samples (this is the memory cost the other backends avoid)."""
    q, k, v = p.q, p.k, p.v
    hq, hk = q.shape[-2], k.shape[-2]
    if not p.packed:
        sq, sk = q.shape[1], k.shape[1]
        mask, is_causal = None, False
        if p.causal and sq == sk:
            is_causal = True
        elif p.causal:
            mask = causal_keep(sq, sk, q.device)
        row_ok = mask.any(-1) if mask is not None else None
        if row_ok is not None and not bool(row_ok.all()):
            mask = mask | ~row_ok[:, None]  # let dead rows see everything (finite), zero them below
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           is_causal=is_causal, scale=p.scale, **_gqa_kwargs(hq, hk)).transpose(1, 2)
        if row_ok is not None and not bool(row_ok.all()):
            o = o * row_ok[None, :, None, None].to(o.dtype)
        return o
    dev = q.device
    seg_q = torch.repeat_interleave(torch.arange(len(p.seqlens_q), device=dev),
                                    torch.tensor(p.seqlens_q, device=dev))
    seg_k = torch.repeat_interleave(torch.arange(len(p.seqlens_k), device=dev),
                                    torch.tensor(p.seqlens_k, device=dev))
    mask = seg_q[:, None] == seg_k[None, :]  # (total_q, total_k): the block-diagonal mask
    if p.causal:
        cu_q = p.cu_seqlens_q.to(dev, torch.long)
        cu_k = p.cu_seqlens_k.to(dev, torch.long)
        pos_q = torch.arange(q.shape[0], device=dev) - cu_q[seg_q]  # position inside its sequence
        pos_k = torch.arange(k.shape[0], device=dev) - cu_k[seg_k]
        len_q = (cu_q[1:] - cu_q[:-1])[seg_q]
        len_k = (cu_k[1:] - cu_k[:-1])[seg_q]
        mask = mask & (pos_k[None, :] <= (pos_q + len_k - len_q)[:, None])
    row_ok = mask.any(-1)
    mask = mask | ~row_ok[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, scale=p.scale, **_gqa_kwargs(hq, hk))[0].transpose(0, 1)
    return o * row_ok[:, None, None].to(o.dtype)


# ----------------------------------------------------------------------------- torch (portable, O(total) memory)

def _sdpa_dense(q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D) through SDPA's fused kernels, never
    materialising more than a (chunk x Sk) mask. Bottom-right causal:

    * Sq == Sk: SDPA's ``is_causal``.
    * Sq > Sk: the first Sq - Sk query rows see no key (output 0); the rest is square causal.
    * Sq < Sk: an explicit bottom-right mask, chunked over query rows.
    """
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if sk == 0 or sq == 0:
        return q * 0.0
    gqa = _gqa_kwargs(hq, hk)
    if gqa and q.dtype != torch.float32:
        # SDPA's CPU GQA backward sums the group's dk/dv in the input dtype: 2-3x the rounding error of
        # naive attention in fp16/bf16 (measured). Expanding K/V (one copy, the size of q) and letting
        # autograd sum the group in fp32 keeps the error at PyTorch's own level; speed is the same within noise.
        g = hq // hk
        k = k[:, :, :, None].expand(b, sk, hk, g, d).reshape(b, sk, hq, d)
        v = v[:, :, :, None].expand(b, sk, hk, g, d).reshape(b, sk, hq, d)
        gqa = {}

    def call(qq, kk, vv, **kw):
        return F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                              scale=scale, **gqa, **kw).transpose(1, 2)

    if not causal:
        return call(q, k, v)
    if sq == sk:
        return call(q, k, v, is_causal=True)
    if sq > sk:
        dead_rows, live_rows = q.split([sq - sk, sk], dim=1)
        return torch.cat([dead_rows * 0.0, call(live_rows, k, v, is_causal=True)], dim=1)
    outs = []
    for a, qc in zip(range(0, sq, _MASK_CHUNK_ROWS), q.split(_MASK_CHUNK_ROWS, dim=1)):
        e = a + qc.shape[1]
        kv_end = e + (sk - sq)  # keys beyond this are masked for every row of the chunk
        mask = causal_keep(e - a, kv_end, q.device)
        outs.append(call(qc, k[:, :kv_end], v[:, :kv_end], attn_mask=mask))
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


def attention_torch_backend(p) -> torch.Tensor:
    """SDPA per group of equal-length sequences; O(total) memory for packed batches.

    Sequences are cut with ``torch.split`` and grouped with ``torch.stack`` / ``unbind`` and joined with
    ``torch.cat``: their backward passes are one cat / stack / split each. (Slicing or index_select per
    sequence would make the backward fill a zero tensor of the whole batch per sequence: quadratic.)
    """
    if not p.packed:
        return _sdpa_dense(p.q, p.k, p.v, causal=p.causal, scale=p.scale)
    if len(p.seqlens_q) == 1:
        return _sdpa_dense(p.q[None], p.k[None], p.v[None], causal=p.causal, scale=p.scale)[0]
    qs, ks, vs = _split_packed(p)
    # Group sequences by (len_q, len_k): images of one size (the vision encoder) become one batched call.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (lq, lk) in enumerate(zip(p.seqlens_q, p.seqlens_k)):
        if lq > 0:
            groups.setdefault((lq, lk), []).append(i)
    outs: list[torch.Tensor] = list(qs)  # empty query sequences stay as their (0, H, D) pieces
    for ix in groups.values():
        if len(ix) == 1:
            i = ix[0]
            outs[i] = _sdpa_dense(qs[i][None], ks[i][None], vs[i][None], causal=p.causal, scale=p.scale)[0]
            continue
        o = _sdpa_dense(torch.stack([qs[i] for i in ix]), torch.stack([ks[i] for i in ix]),
                        torch.stack([vs[i] for i in ix]), causal=p.causal, scale=p.scale)
        for i, oi in zip(ix, o.unbind(0)):
            outs[i] = oi
    return torch.cat(outs, dim=0)


# ----------------------------------------------------------------------------- flash_attn peer

def attention_flash_attn_backend(p) -> torch.Tensor:
    """The FlashAttention 2 package (CUDA, fp16/bf16)."""
    import flash_attn

    if not p.packed:
        return flash_attn.flash_attn_func(p.q, p.k, p.v, softmax_scale=p.scale, causal=p.causal)
    return flash_attn.flash_attn_varlen_func(
        p.q, p.k, p.v, p.cu_seqlens_q.to(torch.int32), p.cu_seqlens_k.to(torch.int32), max(p.max_seqlen_q, 1),
        max(p.max_seqlen_k, 1), softmax_scale=p.scale, causal=p.causal)


# ----------------------------------------------------------------------------- PyTorch's varlen FlashAttention

@functools.cache
def _varlen_attn_parameters() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_unsupported(p) -> str | None:
    """Why ``torch.nn.attention.varlen.varlen_attn`` cannot take problem ``p``, or None."""
    if p.q.dtype not in (torch.float16, torch.bfloat16):
        return f"torch_varlen (FlashAttention 2 kernels) takes float16/bfloat16 only, got {p.q.dtype}"
    d = p.q.shape[-1]
    if d > 256 or d % 8:
        return f"torch_varlen takes head dims that are multiples of 8 up to 256, got {d}"
    params = _varlen_attn_parameters()
    if p.causal and not params & {"window_size", "is_causal"}:
        return "this torch's varlen_attn has no causal option"
    if "scale" not in params and abs(p.scale - d ** -0.5) > 1e-12 * d ** -0.5:
        return f"this torch's varlen_attn takes no softmax scale (needs 1/sqrt({d}), got {p.scale})"
    if p.groups > 1 and "enable_gqa" not in params:
        return "this torch's varlen_attn has no grouped-query attention (enable_gqa)"
    return None


def attention_torch_varlen_backend(p) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA): the FlashAttention 2 kernels that SDPA's
    flash path runs, over a packed batch in one call. A dense (B, S, H, D) batch is passed packed
    ((B * S, H, D) and cu_seqlens = S * arange(B + 1)). Causal is bottom-right aligned, as in FlashAttention:
    ``window_size=(-1, 0)``, or ``is_causal=True`` on torch 2.10, whose varlen_attn has no window."""
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = p.q, p.k, p.v
    if p.packed:
        cu_q, cu_k = p.cu_seqlens_q.to(torch.int32), p.cu_seqlens_k.to(torch.int32)
    else:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        steps = torch.arange(b + 1, device=q.device, dtype=torch.int32)
        cu_q, cu_k = steps * sq, steps * sk
        q, k, v = q.reshape(b * sq, *q.shape[2:]), k.reshape(b * sk, *k.shape[2:]), v.reshape(b * sk, *v.shape[2:])
    params = _varlen_attn_parameters()
    kw = {}
    if p.causal:  # bottom-right: a query row i of a sequence sees keys j <= i + len_k - len_q
        if "window_size" in params:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = p.scale
    if p.groups > 1:
        kw["enable_gqa"] = True
    out = varlen_attn(q, k, v, cu_q, cu_k, max(p.max_seqlen_q, 1), max(p.max_seqlen_k, 1), **kw)
    return out if p.packed else out.view(p.q.shape)
