"""The contrastive Triton kernels compile for real GPUs (sm_80, sm_90) as the JIT would compile the launches
the loss really makes, with the block sizes the launcher picks, fit in shared memory and spill no
registers; checked offline (tests/aot_triton.py: no GPU needed). Catches GPU-only compile errors and
register blow-ups that the interpreter cannot see."""

from __future__ import annotations

import pytest
from aot_triton import triton_builds


@pytest.mark.slow
@pytest.mark.parametrize("triton_dir", triton_builds())
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_gpu_ahead_of_time(arch, triton_dir, tmp_path):
    pytest.importorskip("triton")
    from aot_triton import CI, run_child

    kernels = run_child("contrastive", arch, tmp_path, triton_dir=triton_dir)
    # the forward kernels see D only at run time (their K loop), the backward ones as DP (the gradient block)
    compiled = {(k["name"], k["flags"]["COMPUTE"], k["flags"].get("DP")) for k in kernels}
    dtype_name = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    expected = {(name, dtype_name[dt], max(16, 1 << (d - 1).bit_length()) if name.startswith("_bwd") else None)
                for dt, d in CI["contrastive"] for name in ("_fwd_rows", "_fwd_cols", "_bwd_rows", "_bwd_cols")}
    assert compiled == expected, kernels
    # Register spills: none. The fp32 backward once spilled 14 KB per thread (sm_80, D=128) with the forward's
    # tiles, and the backward's K loop in chunks of 64 spilled 8-36 bytes (kernels/contrastive.py _gpu_config).
    for k in kernels:
        assert k["spills"] == 0, k
        # fp32 embeddings: exact fp32 products, not TF32 (the interpreter ignores input_precision: only
        # here is the launch's choice seen)
        assert k["flags"]["PRECISION"] == ("ieee" if k["flags"]["COMPUTE"] == "fp32" else "tf32"), k
    # Hopper: every product of the 16-bit kernels (D <= 512) on wgmma with a group in flight. The kernels
    # that held a 32-row block's whole embedding used none, and ran at a tenth of cuBLAS's rate on an H100.
    if arch == 90:
        for k in kernels:
            if k["flags"]["COMPUTE"] != "fp32" and k["flags"].get("DP", 0) <= 512:
                products = 2 if k["name"].startswith("_bwd") else 1
                assert (k["wgmma"], k["wgmma_in_flight"]) == (products, 1), k
