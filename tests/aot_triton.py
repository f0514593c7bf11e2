"""Ahead-of-time GPU compilation of the Triton launches our ops really make, without a GPU.

The interpreter runs our kernels' logic on the CPU but cannot see GPU-only compile errors (dot operand
types and shapes, shared memory per block). Here an op's forward and backward run on CPU tensors in a
process without TRITON_INTERPRET (so the launchers pick their GPU tile sizes) with ``JITFunction.run``
replaced by a recorder: every launch is recorded, none runs. Each distinct launch is then compiled for the
target with Triton's bundled ptxas, specialised as the JIT specialises it on a GPU (16-divisible pointers
and ints marked, ints equal to 1 made constants). That is the variant whose software pipelining (cp.async
or TMA stages in shared memory) must fit the GPU, and the one a GPU would run.

    python tests/aot_triton.py --arch 80 [--full] [--ops moe,attention,contrastive]   # a report
    PYTHONPATH=.triton-min python tests/aot_triton.py --arch 90 ...   # the same with the oldest Triton we support

The tests (test_*_compile*) run the small ``CI`` configurations in a child process (``run_child``), once with
the installed Triton and once with the oldest one pyproject.toml allows (``MIN_TRITON``, installed apart in
``.triton-min/`` by ``make test``): torch 2.11's Triton, which the lent GPU machines run. Each Triton
generates different code: Triton 3.6 spilled 6 KB per thread in a kernel that Triton 3.8 compiled with no
spills. ``--full`` compiles every configuration in ``FULL`` (minutes per op and arch). It reaches into
Triton's launcher (``JITFunction.run``, ``_pack_args``, ``create_function_from_signature``; the same in
Triton 3.6 and 3.8), which a Triton upgrade may change: the tests then fail loudly rather than pass.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Shared memory per block (opt-in maximum) in bytes: A100 (sm_80) and H100 (sm_90).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# shared memory per SM (A100: 164 KB, H100: 228 KB), for ctas_per_sm
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}

REPO = Path(__file__).resolve().parent.parent
# The oldest Triton pyproject.toml allows, and where make test installs it apart from the venv's (pip
# --target, no dependencies): a child process with it first on PYTHONPATH imports it instead.
MIN_TRITON = re.search(r'"triton>=([0-9.]+)', (REPO / "pyproject.toml").read_text()).group(1)
MIN_TRITON_DIR = REPO / ".triton-min"


def min_triton_installed() -> bool:
    """Whether .triton-min/ holds MIN_TRITON (a Triton of another version there would test nothing)."""
    return any(MIN_TRITON_DIR.glob(f"triton-{MIN_TRITON}*.dist-info"))


def triton_builds() -> list:
    """pytest parameters for the compile tests: the installed Triton, and MIN_TRITON where installed (a
    missing package: skipped with the reason)."""
    import pytest

    return [pytest.param(None, id="triton-installed"),
            pytest.param(MIN_TRITON_DIR, id=f"triton-{MIN_TRITON}", marks=pytest.mark.skipif(
                not min_triton_installed(), reason=f"Triton {MIN_TRITON} (pyproject's oldest) is not installed "
                f"in {MIN_TRITON_DIR}: make test installs it (pip install --no-deps --target .triton-min "
                f"triton=={MIN_TRITON})"))]

_launches: list = []
ARCH = 90  # the target: what the ops' launchers take the GPU to be (e.g. whether it has TMA)


def start_recording() -> None:
    """From now on every Triton kernel launch in this process is recorded instead of run."""
    from triton.runtime.jit import JITFunction

    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: _launches.append((self, args, kwargs))


# ----------------------------------------------------------------------------- the ops' launches

def exercise_moe(configs) -> None:
    """configs: (dtype name, T, H, I, E, k). Forward + backward (SwiGLU backward fused, then split; then both
    with TMA descriptors, and both with TMA descriptors in persistent launches), and the inference forward."""
    import moon_fast.kernels.moe as moe_triton
    import torch

    from moon_fast.ops.moe_routing import route

    # The routing kernels' launches are recorded, not run, so their outputs would be garbage indices for
    # the torch ops after them: take the values from torch's sort instead (the same values; tested).
    route_kernels = moe_triton.route_triton

    def recorded_routing(expert_idx, num_experts):
        route_kernels(expert_idx, num_experts)
        r = route(expert_idx, num_experts)
        return r, torch.cat([r.offsets.new_zeros(1), r.offsets])

    moe_triton.route_triton = recorded_routing
    moe_triton._device_has_tma = lambda device: ARCH >= 90  # the target's, not this CPU's
    moe_triton._sm_count = lambda device: 132  # an H100's (the grid does not change what is compiled)
    moe_mlp_triton = moe_triton.moe_mlp_triton
    for dtype, t, h, inter, e, k in configs:
        dt = getattr(torch, dtype)
        hidden = torch.randn(t, h, dtype=dt, requires_grad=True)
        idx = torch.randint(0, e, (t, k))
        weight = torch.rand(t, k, dtype=dt, requires_grad=True)
        gate_up = torch.randn(e, 2 * inter, h, dtype=dt, requires_grad=True)
        down = torch.randn(e, h, inter, dtype=dt, requires_grad=True)
        moe_mlp_triton(hidden, idx, weight, gate_up, down).sum().backward()
        moe_mlp_triton(*(x.detach() for x in (hidden, idx, weight, gate_up, down)))  # STORE_GU=False
        # the plain dh GEMM and the elementwise pass; then TMA descriptors for the plain-tile operands
        # (16-bit only), with the SwiGLU backward fused and split
        tma, persistent = {moe_triton.TMA_ENV: "1"}, {moe_triton.TMA_ENV: "1", moe_triton.PERSISTENT_ENV: "1"}
        for env in ({moe_triton.SWIGLU_BWD_ENV: "split"}, tma, {**tma, moe_triton.SWIGLU_BWD_ENV: "split"},
                    persistent, {**persistent, moe_triton.SWIGLU_BWD_ENV: "split"}):
            os.environ.update(env)
            try:
                moe_mlp_triton(hidden, idx, weight, gate_up, down).sum().backward()
                moe_mlp_triton(*(x.detach() for x in (hidden, idx, weight, gate_up, down)))
            finally:
                for name in env:
                    del os.environ[name]


def exercise_attention(configs) -> None:
    """configs: (dtype name, head dim, causal). GQA (4 query heads on 2 kv heads), forward + backward."""
    import torch

    from moon_fast.ops import attention

    attention._import_backends()
    attention.BACKENDS.backends["triton"].unavailable = lambda device: None  # CPU tensors, nothing runs
    for dtype, d, causal in configs:
        dt = getattr(torch, dtype)
        q = torch.randn(2, 48, 4, d, dtype=dt, requires_grad=True)
        k, v = (torch.randn(2, 48, 2, d, dtype=dt, requires_grad=True) for _ in range(2))
        attention.flash_attention(q, k, v, causal=causal, backend="triton").sum().backward()


def exercise_contrastive(configs) -> None:
    """configs: (dtype name, embedding dim). Symmetric with groups (all four kernels), forward + backward."""
    import torch

    from moon_fast.ops import contrastive

    contrastive.BACKENDS.backends["triton"].unavailable = lambda device: None  # CPU tensors, nothing runs
    for dtype, d in configs:
        dt = getattr(torch, dtype)
        q = torch.randn(48, d, dtype=dt, requires_grad=True)
        k = torch.randn(64, d, dtype=dt, requires_grad=True)
        contrastive.contrastive_loss(q, k, torch.tensor(10.0), symmetric=True, query_group=torch.arange(48) % 5,
                                     key_group=torch.arange(64) % 5, backend="triton").backward()


EXERCISE = {"moe": exercise_moe, "attention": exercise_attention, "contrastive": exercise_contrastive}

# CI: the configurations whose launch settings differ most (tile sizes, warps, stages, dtypes).
CI = {
    # aligned widths (what the JIT specialises: pipelined loads) and widths that are not multiples of 16
    "moe": [(dt, 40, 1024, 1024, 4, 2) for dt in ("bfloat16", "float16", "float32")]
           + [(dt, 40, 96, 72, 4, 2) for dt in ("bfloat16", "float16", "float32")],
    "attention": [("bfloat16", 80, True), ("float16", 128, True), ("float32", 64, True)],
    # fp32 D=128: its backward once spilled 14 KB per thread (kernels/contrastive.py _config)
    "contrastive": [("bfloat16", 512), ("float32", 512), ("float16", 128), ("float32", 1024), ("float32", 128)],
}
FULL = {
    "moe": CI["moe"],
    "attention": [(dt, d, c) for dt in ("bfloat16", "float16", "float32") for d in (64, 80, 128, 256)
                  for c in (False, True)],
    "contrastive": [(dt, d) for dt in ("bfloat16", "float16", "float32") for d in (64, 128, 256, 512, 768, 1024)],
}


# ----------------------------------------------------------------------------- compilation

def _ptxas_usage(log: str) -> tuple[int, int]:
    """(registers per thread, spill store bytes) from ptxas -v output."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    assert regs and spills, f"no register report in the ptxas log: {log[-2000:]}"
    return int(regs.group(1)), int(spills.group(1))


def ctas_per_sm(arch: int, regs: int, warps: int, shared: int) -> int:
    """Programs of one kernel that fit on one SM at once (occupancy), the least of what its registers (65536
    per SM, allocated per warp in units of 256), its shared memory (plus 1 KB the driver reserves per
    program) and its warps (64 per SM) allow; at most 32. One program per SM means nothing of another
    program overlaps its epilogue or its waits."""
    by_regs = 65536 // (-(-regs // 8) * 8 * 32 * warps)
    by_smem = SMEM_PER_SM[arch] // (shared + 1024)
    return min(by_regs, by_smem, 64 // warps, 32)


def compile_recorded(arch: int) -> list[dict]:
    """Compiles each distinct recorded launch for sm_``arch``; prints one line per compiled kernel and
    returns {"name", "flags" (constexpr arguments), "shared" (bytes), "regs" (per thread), "spills" (spill
    store bytes), "tma_copies" (TMA loads in the TTGIR), "wgmma" (Hopper warp-group MMAs in the TTGIR),
    "wgmma_in_flight" (the most MMA groups a wait leaves running), "layout_converts" (register-layout
    conversions in the TTGIR), "ctas_per_sm" (ctas_per_sm), "aligned"
    (every pointer and int argument 16-divisible)} for each. Fails if a kernel does
    not compile or needs more shared memory than the GPU has. Call it with an empty Triton cache: a cached
    kernel has no ptxas report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    assert _launches, "nothing was launched: call start_recording() before running the op"
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v (registers, spills) for each compile
    seen, compiled_kernels = set(), []
    for kern, args, kwargs in _launches:
        # what JITFunction.run does on a GPU, with the target given instead of read from a driver
        binder = create_function_from_signature(kern.signature, kern.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kern._pack_args(backend, kwargs, bound, specialization, options)
        key = (kern.__name__, str(signature), str(constexprs), str(attrs), str(options))
        if key in seen:
            continue
        seen.add(key)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kern, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        assert compiled.asm.get("cubin"), kern.__name__
        regs, spills = _ptxas_usage(log.getvalue())
        flags = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        shared = compiled.metadata.shared
        assert shared <= SMEM_LIMIT[arch], (
            f"{kern.__name__} {flags} num_warps={options.num_warps} num_stages={options.num_stages} needs "
            f"{shared} bytes of shared memory; sm_{arch} has {SMEM_LIMIT[arch]}")
        int_or_ptr = [i for i, ty in enumerate(signature.values()) if ty.startswith(("*", "i"))]
        aligned = all(attrs.get((i,)) for i in int_or_ptr)
        # TMA loads issued asynchronously into shared memory (Hopper): what descriptor loads should become
        ttgir = compiled.asm["ttgir"]
        tma = ttgir.count("ttng.async_tma_copy_global_to_local")
        # Hopper's asynchronous tensor-core MMA (wgmma), and how many of its groups a wait leaves in flight:
        # 0 means every K step waits for its own MMA before issuing the next loads' math
        wgmma = ttgir.count("ttng.warp_group_dot ")
        wgmma_in_flight = max((int(n) for n in re.findall(r"pendings = (\d+)", ttgir)), default=0)
        # register-layout changes, each a round trip through shared memory (e.g. between the MMA's accumulator
        # layout and the coalesced layout of an epilogue's loads and stores)
        converts = ttgir.count("ttg.convert_layout")
        occupancy = ctas_per_sm(arch, regs, options.num_warps, shared)
        print("compiled", f"sm_{arch}", kern.__name__, flags, f"warps={options.num_warps}",
              f"stages={options.num_stages}", f"smem={shared}", f"regs={regs}", f"spill_stores={spills}",
              f"tma_copies={tma}", f"wgmma={wgmma}", f"wgmma_in_flight={wgmma_in_flight}",
              f"layout_converts={converts}", f"ctas_per_sm={occupancy}", "aligned" if aligned else "unaligned",
              flush=True)
        compiled_kernels.append({"name": kern.__name__, "flags": flags, "shared": shared, "regs": regs,
                                 "spills": spills, "tma_copies": tma, "wgmma": wgmma,
                                 "wgmma_in_flight": wgmma_in_flight, "layout_converts": converts,
                                 "ctas_per_sm": occupancy, "aligned": aligned})
    return compiled_kernels


def run_child(op: str, arch: int, tmp_path: Path, timeout: int = 900, triton_dir: Path | None = None) -> list[dict]:
    """Records ``op``'s launches for its CI configurations and compiles them for sm_``arch``, in a child
    process without the interpreter; returns compile_recorded's list. ``triton_dir``: a directory holding
    MIN_TRITON, imported by the child in place of the venv's Triton (checked: the child reports its version)."""
    import json

    script = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import aot_triton as a\n"
              f"import triton; print('TRITON', triton.__version__)\n"
              f"a.ARCH = {arch}; a.start_recording(); a.EXERCISE[{op!r}](a.CI[{op!r}])\n"
              f"print('RESULT', json.dumps(a.compile_recorded({arch}), default=str))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    version = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("TRITON ")]
    if triton_dir is not None:
        assert version and (version[0] + ".").startswith(MIN_TRITON + "."), (
            f"{triton_dir} gave Triton {version}, not {MIN_TRITON}")
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, proc.stdout
    return json.loads(result[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description="Compile our Triton kernels' launches for a GPU, offline.")
    parser.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), required=True)
    parser.add_argument("--full", action="store_true", help="every configuration in FULL (slow)")
    parser.add_argument("--ops", default=",".join(EXERCISE))
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("unset TRITON_INTERPRET: the launchers must pick their GPU tile sizes")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot-triton-")  # fresh: every kernel is compiled
    global ARCH
    ARCH = args.arch
    start_recording()
    import triton

    print(f"# triton {triton.__version__} ({Path(triton.__file__).parent}), sm_{args.arch}", flush=True)
    configs = FULL if args.full else CI
    for op in args.ops.split(","):
        _launches.clear()
        print(f"# {op}: {len(configs[op])} configurations", flush=True)
        EXERCISE[op](configs[op])
        compile_recorded(args.arch)


if __name__ == "__main__":
    main()
