"""Benchmark cases of flash_attention (op name ``attention``).

* dense: FlashAttention's benchmark shape: a fixed token budget split into ``batch = tokens // seqlen``
  sequences, ``heads = hidden // head_dim``; seqlens 512..8192, head dims 64 / 80 / 128, non-causal, plus
  causal at head dim 128 (16384 tokens x 2048 wide on a GPU; 8192 x 1024 on a CPU; ``quick``: 4096 x
  1024 at 512 and 1024 only), and (not ``quick``) one causal grouped-query case at head dim 128, S=2048,
  4 query heads per K/V head (a decoder's layout). Backends ``reference`` (materialised fp32 softmax), ``sdpa``, ``torch``,
  ``triton`` (not timed on the CPU: interpreter), ``torch_varlen`` (PyTorch's varlen FlashAttention op, CUDA
  only) and ``flash_attn`` (peer, when installed).
* varlen: a packed batch of sequences of random lengths 1..max_len (the vision encoder's images, packed
  text samples), GQA 4:1. Ours (``torch``, ``triton``, ``torch_varlen``, ``flash_attn``) take cu_seqlens; peers
  ``sdpa`` (one packed sequence with a block-diagonal mask: total x total) and ``sdpa_padded``
  (pad to the longest + key-padding mask: what a padded batch costs). Its point is memory: O(total)
  for ours, O(total^2) or padded for the peers.

FLOPs (moon_fast/bench/flops.py): 4 * pairs * heads * head_dim forward, 2.5x for backward, pairs counted
on real tokens only (causal: the visible half), so padded or masked peers are charged for their waste.
"""

from __future__ import annotations

import torch

from moon_fast.bench import flops
from moon_fast.bench.harness import Case, Workload

OP = "attention"
BACKENDS = ("reference", "sdpa", "torch", "triton", "torch_varlen", "flash_attn")
VARLEN_BACKENDS = ("reference", "sdpa", "sdpa_padded", "torch", "triton", "torch_varlen", "flash_attn")


def _grad_like(t: torch.Tensor) -> torch.Tensor:
    return torch.randn(t.shape, device=t.device, dtype=t.dtype)


def build_dense(*, backend: str, dtype: torch.dtype, device: torch.device, batch: int, seqlen: int, heads: int,
                kv_heads: int, head_dim: int, causal: bool) -> Workload:
    """q (batch, seqlen, heads, head_dim), k/v (batch, seqlen, kv_heads, head_dim)."""
    from moon_fast.ops import flash_attention

    q = torch.randn(batch, seqlen, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seqlen, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    flash_attention(q[:, :1], k[:, :1], v[:, :1], backend=backend)  # raises BackendUnavailable early
    grad = _grad_like(q)
    f_fwd, f_bwd = flops.attention_flops([seqlen] * batch, heads, head_dim, causal=causal)
    b_fwd, b_bwd = flops.attention_bytes(batch * seqlen, batch * seqlen, heads, kv_heads, head_dim, q.element_size())
    return Workload(
        forward=lambda: flash_attention(q, k, v, causal=causal, backend=backend),
        backward=lambda out: out.backward(grad),
        flops_fwd=f_fwd, flops_bwd=f_bwd, bytes_fwd=b_fwd, bytes_bwd=b_bwd,
    )


def varlen_lengths(n_seqs: int, max_len: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, max_len + 1, (n_seqs,), generator=g).tolist()


def build_varlen(*, backend: str, dtype: torch.dtype, device: torch.device, n_seqs: int, max_len: int, heads: int,
                 kv_heads: int, head_dim: int, causal: bool) -> Workload:
    """Packed q (total, heads, head_dim), k/v (total, kv_heads, head_dim), lengths 1..max_len."""
    from moon_fast.ops import flash_attention

    lens = varlen_lengths(n_seqs, max_len)
    total = sum(lens)
    cu = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    q = torch.randn(total, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    grad = _grad_like(q)
    f_fwd, f_bwd = flops.attention_flops(lens, heads, head_dim, causal=causal)
    b_fwd, b_bwd = flops.attention_bytes(total, total, heads, kv_heads, head_dim, q.element_size())
    if backend == "sdpa_padded":
        forward = _padded_sdpa(q, k, v, lens, causal)
    else:
        flash_attention(q[:1], k[:1], v[:1], cu_seqlens_q=cu[:2].clamp(max=1), backend=backend)  # availability
        mx = max(lens)

        def forward():
            return flash_attention(q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                                   max_seqlen_k=mx, backend=backend)
    return Workload(forward=forward, backward=lambda out: out.backward(grad),
                    flops_fwd=f_fwd, flops_bwd=f_bwd, bytes_fwd=b_fwd, bytes_bwd=b_bwd)


def _padded_sdpa(q, k, v, lens, causal):
    """The padded-batch peer: (n, max_len) with a key-padding (and causal) mask, SDPA, unpad."""
    import torch.nn.functional as F

    n, mx, dev = len(lens), max(lens), q.device
    valid = torch.arange(mx, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]  # (n, mx)
    idx = torch.nonzero(valid.reshape(-1)).flatten()
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(mx, mx, dtype=torch.bool, device=dev).tril()
    mask = mask | ~mask.any(-1, keepdim=True)  # padded query rows: finite, dropped below
    g = q.shape[1] // k.shape[1]

    def pad(t):
        return t.new_zeros(n * mx, *t.shape[1:]).index_copy(0, idx, t).view(n, mx, *t.shape[1:]).transpose(1, 2)

    def forward():
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask, enable_gqa=g > 1)
        return o.transpose(1, 2).reshape(n * mx, *q.shape[1:]).index_select(0, idx)

    return forward


def cases(quick: bool) -> list[Case]:
    gpu = torch.cuda.is_available()
    dtypes = ("bf16",) if gpu else ("fp32", "bf16")
    if quick:  # a few minutes on 2 CPU cores: two lengths, head dim 128 only
        seqlens, tokens, hidden, head_dims = (512, 1024), 4096, 1024, (128,)
    elif gpu:
        seqlens, tokens, hidden, head_dims = (512, 1024, 2048, 4096, 8192), 16384, 2048, (64, 80, 128)
    else:  # the full sweep at a quarter of the GPU's token budget and half its width: ~1 h on 2 CPU cores
        seqlens, tokens, hidden, head_dims = (512, 1024, 2048, 4096, 8192), 8192, 1024, (64, 80, 128)
    out: list[Case] = []
    for dt in dtypes:
        for d in head_dims:
            for causal in ((False, True) if d == 128 else (False,)):
                for s in seqlens:
                    heads = max(1, hidden // d)
                    params = dict(batch=max(1, tokens // s), seqlen=s, heads=heads, kv_heads=heads, head_dim=d,
                                  causal=causal)
                    for be in BACKENDS:
                        if be == "reference" and s > 4096:
                            continue  # B x H x S^2 fp32 scores: tens of GB
                        out.append(Case(OP, be, dt, params, "moon_fast.bench.attention:build_dense",
                                        label=f"d={d}{' causal' if causal else ''} S={s}"))
        if not quick:  # a decoder's grouped-query attention: 4 query heads per K/V head, causal
            heads = max(4, hidden // 128)
            params = dict(batch=max(1, tokens // 2048), seqlen=2048, heads=heads, kv_heads=heads // 4, head_dim=128,
                          causal=True)
            for be in BACKENDS:
                out.append(Case(OP, be, dt, params, "moon_fast.bench.attention:build_dense",
                                label="d=128 causal gqa=4 S=2048"))
        # Varlen memory case: Qwen2-VL-like vision packing (head dim 80) and packed causal text (GQA 4:1).
        vl = [(64, 512, 16, 16, 80, False), (64, 1024, 16, 4, 128, True)]
        if quick:
            vl = [(32, 256, 8, 8, 80, False), (32, 512, 8, 2, 128, True)]
        elif not gpu:  # block-diagonal SDPA costs total^2: at the GPU size one round ran > 9 min on 2 cores
            vl = [(32, 512, 8, 8, 80, False), (32, 1024, 8, 2, 128, True)]
        for n_seqs, max_len, heads, kv, d, causal in vl:
            params = dict(n_seqs=n_seqs, max_len=max_len, heads=heads, kv_heads=kv, head_dim=d, causal=causal)
            for be in VARLEN_BACKENDS:
                out.append(Case(OP, be, dt, params, "moon_fast.bench.attention:build_varlen",
                                label=f"varlen d={d}{' causal' if causal else ''} n={n_seqs} max={max_len}"))
    return out
