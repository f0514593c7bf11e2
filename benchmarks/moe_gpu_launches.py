"""What the GPU MoE scripts (moe_gpu_gemm.py, moe_triton_tiles.py, moe_gpu_probes.py) share: the timers
and the six Triton launches of one forward+backward, each with the dense cuBLAS product of its FLOPs.

S = T * k routed rows, widths H and I:
  swiglu_up     x[token] (S, H) @ gate_up[e]^T -> h, gu            dense: (S, H) @ (H, 2I)
  down_fwd      h (S, I) @ down[e]^T, scattered to slot order        dense: (S, I) @ (I, H)
  dh_swiglu     (w * dout[token]) (S, H) @ down[e] -> dgu, h         dense: (S, H) @ (H, I)
  wgrad_down    sum_r (w dout[token])^T h -> (E, H, I)               dense: (H, S) @ (S, I)
  wgrad_gate_up sum_r dgu^T x[token] -> (E, 2I, H)                   dense: (2I, S) @ (S, H)
  dx            dgu (S, 2I) @ gate_up[e], scattered                  dense: (S, 2I) @ (2I, H)
and ``dh``: dh_swiglu split in two (``$MOON_FAST_MOE_SWIGLU_BWD=split``), the plain dh GEMM (the "dh" tiles)
and the elementwise SwiGLU backward (kernels/moe_swiglu.py); dense: that of dh_swiglu.
The forward launches take the weights in the layouts the op's forward uses (kernels/moe.py
``_forward_weights``: an N-contiguous copy in fp32), made beforehand, as routing is.

``peer_products(peer)``: the same six products as another library's grouped GEMMs, on operands gathered
into expert-contiguous rows beforehand (the plain GEMMs: no gather, SwiGLU, weighting or scatter, which our
launches fuse): ``torch_gmm`` = torch.nn.functional.grouped_mm (on CUDA its kernel is bf16-only; other dtypes
take moe_gemm's per-expert loop, as the ``torch`` backend does), ``grouped_gemm`` = the grouped_gemm
package (bf16 only; per-expert cuBLAS from host-side group sizes unless built with GROUPED_GEMM_CUTLASS=1).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moon_fast.bench.moe import make_problem  # noqa: E402

FORWARD = ("swiglu_up", "down_fwd")
BACKWARD = ("dh_swiglu", "wgrad_down", "wgrad_gate_up", "dx")
BACKWARD_SPLIT = ("dh",) + BACKWARD[1:]  # the backward with the SwiGLU backward split out of the dh GEMM
PEERS = ("torch_gmm", "grouped_gemm")


def device_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 200) -> float:
    """Median of triton.testing.do_bench (CUDA events, L2 flushed); NaN off a GPU, where the scripts only
    check their logic under TRITON_INTERPRET=1."""
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def host_ms(fn: Callable[[], object], n: int = 20) -> float:
    """Host time per call of ``n`` calls issued without synchronising: at or above the device time, the
    call is bound by the host (launch cost), not the GPU. NaN off a GPU."""
    fn()
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    out = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return out


def copy_gbps(nbytes: int = 1 << 29) -> float:
    """GPU memory bandwidth as one large device-to-device copy achieves it (``nbytes`` read and written), in
    GB/s; NaN off a GPU."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / device_ms(lambda: dst.copy_(src)) / 1e6


@dataclass
class Launch:
    run: Callable  # run(plan) -> the launch's outputs
    dense: Callable[[], object]  # the dense cuBLAS product of the same FLOPs
    flops: float
    # The fewest bytes the launch must move through GPU memory: each input read once, each output written
    # once (the gathered rows of dout and x once per token, as if L2 served their k reuses). At the memory's
    # copy rate this bounds the launch's time from below, as the dense product's time does for its FLOPs.
    bytes: float


class MoeLaunches:
    """One problem (make_problem: top-k routing of random logits, HF weight layout), its six launches and the split
    dh ("dh")."""

    def __init__(self, t: int, h: int, i: int, e: int, k: int, dtype: torch.dtype, dev: str = "cuda"):
        from moon_fast.kernels.moe import _forward_weights, _Plan, grouped_rows, grouped_wgrad, swiglu_up
        from moon_fast.kernels.moe_swiglu import swiglu_backward

        dev = torch.device(dev)
        self.shape = {"T": t, "H": h, "I": i, "E": e, "k": k, "dtype": str(dtype).replace("torch.", "")}
        self.dtype = dtype
        self.problem = make_problem(t, h, i, e, k, dtype, dev)
        hidden, idx, weight, gate_up, down, grad = self.problem
        self.expert_idx = idx
        self.plan = _Plan(idx, e, dtype, (h, i))  # the routing kernels, run once here as the op runs them once per call
        r = self.plan.routing
        w_sorted = weight.reshape(-1).index_select(0, r.perm)
        w_up, w_down = _forward_weights(gate_up, down)
        h_act, gu = swiglu_up(self.plan, hidden, w_up, store_gu=True)
        wh, dgu = grouped_rows(self.plan, "dh_swiglu", grad, down, i, a_idx=r.token, a_scale=w_sorted, swiglu_gu=gu)
        self.saved = {"w_sorted": w_sorted, "gu": gu, "h": h_act, "dgu": dgu}
        s = t * k
        rnd = lambda *shape: torch.randn(*shape, dtype=dtype, device=dev)  # noqa: E731
        x, a1, d1, d2, w1, w2 = rnd(s, h), rnd(s, i), rnd(s, 2 * i), rnd(s, h), rnd(h, 2 * i), rnd(i, h)
        nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        rows_h, rows_i = s * h * x.element_size(), s * i * x.element_size()  # (S, H) and (S, I) outputs not kept here
        self.launches = {
            "swiglu_up": Launch(lambda p: swiglu_up(p, hidden, w_up, store_gu=True), lambda: x @ w1,
                                2 * s * h * 2 * i, nb(hidden, w_up, h_act, gu)),
            "down_fwd": Launch(lambda p: grouped_rows(p, "down_fwd", h_act, w_down, h, c_idx=r.perm),
                               lambda: a1 @ w2, 2 * s * i * h, nb(h_act, w_down) + rows_h),
            "dh_swiglu": Launch(lambda p: grouped_rows(p, "dh_swiglu", grad, down, i, a_idx=r.token,
                                                       a_scale=w_sorted, swiglu_gu=gu),
                                lambda: d2 @ w2.t(), 2 * s * h * i, nb(grad, down, w_sorted, gu, dgu, wh)),
            "wgrad_down": Launch(lambda p: grouped_wgrad(p, "wgrad_down", grad, wh, a_idx=r.token),
                                 lambda: a1.t() @ d2, 2 * s * h * i, nb(grad, wh, down)),
            "wgrad_gate_up": Launch(lambda p: grouped_wgrad(p, "wgrad_gate_up", dgu, hidden, b_idx=r.token),
                                    lambda: x.t() @ d1, 2 * s * h * 2 * i, nb(dgu, hidden, gate_up)),
            "dx": Launch(lambda p: grouped_rows(p, "dx", dgu, gate_up, h, c_idx=r.perm), lambda: d1 @ w1.t(),
                         2 * s * h * 2 * i, nb(dgu, gate_up) + rows_h),
            # dh_swiglu's traffic plus the plain dh written by the GEMM and read back by the elementwise pass
            "dh": Launch(lambda p: swiglu_backward(grouped_rows(p, "dh", grad, down, i, a_idx=r.token,
                                                                a_scale=w_sorted), gu, w_sorted),
                         lambda: d2 @ w2.t(), 2 * s * h * i, nb(grad, down, w_sorted, gu, dgu, wh) + 2 * rows_i),
        }

    def peer_products(self, peer: str) -> dict[str, Callable[[], object]]:
        """FORWARD + BACKWARD's products as ``peer``'s grouped GEMMs (see the module docstring), or raises
        RuntimeError saying why that peer cannot run here."""
        from moon_fast.ops.moe_gemm import gmm, gmm_wgrad

        hidden, _, _, gate_up, down, grad = self.problem
        routing = self.plan.routing  # the rows of h and dgu are in its order
        xs = hidden.index_select(0, routing.token)
        dys = grad.index_select(0, routing.token) * self.saved["w_sorted"][:, None]
        h, dgu = self.saved["h"], self.saved["dgu"]
        if peer == "torch_gmm":
            return {"swiglu_up": lambda: gmm(xs, gate_up.transpose(1, 2), routing),
                    "down_fwd": lambda: gmm(h, down.transpose(1, 2), routing),
                    "dh_swiglu": lambda: gmm(dys, down, routing),
                    "wgrad_down": lambda: gmm_wgrad(dys, h, routing),
                    "wgrad_gate_up": lambda: gmm_wgrad(dgu, xs, routing),
                    "dx": lambda: gmm(dgu, gate_up, routing)}
        if peer != "grouped_gemm":
            raise ValueError(f"unknown peer {peer!r}: one of {PEERS}")
        if self.dtype != torch.bfloat16:
            raise RuntimeError("grouped_gemm runs bf16 only")
        try:
            from grouped_gemm.backend import gmm as gg
        except ImportError as exc:
            raise RuntimeError(f"grouped_gemm is not installed ({exc}): bash benchmarks/peers.sh") from exc
        sizes = routing.counts().cpu()  # its cuBLAS path takes the group sizes on the host
        return {"swiglu_up": lambda: gg(xs, gate_up, sizes, trans_b=True),
                "down_fwd": lambda: gg(h, down, sizes, trans_b=True),
                "dh_swiglu": lambda: gg(dys, down, sizes),
                "wgrad_down": lambda: gg(dys, h, sizes, trans_a=True),
                "wgrad_gate_up": lambda: gg(dgu, xs, sizes, trans_a=True),
                "dx": lambda: gg(dgu, gate_up, sizes)}

    def plan_with(self, launch: str, tiles: tuple[int, int, int, int, int]):
        """A plan whose ``launch`` uses ``tiles`` (BM, BN, BK, num_warps, num_stages), routing made."""
        from moon_fast.kernels.moe import _tiles

        return self.plan_variant(cfg={**self.plan.cfg, launch: _tiles(*tiles)})

    def plan_variant(self, **attrs):
        """A copy of the plan with attributes replaced (e.g. tma=True), routing made."""
        import copy

        p = copy.copy(self.plan)
        for name, value in attrs.items():
            setattr(p, name, value)
        return p

    def run(self, names, plan=None) -> None:
        """The launches ``names`` in turn (the default tiles unless ``plan``)."""
        for name in names:
            self.launches[name].run(plan or self.plan)

    def dense(self, names) -> None:
        for name in names:
            self.launches[name].dense()

    def flops(self, names) -> float:
        return sum(self.launches[n].flops for n in names)

    def floors(self, gbps: float) -> dict[str, dict]:
        """Per launch, the lower bound of its time: the dense cuBLAS product of its FLOPs (measured) or its
        bytes at ``gbps`` (copy_gbps), whichever is longer. {launch: {"dense_ms", "hbm_ms", "ms", "bound"}}; NaN
        off a GPU."""
        out = {}
        for name, launch in self.launches.items():
            dense_ms, hbm_ms = device_ms(launch.dense), launch.bytes / (gbps * 1e6)
            floor = math.nan if math.isnan(dense_ms) or math.isnan(hbm_ms) else max(dense_ms, hbm_ms)
            out[name] = {"dense_ms": dense_ms, "hbm_ms": hbm_ms, "ms": floor,
                         "bound": "memory" if hbm_ms > dense_ms else "compute"}
        return out

    def op_step(self, backend: str) -> Callable[[], None]:
        """moe_mlp forward+backward with ``backend`` on this problem (gradients for all four inputs). The
        Triton modes ($MOON_FAST_MOE_SWIGLU_BWD, $MOON_FAST_MOE_TMA) are read at each call: set them around
        the whole measurement, not inside the step, so that no mode pays for it in host time."""
        from moon_fast.ops import moe_mlp

        hidden, idx, weight, gate_up, down, grad = self.problem
        leaves = [x.requires_grad_() for x in (hidden, weight, gate_up, down)]

        def step():
            out = moe_mlp(hidden, idx, weight, gate_up, down, backend=backend)
            torch.autograd.grad(out, leaves, grad)

        return step
