"""Builds moon_fast's two C++ extensions from csrc/ (metadata lives in pyproject.toml).

* ``moon_fast._C``: the CUDA kernels, compiled by nvcc. Built when torch is a CUDA build and a CUDA
  toolkit is found; otherwise the package installs without it and says why.
* ``moon_fast._C_emu``: the same kernel sources compiled by the host compiler against the CUDA
  execution-model emulator (csrc/mf_cuda.cuh, -DMF_EMULATE), so their logic runs on the CPU in tests.
* ``moon_fast._C_cpu``: native CPU kernels (csrc/cpu/), multithreaded with torch's OpenMP runtime; the
  ``cpu`` backend of moe_mlp.

Environment knobs:
  MOON_FAST_SKIP_CUDA_BUILD=1   do not build moon_fast._C
  MOON_FAST_SKIP_EMU_BUILD=1    do not build moon_fast._C_emu
  MOON_FAST_SKIP_CPU_BUILD=1    do not build moon_fast._C_cpu
  TORCH_CUDA_ARCH_LIST          target architectures (default "8.0;9.0": A100, H100/H200)
  CUDA_HOME                     toolkit root (default: /usr/local/cuda if present, else nvcc's parent)
  MAX_JOBS                      parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
KERNEL_SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
HEADERS = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cuh")) + sorted(
    str(p.relative_to(ROOT)) for p in CSRC.glob("*.h")
)


def log(msg: str) -> None:
    print(f"moon_fast setup: {msg}", file=sys.stderr)


def find_cuda_home() -> str | None:
    """torch guesses /usr/local when nvcc is a wrapper script there; prefer the real toolkit root."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def nvidia_wheel_includes() -> list[str]:
    """cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes may live only in the nvidia wheels."""
    try:
        import nvidia  # noqa: F401  (namespace package installed with CUDA builds of torch)
    except ImportError:
        return []
    dirs = []
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    found = [d for d in dirs if glob.glob(os.path.join(d, "cusparse*.h")) or glob.glob(os.path.join(d, "cublas*.h"))]
    return list(dict.fromkeys(found))  # the two globs overlap


def emu_wrappers() -> list[str]:
    """The host compiler does not take .cu files: compile each through a one-line .cpp that includes it."""
    out_dir = ROOT / "build" / "emu_src"
    out_dir.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for src in KERNEL_SOURCES:
        wrapper = out_dir / (Path(src).stem + ".cpp")
        text = f'#include "{(ROOT / src).as_posix()}"\n'
        if not wrapper.exists() or wrapper.read_text() != text:
            wrapper.write_text(text)
        wrappers.append(str(wrapper.relative_to(ROOT)))
    return wrappers


def extensions():
    if all(os.environ.get(f"MOON_FAST_SKIP_{kind}_BUILD") == "1" for kind in ("CUDA", "EMU", "CPU")):
        log("all extensions skipped by environment")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # without a GPU, torch's arch probe crashes
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        log("torch is not installed in the build environment: installing without extensions "
            "(use `pip install --no-build-isolation` with torch present)")
        return [], {}

    exts = []
    common = ["-O3", "-std=c++20"]
    if os.environ.get("MOON_FAST_SKIP_EMU_BUILD") != "1":
        exts.append(
            CppExtension(
                "moon_fast._C_emu",
                ["csrc/module.cpp", *emu_wrappers()],
                include_dirs=[str(CSRC)],
                define_macros=[("MF_EMULATE", "1")],
                extra_compile_args={"cxx": ["-O2", "-std=c++20", "-pthread"]},
                extra_link_args=["-pthread"],
                depends=HEADERS + KERNEL_SOURCES,
            )
        )
    if os.environ.get("MOON_FAST_SKIP_CPU_BUILD") != "1":
        # -fopenmp: at::parallel_for is inline OpenMP; the extension then shares the libgomp that torch loaded.
        exts.append(
            CppExtension(
                "moon_fast._C_cpu",
                sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp")),
                extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp"]},
                extra_link_args=["-fopenmp"],
            )
        )

    reason = None
    if os.environ.get("MOON_FAST_SKIP_CUDA_BUILD") == "1":
        reason = "MOON_FAST_SKIP_CUDA_BUILD=1"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif not cuda_home:
        reason = "no CUDA toolkit found (set CUDA_HOME)"
    if reason:
        log(f"not building moon_fast._C (CUDA kernels): {reason}")
    else:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        log(f"building moon_fast._C for TORCH_CUDA_ARCH_LIST={archs} with CUDA_HOME={cuda_home}")
        exts.append(
            CUDAExtension(
                "moon_fast._C",
                ["csrc/module.cpp", *KERNEL_SOURCES],
                include_dirs=[str(CSRC), *nvidia_wheel_includes()],
                define_macros=[("MF_CUDA_ARCHS", f'"{archs}"')],
                extra_compile_args={
                    "cxx": common,
                    "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
                },
                depends=HEADERS,
            )
        )
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()
# moon_fast.kernels comes from the top-level kernels/ folder (package-dir mapping in pyproject.toml).
PACKAGES = find_packages(include=["moon_fast", "moon_fast.*"]) + ["moon_fast.kernels"]
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
