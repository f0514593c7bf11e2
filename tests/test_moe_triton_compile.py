"""The MoE Triton kernels compile for real GPUs (sm_80, sm_90) as the JIT would compile the launches the op
really makes, offline (tests/aot_triton.py: no GPU needed). No GPU has run these kernels; the interpreter
tests check their logic, this checks what only a GPU compile sees: dot operand types and shapes, shared
memory, that the aligned (fast-path) GEMM loops are software pipelined, that 16-bit GEMMs use Hopper's
asynchronous wgmma on sm_90, and that no launch spills registers (aligned widths or not)."""

from __future__ import annotations

import pytest
from aot_triton import run_child, triton_builds

# The launches the op makes (tile flags that are True), each in bf16, fp16 and fp32.
VARIANTS = [("_swiglu_up_kernel", ("STORE_GU",)), ("_swiglu_up_kernel", ()),  # training / inference forward
            ("_grouped_rows_kernel", ("C_SCATTER",)),  # down GEMM, and the dx GEMM
            ("_grouped_rows_kernel", ("A_GATHER", "A_SCALE", "SWIGLU_BWD")),  # dh GEMM + SwiGLU backward
            ("_grouped_rows_kernel", ("A_GATHER", "A_SCALE")),  # the plain dh GEMM (SwiGLU backward split)
            ("_grouped_wgrad_kernel", ("A_GATHER",)),  # d down_proj
            ("_grouped_wgrad_kernel", ("B_GATHER",))]  # d gate_up_proj
# With $MOON_FAST_MOE_TMA=1 (16-bit only): the weights through descriptors in every row-tile launch (B_DESC
# 1 = N-contiguous, 2 = K-contiguous, transposed in the kernel), and A too where its rows are not gathered.
TMA_VARIANTS = [("_swiglu_up_kernel", ("STORE_GU", "W_DESC")), ("_swiglu_up_kernel", ("W_DESC",)),
                ("_grouped_rows_kernel", ("C_SCATTER", "A_DESC", "B_DESC=2")),  # down GEMM
                ("_grouped_rows_kernel", ("C_SCATTER", "A_DESC", "B_DESC=1")),  # dx GEMM
                ("_grouped_rows_kernel", ("A_GATHER", "A_SCALE", "SWIGLU_BWD", "B_DESC=1")),
                ("_grouped_rows_kernel", ("A_GATHER", "A_SCALE", "B_DESC=1")),
                # the weight gradients: w * h rows (d down_proj), d gu rows (d gate_up_proj)
                ("_grouped_wgrad_kernel", ("A_GATHER", "B_DESC")), ("_grouped_wgrad_kernel", ("B_GATHER", "A_DESC"))]
# With $MOON_FAST_MOE_PERSISTENT=1 too: the same launches, each a persistent loop over its tiles (16-bit on
# Hopper only, where TMA is).
PERSISTENT_VARIANTS = [(name, switches + ("PERSISTENT",)) for name, switches in TMA_VARIANTS
                       if name != "_grouped_wgrad_kernel"]
# The small kernels around the GEMMs: routing (kernels/moe_routing.py), combine and its weight gradient
# (kernels/moe_combine.py), the split SwiGLU backward (kernels/moe_swiglu.py). They have no tile table; each
# must compile and spill nothing.
HELPERS = ("_chunk_histogram_kernel", "_chunk_scatter_kernel", "_combine_kernel", "_choice_grad_kernel",
           "_swiglu_backward_kernel")


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", triton_builds())
@pytest.mark.parametrize("arch", [80, 90])
def test_moe_kernels_compile_for_gpu_ahead_of_time(arch, triton_dir, tmp_path):
    pytest.importorskip("triton")
    kernels = run_child("moe", arch, tmp_path, triton_dir=triton_dir)
    covered = set()
    for kern in kernels:
        flags = kern["flags"]
        switches = tuple(name for name, value in flags.items() if value is True and name != "PERSISTENT")
        if flags.get("B_DESC") and flags["B_DESC"] is not True:  # the row-tile kernel's B layout, 1 or 2
            switches += (f"B_DESC={flags['B_DESC']}",)
        if flags.get("PERSISTENT"):
            switches += ("PERSISTENT",)
        if kern["name"] in HELPERS:
            assert kern["spills"] == 0, kern
            covered.add(kern["name"])
            continue
        covered.add((kern["name"], switches, flags["COMPUTE"], kern["aligned"]))
        # exact fp32 products unless torch's own matmuls allow TF32 (off by default); the interpreter ignores
        # input_precision, so only here is the launch's choice seen
        assert flags["PRECISION"] == ("ieee" if flags["COMPUTE"] == "fp32" else "tf32"), kern
        descs = sum(int(bool(flags.get(name))) for name in ("W_DESC", "A_DESC", "B_DESC"))
        # each descriptor operand must become asynchronous TMA copies (one per pipeline stage in the loop and
        # the prologue), not ordinary loads
        assert (kern["tma_copies"] >= descs) and (descs > 0 or kern["tma_copies"] == 0), kern
        if kern["aligned"]:
            # Both operands are plain tile loads (gathered rows or not), so with aligned widths the K loop must
            # be software pipelined: more shared memory than one stage's tiles. One stage means every K step
            # waits on global memory.
            b_tiles = 2 if kern["name"] == "_swiglu_up_kernel" else 1
            elem = 4 if flags["COMPUTE"] == "fp32" else 2
            one_stage = (flags["BM"] + b_tiles * flags["BN"]) * flags["BK"] * elem
            assert kern["shared"] > one_stage, kern
        if arch >= 90 and flags["COMPUTE"] != "fp32" and kern["aligned"]:
            # 16-bit dots on Hopper: asynchronous warp-group MMAs (wgmma), the next K step's issued while one
            # runs. (With unaligned widths some launches wait on every MMA: their masked element-wise loads
            # are not pipelined either; see above.)
            assert kern["wgmma"] >= 1 and kern["wgmma_in_flight"] >= 1, kern
        if flags.get("SWIGLU_BWD") and flags["COMPUTE"] != "fp32" and kern["aligned"]:
            # The fused dh epilogue converts each half of the accumulator once into the layout its loads and
            # stores share, and leaves registers for 2 programs per SM (one's epilogue traffic can overlap the
            # other's MMAs); the whole-tile epilogue took 4 conversions and fit 1 program on sm_90. (A persistent
            # launch has one program per SM by design: its next tile's loads overlap this tile's epilogue.)
            assert kern["layout_converts"] <= 2, kern
            assert kern["ctas_per_sm"] >= (1 if flags.get("PERSISTENT") else 2), kern
        # Accumulators stay in registers: a spill would cost every K step. Widths that are not multiples of 16
        # (the unaligned specialisation: element-wise masked loads) get their own tiles for this
        # (kernels/moe.py _UNALIGNED_TILES).
        assert kern["spills"] == 0, kern
    missing = [(name, sw, dt) for name, sw in VARIANTS for dt in ("bf16", "fp16", "fp32")
               if (name, sw, dt, True) not in covered]
    tma = [(name, sw, dt) for name, sw in TMA_VARIANTS + PERSISTENT_VARIANTS for dt in ("bf16", "fp16")]
    if arch >= 90:
        missing += [v for v in tma if (*v, True) not in covered]
    else:  # no TMA before Hopper: $MOON_FAST_MOE_TMA (and with it $MOON_FAST_MOE_PERSISTENT) is ignored there
        assert not [v for v in tma if (*v, True) in covered], "TMA launches compiled for a GPU without TMA"
    assert not missing, f"launches not compiled in their aligned specialisation: {missing}"
    # ... and the unaligned one (the CI configuration with widths 96 and 72), which has its own tiles
    unaligned = [dt for dt in ("bf16", "fp16", "fp32")
                 if ("_grouped_rows_kernel", ("C_SCATTER",), dt, False) not in covered]
    assert not unaligned, f"down GEMM not compiled with unaligned widths in {unaligned}"
    assert covered.issuperset(HELPERS), f"helper kernels not compiled: {set(HELPERS) - covered}"


@pytest.mark.parametrize("arch, regs, warps, shared, want", [
    (90, 175, 8, 73728, 1),    # registers bind: 176 x 32 x 8 = 45056 of 65536
    (90, 128, 8, 98304, 2),    # registers and shared memory both allow 2
    (90, 80, 4, 24576, 6),     # 80 x 32 x 4 = 10240 -> 6; shared memory would allow 9
    (80, 96, 4, 49152, 3),     # shared memory binds: 164 KB / 49 KB
    (90, 32, 1, 0, 32),        # the cap of 32 programs per SM
])
def test_ctas_per_sm(arch, regs, warps, shared, want):
    from aot_triton import ctas_per_sm

    assert ctas_per_sm(arch, regs, warps, shared) == want
