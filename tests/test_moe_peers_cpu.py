"""The grouped_gemm and MegaBlocks peers of ``moe_mlp`` (moon_fast/ops/moe_peers.py) on the CPU, in fp32.

The packages' own Python runs: MegaBlocks' ops (its gather / scatter Triton kernels, under the interpreter, and
their autograd Functions) and grouped_gemm's ``gmm`` autograd Function. Only their CUDA extensions are replaced,
by torch code with the same contract:
- ``megablocks_ops``: ``sort`` (a stable key sort with the positions, what CUB's radix sort gives),
  ``histogram`` (int32 counts) and ``inclusive_cumsum``;
- ``grouped_gemm_backend.gmm(a, b, c, batch_sizes, trans_a, trans_b)``: per-group matmuls written into ``c``.
So this checks how our wrappers call the packages (argument order, layouts, weights, top-k), not the packages'
CUDA kernels: the GPU test ``test_backend_matches_reference_on_cuda`` runs those.

The sources come from the archives ``bash benchmarks/peers.sh fetch`` puts in .peers/ (``make test`` fetches
them). Without them the test skips: the packages are missing.
"""

from __future__ import annotations

import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch

from moon_fast.ops import moe_mlp, moe_peers
from tests.test_moe_op import make_inputs

PEERS_DIR = Path(__file__).resolve().parent.parent / ".peers"
# (archive name prefix, the Python package inside it)
SOURCES = {"megablocks-": "megablocks", "stanford_stk-": "stk", "grouped_gemm-": "grouped_gemm"}
PACKAGES = ("megablocks", "stk", "grouped_gemm", "megablocks_ops", "grouped_gemm_backend")

pytest.importorskip("triton")


def _fake_megablocks_ops() -> types.ModuleType:
    mod = types.ModuleType("megablocks_ops")

    def sort(x, end_bit, x_out, iota_out):
        values, order = torch.sort(x, stable=True)
        x_out.copy_(values)
        iota_out.copy_(order)

    def histogram(x, num_bins):
        return torch.bincount(x.long(), minlength=num_bins).to(torch.int32)

    def inclusive_cumsum(x, dim, out):
        out.copy_(torch.cumsum(x, dim))

    mod.sort, mod.histogram, mod.inclusive_cumsum = sort, histogram, inclusive_cumsum
    return mod


def _fake_grouped_gemm_backend() -> types.ModuleType:
    mod = types.ModuleType("grouped_gemm_backend")

    def gmm(a, b, c, batch_sizes, trans_a, trans_b):
        # the package's own checks (TORCH_CHECKs in csrc/grouped_gemm.cu)
        assert batch_sizes.device.type == "cpu" and batch_sizes.dtype == torch.int64
        assert a.is_contiguous() and b.is_contiguous() and c.is_contiguous()
        lo = 0
        for e, n in enumerate(batch_sizes.tolist()):
            if trans_a:  # a (S, M), b (S, N) -> c (E, M, N)
                c[e] = a[lo:lo + n].t() @ b[lo:lo + n]
            else:  # a (S, K), b (E, K, N) or (E, N, K) -> c (S, N)
                c[lo:lo + n] = a[lo:lo + n] @ (b[e].t() if trans_b else b[e])
            lo += n

    mod.gmm = gmm
    return mod


@pytest.fixture(scope="module")
def peer_sources(tmp_path_factory):
    """The three packages' Python sources unpacked from .peers/, or a skip."""
    archives = {prefix: sorted(PEERS_DIR.glob(f"{prefix}*.tar.gz")) for prefix in SOURCES}
    missing = [prefix.rstrip("-") for prefix, found in archives.items() if not found]
    if missing:
        pytest.skip(f"peer packages missing: no {', '.join(missing)} archive in {PEERS_DIR} "
                    "(bash benchmarks/peers.sh fetch)")
    root = tmp_path_factory.mktemp("peers")
    for prefix, package in SOURCES.items():
        with tarfile.open(archives[prefix][-1]) as tar:
            top = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/{package}/")]
            tar.extractall(root, members=members, filter="data")
            (root / top / package).rename(root / package)
    return root


@pytest.fixture
def peers(peer_sources, monkeypatch):
    """The packages importable, with fake CUDA extensions; afterwards they are unimported again, so that other
    tests still see them as not installed."""
    monkeypatch.syspath_prepend(str(peer_sources))
    monkeypatch.setitem(sys.modules, "megablocks_ops", _fake_megablocks_ops())
    monkeypatch.setitem(sys.modules, "grouped_gemm_backend", _fake_grouped_gemm_backend())
    # the dtype guard is for the real kernels (bf16 only); the fakes and the interpreter run fp32
    monkeypatch.setattr(moe_peers, "_require_bf16", lambda *args: None)
    from megablocks.backend import kernels
    from triton.runtime.autotuner import Autotuner

    for fn in vars(kernels).values():  # the interpreter cannot time configs: keep MegaBlocks' first
        if isinstance(fn, Autotuner):
            monkeypatch.setattr(fn, "configs", fn.configs[:1])
    yield
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES:
            del sys.modules[name]


CASES = [  # T, H, I, E, k, routing
    (7, 16, 8, 3, 2, "random"),
    (1, 8, 4, 2, 1, "random"),  # one token
    (9, 16, 8, 4, 2, "skip_expert"),  # an expert with no tokens
    (6, 8, 4, 3, 3, "random"),  # k = 3
    (5, 8, 4, 3, 2, "all_one"),  # every token on one expert, twice
]


@pytest.mark.parametrize("backend", ["megablocks", "grouped_gemm"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[5]}-T{c[0]}-k{c[4]}" for c in CASES])
def test_peer_matches_reference(peers, backend, case):
    t, h, i, e, k, routing = case
    tensors, idx, grad = make_inputs(t, h, i, e, k, routing, torch.float32, seed=t * 10 + k)
    fn = {"megablocks": moe_peers.moe_mlp_megablocks, "grouped_gemm": moe_peers.moe_mlp_grouped_gemm}[backend]
    if routing == "all_one":  # weights given as transposed views (moe_mlp takes any strides)
        tensors[2] = tensors[2].transpose(1, 2).contiguous().transpose(1, 2)
        tensors[3] = tensors[3].transpose(1, 2).contiguous().transpose(1, 2)
    leaves = [x.clone().requires_grad_() for x in tensors]
    ref_leaves = [x.clone().requires_grad_() for x in tensors]
    out = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    ref = moe_mlp(ref_leaves[0], idx, ref_leaves[1], ref_leaves[2], ref_leaves[3], backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32 throughout: only summation order differs
    for name, got, want in zip(("hidden", "expert_weight", "gate_up_proj", "down_proj"),
                               torch.autograd.grad(out, leaves, grad), torch.autograd.grad(ref, ref_leaves, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d {n}: {m}")


def test_grouped_gemm_benchmark_products_match_torch(peers, monkeypatch):
    """benchmarks/moe_gpu_gemm.py's grouped_gemm rows compute the same six products as its torch grouped_mm rows
    (which tests/test_moe_gpu_scripts.py checks against our Triton launches): the package's calling
    conventions (trans_a / trans_b, host-side group sizes) are used right."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from moe_gpu_launches import BACKWARD, FORWARD, MoeLaunches

    m = MoeLaunches(24, 32, 16, 3, 2, torch.bfloat16, "cpu")
    ours, theirs = m.peer_products("torch_gmm"), m.peer_products("grouped_gemm")
    for name in FORWARD + BACKWARD:
        torch.testing.assert_close(theirs[name]().float(), ours[name]().float(), rtol=2e-2, atol=2e-2,
                                   msg=lambda msg, n=name: f"{n}: {msg}")
