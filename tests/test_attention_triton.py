"""flash_attention's Triton kernels (FA2 forward, dq/dk/dv backward) against the fp32 reference.

On the CPU these run under the Triton interpreter, whose cost is programs x loop steps, so shapes are
smaller than in tests/test_attention.py: seqlens 1, 17, 97, 130 (257 only for the torch path), varlen
lengths up to 130, few heads. Default interpreter tiles are 64 x 64; some tests switch to 16/32-row tiles
(and BLOCK_M != BLOCK_N, as the GPU forward uses) so that several blocks, the causal block skipping and
partial tiles are exercised at these lengths. Every output buffer is NaN-poisoned before the kernels run.
On a GPU the same tests run with the GPU tiles.
"""

from __future__ import annotations

import pytest
import torch
from aot_triton import triton_builds
from test_attention import check_against_reference, cu_of, make_qkv

from moon_fast.backends import triton_unavailable

pytestmark = pytest.mark.skipif(triton_unavailable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                                is not None, reason="triton cannot run here (see triton_unavailable)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from moon_fast.kernels import flash_attention as fa

    monkeypatch.setattr(fa, "POISON_OUTPUTS", True)
    yield fa


def _on(dev, *ts):
    return [t.detach().to(dev).requires_grad_(True) for t in ts]


def check(q, k, v, **kw):
    q, k, v = _on(DEV, q, k, v)
    for name in ("cu_q", "cu_k"):
        if kw.get(name) is not None:
            kw[name] = kw[name].to(DEV)
    check_against_reference("triton", q, k, v, **kw)


@pytest.mark.parametrize("seqlen", [1, 17, 97, 130])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_fp32(seqlen, causal):
    q, k, v = make_qkv((2, seqlen, 2, 32), (2, seqlen, 1, 32), torch.float32, seed=seqlen)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("groups,causal", [(1, True), (2, False), (4, True), (8, False)])
def test_gqa_ratios(groups, causal):
    q, k, v = make_qkv((1, 40, 8, 32), (1, 40, 8 // groups, 32), torch.float32, seed=groups)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_criterion(dtype, causal):
    q, k, v = make_qkv((1, 97, 4, 64), (1, 97, 2, 64), dtype, seed=5)
    check(q, k, v, causal=causal)


def test_head_dim_chunks():
    from moon_fast.kernels.flash_attention import head_dim_chunks

    assert head_dim_chunks(80) == (64, 16, True)
    assert head_dim_chunks(96) == (64, 32, True)
    assert head_dim_chunks(72) == (64, 16, True)  # the second chunk is 8 columns, padded to 16
    assert head_dim_chunks(160) == (128, 32, True)
    assert [head_dim_chunks(d) for d in (8, 24, 64, 100, 128)] == [(16, 16, False), (32, 16, False), (64, 16, False),
                                                                 (128, 16, False), (128, 16, False)]


# Split head dims (two column chunks: 80, 96, 40, 72, 160) and padded ones (24, 100).
@pytest.mark.parametrize("head_dim,dtype", [(80, torch.float32), (96, torch.bfloat16), (40, torch.float16),
                                            (72, torch.bfloat16), (160, torch.float32), (24, torch.float16),
                                            (100, torch.float32)])
def test_head_dims_split_or_padded(head_dim, dtype):
    q, k, v = make_qkv((1, 33, 2, head_dim), (1, 33, 2, head_dim), dtype, seed=head_dim)
    check(q, k, v, causal=True, scale=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_head_dim_varlen_gqa_several_blocks(dtype, _poison, monkeypatch):
    """d=80 (64 + 16), as in the Qwen2-VL vision encoder, packed, GQA, with 16/32-row tiles: several blocks
    per sequence, so every kernel's loop carries the second chunk's accumulators across steps."""
    monkeypatch.setattr(_poison, "INTERPRETER_TILES", (16, 32))
    lq, lk = [37, 1, 50], [45, 9, 50]
    q, k, v = make_qkv((sum(lq), 4, 80), (sum(lk), 2, 80), dtype, seed=80)
    for causal in (False, True):
        check(q, k, v, causal=causal, cu_q=cu_of(lq), cu_k=cu_of(lk))


@pytest.mark.parametrize("sq,sk", [(20, 100), (100, 20)])
@pytest.mark.parametrize("causal", [False, True])
def test_seqlen_q_differs_from_k(sq, sk, causal, _poison, monkeypatch):
    monkeypatch.setattr(_poison, "INTERPRETER_TILES", (32, 16))
    q, k, v = make_qkv((1, sq, 2, 16), (1, sk, 1, 16), torch.float32, seed=sq + sk)
    check(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_mixed_lengths(causal):
    lq = [1, 130, 0, 17, 64, 33]
    q, k, v = make_qkv((sum(lq), 4, 16), (sum(lq), 2, 16), torch.float32, seed=21)
    check(q, k, v, causal=causal, cu_q=cu_of(lq), cu_k=cu_of(lq))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_small_tiles_block_m_differs_from_n(causal, _poison, monkeypatch):
    monkeypatch.setattr(_poison, "INTERPRETER_TILES", (16, 32))
    lq = [1, 70, 0, 17, 33]
    q, k, v = make_qkv((sum(lq), 2, 16), (sum(lq), 1, 16), torch.float32, seed=24)
    check(q, k, v, causal=causal, cu_q=cu_of(lq), cu_k=cu_of(lq))


def test_varlen_q_k_lengths_differ_and_empty(_poison, monkeypatch):
    monkeypatch.setattr(_poison, "INTERPRETER_TILES", (16, 16))
    lq = [3, 0, 40, 7, 20, 5]
    lk = [30, 4, 10, 7, 0, 9]
    q, k, v = make_qkv((sum(lq), 2, 16), (sum(lk), 1, 16), torch.float32, seed=22)
    check(q, k, v, causal=True, cu_q=cu_of(lq), cu_k=cu_of(lk))
    check(q, k, v, causal=False, cu_q=cu_of(lq), cu_k=cu_of(lk))


def test_varlen_bf16_gqa():
    lq = [50, 1, 77]
    q, k, v = make_qkv((sum(lq), 4, 32), (sum(lq), 1, 32), torch.bfloat16, seed=23)
    check(q, k, v, causal=True, cu_q=cu_of(lq), cu_k=cu_of(lq))


def test_strided_inputs_from_a_fused_qkv_projection():
    # The Qwen2-VL vision attention unbinds q, k, v from one (S, 3, H, D) tensor: token stride 3*H*D.
    qkv = torch.randn(45, 3, 2, 32)
    q, k, v = qkv.unbind(1)
    assert q.stride(0) == 3 * 2 * 32
    lens = [20, 25]
    check(q, k, v, causal=False, cu_q=cu_of(lens), cu_k=cu_of(lens))


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
def test_causal_block_boundaries_every_diagonal_offset(tiles, _poison, monkeypatch):
    """Bottom-right causal with Sk - Sq covering every residue modulo the tile sizes: the boundaries
    between fully visible blocks (no mask) and diagonal blocks (masked) in all three kernels."""
    monkeypatch.setattr(_poison, "INTERPRETER_TILES", tiles)
    lq = [48] * 32
    lk = [48 + d for d in range(-16, 16)]
    q, k, v = make_qkv((sum(lq), 2, 16), (sum(lk), 1, 16), torch.float32, seed=25)
    check(q, k, v, causal=True, cu_q=cu_of(lq), cu_k=cu_of(lk))


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", triton_builds())
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu_ahead_of_time(arch, triton_dir, tmp_path):
    """The forward, preprocess and both backward kernels compile for sm_80 / sm_90 as the JIT would compile
    the launches the op really makes (tests/aot_triton.py: no GPU needed; catches GPU-only compile errors:
    dot operand types, shapes, shared memory), for bf16 d=80, fp16 d=128 and fp32 d=64, causal GQA."""
    pytest.importorskip("triton")
    from aot_triton import CI, run_child

    kernels = run_child("attention", arch, tmp_path, triton_dir=triton_dir)
    compiled = {(k["name"], k["flags"]["HEAD_DIM"]) for k in kernels}
    expected = {(name, d) for _, d, _ in CI["attention"]
                for name in ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel")}
    assert compiled == expected, kernels
    dtype_of = {d: dt for dt, d, _ in CI["attention"]}
    for k in kernels:
        # fp32: exact fp32 products, not TF32 (the interpreter ignores input_precision: only here is it seen)
        if k["name"] != "_bwd_preprocess":
            assert k["flags"]["PRECISION"] == ("ieee" if dtype_of[k["flags"]["HEAD_DIM"]] == "float32" else "tf32"), k
        if k["flags"].get("PRECISION") == "ieee":
            continue  # fp32 (exact dots): its forward and dk/dv kernels spill kilobytes; auto does not pick it
        if k["name"] == "_bwd_dkdv_kernel":
            # 16-bit dk/dv: spills known and not yet fixed (kernels/flash_attention.py _tiles); a ceiling, so
            # that they cannot grow unseen
            assert k["spills"] <= 640, k
        else:
            assert k["spills"] == 0, k
        if arch >= 90 and k["name"] != "_bwd_preprocess":
            assert k["wgmma"] >= 1, k  # 16-bit dots on Hopper: warp-group MMAs
