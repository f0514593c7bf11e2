"""flash_attention: exact softmax attention without the S x S matrix; varlen (packed) and GQA (issue 5).

Layouts (FlashAttention's):

* dense:  q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D)  ->  out (B, Sq, Hq, D)
* packed: q (total_q, Hq, D), k and v (total_k, Hkv, D) with ``cu_seqlens_q`` / ``cu_seqlens_k``
  (n + 1,) int32/int64 cumulative lengths starting at 0  ->  out (total_q, Hq, D).
  Sequence i is rows ``cu_seqlens[i]:cu_seqlens[i+1]``; sequences never attend to each other.

``Hq`` must be a multiple of ``Hkv`` (grouped-query / multi-query attention: query head h uses
key/value head ``h // (Hq // Hkv)``). ``causal=True`` with ``Sq != Sk`` aligns the mask to the bottom
right as FlashAttention 2 does: query i sees keys ``j <= i + Sk - Sq``; a query row that sees no key
(``Sq > Sk``) gets a zero output (and zero gradient), as in FlashAttention.

Backends (``backend=``; ``auto`` = first usable of ``flash_attn, triton, torch`` on CUDA, ``torch`` on CPU;
``auto`` takes ``triton`` only for fp16/bf16 inputs that ``torch`` would not run as one SDPA call, i.e. packed
batches of mixed lengths or causal with Sq != Sk: where it is one call, SDPA ran in about half the Triton
kernels' time on an H100; ``MOON_FAST_FLASH_ATTENTION_BACKEND`` overrides ``auto``):

* ``reference``: fp32 scores and softmax, S x S materialised per sequence (the test oracle).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` as a user would call it; packed
  batches become one sequence with a block-diagonal mask (total x total: the peer's memory cost).
* ``torch``: portable path (the CPU default). SDPA per group of equal-length sequences (never a
  total x total mask), GQA through SDPA's ``enable_gqa`` (no K/V copies), bottom-right causal handled
  by row slicing or a query-chunked mask. Memory O(total * H * D + chunk * Sk).
* ``triton``: our FA2-style kernels (kernels/flash_attention.py): online softmax, LSE saved for the
  backward, dq/dk/dv kernels; causal, varlen, GQA; head dims up to 256; fp16/bf16/fp32. fp32 uses exact
  (non-tensor-core) products and is a correctness path on GPUs: compiled for sm_80/sm_90 its kernels spill
  kilobytes of registers per thread (``python tests/aot_triton.py --arch 80 --full``), so ``auto`` does not
  pick it.
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA, fp16/bf16): the
  FlashAttention 2 kernels of SDPA's flash path, over a packed batch in one call. Not yet run on a GPU (its
  argument plumbing is checked on meta tensors), so ``auto`` does not take it yet.
* ``flash_attn``: the FlashAttention 2 package, when installed (CUDA, fp16/bf16).

Drop-in shims ``flash_attn_func`` / ``flash_attn_varlen_func`` take FlashAttention's signatures.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from moon_fast.backends import (
    BackendUnavailable,
    _autocast_enabled,
    autocast_inputs,
    op_backends,
    package_unavailable,
    triton_unavailable,
)

# After our kernels, CUDA falls back to `torch` (SDPA per equal-length group, O(total) memory), not to `sdpa`,
# whose packed path builds a total x total mask.
BACKENDS = op_backends("flash_attention", {"cuda": ("flash_attn", "triton", "torch"), "cpu": ("torch",)})

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class AttnProblem:
    """Validated arguments handed to a backend. ``seqlens_*`` are host lists (packed layout only)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqlens_q: list[int] | None = None
    seqlens_k: list[int] | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def groups(self) -> int:
        return self.q.shape[-2] // self.k.shape[-2]


# ----------------------------------------------------------------------------- validation

def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, tensor_name: str, device) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"flash_attention: {name} must be a 1-D tensor of n+1 cumulative sequence lengths, "
                         f"got {type(cu).__name__} {tuple(getattr(cu, 'shape', ()))}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"flash_attention: {name} must be int32 or int64, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"flash_attention: {name} is on {cu.device} but q is on {device}; move it with .to(q.device)")
    vals = cu.tolist()  # one host sync: the lengths are needed to check and to size the launch
    if vals[0] != 0:
        raise ValueError(f"flash_attention: {name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    bad = next((i for i, n in enumerate(lens) if n < 0), None)
    if bad is not None:
        raise ValueError(f"flash_attention: {name} must be non-decreasing (cumulative lengths); "
                         f"{name}[{bad + 1}]={vals[bad + 1]} < {name}[{bad}]={vals[bad]}")
    if vals[-1] != total:
        raise ValueError(f"flash_attention: {name}[-1]={vals[-1]} does not match the packed length of {tensor_name} "
                         f"({total} rows); cu_seqlens must end at the number of packed tokens")
    return lens


def _validate(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> AttnProblem:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"flash_attention: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    want = 3 if packed else 4
    layout = "packed (total, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            hint = (" (packed inputs need cu_seqlens_q/cu_seqlens_k; dense inputs must not pass them)")
            raise ValueError(f"flash_attention: {name} must be {want}-D {layout}, got shape {tuple(t.shape)}{hint}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
                         " (different value head dims are not supported)")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"flash_attention: q head dim {d} != k/v head dim {k.shape[-1]}; they must match")
    if hq == 0 or hk == 0:
        raise ValueError(f"flash_attention: q has {hq} heads and k/v {hk}: every input needs at least one head")
    if hq % hk != 0:
        raise ValueError(f"flash_attention: the number of query heads ({hq}) must be a multiple of the number of "
                         f"key/value heads ({hk}) for grouped-query attention")
    if d == 0:
        raise ValueError("flash_attention: head dim is 0")
    if not isinstance(causal, (bool, int)):  # a string such as "no" would otherwise count as True
        raise TypeError(f"flash_attention: causal must be True or False, got {causal!r}")
    try:
        scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    except (TypeError, ValueError):
        raise TypeError(f"flash_attention: softmax_scale must be a number, got {softmax_scale!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: softmax_scale must be finite, got {softmax_scale}")

    if not packed:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"flash_attention: batch of q ({q.shape[0]}) != batch of k/v ({k.shape[0]})")
        return AttnProblem(q, k, v, bool(causal), scale, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1])

    if cu_seqlens_q is None:
        raise ValueError("flash_attention: cu_seqlens_k given without cu_seqlens_q")
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q  # self-attention over the same packing
    lq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", q.device)
    lk = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k/v", q.device)
    if len(lq) != len(lk):
        raise ValueError(f"flash_attention: cu_seqlens_q describes {len(lq)} sequences but cu_seqlens_k {len(lk)}")
    mq, mk = max(lq, default=0), max(lk, default=0)
    for name, given, actual in (("max_seqlen_q", max_seqlen_q, mq), ("max_seqlen_k", max_seqlen_k, mk)):
        if given is not None and int(given) < actual:
            raise ValueError(f"flash_attention: {name}={given} is smaller than the longest sequence ({actual})")
    return AttnProblem(q, k, v, bool(causal), scale, cu_seqlens_q, cu_seqlens_k, mq, mk, lq, lk)


# ----------------------------------------------------------------------------- backends

# Each returns why its backend should not take this problem, or None. ``auto``: the choice is auto's, which
# also passes over a backend that runs the problem but is not the fast path for it.

def _one_square_sdpa_call(p: AttnProblem) -> bool:
    """Whether the ``torch`` backend runs ``p`` as one SDPA call with no explicit mask: a dense batch, or a
    packed one whose non-empty sequences all have one (len_q, len_k), bidirectional or square causal."""
    if p.packed:
        shapes = {(lq, lk) for lq, lk in zip(p.seqlens_q, p.seqlens_k) if lq > 0}
        if len(shapes) != 1:
            return len(shapes) == 0
        (sq, sk), = shapes
    else:
        sq, sk = p.q.shape[1], p.k.shape[1]
    return not p.causal or sq == sk


def _triton_supports(p: AttnProblem, auto: bool = False) -> str | None:
    if p.q.shape[-1] > 256:
        return f"the triton backend supports head dims up to 256, got {p.q.shape[-1]}"
    if auto and p.q.dtype == torch.float32:
        return ("auto does not pick it for float32 (a correctness path on GPUs: its kernels spill registers); "
                "pass backend='triton' to use it anyway")
    if auto and _one_square_sdpa_call(p):
        # Measured on an H100 (README, "Other ops"; bf16, bidirectional, d=64 and 80): where `torch` is one
        # SDPA call, it ran forward+backward in 0.44-0.56x of the Triton kernels' time.
        return ("auto takes the torch backend (one SDPA call) for this input: it ran in about half the "
                "Triton kernels' time on an H100; pass backend='triton' to use them anyway")
    return None


def _flash_attn_supports(p: AttnProblem, auto: bool = False) -> str | None:
    if p.q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn supports float16/bfloat16 only, got {p.q.dtype}"
    if p.q.shape[-1] > 256 or p.q.shape[-1] % 8:
        return f"flash_attn supports head dims that are multiples of 8 up to 256, got {p.q.shape[-1]}"
    return None


def _torch_varlen_supports(p: AttnProblem, auto: bool = False) -> str | None:
    from moon_fast.ops.attention_torch import torch_varlen_unsupported

    return torch_varlen_unsupported(p)


_SUPPORTS = {"triton": _triton_supports, "flash_attn": _flash_attn_supports, "torch_varlen": _torch_varlen_supports}


def _import_backends() -> None:
    # Registered lazily so that importing moon_fast.ops stays cheap (no triton import).
    if "torch" in BACKENDS.backends:
        return
    from moon_fast.ops import attention_torch

    BACKENDS.register("reference", description="fp32 softmax, S x S materialised per sequence")(
        attention_torch.attention_reference_backend)
    BACKENDS.register("sdpa", description="torch SDPA; packed batches via a block-diagonal mask")(
        attention_torch.attention_sdpa_backend)
    BACKENDS.register("torch", description="SDPA per equal-length group; O(total) memory for varlen")(
        attention_torch.attention_torch_backend)

    def _triton(p: AttnProblem):
        from moon_fast.kernels import flash_attention as fa_kernels

        return fa_kernels.flash_attention_triton(p)

    BACKENDS.register("triton", unavailable=triton_unavailable, description="FA2 Triton kernels")(_triton)

    BACKENDS.register("torch_varlen", unavailable=package_unavailable("torch.nn.attention.varlen", "needs torch >= 2.10",
                                                                      needs_cuda=True),
                      description="torch.nn.attention.varlen.varlen_attn: FlashAttention 2 in PyTorch (CUDA)")(
        attention_torch.attention_torch_varlen_backend)

    def _flash_attn(p: AttnProblem):
        from moon_fast.ops import attention_torch

        return attention_torch.attention_flash_attn_backend(p)

    BACKENDS.register("flash_attn", unavailable=package_unavailable("flash_attn", "pip install flash-attn",
                                                                    needs_cuda=True),
                      description="FlashAttention 2 package (CUDA)")(_flash_attn)


def _resolve(backend: str, p: AttnProblem):
    _import_backends()
    dev = p.q.device
    if backend == "auto" and not os.environ.get(BACKENDS.env_var):
        reasons = []
        for name in BACKENDS.auto_order.get(dev.type, ("torch",)):
            why = BACKENDS.why_unavailable(name, dev) or (_SUPPORTS[name](p, auto=True) if name in _SUPPORTS else None)
            if why is None:
                return BACKENDS.backends[name]
            reasons.append(f"{name}: {why}")
        # Nothing in the preference list fits this problem: the portable path always does.
        if BACKENDS.why_unavailable("torch", dev) is None:
            return BACKENDS.backends["torch"]
        raise BackendUnavailable("flash_attention: no backend for this input: " + "; ".join(reasons))
    chosen = BACKENDS.resolve(backend, dev)
    why = _SUPPORTS[chosen.name](p) if chosen.name in _SUPPORTS else None
    if why is not None:
        forced = f" (forced by {BACKENDS.env_var}={os.environ[BACKENDS.env_var]})" if backend == "auto" else ""
        raise BackendUnavailable(f"flash_attention: backend {chosen.name!r}{forced} cannot run this input: {why}")
    return chosen


# ----------------------------------------------------------------------------- public API

def flash_attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None, backend="auto"):
    """Exact attention ``softmax(q k^T * scale [+ causal mask]) v`` per head, per sequence.

    Args:
        q: (B, Sq, Hq, D), or packed (total_q, Hq, D) with ``cu_seqlens_q``.
        k, v: (B, Sk, Hkv, D), or packed (total_k, Hkv, D) with ``cu_seqlens_k``; Hq % Hkv == 0.
        causal: causal mask, bottom-right aligned when Sq != Sk.
        softmax_scale: defaults to 1 / sqrt(D).
        cu_seqlens_q, cu_seqlens_k: (n + 1,) int32/int64 cumulative lengths (``cu_seqlens_k`` defaults
            to ``cu_seqlens_q``). Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: optional; checked to be at least the longest sequence.
        backend: "auto", "reference", "sdpa", "torch", "torch_varlen", "triton" or "flash_attn".

    Returns:
        Tensor shaped like q (same dtype), differentiable w.r.t. q, k, v.
    """
    autocasting = isinstance(q, torch.Tensor) and _autocast_enabled(q.device.type)
    if autocasting:
        # Inside torch.autocast the op behaves like a matmul: q, k, v in the autocast dtype. (transformers'
        # rotary embedding hands back float32 q and k beside a bf16 v there.)
        q, k, v = autocast_inputs(q.device, q, k, v, policy="lower_precision")
    p = _validate(q, k, v, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    impl = _resolve(backend, p)
    if q.numel() == 0:
        # Nothing to compute (no tokens or an empty batch). The output still depends on k and v, so that they
        # get zero gradients rather than None (DDP, without find_unused_parameters, expects a gradient for
        # every parameter on every rank); the added sums multiply to an empty tensor.
        return q * 0.0 + (k.sum() + v.sum()) * 0.0
    if autocasting:  # the backends see exactly the dtypes cast above
        with torch.autocast(q.device.type, enabled=False):
            return impl.fn(p)
    return impl.fn(p)


def _reject(func: str, **unsupported) -> None:
    for name, (value, default) in unsupported.items():
        if value != default and not (value is None and default is None):
            raise NotImplementedError(f"{func}: {name}={value!r} is not supported by moon_fast (only {default!r})")


def _as_tuple(x):
    """A window size as a tuple, for comparison; anything not iterable (None) as itself, for the message."""
    try:
        return tuple(x)
    except TypeError:
        return x


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend="auto"):
    """FlashAttention 2's ``flash_attn_func`` signature: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> (B, Sq, Hq, D).

    Dropout, sliding windows, softcapping, ALiBi and returned probabilities are not supported
    (NotImplementedError); ``deterministic`` is accepted (our backward is deterministic or not per backend).
    """
    _reject("flash_attn_func", dropout_p=(float(dropout_p), 0.0), window_size=(_as_tuple(window_size), (-1, -1)),
            softcap=(float(softcap), 0.0), alibi_slopes=(alibi_slopes, None), return_attn_probs=(return_attn_probs, False))
    return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, backend="auto"):
    """FlashAttention 2's ``flash_attn_varlen_func`` signature: packed q (total_q, Hq, D), k/v (total_k, Hkv, D)
    with int32 ``cu_seqlens_q/k`` -> (total_q, Hq, D). Unsupported options raise NotImplementedError."""
    _reject("flash_attn_varlen_func", dropout_p=(float(dropout_p), 0.0), window_size=(_as_tuple(window_size), (-1, -1)),
            softcap=(float(softcap), 0.0), alibi_slopes=(alibi_slopes, None),
            return_attn_probs=(return_attn_probs, False), block_table=(block_table, None))
    return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                           backend=backend)


def available_backends(device="cpu") -> dict[str, str | None]:
    """{backend: None if usable on ``device`` else the reason}."""
    _import_backends()
    return BACKENDS.availability(device)

_import_backends()  # register every backend at import (``moon-fast env`` lists them); triton is imported lazily
