"""The MoE Triton kernels compile for real GPUs (sm_80, sm_90) with the arguments and tile sizes the
launchers really pass, checked offline (no GPU needed; Triton's bundled ptxas). The interpreter runs the
kernels' logic in the other tests but cannot see GPU-only compile errors (dot operand types and shapes,
shared memory); nothing else here compiles these kernels, since no GPU has run them.

How: a child process without TRITON_INTERPRET runs the ``triton`` backend's forward and backward on CPU
tensors with ``JITFunction.run`` replaced by a recorder, so every launch (kernel, arguments, constexprs,
warps, stages) is captured instead of run; each distinct launch is then compiled for the target."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    launches = []
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))

    from moon_fast.kernels.moe import moe_mlp_triton

    def run_op(t, h, inter, e, k, dtype):
        hidden = torch.randn(t, h, dtype=dtype, requires_grad=True)
        idx = torch.randint(0, e, (t, k))
        weight = torch.rand(t, k, dtype=dtype, requires_grad=True)
        gate_up = torch.randn(e, 2 * inter, h, dtype=dtype, requires_grad=True)
        down = torch.randn(e, h, inter, dtype=dtype, requires_grad=True)
        out = moe_mlp_triton(hidden, idx, weight, gate_up, down)
        out.backward(torch.randn_like(out))
        # the inference forward (no saved pre-activation: STORE_GU=False)
        moe_mlp_triton(*(x.detach() for x in (hidden, idx, weight, gate_up, down)))

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        run_op(40, 1024, 1024, 4, 2, dtype)  # aligned widths: the JIT specialises them (16-divisible)
        run_op(40, 96, 72, 4, 2, dtype)      # widths that are not multiples of 16 elements

    arch = int(sys.argv[1])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    smem_limit = {80: 163 * 1024, 90: 227 * 1024}[arch]
    seen, covered = set(), set()
    for kern, args, kwargs in launches:
        # what JITFunction.run does on a GPU, with the target given instead of read from a driver
        binder = create_function_from_signature(kern.signature, kern.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kern._pack_args(backend, kwargs, bound, specialization, options)
        key = (kern.__name__, str(signature), str(constexprs), str(attrs))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(kern, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        assert compiled.asm.get("cubin"), kern.__name__
        shared = compiled.metadata.shared
        flags = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        assert shared <= smem_limit, (kern.__name__, flags, shared, smem_limit)
        runtime_args = [i for i, ty in enumerate(signature.values()) if ty != "constexpr"]
        aligned = all(attrs.get((i,)) for i in runtime_args)  # every pointer and int 16-divisible
        if aligned and kern.__name__ != "_grouped_wgrad_kernel":
            # Both operands are plain tile loads here, so with aligned widths the loop must be software
            # pipelined (cp.async / TMA into several shared-memory stages): more shared memory than one
            # stage's tiles. One stage means every K step waits for global memory.
            b_tiles = 2 if kern.__name__ == "_swiglu_up_kernel" else 1
            one_stage = (flags["BM"] + b_tiles * flags["BN"]) * flags["BK"] * flags["COMPUTE"].primitive_bitwidth // 8
            assert shared > one_stage, (kern.__name__, flags, shared, one_stage)
        switches = tuple(k for k, v in flags.items() if v is True)
        covered.add((kern.__name__, switches, str(flags["COMPUTE"]), aligned))
        print("compiled", arch, kern.__name__, flags, "smem", shared, "aligned" if aligned else "unaligned")

    # every launch the op makes, in every dtype, was compiled in its aligned (fast) specialisation
    variants = [("_swiglu_up_kernel", ("STORE_GU",)), ("_swiglu_up_kernel", ()),
                ("_grouped_rows_kernel", ("C_SCATTER",)),
                ("_grouped_rows_kernel", ("A_GATHER", "A_SCALE", "SWIGLU_BWD")),
                ("_grouped_wgrad_kernel", ("A_GATHER", "A_SCALE")), ("_grouped_wgrad_kernel", ("B_GATHER",))]
    missing = [(name, sw, dt) for name, sw in variants for dt in ("bf16", "fp16", "fp32")
               if (name, sw, dt, True) not in covered]
    assert not missing, missing
    print("ok", len(seen))
""")


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_moe_kernels_compile_for_gpu_ahead_of_time(arch, tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(arch)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1].startswith("ok"), proc.stdout
