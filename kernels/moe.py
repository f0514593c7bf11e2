"""Triton backend of ``moe_mlp``: grouped GEMMs over expert-contiguous row tiles.

S = T * k slots, rows in expert-contiguous order (moon_fast.ops.moe_routing). The routing is two launches
(kernels/moe_routing.py: a stable counting sort, no host synchronisation). There is no tile schedule:
each row-tile program finds its expert and rows from the routing's bounds (``_row_tile``), and the grid
is the upper bound cdiv(S, BM) + E of the tile count times the column tiles; surplus programs exit at once.
Grids are ordered so that the programs sharing an operand block run together and share it through L2
(``_tile_of_program``, ``_wgrad_grid``). With ``$MOON_FAST_MOE_PERSISTENT=1`` (and TMA) the row-tile launches
are persistent instead: one program per SM looping over the tiles in the same order (PERSISTENT_ENV).

Kernels (shapes above each):
* ``_swiglu_up_kernel``: h = silu(X[token] Wg^T) * (X[token] Wu^T), the gather of token rows fused into
  the A loads and the SwiGLU into the epilogue (one dot over the gate and up weights together, split in
  the epilogue); optionally also stores the pre-activation for the backward.
* ``_grouped_rows_kernel``: C = (scale * A[a_idx]) @ B[e] per row tile, with optional row gather and
  scale on A, optional scatter of C rows (to slot order: a permutation, so no atomics), or the SwiGLU
  backward in the epilogue (dgate, dup and the recomputed h, scaled by the routing weights). With
  ``$MOON_FAST_MOE_SWIGLU_BWD=split`` the dh GEMM stores plain dh and kernels/moe_swiglu.py's one
  elementwise pass does the SwiGLU backward.
* ``_grouped_wgrad_kernel``: dW[e] = A[a_idx]^T B[b_idx] over expert e's rows (zero when it has none): the
  weight gradients. The routing weights that d down_proj needs come already multiplied into its B operand
  (w * h, from the SwiGLU backward), so both A tiles go from shared memory into the MMA unchanged.
The k contributions of each token are combined, and the routing weights' gradient computed, by one launch
each (kernels/moe_combine.py: fp32 accumulation, deterministic). On a GPU moe_mlp leaves the expert-range
check to the routing (moe_routing.assert_all_routed: 2 launches, where its own check takes 5). Counted on
the CPU (benchmarks/moe_launch_count.py), one forward+backward made 58 launches (52 torch ops, 6 Triton)
and now makes 17 (7 and 10), 3 of them moe_mlp's own CPU range check; on a GPU, 14 (one more split). On an H100 the op was
bound by host time per launch (benchmarks/results/2026-11-22-h100/moe_gpu_probes_539dfd1.txt).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from moon_fast.kernels import _utils
from moon_fast.kernels._utils import compute_dtype_for, interpreting, next_power_of_2
from moon_fast.kernels.moe_combine import choice_weight_grad, combine
from moon_fast.kernels.moe_routing import route_triton
from moon_fast.kernels.moe_swiglu import swiglu_backward, swiglu_backward_tile
from torch.autograd.function import once_differentiable
from triton.tools.tensor_descriptor import TensorDescriptor

from moon_fast.ops.moe_routing import assert_all_routed

# The six launches of one forward + backward, each with its own tiles (benchmarks/moe_triton_tiles.py times
# them one by one against the dense cuBLAS product of the same FLOPs), and "dh": the plain dh GEMM that
# replaces dh_swiglu when the SwiGLU backward is split out of its epilogue (SWIGLU_BWD_ENV).
LAUNCHES = ("swiglu_up", "down_fwd", "dh_swiglu", "wgrad_down", "wgrad_gate_up", "dx", "dh")
_TILE_KEYS = ("BM", "BN", "BK", "num_warps", "num_stages")
TILES_ENV = "MOON_FAST_MOE_TILES"
# Where the backward computes the SwiGLU backward: "fused" into the dh GEMM's epilogue (one launch; the
# default, the mode measured on an H100) or "split": the plain dh GEMM, then one elementwise pass
# (kernels/moe_swiglu.py; one launch more). benchmarks/moe_gpu_gemm.py times both.
SWIGLU_BWD_ENV = "MOON_FAST_MOE_SWIGLU_BWD"
SWIGLU_BWD_MODES = ("fused", "split")
# "1": on Hopper and later, 16-bit GEMM operands that are plain tiles (the weights; A rows where they are not
# gathered; in the weight gradients, w * h and d gu, whole BK-row blocks) load through TMA tensor descriptors. Ignored on older GPUs: there Triton lowers descriptors to
# ordinary loads, which compiled for sm_80 spilled registers (712 bytes in the down GEMM) and kept fewer
# stages (benchmarks/results/2026-11-22-aot/triton_aot_sm80_moe_tma_forced_6819b96.txt).
# Off by default until a GPU measures it against the pointer loads (benchmarks/moe_gpu_gemm.py,
# ``op_triton_tma``).
TMA_ENV = "MOON_FAST_MOE_TMA"
# "1" (with TMA_ENV, on Hopper and later): the row-tile GEMMs (swiglu_up, down_fwd, dh / dh_swiglu, dx) run
# persistent: one program per SM, each looping over the (row tile, column tile) pairs t = program,
# program + grid, ... in one flattened loop (tl.range(flatten=True)) that the compiler software-pipelines
# across tiles: the next tile's first TMA loads are in flight while this tile finishes its K loop and its
# epilogue, which at H = 1024 and BK = 64 is a 16-step K loop per tile, 2 of them pipeline fill.
# Only with TMA descriptors: compiled for sm_90 with pointer loads, the persistent kernels spilled registers
# (the dh GEMM 112-156 bytes) and 3 of 6 launches lost their wgmma group in flight; with descriptors none
# spills and every launch keeps one (tests/test_moe_triton_compile.py). Each persistent launch needs more
# registers (swiglu_up 172-186 against 125-128), so one program fits per SM where two did.
# Off by default: not yet run on a GPU (benchmarks/moe_gpu_gemm.py ``*_tma_persistent`` rows time it).
PERSISTENT_ENV = "MOON_FAST_MOE_PERSISTENT"
# Programs a persistent launch gets under the interpreter (no SMs): 2, so each loops over several tiles.
_INTERPRETER_PROGRAMS = 2


# Widths H or I that are not multiples of 16: Triton's JIT then cannot assume 16-divisible strides, so the
# loads are masked element by element and need many more registers for addresses and masks. With the
# aligned tiles ptxas spilled in 13 of the 77 kernels compiled for sm_90 (up to 592 bytes, the 16-bit down
# GEMM) and in 10 of 55 for sm_80 (up to 700). With these, none spills on either, pointer or TMA loads
# (offline compile, python tests/aot_triton.py --arch 90|80 --ops moe: triton_aot_sm*_moe_0967e49.txt before,
# triton_aot_sm*_moe_498540e.txt after, in benchmarks/results/2026-11-22-aot/; tests/test_moe_triton_compile.py
# checks it). Keyed by "fp32?"; the launches not named keep the aligned tiles (they did not spill). Chosen per
# launch by the widths that launch sees (plan_tiles): at H = 96, I = 72 the dx GEMM sees 2I = 144 and compiles
# aligned, so it keeps the aligned tiles (triton_aot_sm*_moe_7fb69c1.txt: 0 spills). Not timed
# on a GPU: real model widths are multiples of 16, and this path exists for correctness at any width.
# The 16-bit swiglu_up entry came with its one (BM, 2 BN) dot: with the aligned tiles its unaligned, gu-storing
# compile for sm_80 spilled 24-40 bytes (Triton 3.8 / 3.6); BM 64 spills none
# (benchmarks/results/2026-11-23-aot/triton_aot_sm*_moe_triton3*_bb06852.txt).
_UNALIGNED_TILES = {
    False: {"swiglu_up": (64, 64, 64, 8, 3), "down_fwd": (128, 128, 32, 8, 3), "dx": (128, 128, 32, 8, 3),
            "dh": (128, 128, 32, 8, 3),
            "dh_swiglu": (64, 64, 64, 8, 3), "wgrad_down": (128, 64, 64, 4, 3)},
    True: {"swiglu_up": (64, 64, 16, 8, 3), "wgrad_down": (64, 64, 32, 8, 3)},
}


# 16-bit tiles before Hopper (sm_80), for the launches whose Hopper tiles spill there. An A100's mma.sync holds
# its operand fragments in registers beside the accumulator, where Hopper's wgmma reads them from shared memory.
# Compiled for sm_80 with Triton 3.6 (torch 2.11's; pyproject's oldest), the Hopper tiles spilled: 80 bytes in
# the 128x256x64 down and dx GEMMs, 8 in the plain dh, 64 in the 4-warp d down_proj (Triton 3.8: none, at 255
# registers). BK 32 with a 4th stage, and 8 warps, spill nothing with either Triton
# (benchmarks/results/2026-11-23-aot/triton_aot_sm80_moe_triton3{6,8}_*.txt). Chosen from compiles: no A100
# has run them.
_PRE_HOPPER_TILES = {"down_fwd": (128, 256, 32, 8, 4), "dx": (128, 256, 32, 8, 4), "dh": (128, 256, 32, 8, 4),
                     "wgrad_down": (128, 128, 64, 8, 3)}


def _tiles(bm, bn, bk, warps, stages) -> dict:
    return dict(zip(_TILE_KEYS, (bm, bn, bk, warps, stages)))


def tile_sizes(dtype: torch.dtype, aligned: bool = True, hopper: bool = True) -> dict[str, dict]:
    """{launch: {BM, BN, BK, num_warps, num_stages}}. Small tiles under the interpreter (cost grows with
    program instances x loop steps); tensor-core-sized tiles on a GPU. The SwiGLU launches' BN is per
    projection (swiglu_up's accumulator is (BM, 2 BN), dh_swiglu's (BM, BN)). ``aligned``: the widths H and
    I are multiples of 16 (see _UNALIGNED_TILES).
    ``hopper``: the GPU is sm_90 or later (else _PRE_HOPPER_TILES in 16-bit).
    ``$MOON_FAST_MOE_TILES`` overrides launches on a GPU, for tuning: JSON {launch: [BM, BN, BK, warps,
    stages]} for every dtype, or {dtype: {launch: [...]}} (dtype "fp32" / "fp16" / "bf16") for the dtypes
    it names, as benchmarks/moe_triton_tiles.py writes it (16-bit tiles overflow fp32's shared memory)."""
    if interpreting():
        return {name: _tiles(16, 16, 16, 4, 1) for name in LAUNCHES}
    if dtype == torch.float32:
        # Exact fp32 dots (no tensor cores) hold larger operand fragments: with 128-row tiles ptxas spilled
        # registers on sm_80 (740 bytes in the SwiGLU kernel); 64-row tiles spill none on sm_80 or sm_90
        # (python tests/aot_triton.py --arch 80; tests/test_moe_triton_compile.py checks it).
        rows, swiglu, wgrad = _tiles(64, 128, 32, 8, 3), _tiles(64, 64, 32, 8, 3), _tiles(64, 128, 32, 8, 3)
        out = {"swiglu_up": swiglu, "down_fwd": rows, "dh_swiglu": swiglu, "wgrad_down": wgrad,
               "wgrad_gate_up": wgrad, "dx": rows, "dh": rows}
    else:
        # The fastest of benchmarks/moe_triton_tiles.py's candidates on an H100 (bf16, T=16384, E=8,
        # H=I=1024; benchmarks/results/2026-11-22-h100/moe_triton_tiles_bf16.txt) among those that fit an
        # A100's 163 KiB of shared memory and spill no registers (tests/test_moe_triton_compile.py).
        # The SwiGLU launches keep (128, 64): in swiglu_up (128, 128) spilled 12 bytes and was within 2
        # points (with a 4th stage 4 points better, but 192 KiB); in dh_swiglu, (64, 128, 4 warps) spilled
        # 1.3 KB and was within 2 points (all its candidates ran at 14-20% of dense: see the README).
        out = {"swiglu_up": _tiles(128, 64, 64, 8, 3), "down_fwd": _tiles(128, 256, 64, 8, 3),
               "dh_swiglu": _tiles(128, 64, 64, 8, 3), "wgrad_down": _tiles(128, 128, 64, 4, 3),
               "wgrad_gate_up": _tiles(128, 128, 64, 8, 4), "dx": _tiles(128, 256, 64, 8, 3),
               # the plain dh GEMM, (S, H) @ (H, I), has down_fwd's shape at H = I: its tiles, not yet swept
               "dh": _tiles(128, 256, 64, 8, 3)}
    if not hopper and dtype != torch.float32:
        out.update({name: _tiles(*tiles) for name, tiles in _PRE_HOPPER_TILES.items()})
    if not aligned:
        out.update({name: _tiles(*tiles) for name, tiles in _UNALIGNED_TILES[dtype == torch.float32].items()})
    override = os.environ.get(TILES_ENV)
    if override:
        try:
            table = json.loads(override)
            if set(table) <= set(_DTYPE_NAMES.values()):  # keyed by dtype: only this dtype's entry applies
                table = table.get(_DTYPE_NAMES[dtype], {})
            unknown = set(table) - set(LAUNCHES)
            if unknown:
                raise ValueError(f"unknown launches {sorted(unknown)}")
            out.update({name: _tiles(*table[name]) for name in table})
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ValueError(f"${TILES_ENV} must be JSON {{launch: [BM, BN, BK, num_warps, num_stages]}} or "
                             f"{{dtype: {{launch: [...]}}}} (dtypes {sorted(_DTYPE_NAMES.values())}) with launches "
                             f"among {LAUNCHES}; got {override!r} ({exc})") from exc
    return out


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def plan_tiles(dtype: torch.dtype, hidden: int, inter: int, hopper: bool = True) -> dict[str, dict]:
    """Each launch's tiles for widths H = ``hidden`` and I = ``inter``: the aligned table where every width
    that launch's kernel sees is a multiple of 16 (the JIT's 16-divisible specialisation), else
    _UNALIGNED_TILES. The dx and gate_up weight-gradient launches see 2I, not I (their operand is d gu,
    (S, 2I)), so at I % 16 == 8 they compile aligned and keep the aligned tiles."""
    tables = {aligned: tile_sizes(dtype, aligned=aligned, hopper=hopper) for aligned in (True, False)}
    widths = {name: (hidden, 2 * inter if name in ("dx", "wgrad_gate_up") else inter) for name in LAUNCHES}
    return {name: tables[all(w % 16 == 0 for w in widths[name])][name] for name in LAUNCHES}


def swiglu_backward_mode() -> str:
    """``$MOON_FAST_MOE_SWIGLU_BWD``: "fused" (default) or "split" (see SWIGLU_BWD_ENV)."""
    mode = os.environ.get(SWIGLU_BWD_ENV) or "fused"
    if mode not in SWIGLU_BWD_MODES:
        raise ValueError(f"${SWIGLU_BWD_ENV} must be one of {SWIGLU_BWD_MODES}; got {mode!r}")
    return mode


def tma_enabled() -> bool:
    """``$MOON_FAST_MOE_TMA``: "1" on, unset / "0" off (see TMA_ENV)."""
    value = os.environ.get(TMA_ENV) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"${TMA_ENV} must be 0 or 1; got {value!r}")
    return value == "1"


def persistent_enabled() -> bool:
    """``$MOON_FAST_MOE_PERSISTENT``: "1" on, unset / "0" off (see PERSISTENT_ENV)."""
    value = os.environ.get(PERSISTENT_ENV) or "0"
    if value not in ("0", "1"):
        raise ValueError(f"${PERSISTENT_ENV} must be 0 or 1; got {value!r}")
    return value == "1"


def _device_has_tma(device: torch.device) -> bool:
    """Hopper (sm_90) or later; and the interpreter, which runs descriptor loads as TMA would (zero fill)."""
    if interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor's layout rule: last dim contiguous, the other strides and the base 16-byte aligned."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


def _rows_desc(a: torch.Tensor, rows: int, cols: int):
    """A (S, K) row-major as a descriptor of (rows, cols) boxes, or None where the layout does not allow one."""
    return TensorDescriptor(a, list(a.shape), list(a.stride()), [rows, cols]) if _tma_ok(a) else None


def _weights_desc(b: torch.Tensor, bk: int, bn: int):
    """B (E, K, N) any strides -> (descriptor, mode): mode 1 boxes (1, BK, BN) of an N-contiguous B, mode 2
    boxes (1, BN, BK) of a K-contiguous one (the kernel transposes the tile); (b, 0) where neither fits."""
    if b.stride(2) == 1 and _tma_ok(b):
        return TensorDescriptor(b, list(b.shape), list(b.stride()), [1, bk, bn]), 1
    bt = b.transpose(1, 2)
    if bt.stride(2) == 1 and _tma_ok(bt):
        return TensorDescriptor(bt, list(bt.shape), list(bt.stride()), [1, bn, bk]), 2
    return b, 0


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. fp32 operands (fp32 inputs, or bf16 upcast under the interpreter): exact
    ("ieee") unless torch's own fp32 matmuls use TF32 (torch.backends.cuda.matmul.allow_tf32).
    16-bit operands: the default ("tf32"), which 16-bit dots ignore."""
    if compute_dtype_for(dtype) != tl.float32:
        return "tf32"
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tile_of_program(N, BN: tl.constexpr):
    """(row tile, column tile) of this program in a row-tile launch's 1-D grid of
    (cdiv(S, BM) + E) * cdiv(N, BN) programs, column tile fastest.

    Why this order: a GPU starts programs in grid order, so the cdiv(N, BN) programs that read one (BM, K)
    block of the row operand A run side by side and share it through L2. With the row tile fastest (the
    order before), they ran a whole grid row apart, and each of them read the block from HBM again: on an
    H100 the down and dx GEMMs' times grew by |A| at 3.0-3.2 TB/s per column tile (r = 0.98 over the tile
    sweep; benchmarks/moe_tile_rereads.py on benchmarks/results/2026-11-22-h100/moe_triton_tiles_bf16.txt).
    The weights B[e] are read by every program of expert e, and they too stay in L2 (an expert's rows are
    consecutive tiles)."""
    n_cols = tl.cdiv(N, BN)
    pid = tl.program_id(0)
    return pid // n_cols, pid % n_cols


@triton.jit
def _expert_tiles(bounds_ptr, E, BM: tl.constexpr, EP: tl.constexpr):
    """Each expert's rows, bounds[e]:bounds[e + 1], cut into cdiv(count_e, BM) tiles, over EP >= E lanes
    (zero past E): (starts, ends, tiles, tile_end), each (EP,): the expert's first row, its end row, its tile
    count and the running tile count up to and including it (a prefix sum)."""
    es = tl.arange(0, EP)
    emask = es < E
    starts = tl.load(bounds_ptr + es, mask=emask, other=0)
    ends = tl.load(bounds_ptr + 1 + es, mask=emask, other=0)
    tiles = (ends - starts + BM - 1) // BM
    return starts, ends, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _locate_row_tile(tile, starts, ends, tiles, tile_end, BM: tl.constexpr, EP: tl.constexpr):
    """Row tile ``tile`` from _expert_tiles: expert e (int64; E or more past the last tile), rows (BM,) in
    expert-contiguous order and their mask (rows past the expert's last row are off)."""
    es = tl.arange(0, EP)
    e = tl.sum((tile_end <= tile).to(tl.int32), 0)  # experts whose tiles all come before this one
    mine = es == e
    # this tile's first row: its expert's start + (tile - the expert's first tile) * BM, in one reduction
    # (two, one per term, left 12 bytes of spills in the 128x256 down GEMM on sm_80)
    first_row = tl.sum(tl.where(mine, starts + (tile - tile_end + tiles) * BM, 0), 0)
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    rows = first_row + tl.arange(0, BM)
    return e.to(tl.int64), rows, rows < row_end


@triton.jit
def _row_tile(bounds_ptr, tile, E, BM: tl.constexpr, EP: tl.constexpr):
    """Row tile ``tile``: expert e (int64; E or more for a surplus tile), rows (BM,) in
    expert-contiguous order and their mask (rows past the expert's last row are off).

    Tile j is the j-th when each expert's rows, bounds[e]:bounds[e + 1], are cut into cdiv(count_e, BM)
    tiles in expert order. Every program finds its own tile from bounds (EP >= E lanes): a prefix sum of the
    tile counts, so no tile schedule is built between routing and the GEMMs. The grid holds the upper bound
    cdiv(S, BM) + E of the tile count; programs past the last tile return at once."""
    starts, ends, tiles, tile_end = _expert_tiles(bounds_ptr, E, BM, EP)
    return _locate_row_tile(tile, starts, ends, tiles, tile_end, BM, EP)


# x (T, H) rows gathered by token (S,); w (E, 2I, H) gate rows first -> h (S, I), gu (S, 2I)
# One (BM, 2 BN) accumulator: columns [0, BN) the gate's n0 + j, [BN, 2 BN) the up projection's n0 + j.
@triton.jit
def _swiglu_up_tile(e, rows, rmask, col_tile, x_ptr, token_ptr, w_ptr, h_ptr, gu_ptr,
                    H, INTER, stride_xm, stride_we, stride_wn, stride_wk,
                    STORE_GU: tl.constexpr, W_DESC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    tok = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
    n0 = col_tile * BN
    cols = n0 + tl.arange(0, BN)
    cmask = cols < INTER
    # Gate and up weights in one B tile and one dot, so each A tile is read from shared memory by one MMA,
    # not by two (one per projection, as before). Hopper's wgmma reads both operands from shared memory: per
    # K step of 16 a warp group's two N = 64 dots read 8 KB (A twice), the one N = 128 dot 6 KB, for the
    # same FLOPs. Estimated at an H100's ~4096 bf16 FLOP per clock per SM, the two dots need ~128 B per clock
    # of its 128 B of shared-memory bandwidth (before the copies that fill it), the one ~96 (untimed).
    both = tl.arange(0, 2 * BN)
    w_cols = n0 + both % BN  # the projection's column of each accumulator column
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    offs_k = tl.arange(0, BK)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
    if W_DESC:  # w viewed (E, 2, I, H) through a TMA descriptor of (1, 2, BN, BK) boxes: zeros past row I
        e32 = e.to(tl.int32)
    else:
        w_ptrs = (w_ptr + e * stride_we + ((both // BN) * INTER + w_cols)[None, :] * stride_wn
                  + offs_k[:, None] * stride_wk)
    for k0 in range(0, H, BK):
        kmask = (k0 + offs_k) < H
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0).to(COMPUTE)
        if W_DESC:
            w = w_ptr.load([e32, 0, n0, k0]).reshape(2 * BN, BK).trans()
        else:
            w = tl.load(w_ptrs, mask=kmask[:, None] & (w_cols < INTER)[None, :], other=0.0)
            w_ptrs += BK * stride_wk
        acc = tl.dot(a, w.to(COMPUTE), acc, input_precision=PRECISION)
        a_ptrs += BK
    acc_g, acc_u = acc.reshape(BM, 2, BN).permute(0, 2, 1).split()
    omask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    if STORE_GU:
        gu_row = gu_ptr + rows64[:, None] * (2 * INTER) + cols[None, :]
        tl.store(gu_row, acc_g.to(gu_ptr.dtype.element_ty), mask=omask)
        tl.store(gu_row + INTER, acc_u.to(gu_ptr.dtype.element_ty), mask=omask)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rows64[:, None] * INTER + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _swiglu_up_kernel(x_ptr, token_ptr, w_ptr, h_ptr, gu_ptr, bounds_ptr,
                      H, INTER, stride_xm, stride_we, stride_wn, stride_wk,
                      STORE_GU: tl.constexpr, W_DESC: tl.constexpr, PERSISTENT: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, E: tl.constexpr, EP: tl.constexpr, COMPUTE: tl.constexpr,
                      PRECISION: tl.constexpr):
    if PERSISTENT:  # one program per SM looping over the tiles (see PERSISTENT_ENV)
        starts, ends, tiles, tile_end = _expert_tiles(bounds_ptr, E, BM, EP)
        n_cols = tl.cdiv(INTER, BN)
        for t in tl.range(tl.program_id(0), tl.sum(tiles, 0) * n_cols, tl.num_programs(0), flatten=True):
            e, rows, rmask = _locate_row_tile(t // n_cols, starts, ends, tiles, tile_end, BM, EP)
            _swiglu_up_tile(e, rows, rmask, t % n_cols, x_ptr, token_ptr, w_ptr, h_ptr, gu_ptr, H, INTER,
                            stride_xm, stride_we, stride_wn, stride_wk, STORE_GU, W_DESC, BM, BN, BK, COMPUTE,
                            PRECISION)
    else:
        tile, col_tile = _tile_of_program(INTER, BN)
        e, rows, rmask = _row_tile(bounds_ptr, tile, E, BM, EP)
        if e < E:  # else a surplus program of the grid's upper bound
            _swiglu_up_tile(e, rows, rmask, col_tile, x_ptr, token_ptr, w_ptr, h_ptr, gu_ptr, H, INTER,
                            stride_xm, stride_we, stride_wn, stride_wk, STORE_GU, W_DESC, BM, BN, BK, COMPUTE,
                            PRECISION)


# C[c_row(r)] = (scale[r] * A[a_row(r)]) @ B[e]   A rows (K,), B[e] (K, N) by strides, C rows (N,)
# SWIGLU_BWD: C is dh (N = I); the epilogue reads gu (S, 2I) and writes dgu (S, 2I) and h (S, I) to c_ptr
# A_DESC / B_DESC (TMA_ENV): a_ptr / b_ptr are TMA tensor descriptors (see _rows_desc, _weights_desc)
@triton.jit
def _grouped_rows_tile(e, rows, rmask, col_tile, a_ptr, a_idx_ptr, a_scale_ptr, b_ptr, c_ptr, c_idx_ptr, gu_ptr,
                       dgu_ptr, N, K, stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                       A_GATHER: tl.constexpr, A_SCALE: tl.constexpr, C_SCATTER: tl.constexpr,
                       SWIGLU_BWD: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, COMPUTE: tl.constexpr,
                       PRECISION: tl.constexpr):
    if A_GATHER:
        a_rows = tl.load(a_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = col_tile * BN + tl.arange(0, BN)
    cmask = cols < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # A_DESC: A (S, K) through a TMA descriptor from the tile's first row; rows past the expert's end load
    # the next expert's rows (zeros past S), which the store masks off. Pointer loads: offsets recomputed
    # per K step, which keeps fewer 64-bit pointer tiles live (no spills).
    if A_DESC:
        first = tl.min(rows, 0)
    else:
        a_base = a_ptr + a_rows[:, None] * stride_am
    if B_DESC == 0:
        b_base = b_ptr + e * stride_be
    n0 = col_tile * BN
    e32 = e.to(tl.int32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        if A_DESC:
            a = a_ptr.load([first, k0])
        else:
            a = tl.load(a_base + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if B_DESC == 1:  # B (E, K, N) N-contiguous, boxes (1, BK, BN)
            b = b_ptr.load([e32, k0, n0]).reshape(BK, BN)
        elif B_DESC == 2:  # B stored (E, N, K) K-contiguous, boxes (1, BN, BK), transposed here
            b = b_ptr.load([e32, n0, k0]).reshape(BN, BK).trans()
        else:
            b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(a.to(COMPUTE), b.to(COMPUTE), acc, input_precision=PRECISION)
    if A_SCALE:  # diag(scale) A B = diag(scale) (A B): scale the accumulator rows once, not every A tile
        row_scale = tl.load(a_scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * row_scale[:, None]
    else:
        row_scale = tl.full((BM,), 1.0, tl.float32)
    omask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    if SWIGLU_BWD:  # h is stored scaled by the rows' routing weights too (kernels/moe_swiglu.py)
        # In two halves of BN / 2 columns. Compiled for sm_90 (bf16/fp16, Triton 3.6 and 3.8), each half's
        # accumulator is converted once to the coalesced layout that the gu loads and the three stores then
        # share: 2 layout conversions where the whole tile took 4, and 97-108 registers where it took 174-187,
        # so 2 programs fit on an SM instead of 1 and one's epilogue can overlap the other's MMAs
        # (tests/aot_triton.py; untimed).
        d0, d1 = acc.reshape(BM, 2, BN // 2).permute(0, 2, 1).split()
        half = n0 + tl.arange(0, BN // 2)
        swiglu_backward_tile(d0, gu_ptr, dgu_ptr, rows64[:, None] * (2 * N) + half[None, :], c_ptr,
                             rows64[:, None] * stride_cm + half[None, :], row_scale[:, None], N,
                             rmask[:, None] & (half < N)[None, :])
        half += BN // 2
        swiglu_backward_tile(d1, gu_ptr, dgu_ptr, rows64[:, None] * (2 * N) + half[None, :], c_ptr,
                             rows64[:, None] * stride_cm + half[None, :], row_scale[:, None], N,
                             rmask[:, None] & (half < N)[None, :])
    else:
        if C_SCATTER:
            c_rows = tl.load(c_idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            c_rows = rows64
        tl.store(c_ptr + c_rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _grouped_rows_kernel(a_ptr, a_idx_ptr, a_scale_ptr, b_ptr, c_ptr, c_idx_ptr, gu_ptr, dgu_ptr,
                         bounds_ptr,
                         N, K, stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                         A_GATHER: tl.constexpr, A_SCALE: tl.constexpr, C_SCATTER: tl.constexpr,
                         SWIGLU_BWD: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr,
                         PERSISTENT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         E: tl.constexpr, EP: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    if PERSISTENT:  # one program per SM looping over the tiles (see PERSISTENT_ENV)
        starts, ends, tiles, tile_end = _expert_tiles(bounds_ptr, E, BM, EP)
        n_cols = tl.cdiv(N, BN)
        for t in tl.range(tl.program_id(0), tl.sum(tiles, 0) * n_cols, tl.num_programs(0), flatten=True):
            e, rows, rmask = _locate_row_tile(t // n_cols, starts, ends, tiles, tile_end, BM, EP)
            _grouped_rows_tile(e, rows, rmask, t % n_cols, a_ptr, a_idx_ptr, a_scale_ptr, b_ptr, c_ptr, c_idx_ptr,
                               gu_ptr, dgu_ptr, N, K, stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                               A_GATHER, A_SCALE, C_SCATTER, SWIGLU_BWD, A_DESC, B_DESC, BM, BN, BK, COMPUTE,
                               PRECISION)
    else:
        tile, col_tile = _tile_of_program(N, BN)
        e, rows, rmask = _row_tile(bounds_ptr, tile, E, BM, EP)
        if e < E:  # else a surplus program of the grid's upper bound
            _grouped_rows_tile(e, rows, rmask, col_tile, a_ptr, a_idx_ptr, a_scale_ptr, b_ptr, c_ptr, c_idx_ptr,
                               gu_ptr, dgu_ptr, N, K, stride_am, stride_be, stride_bk, stride_bn, stride_cm,
                               A_GATHER, A_SCALE, C_SCATTER, SWIGLU_BWD, A_DESC, B_DESC, BM, BN, BK, COMPUTE,
                               PRECISION)


@triton.jit
def _wgrad_step(acc, a_ptr, a_idx_ptr, b_ptr, b_idx_ptr, r0, end, m0, n0, ms, ns, mmask, nmask, stride_am, stride_bm,
                A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr,
                BK: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    """acc (BM, BN) += A[rows r0 .. r0 + BK, ms]^T B[rows, ns], rows past ``end`` zero (pointer loads; a
    descriptor's box is read whole: its caller gives it only rows below ``end``)."""
    rs = r0 + tl.arange(0, BK)
    rmask = rs < end
    # both operands' row indices before either tile's load (in this order the pointer-only kernels compile as
    # they did before descriptors: loading A first took sm_80's fp32 d gate_up kernel from 138 to 242 registers)
    if A_GATHER:
        a_rows = tl.load(a_idx_ptr + rs, mask=rmask, other=0).to(tl.int64)
    else:
        a_rows = rs.to(tl.int64)
    if B_GATHER:
        b_rows = tl.load(b_idx_ptr + rs, mask=rmask, other=0).to(tl.int64)
    else:
        b_rows = rs.to(tl.int64)
    if A_DESC:  # A (S, M) in boxes (BK, BM)
        at = a_ptr.load([r0, m0]).trans()
    else:
        at = tl.load(a_ptr + a_rows[None, :] * stride_am + ms[:, None], mask=mmask[:, None] & rmask[None, :],
                     other=0.0)
    if B_DESC:  # B (S, N) in boxes (BK, BN)
        b = b_ptr.load([r0, n0])
    else:
        b = tl.load(b_ptr + b_rows[:, None] * stride_bm + ns[None, :], mask=rmask[:, None] & nmask[None, :],
                    other=0.0)
    return tl.dot(at.to(COMPUTE), b.to(COMPUTE), acc, input_precision=PRECISION)


# C[e] (M, N) = sum over rows r of expert e of A[a_row(r), :M]^T B[b_row(r), :N]
# grid (cdiv(N, BN), cdiv(M, BM), E): see _wgrad_grid
# A_DESC / B_DESC (TMA_ENV; operands whose rows are not gathered): TMA descriptors of (BK, BM) / (BK, BN)
# boxes. A box reads BK rows whatever the expert's end, and the next expert's rows cannot be masked out of
# a reduction over rows (zeros times their values may be NaN), so the descriptors take the whole BK-row
# blocks of the expert and the last partial block goes through masked pointer loads (a_rows / b_rows: the
# tensors themselves, where a_ptr / b_ptr are descriptors).
@triton.jit
def _grouped_wgrad_kernel(a_ptr, a_idx_ptr, b_ptr, b_idx_ptr, c_ptr, bounds_ptr, a_rows, b_rows,
                          M, N, stride_am, stride_bm, stride_ce,
                          A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, A_DESC: tl.constexpr,
                          B_DESC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          COMPUTE: tl.constexpr, PRECISION: tl.constexpr):
    e = tl.program_id(2).to(tl.int64)
    start = tl.load(bounds_ptr + e)
    end = tl.load(bounds_ptr + e + 1)
    m0 = tl.program_id(1) * BM
    n0 = tl.program_id(0) * BN
    ms = m0 + tl.arange(0, BM)
    ns = n0 + tl.arange(0, BN)
    mmask = ms < M
    nmask = ns < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    r_tail = start
    if A_DESC or B_DESC:
        r_tail = start + (end - start) // BK * BK
        for r0 in range(start, r_tail, BK):
            acc = _wgrad_step(acc, a_ptr, a_idx_ptr, b_ptr, b_idx_ptr, r0, end, m0, n0, ms, ns, mmask, nmask,
                              stride_am, stride_bm, A_GATHER, B_GATHER, A_DESC, B_DESC, BK, COMPUTE, PRECISION)
    for r0 in range(r_tail, end, BK):
        acc = _wgrad_step(acc, a_rows, a_idx_ptr, b_rows, b_idx_ptr, r0, end, m0, n0, ms, ns, mmask, nmask,
                          stride_am, stride_bm, A_GATHER, B_GATHER, False, False, BK, COMPUTE, PRECISION)
    out = c_ptr + e * stride_ce + ms[:, None].to(tl.int64) * N + ns[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


# ----------------------------------------------------------------------------- launchers

def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch on ``device``: one per SM (each persistent launch compiles to one
    program per SM on sm_90: see PERSISTENT_ENV); _INTERPRETER_PROGRAMS under the interpreter."""
    return _INTERPRETER_PROGRAMS if interpreting() else _sm_count(device)


class _Plan:
    """Routing (kernels/moe_routing.py) and launch constants shared by the forward and backward launches."""

    def __init__(self, expert_idx: torch.Tensor, num_experts: int, dtype: torch.dtype, widths: tuple[int, int]):
        self.routing, self.bounds = route_triton(expert_idx, num_experts)
        assert_all_routed(self.routing)  # moe_mlp leaves the expert-range check to this on a GPU
        hopper = _device_has_tma(expert_idx.device)  # sm_90 or later (and the interpreter)
        self.cfg = plan_tiles(dtype, *widths, hopper=hopper)  # widths (H, I)
        # E is a compile-time constant of the row-tile kernels (one compile per model); EP >= E lanes for
        # _row_tile's search over the experts
        self.experts = {"E": num_experts, "EP": max(16, next_power_of_2(num_experts))}
        self.compute = compute_dtype_for(dtype)
        self.precision = _precision(dtype)
        self.swiglu_bwd = swiglu_backward_mode()
        self.tma = tma_enabled() and dtype in (torch.float16, torch.bfloat16) and hopper
        # programs of a persistent launch (PERSISTENT_ENV; 0: one program per tile)
        self.programs = persistent_programs(expert_idx.device) if self.tma and persistent_enabled() else 0

    def rows_grid(self, opts: dict, n: int) -> tuple[int]:
        """The 1-D grid of a row-tile launch with output width ``n``: row tiles (an upper bound of
        sum_e cdiv(count_e, BM)) x column tiles, the column tile fastest (_tile_of_program); persistent, at
        most ``programs`` (each loops over the real tiles: see PERSISTENT_ENV)."""
        row_tiles = triton.cdiv(self.routing.num_slots, opts["BM"]) + self.routing.num_experts
        tiles = row_tiles * triton.cdiv(n, opts["BN"])
        return (min(tiles, self.programs) if self.programs else tiles,)

    def launch_opts(self, launch: str) -> dict:
        return {**self.cfg[launch], "COMPUTE": self.compute, "PRECISION": self.precision}


def swiglu_up(plan: _Plan, hidden, gate_up_proj, store_gu: bool):
    """hidden (T, H), gate_up_proj (E, 2I, H) any strides -> h (S, I), gu (S, 2I) or None."""
    s, inter = plan.routing.num_slots, gate_up_proj.shape[1] // 2
    h = _utils.new_output((s, inter), hidden)
    gu = _utils.new_output((s, 2 * inter), hidden) if store_gu else h  # dummy pointer when not stored
    opts = plan.launch_opts("swiglu_up")
    grid = plan.rows_grid(opts, inter)
    w = gate_up_proj
    if plan.tma and w.stride(2) == 1 and _tma_ok(w):
        # the (E, 2, I, H) view (its new stride, I rows, is 16-byte aligned as a row is): gate and up rows of
        # one box in one load
        shape, strides = [w.shape[0], 2, inter, w.shape[2]], [w.stride(0), inter * w.stride(1), *w.stride()[1:]]
        w = TensorDescriptor(w, shape, strides, [1, 2, opts["BN"], opts["BK"]])
    _swiglu_up_kernel[grid](hidden, plan.routing.token, w, h, gu, plan.bounds, hidden.shape[1], inter,
                            hidden.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2),
                            STORE_GU=store_gu, W_DESC=w is not gate_up_proj, PERSISTENT=plan.programs > 0,
                            **plan.experts, **opts)
    return h, (gu if store_gu else None)


def grouped_rows(plan: _Plan, launch: str, a, b, n, *, a_idx=None, a_scale=None, c_idx=None, swiglu_gu=None,
                 out_rows=None):
    """C (out_rows, n) with C[c_idx[r] or r] = (a_scale[r] * a[a_idx[r] or r]) @ b[e], b (E, K, N) any
    strides. With ``swiglu_gu`` (S, 2I): returns (h (S, I), dgu (S, 2I)) from dh = the product.
    ``launch``: which of LAUNCHES this is (its tiles)."""
    s = plan.routing.num_slots
    k = a.shape[1]
    c = _utils.new_output((out_rows or s, n), a)
    dgu = _utils.new_output(swiglu_gu.shape, a) if swiglu_gu is not None else c
    opts = plan.launch_opts(launch)
    grid = plan.rows_grid(opts, n)
    a_op, b_op, b_mode = a, b, 0
    if plan.tma:
        if a_idx is None:
            a_op = _rows_desc(a, opts["BM"], opts["BK"]) or a
        b_op, b_mode = _weights_desc(b, opts["BK"], opts["BN"])
    _grouped_rows_kernel[grid](
        a_op, a_idx if a_idx is not None else plan.bounds, a_scale if a_scale is not None else a, b_op, c,
        c_idx if c_idx is not None else plan.bounds, swiglu_gu if swiglu_gu is not None else c, dgu,
        plan.bounds, n, k, a.stride(0), b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), A_GATHER=a_idx is not None, A_SCALE=a_scale is not None, C_SCATTER=c_idx is not None,
        SWIGLU_BWD=swiglu_gu is not None, A_DESC=a_op is not a, B_DESC=b_mode, PERSISTENT=plan.programs > 0,
        **plan.experts, **opts)
    return (c, dgu) if swiglu_gu is not None else c


def _wgrad_grid(experts: int, m: int, n: int, opts: dict) -> tuple[int, int, int]:
    """The weight-gradient grid (cdiv(N, BN), cdiv(M, BM), E). A GPU starts programs x fastest, so one
    expert's (M, N) blocks run together: its A column blocks (read by the cdiv(N, BN) programs of one M
    block) and B column blocks (read by every M block) are shared through L2. With the expert fastest (the
    order before), a wave held every expert's blocks of a few (M, N) positions, so A came from HBM again for
    each N block, as in the row-tile launches (_tile_of_program). Reasoned, not fitted: the tile sweep's
    weight-gradient candidates differ in more than BN, and their times do not separate this cost."""
    return triton.cdiv(n, opts["BN"]), triton.cdiv(m, opts["BM"]), experts


def grouped_wgrad(plan: _Plan, launch: str, a, b, *, a_idx=None, b_idx=None):
    """(E, M, N): per expert e, sum over its rows r of a[a_idx[r]]^T b[b_idx[r]]."""
    m, n, e = a.shape[1], b.shape[1], plan.routing.num_experts
    c = _utils.new_output((e, m, n), a)
    opts = plan.launch_opts(launch)
    a_op, b_op = a, b
    if plan.tma:  # the operand whose rows are not gathered, through a descriptor where its layout allows one
        if a_idx is None:
            a_op = _rows_desc(a, opts["BK"], opts["BM"]) or a
        if b_idx is None:
            b_op = _rows_desc(b, opts["BK"], opts["BN"]) or b
    _grouped_wgrad_kernel[_wgrad_grid(e, m, n, opts)](
        a_op, a_idx if a_idx is not None else plan.bounds, b_op, b_idx if b_idx is not None else plan.bounds, c,
        plan.bounds, a, b, m, n, a.stride(0), b.stride(0), c.stride(0),
        A_GATHER=a_idx is not None, B_GATHER=b_idx is not None, A_DESC=a_op is not a, B_DESC=b_op is not b, **opts)
    return c


# ----------------------------------------------------------------------------- autograd

def _forward_weights(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward GEMMs' B operands: gate_up (E, 2I, H) as (e, n, k) and down^T (E, I, H) as (e, k, n).
    As stored, both are K-contiguous. 16-bit dots take that as it is; the exact fp32 dot ran at 18% of dense
    cuBLAS with it on an H100 while the backward's N-contiguous operands ran at 80%
    (benchmarks/results/2026-11-22-h100/moe_gpu_gemm_0dbe9ff.txt). So fp32 gets N-contiguous copies (one
    pass over the weights, E * 3 * I * H elements) with the same logical shapes."""
    if gate_up_proj.dtype != torch.float32:
        return gate_up_proj, down_proj.transpose(1, 2)
    return gate_up_proj.transpose(1, 2).contiguous().transpose(1, 2), down_proj.transpose(1, 2).contiguous()


class MoeMlpTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
        t, k = expert_idx.shape
        hdim = hidden.shape[1]
        plan = _Plan(expert_idx, gate_up_proj.shape[0], hidden.dtype, (hdim, down_proj.shape[2]))
        need_grad = any(ctx.needs_input_grad)
        w_up, w_down = _forward_weights(gate_up_proj, down_proj)
        h, gu = swiglu_up(plan, hidden, w_up, store_gu=need_grad)
        del w_up
        # y in slot order (t * k + j): the scatter is fused into the down GEMM's stores
        y_slot = grouped_rows(plan, "down_fwd", h, w_down, hdim, c_idx=plan.routing.perm)
        del w_down
        out = combine(y_slot, expert_weight, _utils.new_output((t, hdim), hidden))
        ctx.plan = plan
        ctx.save_for_backward(hidden, expert_weight, gate_up_proj, down_proj, gu, y_slot)
        return out

    @staticmethod
    @once_differentiable  # no double backward: fail loudly rather than give wrong 2nd-order grads
    def backward(ctx, dout):
        hidden, expert_weight, gate_up_proj, down_proj, gu, y_slot = ctx.saved_tensors
        plan = ctx.plan
        r = plan.routing
        (t, k), hdim = expert_weight.shape, y_slot.shape[1]
        inter = down_proj.shape[2]
        need_x, _, need_w, need_gu, need_down = ctx.needs_input_grad
        dout = dout.contiguous()
        d_hidden = d_weight = d_gate_up = d_down = None
        if need_w:
            d_weight = choice_weight_grad(y_slot, dout, _utils.new_output((t, k), expert_weight))
        if need_x or need_gu or need_down:
            w_sorted = expert_weight.reshape(-1).index_select(0, r.perm)
            # dh = (w * dout[token]) @ down[e], turned into dgu (and w * h, h recomputed) by the GEMM's
            # epilogue or, split, by one elementwise pass after it
            if plan.swiglu_bwd == "split":
                wh, dgu = swiglu_backward(grouped_rows(plan, "dh", dout, down_proj, inter, a_idx=r.token,
                                                       a_scale=w_sorted), gu, w_sorted)
            else:
                wh, dgu = grouped_rows(plan, "dh_swiglu", dout, down_proj, inter, a_idx=r.token,
                                       a_scale=w_sorted, swiglu_gu=gu)
            if need_down:  # d down[e] = sum over e's rows of (w dout[token])^T h = dout[token]^T (w h)
                d_down = grouped_wgrad(plan, "wgrad_down", dout, wh, a_idx=r.token)
            del wh
            if need_gu:
                d_gate_up = grouped_wgrad(plan, "wgrad_gate_up", dgu, hidden, b_idx=r.token)
            if need_x:
                dx_slot = grouped_rows(plan, "dx", dgu, gate_up_proj, hdim, c_idx=r.perm)
                d_hidden = dx_slot.view(t, k, hdim).sum(1)
        return d_hidden, None, d_weight, d_gate_up, d_down


def moe_mlp_triton(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    """See moon_fast.ops.moe.moe_mlp (inputs already checked and contiguous)."""
    return MoeMlpTriton.apply(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)
