"""The foundation: extension builds, the CUDA emulator, backend dispatch and the env command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moon_fast import _ext
from moon_fast.backends import BackendUnavailable, OpBackends, triton_unavailable


def test_emulated_extension_is_built():
    assert _ext.emu_ext_error() is None, _ext.emu_ext_error()


@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch build cannot build the CUDA extension")
def test_cuda_extension_is_built_and_imports_without_gpu():
    assert _ext.cuda_ext_error() is None, _ext.cuda_ext_error()
    import moon_fast._C as C

    assert C.emulated is False
    assert "8.0" in C.cuda_archs and "9.0" in C.cuda_archs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a CUDA op gives on a machine without a GPU")
@pytest.mark.skipif(torch.version.cuda is None, reason="CPU-only torch build cannot build the CUDA extension")
def test_cuda_op_on_cpu_tensors_raises_clear_error():
    ops = _ext.cuda_ops()
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.selftest_block_sum(torch.ones(2, 3))


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 31), (2, 256), (4, 257), (2, 1000)])
def test_emulator_shared_memory_barriers_shuffles_atomics(rows, cols):
    """The emulator runs a kernel using every feature (shared memory, __syncthreads, shfl_down,
    shfl_xor, atomicAdd, 2-D grid) and matches torch."""
    x = torch.randn(rows, cols)
    sums, total = _ext.emu_ops().selftest_block_sum(x)
    nb = (cols + 255) // 256
    padded = torch.nn.functional.pad(x, (0, nb * 256 - cols)).view(rows, nb, 256)
    torch.testing.assert_close(sums, padded.sum(-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(total, x.sum(-1), atol=1e-4, rtol=1e-5)


def test_emulated_op_rejects_cuda_device_mismatch():
    with pytest.raises(RuntimeError, match="must be a 2-D float32"):
        _ext.emu_ops().selftest_block_sum(torch.ones(2, 3, dtype=torch.float64))


def _toy_registry():
    reg = OpBackends("toy_op", {"cpu": ("fast", "slow"), "cuda": ("fast",)})
    reg.register("slow")(lambda: "slow")
    reg.register("fast", unavailable=lambda d: None if d.type == "cuda" else "needs a GPU (toy)")(lambda: "fast")
    return reg


def test_auto_picks_first_available_backend():
    reg = _toy_registry()
    assert reg.resolve("auto", "cpu").name == "slow"


def test_unavailable_backend_error_says_why_and_what_is_available():
    reg = _toy_registry()
    with pytest.raises(BackendUnavailable, match=r"needs a GPU \(toy\).*Available here: slow"):
        reg.resolve("fast", "cpu")
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        reg.resolve("nope", "cpu")


def test_environment_override_forces_backend(monkeypatch):
    reg = _toy_registry()
    monkeypatch.setenv("MOON_FAST_TOY_OP_BACKEND", "fast")
    with pytest.raises(BackendUnavailable, match="forced by MOON_FAST_TOY_OP_BACKEND=fast"):
        reg.resolve("auto", "cpu")
    monkeypatch.setenv("MOON_FAST_TOY_OP_BACKEND", "slow")
    assert reg.resolve("auto", "cpu").name == "slow"


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in triton_unavailable(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_unavailable(torch.device("cpu")) is None


def test_env_command_json_tells_the_truth():
    out = subprocess.run([sys.executable, "-m", "moon_fast.cli", "env", "--json"], capture_output=True, text=True,
                         check=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    assert info["cuda_runtime_available"] == torch.cuda.is_available()
    assert info["extensions"]["moon_fast._C_emu"]["built"] is True
    for op in ("contrastive_loss", "moe_mlp", "flash_attention"):
        cpu = info["ops"][op]["cpu"]
        assert cpu["reference"] == "available"
        assert cpu["torch"] == "available"
        if not torch.cuda.is_available():
            if "cuda" in cpu:  # flash_attention's CUDA path is the flash_attn peer, not csrc
                assert "CUDA tensors" in cpu["cuda"] or "not built" in cpu["cuda"]
            assert "TRITON_INTERPRET" in cpu["triton"]
    assert "cuda_emu" in info["ops"]["moe_mlp"]["cpu"] and info["ops"]["moe_mlp"]["cpu"]["cuda_emu"] == "available"


def test_env_command_text_runs():
    out = subprocess.run([sys.executable, "-m", "moon_fast.cli", "env"], capture_output=True, text=True, check=True)
    assert "moon_fast._C_emu: built" in out.stdout


def test_triton_kernels_import_as_moon_fast_kernels():
    import moon_fast.kernels

    assert os.path.basename(os.path.dirname(moon_fast.kernels.__file__)) == "kernels"
