"""Benchmark cases of ``moe_mlp`` (forward + backward) and its peers, for ``moon-fast bench``.

Backends: ours (``reference``, ``torch``, ``cpu``, ``grouped_mm``, ``triton``, ``cuda``) and the library peers
``grouped_gemm`` / ``megablocks`` (GPU only) through ``moe_mlp``; peers ``hf_eager`` and ``hf_grouped_mm`` (transformers' ``Qwen2MoeExperts`` with
``experts_implementation`` "eager" / "grouped_mm", same weights and routing); and ``dense_gemm``: two
dense matmuls of exactly the op's FLOPs (S = T * k rows through H -> 2I -> H, forward and the two
backward products each), the "matmul rate" every MoE backend is judged against, measured in the same run;
``dense_gemm_rowmajor``: the same six products with every operand row-major (the weight gradients' A
copied transposed outside the timing), the fastest layout of the GEMM library, i.e. the strictest "matmul
rate"; ``grouped_gemm_floor``: the op's six grouped GEMMs alone as the ``torch`` backend runs them
(``moon_fast.ops.moe_gemm``: grouped_mm), and ``cpu_gemm_floor``: the same as the ``cpu`` backend runs them
(csrc/cpu/grouped_gemm_cpu.cpp); each with the same routing and group sizes and nothing else (no gather,
SwiGLU, weighting or combine). ``dense_gemm`` vs a floor is what splitting the rows into E groups costs
(or saves); a floor vs its backend is what the dispatch around the GEMMs costs.

FLOPs and bytes: the shared formulas of moon_fast.bench.flops (moe_flops: forward
2 * T * k * (H * 2I + I * H) = 6 T k H I, backward twice that; moe_bytes: minimum traffic).
"""

from __future__ import annotations

import copy

import torch

from moon_fast.bench.harness import Case, Workload

OP = "moe"
BUILDER = "moon_fast.bench.moe:build"
OURS = ("reference", "torch", "cpu", "grouped_mm", "triton", "cuda")
PEERS = ("hf_eager", "hf_grouped_mm", "grouped_gemm", "megablocks", "dense_gemm", "dense_gemm_rowmajor",
         "grouped_gemm_floor", "cpu_gemm_floor")


def flops(t: int, h: int, i: int, k: int) -> tuple[float, float]:
    """(forward, backward) FLOPs: moon_fast.bench.flops.moe_flops (6 T k H I forward, twice that back)."""
    from moon_fast.bench.flops import moe_flops

    return moe_flops(t, k, h, i)


def traffic_bytes(t: int, h: int, i: int, e: int, k: int, elem: int) -> tuple[float, float]:
    from moon_fast.bench.flops import moe_bytes

    return moe_bytes(t, k, h, i, e, elem)


def cases(quick: bool) -> list[Case]:
    """The headline case (T=4096, H=I=1024, E=8, k=2, fp32 and bf16, every backend; fp16, the main ones)
    and sweeps over T and E (bf16). ``quick``: small shapes only, for the CPU."""
    out: list[Case] = []
    backends = OURS + PEERS

    def add(dtype, t, h, i, e, k, names, tag=""):
        for b in names:
            params = {"T": t, "H": h, "I": i, "E": e, "k": k}
            out.append(Case(OP, b, dtype, params, BUILDER, label=f"{tag}T={t},E={e}"))

    if quick:
        for dtype in ("fp32", "bf16"):
            add(dtype, 512, 256, 256, 8, 2, backends)
        for t in (128, 1024):
            add("bf16", t, 256, 256, 8, 2, ("torch", "cpu", "hf_grouped_mm", "dense_gemm", "cpu_gemm_floor"),
                tag="sweepT:")
        for e in (4, 32):
            add("bf16", 512, 256, 256, e, 2, ("torch", "cpu", "hf_grouped_mm", "dense_gemm", "cpu_gemm_floor"),
                tag="sweepE:")
        return out
    for dtype in ("fp32", "bf16"):
        add(dtype, 4096, 1024, 1024, 8, 2, backends)
    sweep = ("torch", "cpu", "triton", "cuda", "hf_grouped_mm", "dense_gemm", "cpu_gemm_floor")
    add("fp16", 4096, 1024, 1024, 8, 2, sweep)  # the headline shape in fp16, against the main peers only
    for t in (1024, 16384):
        add("bf16", t, 1024, 1024, 8, 2, sweep, tag="sweepT:")
    for e in (4, 32, 64):
        add("bf16", 4096, 1024, 1024, e, 2, sweep, tag="sweepE:")
    return out


def make_problem(t, h, i, e, k, dtype, device, seed=0):
    """Hidden states, a top-k routing of random router logits (distinct experts per token, softmax
    weights renormalised over the k picks, as Qwen2-MoE does) and expert weights in the HF layout."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen)
    logits = torch.randn(t, e, generator=gen)
    weight, idx = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    weight = weight / weight.sum(-1, keepdim=True)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    down = torch.randn(e, h, i, generator=gen) / i**0.5
    grad = torch.randn(t, h, generator=gen)
    cast = [x.to(device=device, dtype=dtype) for x in (hidden, weight, gate_up, down, grad)]
    return cast[0], idx.to(device), cast[1], cast[2], cast[3], cast[4]


def hf_experts(gate_up: torch.Tensor, down: torch.Tensor, implementation: str):
    """transformers' Qwen2MoeExperts holding these weights, dispatching to ``implementation``."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    e, two_i, h = gate_up.shape
    cfg = Qwen2MoeConfig(hidden_size=h, moe_intermediate_size=two_i // 2, num_experts=e, hidden_act="silu")
    cfg._experts_implementation = implementation
    mod = Qwen2MoeExperts(copy.deepcopy(cfg)).to(device=gate_up.device, dtype=gate_up.dtype)
    with torch.no_grad():
        mod.gate_up_proj.copy_(gate_up)
        mod.down_proj.copy_(down)
    return mod


def build(*, backend: str, dtype: torch.dtype, device: torch.device, T: int, H: int, I: int, E: int,  # noqa: E741
          k: int) -> Workload:
    hidden, idx, weight, gate_up, down, grad = make_problem(T, H, I, E, k, dtype, device)
    fl_f, fl_b = flops(T, H, I, k)
    by_f, by_b = traffic_bytes(T, H, I, E, k, hidden.element_size())

    if backend == "dense_gemm":
        s = T * k
        x = torch.randn(s, H, dtype=dtype, device=device)
        w1 = torch.randn(H, 2 * I, dtype=dtype, device=device) / H**0.5
        w2 = torch.randn(I, H, dtype=dtype, device=device) / I**0.5
        d1 = torch.randn(s, 2 * I, dtype=dtype, device=device)
        d2 = torch.randn(s, H, dtype=dtype, device=device)
        a1 = torch.randn(s, I, dtype=dtype, device=device)

        def forward():
            return (x @ w1)[:, :I] @ w2  # the slice is a view: same FLOPs as the op's two GEMMs

        def backward(_):
            d2 @ w2.t(), a1.t() @ d2, d1 @ w1.t(), x.t() @ d1  # noqa: B018  dX2, dW2, dX1, dW1

        return Workload(forward, backward, fl_f, fl_b, by_f, by_b)

    if backend == "dense_gemm_rowmajor":
        s = T * k
        x, d2 = torch.randn(s, H, dtype=dtype, device=device), torch.randn(s, H, dtype=dtype, device=device)
        a1, d1 = torch.randn(s, I, dtype=dtype, device=device), torch.randn(s, 2 * I, dtype=dtype, device=device)
        w1, w1t = torch.randn(H, 2 * I, dtype=dtype, device=device), torch.randn(2 * I, H, dtype=dtype, device=device)
        w2, w2t = torch.randn(I, H, dtype=dtype, device=device), torch.randn(H, I, dtype=dtype, device=device)
        a1t, xt = a1.t().contiguous(), x.t().contiguous()

        def forward():
            x @ w1  # noqa: B018
            return a1 @ w2

        def backward(_):
            d2 @ w2t, a1t @ d2, d1 @ w1t, xt @ d1  # noqa: B018  dX2, dW2^T, dX1, dW1^T: all row-major

        return Workload(forward, backward, fl_f, fl_b, by_f, by_b)

    if backend in ("grouped_gemm_floor", "cpu_gemm_floor"):
        if backend == "grouped_gemm_floor":
            from moon_fast.ops.moe_gemm import gmm, gmm_wgrad
        else:
            from moon_fast.backends import BackendUnavailable, cpu_ext_unavailable
            from moon_fast.ops.moe_cuda import CPU_KERNELS

            reason = cpu_ext_unavailable(device)  # not built, or not the CPU
            if reason:
                raise BackendUnavailable(f"cpu_gemm_floor: {reason}")
            gmm, gmm_wgrad = CPU_KERNELS.gmm, CPU_KERNELS.gmm_wgrad
        return _grouped_gemm_floor(idx, gate_up, down, gmm, gmm_wgrad, fl_f, fl_b, by_f, by_b)

    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    if backend.startswith("hf_"):
        mod = hf_experts(gate_up, down, backend[len("hf_"):])
        params = [mod.gate_up_proj, mod.down_proj]

        def forward():
            return mod(hidden, idx, weight)
    else:
        from moon_fast.ops import moe_mlp

        params = [gate_up.requires_grad_(), down.requires_grad_()]

        def forward():
            return moe_mlp(hidden, idx, weight, gate_up, down, backend=backend)

    inputs = leaves + params

    def backward(out):
        torch.autograd.grad(out, inputs, grad)

    return Workload(forward, backward, fl_f, fl_b, by_f, by_b)


def _grouped_gemm_floor(idx, gate_up, down, gmm, gmm_wgrad, fl_f, fl_b, by_f, by_b) -> Workload:
    """The six grouped GEMMs of moe_mlp's forward and backward over ``idx``'s routing, on random
    operands of the right shapes (S = T * k rows in expert-contiguous order), by ``gmm`` (a (S, K),
    b (E, K, N), routing -> (S, N)) and ``gmm_wgrad`` (a (S, M), b (S, N), routing -> (E, M, N))."""
    from moon_fast.ops.moe_routing import route

    e, two_i, h = gate_up.shape
    s = idx.numel()
    routing = route(idx, e)
    dev, dt = gate_up.device, gate_up.dtype
    xs, dys = torch.randn(s, h, device=dev, dtype=dt), torch.randn(s, h, device=dev, dtype=dt)
    act = torch.randn(s, two_i // 2, device=dev, dtype=dt)
    dgu = torch.randn(s, two_i, device=dev, dtype=dt)

    def forward():
        gmm(xs, gate_up.transpose(1, 2), routing)  # (S, 2I)
        return gmm(act, down.transpose(1, 2), routing)  # (S, H)

    def backward(_):
        gmm_wgrad(dys, act, routing), gmm(dys, down, routing)  # d down (E, H, I), d act (S, I)
        gmm_wgrad(dgu, xs, routing), gmm(dgu, gate_up, routing)  # d gate_up (E, 2I, H), d xs (S, H)

    return Workload(forward, backward, fl_f, fl_b, by_f, by_b)
