"""flash_attention: the PyTorch backends (``torch``, ``sdpa``) against ``reference``, input checks, shims.

Criterion (FlashAttention's): in fp16/bf16 a backend's max error against the fp32 reference is at most
twice PyTorch's own low-precision error (the naive attention computed in that dtype) plus a small floor;
fp32 is compared element-wise. Forward and dq/dk/dv. The Triton kernels: tests/test_attention_triton.py;
the transformers integration: tests/test_attention_hf.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import assert_close, low_precision_error_bound, tolerance

from moon_fast.backends import BackendUnavailable
from moon_fast.ops import flash_attention, flash_attn_func, flash_attn_varlen_func
from moon_fast.ops.attention_torch import attention_dense_reference

LOWP = [torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------- helpers (shared with the triton tests)

def make_qkv(shape_q, shape_k, dtype, *, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g).to(dtype)
    k = torch.randn(shape_k, generator=g).to(dtype)
    v = torch.randn(shape_k, generator=g).to(dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0).to(torch.int32)


def lowp_reference(q, k, v, *, causal, scale=None, cu_q=None, cu_k=None, upcast=False):
    """Naive attention (per sequence when packed), in the input dtype unless ``upcast``."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    if cu_q is None:
        return attention_dense_reference(q, k, v, causal=causal, scale=scale, upcast=upcast)
    outs = []
    lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    for qi, ki, vi in zip(q.split(lq), k.split(lk), v.split(lk)):
        if qi.shape[0] == 0 or ki.shape[0] == 0:
            outs.append(qi * 0.0)
        else:
            outs.append(attention_dense_reference(qi[None], ki[None], vi[None], causal=causal, scale=scale,
                                                  upcast=upcast)[0])
    return torch.cat(outs)


def run_fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))  # detach keeps strides
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out.detach(), dq, dk, dv


def check_against_reference(backend, q, k, v, *, causal, cu_q=None, cu_k=None, floor=None, scale=None,
                            check_grads=True):
    """Compares ``backend`` with the fp32 reference, forward and (optionally) backward.

    fp32: element-wise tolerance. fp16/bf16: FlashAttention's 2x-PyTorch-error criterion, where the
    PyTorch error is the naive attention run in that dtype against the fp32 reference.
    """
    dtype = q.dtype
    kw = dict(causal=causal, softmax_scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
    g = torch.Generator().manual_seed(123)
    out_shape = q.shape
    do = torch.randn(out_shape, generator=g).to(device=q.device, dtype=dtype)

    got = run_fwd_bwd(lambda a, b, c: flash_attention(a, b, c, **kw), q, k, v, do)
    ref32 = run_fwd_bwd(lambda a, b, c: lowp_reference(a.float(), b.float(), c.float(), causal=causal, scale=scale,
                                                       cu_q=cu_q, cu_k=cu_k, upcast=True), q, k, v, do.float())
    names = ("out", "dq", "dk", "dv") if check_grads else ("out",)
    if dtype == torch.float32:
        for name, a, e in zip(names, got, ref32):
            # Gradients sum over up to S terms: scale the tolerance a little with the length.
            assert_close(a, e, **tolerance(torch.float32, scale=4.0 if name == "out" else 20.0),
                         name=f"{backend} {name}")
        return
    lowp = run_fwd_bwd(lambda a, b, c: lowp_reference(a, b, c, causal=causal, scale=scale, cu_q=cu_q, cu_k=cu_k),
                       q, k, v, do)
    for name, a, lp, e in zip(names, got, lowp, ref32):
        assert not torch.isnan(a).any(), f"{backend} {name}: NaN"
        fl = floor if floor is not None else (1e-3 if dtype == torch.float16 else 1e-2)
        err, allowed = low_precision_error_bound(a, lp, e, floor=fl)
        assert err <= allowed, f"{backend} {dtype} {name}: error {err:.3g} > allowed {allowed:.3g}"


# ----------------------------------------------------------------------------- dense

@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("seqlen", [1, 17, 97, 128, 257])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_fp32_matches_reference(backend, seqlen, causal):
    q, k, v = make_qkv((2, seqlen, 4, 32), (2, seqlen, 2, 32), torch.float32, seed=seqlen)
    check_against_reference(backend, q, k, v, causal=causal)


# Measured: SDPA's CPU GQA backward sums a group's dk/dv in fp16/bf16, 2-3x naive attention's error, which
# fails this criterion; so the peer ``sdpa`` is checked here without GQA, and the ``torch`` backend expands
# K/V in low precision (see attention_torch._sdpa_dense).
@pytest.mark.parametrize("backend,groups", [("torch", 1), ("torch", 2), ("torch", 4), ("torch", 8), ("sdpa", 1)])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_gqa_low_precision(backend, groups, dtype, causal):
    q, k, v = make_qkv((2, 97, 8, 64), (2, 97, 8 // groups, 64), dtype, seed=groups)
    check_against_reference(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("backend", ["torch", "sdpa", "reference"])
@pytest.mark.parametrize("sq,sk", [(17, 97), (97, 17), (1, 128), (128, 1), (5, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_seqlen_q_differs_from_k(backend, sq, sk, causal):
    q, k, v = make_qkv((2, sq, 4, 32), (2, sk, 1, 32), torch.float32, seed=sq * 1000 + sk)
    if backend == "reference":
        # The reference's own bottom-right mask, checked against an explicit loop over rows.
        out = flash_attention(q, k, v, causal=causal, backend="reference")
        for i in range(sq):
            hi = i + sk - sq + 1 if causal else sk
            if hi <= 0:
                assert torch.all(out[:, i] == 0), f"row {i} sees no key and must be 0"
                continue
            row = lowp_reference(q[:, i:i + 1], k[:, :hi], v[:, :hi], causal=False, upcast=True)
            assert_close(out[:, i:i + 1], row, **tolerance(torch.float32), name=f"row {i}")
        return
    check_against_reference(backend, q, k, v, causal=causal)


@pytest.mark.parametrize("sq,sk", [(37, 50), (32, 33), (5, 70)])
def test_causal_mask_in_several_chunks(sq, sk, monkeypatch):
    """The torch backend builds the bottom-right causal mask of Sq < Sk in chunks of _MASK_CHUNK_ROWS query
    rows (1024): shrunk to 8 here, so every chunk after the first, and a short last one, run against the
    reference, forward and backward."""
    from moon_fast.ops import attention_torch

    monkeypatch.setattr(attention_torch, "_MASK_CHUNK_ROWS", 8)
    q, k, v = make_qkv((2, sq, 4, 32), (2, sk, 2, 32), torch.float32, seed=sq + sk)
    check_against_reference("torch", q, k, v, causal=True)


def test_seqlen_q_differs_from_k_low_precision():
    q, k, v = make_qkv((1, 40, 4, 64), (1, 130, 2, 64), torch.bfloat16, seed=7)
    check_against_reference("torch", q, k, v, causal=True)


def test_softmax_scale_and_odd_head_dim():
    q, k, v = make_qkv((1, 33, 2, 80), (1, 33, 2, 80), torch.float32, seed=3)
    check_against_reference("torch", q, k, v, causal=True, scale=0.3)
    q, k, v = make_qkv((1, 33, 3, 59), (1, 33, 1, 59), torch.float32, seed=4)
    check_against_reference("torch", q, k, v, causal=False)


# ----------------------------------------------------------------------------- varlen (packed)

def _lengths(seed, n, lo=1, hi=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_varlen_mixed_lengths_fp32(backend, causal, groups):
    lens = _lengths(groups + causal, 6) + [1, 300, 17]
    cu = cu_of(lens)
    q, k, v = make_qkv((sum(lens), 4, 32), (sum(lens), 4 // groups, 32), torch.float32, seed=11)
    check_against_reference(backend, q, k, v, causal=causal, cu_q=cu, cu_k=cu)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_low_precision(dtype, causal):
    lens = _lengths(5, 5) + [128, 1]
    cu = cu_of(lens)
    q, k, v = make_qkv((sum(lens), 8, 64), (sum(lens), 2, 64), dtype, seed=12)
    check_against_reference("torch", q, k, v, causal=causal, cu_q=cu, cu_k=cu)


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_q_k_lengths_differ_and_empty_sequences(backend, causal):
    # Per sequence: Sq < Sk, Sq > Sk (rows that see nothing under causal), empty q, empty k.
    lq = [3, 0, 40, 7, 20, 5, 9]
    lk = [30, 4, 10, 7, 20, 0, 9]
    q, k, v = make_qkv((sum(lq), 4, 16), (sum(lk), 2, 16), torch.float32, seed=13)
    check_against_reference(backend, q, k, v, causal=causal, cu_q=cu_of(lq), cu_k=cu_of(lk))


def test_varlen_equal_lengths_grouped_path():
    # Several sequences of one length (images of one size) go through one batched call: check the
    # rows come back in packed order, with other lengths mixed in between.
    lens = [16, 16, 5, 16, 24, 5, 16]
    cu = cu_of(lens)
    q, k, v = make_qkv((sum(lens), 2, 16), (sum(lens), 2, 16), torch.float32, seed=14)
    check_against_reference("torch", q, k, v, causal=False, cu_q=cu, cu_k=cu)
    check_against_reference("torch", q, k, v, causal=True, cu_q=cu, cu_k=cu)


def test_varlen_equals_dense_per_sequence():
    # Packed output must equal running each sequence alone (no cross-sequence leakage).
    lens = [5, 9, 1]
    cu = cu_of(lens)
    q, k, v = make_qkv((sum(lens), 2, 8), (sum(lens), 2, 8), torch.float32, seed=15, requires_grad=False)
    out = flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="torch")
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = flash_attention(q[a:b][None], k[a:b][None], v[a:b][None], causal=True, backend="reference")[0]
        assert_close(out[a:b], alone, **tolerance(torch.float32), name=f"sequence {i}")


def test_torch_backend_varlen_memory_is_linear():
    """16384 packed tokens (128 sequences of 128): a total x total fp32 matrix would be 1 GiB; the
    torch backend's forward+backward must stay far below (peak RSS growth, measured in a child)."""
    code = textwrap.dedent("""
        import resource, torch
        from moon_fast.ops import flash_attention
        torch.set_num_threads(1)
        n, L, H, D = 128, 128, 2, 16
        q = torch.randn(n * L, H, D, requires_grad=True); k = torch.randn(n * L, H, D, requires_grad=True)
        v = torch.randn(n * L, H, D, requires_grad=True)
        lens = torch.full((n,), L); lens[::2] += 7; lens[1::2] -= 7  # two lengths: grouped calls
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        flash_attention(q[:256], k[:256], v[:256], cu_seqlens_q=cu[:3], cu_seqlens_k=cu[:3]).sum().backward()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = flash_attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, backend="torch")
        out.sum().backward()
        print("PEAK_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = float(proc.stdout.split("PEAK_MB")[1])
    assert peak < 200, f"torch varlen backend grew RSS by {peak:.0f} MB; a total x total matrix is 1024 MB"


# ----------------------------------------------------------------------------- auto, shims, errors

def test_auto_on_cpu_is_torch_and_env_override(monkeypatch):
    q, k, v = make_qkv((1, 9, 2, 16), (1, 9, 2, 16), torch.float32, requires_grad=False)
    ref = flash_attention(q, k, v, causal=True, backend="reference")
    assert_close(flash_attention(q, k, v, causal=True), ref, **tolerance(torch.float32), name="auto")
    monkeypatch.setenv("MOON_FAST_FLASH_ATTENTION_BACKEND", "flash_attn")
    with pytest.raises(BackendUnavailable, match="flash_attn"):
        flash_attention(q, k, v)
    from moon_fast.ops.attention import BACKENDS

    if BACKENDS.why_unavailable("triton", "cpu") is None:  # a forced backend that cannot take the input says why
        monkeypatch.setenv("MOON_FAST_FLASH_ATTENTION_BACKEND", "triton")
        big = make_qkv((1, 3, 1, 512), (1, 3, 1, 512), torch.float32, requires_grad=False)
        with pytest.raises(BackendUnavailable, match=r"'triton' \(forced by MOON_FAST_FLASH_ATTENTION_BACKEND="
                                                     r"triton\) cannot run this input: .*head dims up to 256"):
            flash_attention(*big)


def test_auto_passes_triton_over_for_fp32(monkeypatch):
    """auto's CUDA rule (flash_attn, triton, torch; triton for 16-bit only), run with the CPU's order set to
    it: the Triton kernels run here under the interpreter, flash_attn is not installed. A packed batch of
    mixed lengths, which auto gives triton in 16-bit (next test)."""
    from moon_fast.backends import triton_unavailable
    from moon_fast.ops.attention import BACKENDS, _resolve, _validate

    if triton_unavailable(torch.device("cpu")):
        pytest.skip(f"needs triton: {triton_unavailable(torch.device('cpu'))}")
    monkeypatch.delenv("MOON_FAST_FLASH_ATTENTION_BACKEND", raising=False)
    monkeypatch.setitem(BACKENDS.auto_order, "cpu", ("flash_attn", "triton", "torch"))
    cu = cu_of([3, 6])
    for dtype, expected in ((torch.bfloat16, "triton"), (torch.float16, "triton"), (torch.float32, "torch")):
        q, k, v = make_qkv((9, 2, 16), (9, 2, 16), dtype, requires_grad=False)
        p = _validate(q, k, v, True, None, cu, cu, None, None)
        assert _resolve("auto", p).name == expected, dtype
    # asked for by name, fp32 still runs on the Triton kernels
    q, k, v = make_qkv((1, 9, 2, 16), (1, 9, 2, 16), torch.float32, requires_grad=False)
    ref = flash_attention(q, k, v, causal=True, backend="reference")
    assert_close(flash_attention(q, k, v, causal=True, backend="triton"), ref, **tolerance(torch.float32),
                 name="triton fp32")


@pytest.mark.parametrize("dtype", LOWP)
def test_auto_takes_torch_where_it_is_one_sdpa_call(dtype, monkeypatch):
    """With CUDA's order (flash_attn, triton, torch), 16-bit auto passes triton over exactly where the torch
    backend makes one SDPA call with no explicit mask (measured about 2x faster there on an H100)."""
    from moon_fast.backends import triton_unavailable
    from moon_fast.ops.attention import BACKENDS, _resolve, _validate

    if triton_unavailable(torch.device("cpu")):
        pytest.skip(f"needs triton: {triton_unavailable(torch.device('cpu'))}")
    monkeypatch.delenv("MOON_FAST_FLASH_ATTENTION_BACKEND", raising=False)
    monkeypatch.setitem(BACKENDS.auto_order, "cpu", ("flash_attn", "triton", "torch"))

    def dense(sq, sk, causal, hk=2):
        q, k, v = make_qkv((2, sq, 4, 16), (2, sk, hk, 16), dtype, requires_grad=False)
        return _resolve("auto", _validate(q, k, v, causal, None, None, None, None, None)).name

    def packed(lq, lk, causal):
        q, k, v = make_qkv((sum(lq), 4, 16), (sum(lk), 4, 16), dtype, requires_grad=False)
        return _resolve("auto", _validate(q, k, v, causal, None, cu_of(lq), cu_of(lk), None, None)).name

    assert dense(9, 9, False) == "torch"
    assert dense(9, 9, True) == "torch"
    assert dense(9, 9, True, hk=4) == "torch"  # no GQA
    assert dense(5, 9, False) == "torch"  # Sq != Sk, bidirectional: still one call, no mask
    assert dense(5, 9, True) == "triton"  # bottom-right causal: torch builds masks in chunks
    assert dense(9, 5, True) == "triton"
    assert packed([7, 7], [7, 7], True) == "torch"  # one length: one stacked call
    assert packed([0, 7, 7], [3, 7, 7], True) == "torch"  # an empty query sequence takes no call
    assert packed([4, 4], [6, 6], False) == "torch"
    assert packed([4, 4], [6, 6], True) == "triton"
    assert packed([3, 7], [3, 7], False) == "triton"  # mixed lengths: one call per length
    assert packed([7], [7], True) == "torch"


def test_empty_inputs():
    q, k, v = make_qkv((0, 5, 2, 16), (0, 5, 2, 16), torch.float32)
    assert flash_attention(q, k, v).shape == (0, 5, 2, 16)
    q, k, v = make_qkv((0, 2, 16), (0, 2, 16), torch.float32)
    z = torch.zeros(1, dtype=torch.int32)
    assert flash_attention(q, k, v, cu_seqlens_q=z, cu_seqlens_k=z).shape == (0, 2, 16)
    # no query rows but keys: k and v get zero gradients, not None (DDP expects every gradient)
    q, k, v = make_qkv((0, 2, 16), (5, 2, 16), torch.float32)
    flash_attention(q, k, v, cu_seqlens_q=torch.tensor([0, 0]), cu_seqlens_k=torch.tensor([0, 5])).sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


# ----------------------------------------------------------------------------- torch_varlen

def _varlen_attn_by_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), is_causal=False,
                              scale=None, enable_gqa=False):
    """``torch.nn.attention.varlen.varlen_attn`` as documented, computed by the naive reference on the CPU
    (the real op runs on CUDA only): checks how our backend calls it, not the op itself."""
    assert cu_q.dtype == cu_k.dtype == torch.int32, (cu_q.dtype, cu_k.dtype)
    assert max_q >= int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
    assert tuple(window_size) in ((-1, -1), (-1, 0)), window_size
    assert enable_gqa == (q.shape[1] != k.shape[1])
    causal = tuple(window_size) == (-1, 0) or is_causal
    return lowp_reference(q, k, v, causal=causal, scale=scale, cu_q=cu_q, cu_k=cu_k)


def _varlen_cases():
    # (q shape, k shape, cu_seqlens_q lengths, cu_seqlens_k lengths, causal, scale): dense with Sq != Sk,
    # GQA, packed with an empty sequence and Sq != Sk per sequence, a softmax scale of the caller's.
    return [((2, 9, 4, 16), (2, 13, 2, 16), None, None, True, None),
            ((2, 9, 4, 16), (2, 9, 4, 16), None, None, False, 0.3),
            ((12, 4, 16), (17, 1, 16), [5, 0, 7], [6, 4, 7], True, None),
            ((12, 2, 24), (12, 2, 24), [5, 7], [5, 7], False, 0.5)]


@pytest.mark.parametrize("case", range(4))
def test_torch_varlen_calls_varlen_attn_as_documented(case, monkeypatch):
    """Our call of varlen_attn (dense batches packed, cu_seqlens, causal window, scale, GQA), against the
    reference, with the op replaced by its documented semantics."""
    import torch.nn.attention.varlen as varlen

    from moon_fast.ops.attention import BACKENDS, _import_backends

    _import_backends()
    monkeypatch.setattr(BACKENDS.backends["torch_varlen"], "unavailable", lambda device: None)
    monkeypatch.setattr(varlen, "varlen_attn", _varlen_attn_by_reference)
    shape_q, shape_k, lq, lk, causal, scale = _varlen_cases()[case]
    q, k, v = make_qkv(shape_q, shape_k, torch.bfloat16, seed=case)
    cu_q, cu_k = (cu_of(lq), cu_of(lk)) if lq else (None, None)
    check_against_reference("torch_varlen", q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k, scale=scale)


@pytest.mark.parametrize("case", range(4))
def test_torch_varlen_arguments_pass_the_real_op_on_meta_tensors(case):
    """The real varlen_attn, forward and backward, on meta tensors: torch accepts our arguments and returns
    outputs and gradients of the right shapes (no numbers: meta tensors hold none)."""
    import dataclasses

    from moon_fast.ops.attention import _validate
    from moon_fast.ops.attention_torch import attention_torch_varlen_backend, torch_varlen_unsupported

    shape_q, shape_k, lq, lk, causal, scale = _varlen_cases()[case]
    q, k, v = make_qkv(shape_q, shape_k, torch.bfloat16, requires_grad=False)
    cu_q, cu_k = (cu_of(lq), cu_of(lk)) if lq else (None, None)
    p = _validate(q, k, v, causal, scale, cu_q, cu_k, None, None)
    assert torch_varlen_unsupported(p) is None
    meta = {n: getattr(p, n).to("meta").requires_grad_(True) for n in ("q", "k", "v")}
    if p.packed:
        meta.update(cu_seqlens_q=p.cu_seqlens_q.to("meta"), cu_seqlens_k=p.cu_seqlens_k.to("meta"))
    pm = dataclasses.replace(p, **meta)
    out = attention_torch_varlen_backend(pm)
    assert (out.shape, out.dtype, out.device.type) == (q.shape, q.dtype, "meta")
    grads = torch.autograd.grad(out.sum(), (pm.q, pm.k, pm.v))
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_torch_varlen_refuses_what_its_kernels_do_not_take():
    from moon_fast.ops.attention import _validate
    from moon_fast.ops.attention_torch import torch_varlen_unsupported

    def why(dtype, d):
        q, k, v = make_qkv((1, 5, 2, d), (1, 5, 2, d), dtype, requires_grad=False)
        return torch_varlen_unsupported(_validate(q, k, v, True, None, None, None, None, None))

    assert "float16/bfloat16" in why(torch.float32, 16)
    assert "multiples of 8" in why(torch.bfloat16, 20)
    assert "up to 256" in why(torch.float16, 264)
    assert why(torch.bfloat16, 80) is None
    q, k, v = make_qkv((1, 5, 2, 16), (1, 5, 2, 16), torch.bfloat16, requires_grad=False)
    with pytest.raises(BackendUnavailable, match="CUDA"):
        flash_attention(q, k, v, backend="torch_varlen")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (varlen_attn runs on CUDA only)")
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("case", range(4))
def test_torch_varlen_matches_reference_on_cuda(case, dtype):
    shape_q, shape_k, lq, lk, causal, scale = _varlen_cases()[case]
    q, k, v = (t.detach().cuda() for t in make_qkv(shape_q, shape_k, dtype, seed=case))
    cu_q, cu_k = (cu_of(lq).cuda(), cu_of(lk).cuda()) if lq else (None, None)
    check_against_reference("torch_varlen", q, k, v, causal=causal, cu_q=cu_q, cu_k=cu_k, scale=scale)


def test_flash_attn_shims_match_and_reject_unsupported():
    q, k, v = make_qkv((2, 17, 4, 32), (2, 17, 2, 32), torch.float32, requires_grad=False)
    assert_close(flash_attn_func(q, k, v, causal=True), flash_attention(q, k, v, causal=True),
                 **tolerance(torch.float32), name="flash_attn_func")
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(8, 0))
    lens = [5, 12]
    cu = cu_of(lens)
    qp, kp, vp = make_qkv((17, 4, 32), (17, 2, 32), torch.float32, requires_grad=False)
    got = flash_attn_varlen_func(qp, kp, vp, cu, cu, 12, 12, softmax_scale=0.5, causal=True)
    want = flash_attention(qp, kp, vp, cu_seqlens_q=cu, cu_seqlens_k=cu, softmax_scale=0.5, causal=True,
                           backend="reference")
    assert_close(got, want, **tolerance(torch.float32), name="flash_attn_varlen_func")
    with pytest.raises(NotImplementedError, match="dropout_p"):
        flash_attn_varlen_func(qp, kp, vp, cu, cu, 12, 12, dropout_p=0.5)
    with pytest.raises(NotImplementedError, match=r"window_size=None is not supported by moon_fast \(only \(-1, -1\)\)"):
        flash_attn_varlen_func(qp, kp, vp, cu, cu, 12, 12, window_size=None)


@pytest.mark.parametrize("case,match", [
    ("heads", "multiple of the number of key/value heads"),
    ("no_heads", "q has 0 heads and k/v 0: every input needs at least one head"),
    ("head_dim", "head dim"),
    ("kv_shape", "k and v must have the same shape"),
    ("dtype_mix", "share a dtype"),
    ("int_dtype", "dtype"),
    ("rank", "4-D"),
    ("batch", "batch"),
    ("cu_decreasing", "non-decreasing"),
    ("cu_total", "does not match the packed length"),
    ("cu_start", "start at 0"),
    ("cu_dtype", "int32 or int64"),
    ("cu_count", "sequences"),
    ("max_seqlen", "smaller than the longest"),
    ("packed_rank", "3-D"),
])
def test_bad_input_errors(case, match):
    q, k, v = make_qkv((1, 8, 4, 16), (1, 8, 2, 16), torch.float32, requires_grad=False)
    qp, kp, vp = q[0], k[0], v[0]
    cu = cu_of([3, 5])
    kw = {}
    if case == "heads":
        k, v = make_qkv((1, 8, 3, 16), (1, 8, 3, 16), torch.float32, requires_grad=False)[:2]
    elif case == "no_heads":
        q, k, v = make_qkv((1, 8, 0, 16), (1, 8, 0, 16), torch.float32, requires_grad=False)
    elif case == "head_dim":
        k, v = k[..., :8], v[..., :8]
    elif case == "kv_shape":
        v = v[:, :4]
    elif case == "dtype_mix":
        k = k.half()
    elif case == "int_dtype":
        q = q.to(torch.int32)
    elif case == "rank":
        q = q[0]
    elif case == "batch":
        q = torch.cat([q, q])
    if case.startswith("cu_") or case in ("max_seqlen", "packed_rank"):
        q, k, v = qp, kp, vp
        kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
        if case == "cu_decreasing":
            kw["cu_seqlens_q"] = torch.tensor([0, 6, 3, 8], dtype=torch.int32)
            kw["cu_seqlens_k"] = kw["cu_seqlens_q"]
        elif case == "cu_total":
            kw["cu_seqlens_k"] = torch.tensor([0, 3, 7], dtype=torch.int32)
        elif case == "cu_start":
            kw["cu_seqlens_q"] = torch.tensor([1, 3, 8], dtype=torch.int32)
        elif case == "cu_dtype":
            kw["cu_seqlens_q"] = cu.float()
        elif case == "cu_count":
            kw["cu_seqlens_k"] = torch.tensor([0, 8], dtype=torch.int32)
        elif case == "max_seqlen":
            kw["max_seqlen_q"] = 4
        elif case == "packed_rank":
            q = q[None]
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(q, k, v, **kw)


def test_unsupported_head_dim_for_triton_is_reported():
    q, k, v = make_qkv((1, 4, 1, 320), (1, 4, 1, 320), torch.float32, requires_grad=False)
    with pytest.raises(BackendUnavailable, match="head dims up to 256"):
        flash_attention(q, k, v, backend="triton")
    # auto on the CPU takes the torch path, which has no head-dim limit.
    assert flash_attention(q, k, v).shape == q.shape


@pytest.mark.parametrize("kwargs, match", [({"causal": "no"}, "causal must be True or False, got 'no'"),
                                           ({"softmax_scale": "a"}, "softmax_scale must be a number, got 'a'")])
def test_bad_flag_types(kwargs, match):
    q, k, v = make_qkv((1, 8, 4, 16), (1, 8, 2, 16), torch.float32, requires_grad=False)
    with pytest.raises(TypeError, match=match):
        flash_attention(q, k, v, **kwargs)


def test_autocast_casts_q_k_v_like_a_matmul():
    """Inside torch.autocast, flash_attention runs in the autocast dtype whatever mix it gets (transformers'
    rotary embedding returns float32 q, k beside a bf16 v); outside it, mixed dtypes stay an error."""
    q, k, v = make_qkv((1, 9, 2, 16), (1, 9, 2, 16), torch.float32, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flash_attention(q, k, v.bfloat16(), causal=True)
    assert out.dtype == torch.bfloat16
    want = flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, backend="reference")
    assert_close(out, want, **tolerance(torch.bfloat16), name="autocast")
    with pytest.raises(ValueError, match="must share a dtype"):
        flash_attention(q, k, v.bfloat16())
