"""Loads the compiled extensions and says why one is missing.

``moon_fast._C`` holds the CUDA kernels (ops under ``torch.ops.moon_fast_cuda``);
``moon_fast._C_emu`` holds the same kernels compiled for the CPU emulator (``torch.ops.moon_fast_emu``);
``moon_fast._C_cpu`` holds native CPU kernels (``torch.ops.moon_fast_cpu``).
A missing extension never breaks ``import moon_fast``: the backends that need it report the reason.
"""

from __future__ import annotations

import functools
import importlib

import torch

_BUILD_HINT = "build it with `make build` (or `python setup.py build_ext --inplace`)"


@functools.cache
def _load(module: str):
    try:
        return importlib.import_module(module), None
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{module} is not built or failed to import ({exc}); {_BUILD_HINT}"


def cuda_ext_error() -> str | None:
    mod, err = _load("moon_fast._C")
    if err and torch.version.cuda is None:
        err = f"torch {torch.__version__} is a CPU-only build, so moon_fast._C (CUDA kernels) cannot be built"
    return err


def emu_ext_error() -> str | None:
    return _load("moon_fast._C_emu")[1]


def cpu_ext_error() -> str | None:
    return _load("moon_fast._C_cpu")[1]


def cpu_ops():
    """``torch.ops.moon_fast_cpu``: the native CPU kernels (csrc/cpu/)."""
    mod, err = _load("moon_fast._C_cpu")
    if err:
        raise RuntimeError(err)
    return torch.ops.moon_fast_cpu


def cuda_ops():
    """``torch.ops.moon_fast_cuda``, after loading the extension (raises with the reason)."""
    mod, err = _load("moon_fast._C")
    if err:
        raise RuntimeError(err)
    return torch.ops.moon_fast_cuda


def emu_ops():
    """``torch.ops.moon_fast_emu``: the csrc kernels under the CPU emulator."""
    mod, err = _load("moon_fast._C_emu")
    if err:
        raise RuntimeError(err)
    return torch.ops.moon_fast_emu


def csrc_ops(device: torch.device | str):
    """The csrc op namespace that serves tensors on ``device``: real CUDA kernels or the emulator."""
    return cuda_ops() if torch.device(device).type == "cuda" else emu_ops()


def cuda_ext_archs() -> str | None:
    mod, _ = _load("moon_fast._C")
    return getattr(mod, "cuda_archs", None) if mod else None
