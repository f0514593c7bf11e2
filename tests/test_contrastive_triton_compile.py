"""The contrastive Triton kernels compile for a real GPU (sm_90) with the block sizes the launcher picks,
and fit in shared memory, checked offline (no GPU needed; Triton's bundled ptxas). Catches GPU-only
compile errors that the interpreter cannot see. Runs in a subprocess without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import torch, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import moon_fast.kernels.contrastive as K

    target = GPUTarget("cuda", 90, 32)
    for dtype, d in [(torch.bfloat16, 512), (torch.float32, 512), (torch.float16, 128), (torch.float32, 1024)]:
        cfg = K._config(d, dtype)
        ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
        for kern in (K._fwd_rows, K._fwd_cols, K._bwd_rows, K._bwd_cols):
            sig, consts = {}, {}
            for a in kern.arg_names:
                if a in ("r_ptr", "c_ptr"):
                    sig[a] = ptr
                elif a in ("pos_ptr", "rg_ptr", "rid_ptr", "cg_ptr", "cid_ptr"):
                    sig[a] = "*i64"
                elif a.endswith("_ptr"):
                    sig[a] = "*fp32"
                elif a in ("HAS_GROUPS", "SYM", "COMPUTE", "PRECISION", "BR", "BC", "DP"):
                    sig[a] = "constexpr"
                    consts[a] = {"HAS_GROUPS": True, "SYM": True, "COMPUTE": K.compute_dtype_for(dtype),
                                 "PRECISION": K._precision(dtype), "BR": cfg["BR"], "DP": cfg["DP"],
                                 "BC": cfg["BR"] if kern is K._bwd_cols else cfg["BC"]}[a]
                else:
                    sig[a] = "i32"
            ck = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=consts), target=target,
                                options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
            shared = ck.metadata.shared
            assert shared <= 160 * 1024, (kern.__name__, dtype, d, shared)
            print(kern.__name__, dtype, d, shared)
""")


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 16, proc.stdout
