"""moe_mlp: dropless Mixture-of-Experts MLP over expert-contiguous grouped GEMMs (issue 4).

``moe_mlp(hidden (T, H), expert_idx (T, k), expert_weight (T, k), gate_up_proj (E, 2I, H),
down_proj (E, H, I)) -> (T, H)``, with out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)),
e = expert_idx[t, j]: the semantics and weight layout of transformers' ``Qwen2MoeExperts.forward``
(gate rows first in ``gate_up_proj``). Dropless: no capacity factor, every (token, choice) is computed.

Backends (see :mod:`moon_fast.backends` for ``auto``):

* ``reference``: per-expert loop (moe_reference.py), the oracle.
* ``torch``: one stable sort, grouped matmuls (``grouped_mm`` where it runs), fused-memory autograd
  Function (moe_torch.py). No host synchronisation on aligned shapes.
* ``grouped_mm``: the same dataflow through torch's own autograd (what transformers' "grouped_mm"
  experts do); a peer.
* ``triton``: grouped GEMM kernels with the SwiGLU fused into the first GEMM's epilogue and the
  gather / weighted scatter fused into the GEMM loads / stores (kernels/moe.py).
* ``cuda`` / ``cuda_emu``: csrc/moe.cu routing metadata (histogram, scan, stable permutation), permute,
  SwiGLU and weighted-unpermute kernels; GEMMs through grouped_mm / cuBLAS (moe_cuda.py).
* ``cpu``: the dataflow of ``cuda`` with native multithreaded CPU kernels (csrc/cpu/moe_cpu.cpp) for the
  gather, SwiGLU and its backward, the weighted unpermute and its weight gradient (one pass over memory
  each, fp32 arithmetic), and its own grouped GEMMs (csrc/cpu/grouped_gemm_cpu.cpp: single-threaded
  oneDNN / MKL calls on (expert, row chunk) tasks spread over the threads; the weight gradients from a
  transposed copy of A, which oneDNN's bf16 GEMM runs faster). The default on the CPU.
* ``grouped_gemm``, ``megablocks``: peers on those packages (CUDA only; moe_peers.py).

Gradients flow to hidden, expert_weight, gate_up_proj and down_proj (not to expert_idx).
"""

from __future__ import annotations

import torch

from moon_fast.backends import (
    autocast_inputs,
    cpu_ext_unavailable,
    cuda_emu_unavailable,
    cuda_ext_unavailable,
    op_backends,
    package_unavailable,
    triton_unavailable,
)
from moon_fast.ops.moe_routing import expert_range_message

BACKENDS = op_backends("moe_mlp", {"cuda": ("triton", "cuda", "grouped_mm", "torch"), "cpu": ("cpu", "torch")})
# auto on a GPU in bf16: `cuda` first. On an H100 it was the fastest backend at every T and E measured
# (T=16384, E=8: 2.14 ms against triton's 2.90; benchmarks/results/2026-11-22-h100/). In fp16 and fp32 the
# device order above stands: grouped_mm takes only bf16 on a GPU, so there `cuda` and `torch` loop over
# the experts (fp16, T=4096, E=32: cuda 7.2 ms, triton 2.5 ms).
_CUDA_BF16_ORDER = ("cuda", "triton", "grouped_mm", "torch")


def _auto_order(hidden: torch.Tensor):
    """auto's preference for these inputs: `_CUDA_BF16_ORDER` for bf16 on a GPU, else None (the device's)."""
    return _CUDA_BF16_ORDER if hidden.device.type == "cuda" and hidden.dtype == torch.bfloat16 else None

# On a GPU these backends' routings check the expert range on the device, in place of _check_expert_range's
# 5 launches: the Triton and csrc routing kernels skip ids outside [0, E) and then assert that no slot was
# skipped (moe_routing.assert_all_routed: 2 launches); moe_routing.route (torch, grouped_mm and the
# grouped_gemm peer) asserts from its binary search (3 launches). The megablocks peer sorts with its own
# kernels, and the reference loops over experts: moe_mlp checks for them.
_ROUTING_CHECKS_RANGE = ("torch", "grouped_mm", "triton", "cuda", "grouped_gemm")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_SLOTS = 2**31 - 1  # grouped_mm offsets and the csrc kernels index slots with int32


def _check_inputs(hidden, expert_idx, expert_weight, gate_up_proj, down_proj) -> None:
    """Raises ValueError / TypeError naming the bad argument and how to fix it."""
    def shape(t):
        return tuple(t.shape)

    for name, t in (("hidden", hidden), ("expert_idx", expert_idx), ("expert_weight", expert_weight),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"moe_mlp: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"moe_mlp: hidden must be 2-D (T, H), got shape {shape(hidden)}; "
                         "flatten batch and sequence dims first (hidden.reshape(-1, H))")
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"moe_mlp: hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    num_tokens, hdim = hidden.shape
    if expert_idx.dim() != 2 or expert_idx.shape[0] != num_tokens:
        raise ValueError(f"moe_mlp: expert_idx must be (T, k) = ({num_tokens}, k), got shape {shape(expert_idx)}")
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"moe_mlp: expert_idx must be an integer tensor (torch.long), got {expert_idx.dtype}; "
                        "pass the indices of torch.topk, not the scores")
    top_k = expert_idx.shape[1]
    if top_k == 0:
        raise ValueError("moe_mlp: k = 0 (expert_idx has shape (T, 0)): every token needs at least one expert")
    if shape(expert_weight) != shape(expert_idx):
        raise ValueError(f"moe_mlp: expert_weight must have the shape of expert_idx {shape(expert_idx)}, "
                         f"got {shape(expert_weight)}")
    if expert_weight.dtype not in _FLOATS:
        raise TypeError(f"moe_mlp: expert_weight must be float32, float16 or bfloat16 (it is cast to hidden's "
                        f"dtype), got {expert_weight.dtype}")
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != hdim or gate_up_proj.shape[1] % 2 \
            or gate_up_proj.shape[1] == 0:
        raise ValueError(f"moe_mlp: gate_up_proj must be (E, 2I, H) = (E, 2I, {hdim}) with the gate rows first, "
                         f"got shape {shape(gate_up_proj)}")
    num_experts, inter = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    if num_experts == 0:
        raise ValueError("moe_mlp: gate_up_proj has E = 0 experts")
    if shape(down_proj) != (num_experts, hdim, inter):
        raise ValueError(f"moe_mlp: down_proj must be (E, H, I) = ({num_experts}, {hdim}, {inter}) to match "
                         f"gate_up_proj {shape(gate_up_proj)}, got {shape(down_proj)}")
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype != hidden.dtype:
            raise TypeError(f"moe_mlp: {name} is {t.dtype} but hidden is {hidden.dtype}; cast one of them "
                            "(or run under torch.autocast, which casts both)")
    for name, t in (("expert_idx", expert_idx), ("expert_weight", expert_weight),
                    ("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.device != hidden.device:
            raise ValueError(f"moe_mlp: {name} is on {t.device} but hidden is on {hidden.device}")
    if num_tokens * top_k > _MAX_SLOTS:
        raise ValueError(f"moe_mlp: T * k = {num_tokens * top_k} routed slots exceed {_MAX_SLOTS} (int32 "
                         "offsets); split the batch")


def _check_expert_range(expert_idx: torch.Tensor, num_experts: int) -> None:
    """Every id in [0, E). On the CPU a direct check; on a GPU an asynchronous device assert, so the
    hot path never waits for the device (the error then surfaces at the next synchronisation)."""
    if expert_idx.numel() == 0:
        return
    if expert_idx.device.type == "cuda":
        ok = ((expert_idx >= 0) & (expert_idx < num_experts)).all()
        torch._assert_async(ok, expert_range_message(num_experts))
        return
    lo, hi = torch.aminmax(expert_idx)
    if int(lo) < 0 or int(hi) >= num_experts:
        bad = int(lo) if int(lo) < 0 else int(hi)
        raise ValueError(f"moe_mlp: expert_idx contains {bad}, outside [0, {num_experts}) for E = {num_experts} "
                         "experts (gate_up_proj.shape[0]); check the router's number of experts")


def moe_mlp(hidden, expert_idx, expert_weight, gate_up_proj, down_proj, *, backend="auto"):
    """Dropless MoE MLP. hidden (T, H); expert_idx (T, k) long in [0, E); expert_weight (T, k) floating
    (cast to hidden's dtype); gate_up_proj (E, 2I, H), gate rows first; down_proj (E, H, I); all on one
    device, weights in hidden's dtype. Returns (T, H) in hidden's dtype. ``backend``: "auto",
    "reference", "torch", "cpu", "grouped_mm", "triton", "cuda", "cuda_emu"."""
    if not isinstance(hidden, torch.Tensor):  # before autocast_inputs reads its device
        raise TypeError(f"moe_mlp: hidden must be a torch.Tensor, got {type(hidden).__name__}")
    # Inside torch.autocast the op behaves like a matmul: everything in the autocast dtype.
    hidden, expert_weight, gate_up_proj, down_proj = autocast_inputs(
        hidden.device, hidden, expert_weight, gate_up_proj, down_proj, policy="lower_precision")
    _check_inputs(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)
    impl = BACKENDS.resolve(backend, hidden.device, order=_auto_order(hidden))
    if not (hidden.device.type == "cuda" and impl.name in _ROUTING_CHECKS_RANGE):
        _check_expert_range(expert_idx, gate_up_proj.shape[0])
    if hidden.shape[0] == 0:
        # No tokens: an empty output that still belongs to the graph, and depends on the weights, so that
        # they get zero gradients rather than None (DDP expects a gradient for every parameter on every rank).
        return hidden * 0 + (expert_weight.sum() + gate_up_proj.sum() + down_proj.sum()) * 0
    expert_idx = expert_idx.long().contiguous()
    expert_weight = expert_weight.to(hidden.dtype).contiguous()
    with torch.autocast(hidden.device.type, enabled=False):
        return impl.fn(hidden.contiguous(), expert_idx, expert_weight, gate_up_proj.contiguous(),
                       down_proj.contiguous())


# ----------------------------------------------------------------------------- backends

@BACKENDS.register("reference", description="per-expert loop in plain PyTorch (the oracle)")
def _reference(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_reference import moe_mlp_reference

    return moe_mlp_reference(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


@BACKENDS.register("torch", description="sort-based permutation + grouped matmuls, custom autograd")
def _torch(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_torch import moe_mlp_torch

    return moe_mlp_torch(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


def _grouped_mm_unavailable(device: torch.device) -> str | None:
    from moon_fast.ops.moe_gemm import grouped_mm_function

    if grouped_mm_function() is None:
        return f"torch {torch.__version__} has neither torch.nn.functional.grouped_mm nor torch._grouped_mm"
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
        return "torch grouped_mm needs a GPU of compute capability >= 8.0"
    return None


@BACKENDS.register("grouped_mm", unavailable=_grouped_mm_unavailable,
                   description="peer: torch grouped_mm with torch's own autograd (transformers' grouped_mm)")
def _grouped_mm(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_torch import moe_mlp_grouped_mm_autograd

    return moe_mlp_grouped_mm_autograd(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


@BACKENDS.register("triton", unavailable=triton_unavailable,
                   description="Triton grouped GEMM, SwiGLU epilogue, fused gather/scatter")
def _triton(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.kernels.moe import moe_mlp_triton

    return moe_mlp_triton(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


def _csrc_unavailable(check):
    """The extension check, plus: was it built with csrc/moe.cu?"""

    def unavailable(device: torch.device) -> str | None:
        reason = check(device)
        if reason:
            return reason
        from moon_fast import _ext

        if not hasattr(_ext.csrc_ops(device), "moe_swiglu"):
            return "the moon_fast extension was built before csrc/moe.cu's current kernels; rebuild it with `make build`"
        return None

    return unavailable


@BACKENDS.register("cuda", unavailable=_csrc_unavailable(cuda_ext_unavailable),
                   description="csrc routing/permute/unpermute kernels + grouped_mm/cuBLAS GEMMs")
def _cuda(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_cuda import moe_mlp_cuda

    return moe_mlp_cuda(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


@BACKENDS.register("cuda_emu", unavailable=_csrc_unavailable(cuda_emu_unavailable),
                   description="the csrc kernels under the CPU emulator (tests only)")
def _cuda_emu(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_cuda import moe_mlp_cuda

    return moe_mlp_cuda(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


@BACKENDS.register("cpu", unavailable=cpu_ext_unavailable,
                   description="native CPU kernels: gather/SwiGLU/unpermute and task-parallel grouped GEMMs (oneDNN/MKL)")
def _cpu(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_cuda import moe_mlp_cpu

    return moe_mlp_cpu(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


_PEER_INSTALL = "bash benchmarks/peers.sh fetch, then build on the GPU machine (it needs a CUDA toolkit)"


@BACKENDS.register("grouped_gemm", unavailable=package_unavailable("grouped_gemm", _PEER_INSTALL, needs_cuda=True),
                   description="peer: grouped_gemm's gmm (per-expert cuBLAS; CUTLASS if built so), bf16 only")
def _grouped_gemm(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_peers import moe_mlp_grouped_gemm

    return moe_mlp_grouped_gemm(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)


def _megablocks_unavailable(device: torch.device) -> str | None:
    return (package_unavailable("megablocks", _PEER_INSTALL, needs_cuda=True)(device)
            or package_unavailable("grouped_gemm", _PEER_INSTALL, needs_cuda=True)(device))


@BACKENDS.register("megablocks", unavailable=_megablocks_unavailable,
                   description="peer: MegaBlocks dropless gather/scatter + grouped_gemm, bf16 only")
def _megablocks(hidden, expert_idx, expert_weight, gate_up_proj, down_proj):
    from moon_fast.ops.moe_peers import moe_mlp_megablocks

    return moe_mlp_megablocks(hidden, expert_idx, expert_weight, gate_up_proj, down_proj)
