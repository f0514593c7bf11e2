"""Triton's fp32 -> bf16 cast rounds to nearest-even, as torch's does: under the interpreter through
kernels/_interpreter_rounding.py (Triton 3.8's interpreter truncates), compiled on a GPU by the hardware."""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from moon_fast.kernels import _utils  # noqa: E402,F401  (installs the rounding fix under the interpreter)
from moon_fast.kernels._interpreter_rounding import fp32_bits_to_bf16_bits  # noqa: E402

# ties (to even, down and up), a carry into the exponent, the largest finite value (rounds to inf), inf, NaNs,
# subnormals, signed zeros
SPECIAL_BITS = [0x3F808000, 0x3F818000, 0xBF808000, 0x3F7FFFFF, 0x3F7F8000, 0x7F7FFFFF, 0x7F7F7FFF,
                0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001, 0x00008000, 0x00018000,
                0x807FFFFF, 0x00000000, 0x80000000]


def _bits_to_torch_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.view(np.float32).copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _assert_same_bf16(got: np.ndarray, want: np.ndarray, source: np.ndarray):
    nan_got, nan_want = (got & 0x7FFF) > 0x7F80, (want & 0x7FFF) > 0x7F80
    bad = (nan_got != nan_want) | (~nan_want & (got != want))  # any NaN matches any NaN
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{int(bad.sum())} of {bad.size} casts differ from torch's; first: fp32 bits "
                             f"{source[i]:#010x} -> {got[i]:#06x}, torch gives {want[i]:#06x}")


def test_rounding_rule_matches_torch_bitwise():
    rng = np.random.default_rng(0)
    bits = np.concatenate([np.array(SPECIAL_BITS, dtype=np.uint32),
                           rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)])
    _assert_same_bf16(fp32_bits_to_bf16_bits(bits), _bits_to_torch_bf16_bits(bits), bits)


@triton.jit
def _cast_kernel(x_ptr, cast_ptr, stored_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(cast_ptr + offs, x.to(tl.bfloat16), mask=mask)  # an explicit cast
    tl.store(stored_ptr + offs, x, mask=mask)  # fp32 values stored through a bf16 pointer


def test_kernel_casts_and_stores_round_as_torch(device):
    """Both ways a kernel turns fp32 into bf16, run by Triton (the interpreter here, compiled on a GPU)."""
    rng = np.random.default_rng(1)
    finite = rng.standard_normal(4093).astype(np.float32) * np.float32(3.0)
    bits = np.concatenate([np.array(SPECIAL_BITS, dtype=np.uint32), finite.view(np.uint32)])
    x = torch.from_numpy(bits.view(np.float32).copy()).to(device)
    cast = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=device)
    stored = torch.full(x.shape, float("nan"), dtype=torch.bfloat16, device=device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, cast, stored, x.numel(), BLOCK=1024)
    want = _bits_to_torch_bf16_bits(bits)
    for name, out in (("x.to(tl.bfloat16)", cast), ("store into bf16", stored)):
        got = out.view(torch.int16).cpu().numpy().view(np.uint16)
        try:
            _assert_same_bf16(got, want, bits)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None
