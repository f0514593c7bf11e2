"""Explicit FLOP and byte formulas for the benchmarked ops (one place, tested in tests/test_bench_flops.py).

FLOPs are ALGORITHMIC: the multiply-adds the op needs (2 per multiply-add), not what a kernel executes
(recomputation in flash-style backward passes, padding and masked-out work are not counted), so a
kernel that recomputes shows a lower TFLOP/s, as it should. Element-wise work (softmax, activations)
is left out where a matrix product dominates. Bytes are the minimum traffic to main memory: each
input read once and each output written once; intermediates that a fused kernel keeps on chip are not
counted, so GB/s is a lower bound on the traffic a non-fused implementation causes.
"""

from __future__ import annotations

from collections.abc import Sequence


def gemm_flops(m: int, n: int, k: int) -> float:
    """(m, k) @ (k, n)."""
    return 2.0 * m * n * k


# ----------------------------------------------------------------------------- contrastive loss

def contrastive_flops(n_query: int, n_key: int, dim: int) -> tuple[float, float]:
    """(forward, backward) of an InfoNCE loss over an (n_query, n_key) logit matrix of dimension ``dim``.

    Forward: logits = q @ k.T (2 N M D). Backward: dq = P @ k and dk = P.T @ q (4 N M D). A symmetric
    loss (both directions) reuses the same logits, so it costs the same matrix products."""
    fwd = gemm_flops(n_query, n_key, dim)
    return fwd, 2.0 * fwd


def contrastive_bytes(n_query: int, n_key: int, dim: int, elem_size: int) -> tuple[float, float]:
    """(forward, backward) minimum traffic: forward reads q and k; backward reads q and k and writes
    dq and dk. The (N, M) logit matrix is not counted (a fused kernel never stores it)."""
    io = (n_query + n_key) * dim * elem_size
    return float(io), 2.0 * io


# ----------------------------------------------------------------------------- attention

def attention_pairs(seqlens_q: Sequence[int], seqlens_k: Sequence[int] | None = None, *,
                    causal: bool = False) -> int:
    """Number of (query, key) score entries: sum over sequences of s_q * s_k, or with ``causal`` the
    entries on or below the diagonal aligned to the bottom right (flash-attn's convention):
    key j is visible to query i when j <= i + s_k - s_q."""
    seqlens_k = seqlens_q if seqlens_k is None else seqlens_k
    total = 0
    for sq, sk in zip(seqlens_q, seqlens_k):
        if not causal:
            total += sq * sk
        else:
            off = sk - sq
            total += sum(max(0, min(sk, i + off + 1)) for i in range(sq))
    return total


def attention_flops(seqlens_q: Sequence[int], n_heads: int, head_dim: int, seqlens_k: Sequence[int] | None = None,
                    *, causal: bool = False) -> tuple[float, float]:
    """(forward, backward): forward is Q K^T and P V, 2 x 2 x pairs x head_dim per head (FlashAttention's
    4 b s^2 h d, counting only visible pairs when causal); backward is 2.5 x forward (dV, dP, dQ, dK:
    four products, plus the recomputation of Q K^T that every flash backward does; FlashAttention's
    convention)."""
    fwd = 4.0 * attention_pairs(seqlens_q, seqlens_k, causal=causal) * n_heads * head_dim
    return fwd, 2.5 * fwd


def attention_bytes(total_q: int, total_k: int, n_heads: int, n_kv_heads: int, head_dim: int,
                    elem_size: int) -> tuple[float, float]:
    """(forward, backward): forward reads q, k, v and writes o; backward reads q, k, v, o, do and
    writes dq, dk, dv."""
    q = total_q * n_heads * head_dim * elem_size
    kv = total_k * n_kv_heads * head_dim * elem_size
    return float(2 * q + 2 * kv), float(4 * q + 4 * kv)


# ----------------------------------------------------------------------------- MoE experts

def moe_flops(n_tokens: int, top_k: int, hidden: int, intermediate: int) -> tuple[float, float]:
    """(forward, backward) of SwiGLU experts: each of the n_tokens * top_k assignments does a
    gate_up product (H -> 2I: 4 H I) and a down product (I -> H: 2 H I) = 6 H I; backward computes
    gradients of inputs and weights of both products, 2 x forward. Routing and the activation are
    left out."""
    fwd = 6.0 * n_tokens * top_k * hidden * intermediate
    return fwd, 2.0 * fwd


def moe_bytes(n_tokens: int, top_k: int, hidden: int, intermediate: int, n_experts: int,
              elem_size: int) -> tuple[float, float]:
    """(forward, backward): forward reads the tokens and every expert's weights (3 H I each) and writes
    the output; backward reads them plus the output gradient and writes the input and weight
    gradients. Routing indices and weights are negligible and left out."""
    act = n_tokens * hidden * elem_size
    w = n_experts * 3 * hidden * intermediate * elem_size
    return float(2 * act + w), float(3 * act + 2 * w)
