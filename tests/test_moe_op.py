"""moe_mlp: every backend against the per-expert reference and against transformers' Qwen2MoeExperts,
forward and backward (hidden, expert_weight, gate_up_proj, down_proj), fp32 / fp16 / bf16, on awkward
routings and shapes; the csrc routing metadata against torch; input errors."""

from __future__ import annotations

import copy

import pytest
import torch

from moon_fast.ops import moe_mlp
from moon_fast.ops.moe import BACKENDS
from tests.utils import DTYPES, assert_close, case_seed, poison_, tolerance

# (name, T, H, I, E, k, routing): H and I deliberately not multiples of tiles (16/32) nor of 8.
CASES = [
    ("basic", 37, 24, 20, 5, 2, "random"),
    ("odd_shapes", 29, 7, 5, 3, 3, "random"),
    ("one_token", 1, 16, 8, 4, 2, "random"),
    ("one_expert", 9, 16, 12, 1, 1, "random"),
    ("k4", 17, 16, 12, 6, 4, "random"),
    ("empty_expert", 21, 16, 12, 4, 2, "skip_expert"),
    ("all_on_one_expert", 13, 16, 12, 4, 1, "all_one"),
    ("duplicate_choices", 11, 16, 12, 3, 2, "duplicates"),
    ("many_rows_per_expert", 40, 16, 12, 2, 2, "random"),  # several row tiles per expert
]
FAST_BACKENDS = ["torch", "cpu", "grouped_mm", "triton", "cuda_emu"]


def make_inputs(t, h, i, e, k, routing, dtype, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen)
    # distinct experts per token as a top-k router gives, unless the case asks otherwise
    idx = torch.rand(t, e, generator=gen).argsort(dim=1)[:, :k] if k <= e else torch.randint(0, e, (t, k), generator=gen)
    if routing == "skip_expert":  # expert 1 gets no token: distinct picks among the others
        others = torch.tensor([x for x in range(e) if x != 1])
        idx = others[torch.rand(t, e - 1, generator=gen).argsort(dim=1)[:, :k]]
    elif routing == "all_one":
        idx = torch.full((t, k), 2)
    elif routing == "duplicates":  # the same expert twice for one token: two independent slots
        idx[:, 1] = idx[:, 0]
    weight = torch.rand(t, k, generator=gen)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    down = torch.randn(e, h, i, generator=gen) / i**0.5
    grad_out = torch.randn(t, h, generator=gen)
    fp = [hidden, weight, gate_up, down]
    return [x.to(dtype) for x in fp], idx, grad_out


def run(backend, tensors, idx, grad_out, dtype=None):
    """Output and gradients (hidden, expert_weight, gate_up_proj, down_proj) of one call."""
    leaves = [x.detach().clone().to(dtype or x.dtype).requires_grad_() for x in tensors]
    hidden, weight, gate_up, down = leaves
    out = moe_mlp(hidden, idx, weight, gate_up, down, backend=backend)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


NAMES = ["out", "d_hidden", "d_expert_weight", "d_gate_up_proj", "d_down_proj"]


def check_against_fp32_oracle(got, ref_lp, ref_fp32, dtype, *, factor=2.0, names=NAMES):
    """fp32: element-wise tolerance. fp16/bf16: the backend's error against the fp32 reference is at
    most ``factor`` x the low-precision reference's own error, plus a floor (FlashAttention's rule).
    ``names``: of the tensors in each list (by default a call's output and gradients, as ``run`` gives them)."""
    for name, g, r_lp, r32 in zip(names, got, ref_lp, ref_fp32, strict=True):
        assert g is not None, f"{name}: no gradient"
        assert g.dtype == r_lp.dtype, f"{name}: dtype {g.dtype}, expected {r_lp.dtype}"
        if dtype == torch.float32:
            assert_close(g, r32, **tolerance(dtype, scale=3), name=name)
            continue
        assert not torch.isnan(g).any(), f"{name}: NaN"
        scale = r32.abs().max().item() + 1e-6
        err = (g.float() - r32).abs().max().item()
        ref_err = (r_lp.float() - r32).abs().max().item()
        # The reference's own error is a max over the tensor's elements: over a handful of elements
        # (T=1: d_expert_weight has k entries) it can come out far below the usual rounding error of a
        # low-precision dot product, so tiny tensors get a doubled floor.
        floor = tolerance(dtype)["atol"] * scale * (2.0 if g.numel() < 64 else 1.0)
        assert err <= factor * ref_err + floor, (
            f"{name} {dtype}: error {err:.3g} vs fp32 reference exceeds {factor} x the reference's own "
            f"low-precision error {ref_err:.3g} + {floor:.3g}")


def _poisoned_empty(shape, like, dtype=None):
    return poison_(torch.empty(shape, dtype=dtype or like.dtype, device=like.device))


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every buffer the triton / csrc launchers allocate for a kernel to fill starts as NaN (or int max)."""
    import moon_fast.ops.moe_cuda as moe_cuda

    monkeypatch.setattr(moe_cuda, "_empty", _poisoned_empty)
    try:
        import moon_fast.kernels._utils as kernel_utils
    except ImportError:  # no triton: its tests skip
        return
    monkeypatch.setattr(kernel_utils, "new_output", _poisoned_empty)  # the Triton routing's outputs too


def _skip_unavailable(backend):
    """Skips only what needs a GPU or a package that cannot be installed here (grouped_gemm,
    megablocks); any other unavailable backend (a broken cuda_emu build, missing triton) fails."""
    reason = BACKENDS.why_unavailable(backend, "cpu")
    if reason and backend in ("cuda", "grouped_gemm", "megablocks"):
        pytest.skip(f"{backend} needs a CUDA GPU or a package not installed here: {reason}")
    assert reason is None, f"{backend} should run here: {reason}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_matches_reference(backend, case, dtype):
    _skip_unavailable(backend)
    check_case(backend, case, dtype)


def check_case(backend, case, dtype, device="cpu"):
    """``backend`` on ``case`` in ``dtype`` against the reference on ``device`` (fp32 reference as the oracle)."""
    _, t, h, i, e, k, routing = case
    tensors, idx, grad_out = make_inputs(t, h, i, e, k, routing, torch.float32, seed=case_seed(case))
    tensors, idx, grad_out = [x.to(device) for x in tensors], idx.to(device), grad_out.to(device)
    ref32 = run("reference", tensors, idx, grad_out)
    ref_lp = run("reference", tensors, idx, grad_out, dtype)
    got = run(backend, tensors, idx, grad_out, dtype)
    check_against_fp32_oracle(got, ref_lp, ref32, dtype)


# The max-error rule above is loose at those shapes (a handful of elements per tensor, plus a floor): a systematic
# extra rounding passes it. Over thousands of elements the RMS error tells one apart: Triton's interpreter
# truncating fp32 -> bf16 (kernels/_interpreter_rounding.py) put the Triton backend's RMS error at 1.6-2.3x the
# bf16 reference's, while every backend that rounds as the reference does stays at or below 1.04x (worst of
# each output over seeds 0-19, fp16 and bf16).
RMS_CASE = ("rms", 96, 64, 48, 4, 2, "random")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_low_precision_rms_error_no_worse_than_reference(backend, dtype):
    _skip_unavailable(backend)
    _, t, h, i, e, k, routing = RMS_CASE
    tensors, idx, grad_out = make_inputs(t, h, i, e, k, routing, torch.float32, seed=case_seed((RMS_CASE, dtype)))
    ref32 = run("reference", tensors, idx, grad_out)
    ref_lp = run("reference", tensors, idx, grad_out, dtype)
    got = run(backend, tensors, idx, grad_out, dtype)

    def rms(x):
        return x.float().pow(2).mean().sqrt().item()

    for name, g, r_lp, r32 in zip(NAMES, got, ref_lp, ref32):
        err, ref_err = rms(g.float() - r32), rms(r_lp.float() - r32)
        assert err <= 1.25 * ref_err, (f"{name} {dtype}: RMS error {err:.3g} against the fp32 reference is "
                                       f"{err / ref_err:.2f}x the {dtype} reference's own ({ref_err:.3g}); at most 1.25x")


SPLIT_CASES = [c for c in CASES if c[0] in ("one_token", "one_expert", "k4", "empty_expert", "many_rows_per_expert")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_triton_split_swiglu_backward_matches_reference(case, dtype, monkeypatch):
    """$MOON_FAST_MOE_SWIGLU_BWD=split: the plain dh GEMM, then kernels/moe_swiglu.py's one pass, in place of
    the fused epilogue; checked against the reference as the default mode is (test_backend_matches_reference),
    and checked to have taken the split path."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton
    from moon_fast.kernels.moe_swiglu import swiglu_backward as split_pass

    calls = []

    def recording_split_pass(dh, gu, h_scale):
        calls.append(tuple(dh.shape))
        return split_pass(dh, gu, h_scale)

    monkeypatch.setattr(moe_triton, "swiglu_backward", recording_split_pass)
    monkeypatch.setenv(moe_triton.SWIGLU_BWD_ENV, "split")
    _, t, h, i, e, k, routing = case
    check_case("triton", case, dtype)
    assert calls == [(t * k, i)], "the split SwiGLU backward did not run"


def test_triton_swiglu_backward_mode_env(monkeypatch):
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    monkeypatch.delenv(moe_triton.SWIGLU_BWD_ENV, raising=False)
    assert moe_triton.swiglu_backward_mode() == "fused"
    monkeypatch.setenv(moe_triton.SWIGLU_BWD_ENV, "split")
    assert moe_triton.swiglu_backward_mode() == "split"
    monkeypatch.setenv(moe_triton.SWIGLU_BWD_ENV, "fast")
    with pytest.raises(ValueError, match=r"MOON_FAST_MOE_SWIGLU_BWD must be one of \('fused', 'split'\)"):
        moe_triton.swiglu_backward_mode()


# Widths whose rows are 16-byte aligned in 16-bit (TMA descriptors need that): one token; an empty expert;
# several row tiles per expert, so a descriptor's A box reaches into the next expert's rows (and past S).
TMA_CASES = [("one_token", 1, 16, 8, 4, 2, "random"), ("empty_expert", 21, 16, 24, 4, 2, "skip_expert"),
             ("many_rows_per_expert", 40, 24, 16, 2, 2, "random"), ("unaligned_inter", 9, 16, 12, 3, 1, "random")]


def _record_descriptors(monkeypatch, moe_triton) -> list:
    """The shapes of the TMA descriptors kernels/moe.py makes from now on, in order."""
    made = []
    real = moe_triton.TensorDescriptor

    def recording(base, shape, strides, block_shape):
        made.append(tuple(shape))
        return real(base, shape, strides, block_shape)

    monkeypatch.setattr(moe_triton, "TensorDescriptor", recording)
    return made


@pytest.mark.parametrize("swiglu_bwd", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TMA_CASES, ids=[c[0] for c in TMA_CASES])
def test_triton_tma_operands_match_reference(case, dtype, swiglu_bwd, monkeypatch):
    """$MOON_FAST_MOE_TMA=1: the GEMMs' plain-tile operands (weights; A rows that are not gathered) load
    through tensor descriptors (the interpreter runs them as TMA would: zero fill past the tensor). Checked
    against the reference, and checked to have used descriptors exactly where the layout allows them: I = 12
    in 16-bit (24-byte rows) leaves the I-wide operands (h, down_proj) on pointer loads."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    made = _record_descriptors(monkeypatch, moe_triton)
    monkeypatch.setenv(moe_triton.TMA_ENV, "1")
    monkeypatch.setenv(moe_triton.SWIGLU_BWD_ENV, swiglu_bwd)
    _, t, h, i, e, k, routing = case
    check_case("triton", case, dtype)
    s = t * k
    # swiglu_up views gate_up as (E, 2, I, H): one box holds the gate and up rows
    # swiglu_up: gate_up; down_fwd: h rows, down; dh: down; d down_proj: w * h rows; d gate_up: dgu rows;
    # dx: dgu rows, gate_up
    if i % 8 == 0:
        want = [(e, 2, i, h), (s, i), (e, h, i), (e, h, i), (s, i), (s, 2 * i), (s, 2 * i), (e, 2 * i, h)]
    else:  # I = 12: only gate_up (H-wide rows, in swiglu_up and dx) and dgu rows (2I = 24: 48 bytes)
        want = [(e, 2, i, h), (s, 2 * i), (s, 2 * i), (e, 2 * i, h)]
    assert sorted(made) == sorted(want), made


def test_triton_tma_leaves_misaligned_weights_on_pointer_loads(monkeypatch):
    """A weight whose storage starts 2 bytes past a 16-byte boundary (a view into a larger buffer) cannot be
    a TMA descriptor: that operand keeps its pointer loads, the others still go through descriptors, and the
    result matches the reference."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    made = _record_descriptors(monkeypatch, moe_triton)
    monkeypatch.setenv(moe_triton.TMA_ENV, "1")
    t, h, i, e, k = 21, 16, 24, 4, 2
    tensors, idx, grad_out = make_inputs(t, h, i, e, k, "random", torch.float32, seed=7)
    tensors = [x.to(torch.bfloat16) for x in tensors]
    buf = torch.empty(tensors[2].numel() + 1, dtype=torch.bfloat16)
    gate_up = buf[1:].view(tensors[2].shape)
    gate_up.copy_(tensors[2])
    assert gate_up.data_ptr() % 16 != 0
    hidden, weight, _, down = (x.detach().requires_grad_() for x in tensors)
    gate_up.requires_grad_()
    out = moe_mlp(hidden, idx, weight, gate_up, down, backend="triton")
    out.backward(grad_out.to(out.dtype))
    got = [out.detach(), hidden.grad, weight.grad, gate_up.grad, down.grad]
    assert (e, 2 * i, h) not in made and made, made  # gate_up on pointers; h, down and dgu on descriptors
    ref32 = run("reference", [x.float() for x in tensors], idx, grad_out)
    ref_lp = run("reference", tensors, idx, grad_out)
    check_against_fp32_oracle(got, ref_lp, ref32, torch.bfloat16)


# expert 1's products of infinite values are NaN on purpose (numpy says so under the interpreter)
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_triton_tma_weight_grads_read_only_their_experts_rows(monkeypatch):
    """With TMA, a weight gradient's descriptor box holds BK rows whatever the expert's end, so an expert's
    last partial block goes through masked pointer loads instead: the next expert's rows never enter its sum.
    Zeros times those rows would not be enough: here expert 1 has a token of infinite hidden values (its
    rows of d gu and w * h are not finite), and expert 0's 20 rows (a 16-row block and a partial one under the
    interpreter) must still give finite d gate_up / d down_proj, equal to the reference's."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    monkeypatch.setenv(moe_triton.TMA_ENV, "1")
    t, h, i, e = 25, 16, 16, 2
    tensors, _, grad_out = make_inputs(t, h, i, e, 1, "random", torch.float32, seed=3)
    idx = torch.tensor([0] * 20 + [1] * 5)[:, None]
    tensors[0][22] = float("inf")  # a token of expert 1
    got = run("triton", tensors, idx, grad_out, torch.bfloat16)
    ref32 = run("reference", tensors, idx, grad_out)
    ref_lp = run("reference", tensors, idx, grad_out, torch.bfloat16)
    for name, w in zip(("d_gate_up_proj", "d_down_proj"), ref32[3:]):
        assert not w[1].isfinite().all(), f"the case lost its teeth: expert 1's {name} is finite"
    check_against_fp32_oracle([g[0] for g in got[3:]], [r[0] for r in ref_lp[3:]], [r[0] for r in ref32[3:]],
                              torch.bfloat16, names=("expert 0's d_gate_up_proj", "expert 0's d_down_proj"))


@pytest.mark.parametrize("env, getter", [("TMA_ENV", "tma_enabled"), ("PERSISTENT_ENV", "persistent_enabled")])
def test_triton_on_off_switches(env, getter, monkeypatch):
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    name, read = getattr(moe_triton, env), getattr(moe_triton, getter)
    monkeypatch.delenv(name, raising=False)
    assert read() is False
    monkeypatch.setenv(name, "1")
    assert read() is True
    monkeypatch.setenv(name, "0")
    assert read() is False
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name} must be 0 or 1"):
        read()


def test_triton_no_tma_on_a_cpu_off_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    monkeypatch.setattr(moe_triton, "interpreting", lambda: False)
    assert moe_triton._device_has_tma(torch.device("cpu")) is False


@pytest.mark.parametrize("swiglu_bwd", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TMA_CASES, ids=[c[0] for c in TMA_CASES])
def test_triton_persistent_launches_match_reference(case, dtype, swiglu_bwd, monkeypatch):
    """$MOON_FAST_MOE_PERSISTENT=1 (with TMA): every row-tile launch gets a grid of 2 programs under the
    interpreter (kernels/moe.py _INTERPRETER_PROGRAMS), each looping over its share of the (row tile, column
    tile) pairs; outputs start poisoned, so a pair no program reached fails. Against the reference, and the
    launched grids checked: each a persistent one."""
    triton = pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    grids = []
    real_grid = moe_triton._Plan.rows_grid

    def recording_grid(plan, opts, n):
        grid = real_grid(plan, opts, n)
        grids.append((grid[0], (triton.cdiv(plan.routing.num_slots, opts["BM"]) + plan.routing.num_experts)
                      * triton.cdiv(n, opts["BN"])))
        return grid

    monkeypatch.setattr(moe_triton._Plan, "rows_grid", recording_grid)
    monkeypatch.setenv(moe_triton.TMA_ENV, "1")
    monkeypatch.setenv(moe_triton.PERSISTENT_ENV, "1")
    monkeypatch.setenv(moe_triton.SWIGLU_BWD_ENV, swiglu_bwd)
    check_case("triton", case, dtype)
    # swiglu_up, down, dh (or dh_swiglu), dx: each on 2 programs, looping where there are more tiles
    assert len(grids) == 4 and all(g == min(2, bound) for g, bound in grids), grids


def test_triton_persistent_only_with_tma(monkeypatch):
    """The persistent launches come with TMA descriptors only: fp32 (no descriptors) and TMA off keep one
    program per tile."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    idx = torch.tensor([[0, 1], [1, 0]])
    monkeypatch.setenv(moe_triton.PERSISTENT_ENV, "1")
    monkeypatch.setenv(moe_triton.TMA_ENV, "1")
    assert moe_triton._Plan(idx, 2, torch.bfloat16, (16, 16)).programs == moe_triton._INTERPRETER_PROGRAMS
    assert moe_triton._Plan(idx, 2, torch.float32, (16, 16)).programs == 0
    monkeypatch.setenv(moe_triton.TMA_ENV, "0")
    assert moe_triton._Plan(idx, 2, torch.bfloat16, (16, 16)).programs == 0


# ----------------------------------------------------------------------------- on a CUDA GPU

# The CPU cases plus two at GPU tile sizes: several 128-row tiles per expert with K loops of several steps
# (the aligned, software-pipelined fast path), and widths that are no multiple of 16 (the masked path).
GPU_CASES = CASES + [
    ("gpu_aligned", 1000, 256, 192, 8, 2, "random"),
    ("gpu_unaligned", 333, 200, 72, 5, 3, "random"),
]
GPU_BACKENDS = ["torch", "grouped_mm", "triton", "cuda", "grouped_gemm", "megablocks"]
BF16_ONLY_PEERS = ("grouped_gemm", "megablocks")  # the grouped_gemm package's kernels take bfloat16 only
GPU_BACKEND_DTYPES = [(b, d) for b in GPU_BACKENDS for d in DTYPES if b not in BF16_ONLY_PEERS or d == torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
@pytest.mark.parametrize("backend, dtype", GPU_BACKEND_DTYPES, ids=[f"{b}-{d}" for b, d in GPU_BACKEND_DTYPES])
def test_backend_matches_reference_on_cuda(backend, case, dtype):
    """The GPU kernels (Triton tiles, csrc routing/permute, cuBLAS / grouped_mm GEMMs) against the
    reference run on the same GPU, with the fp32 reference as the oracle; the peers skip when their package
    is missing."""
    reason = BACKENDS.why_unavailable(backend, "cuda")
    if reason and backend in ("grouped_gemm", "megablocks"):
        pytest.skip(f"{backend}: package not installed on this GPU machine: {reason}")
    assert reason is None, f"{backend} should run on a CUDA GPU: {reason}"
    check_case(backend, case, dtype, device="cuda")


@pytest.mark.parametrize("backend", BF16_ONLY_PEERS)
def test_bf16_only_peers_reject_other_dtypes(backend):
    """The peers on the grouped_gemm package say which dtype they take (its kernels would fail a bare
    TORCH_CHECK); the dtype is checked before the package is imported, so this runs anywhere."""
    from moon_fast.ops import moe_peers

    tensors, idx, _ = make_inputs(5, 16, 8, 3, 2, "random", torch.float32, seed=0)
    hidden, weight, gate_up, down = tensors
    fn = {"grouped_gemm": moe_peers.moe_mlp_grouped_gemm, "megablocks": moe_peers.moe_mlp_megablocks}[backend]
    with pytest.raises(TypeError, match=f"{backend}.*bfloat16 only.*float32"):
        fn(hidden, idx, weight, gate_up, down)


TRITON_MODES = {"split": {"MOON_FAST_MOE_SWIGLU_BWD": "split"}, "tma": {"MOON_FAST_MOE_TMA": "1"},
                "tma_split": {"MOON_FAST_MOE_TMA": "1", "MOON_FAST_MOE_SWIGLU_BWD": "split"},
                "tma_persistent": {"MOON_FAST_MOE_TMA": "1", "MOON_FAST_MOE_PERSISTENT": "1"},
                "tma_persistent_split": {"MOON_FAST_MOE_TMA": "1", "MOON_FAST_MOE_PERSISTENT": "1",
                                         "MOON_FAST_MOE_SWIGLU_BWD": "split"}}
MODE_CASES = [c for c in GPU_CASES if c[0] in ("one_token", "empty_expert", "many_rows_per_expert", "gpu_aligned",
                                               "gpu_unaligned")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MODE_CASES, ids=[c[0] for c in MODE_CASES])
@pytest.mark.parametrize("mode", list(TRITON_MODES))
def test_triton_modes_match_reference_on_cuda(mode, case, dtype, monkeypatch):
    """The Triton backend's optional modes on a real GPU: the split SwiGLU backward, TMA descriptor loads
    (where the GPU has TMA: real TMA boxes, whose zero fill past the tensor the interpreter only imitates) and
    with them persistent launches (one program per SM, each looping over tiles)."""
    for name, value in TRITON_MODES[mode].items():
        monkeypatch.setenv(name, value)
    test_backend_matches_reference_on_cuda("triton", case, dtype)


# ----------------------------------------------------------------------------- transformers' experts

def hf_experts(gate_up, down, implementation):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    e, two_i, h = gate_up.shape
    cfg = Qwen2MoeConfig(hidden_size=h, moe_intermediate_size=two_i // 2, num_experts=e, hidden_act="silu")
    cfg._experts_implementation = implementation
    mod = Qwen2MoeExperts(copy.deepcopy(cfg)).to(gate_up.dtype)
    with torch.no_grad():
        mod.gate_up_proj.copy_(gate_up)
        mod.down_proj.copy_(down)
    return mod


def run_hf(implementation, tensors, idx, grad_out, dtype):
    hidden, weight, gate_up, down = (x.detach().clone().to(dtype) for x in tensors)
    mod = hf_experts(gate_up, down, implementation)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = mod(hidden, idx, weight)
    out.backward(grad_out.to(dtype))
    return [out.detach(), hidden.grad, weight.grad, mod.gate_up_proj.grad, mod.down_proj.grad]


HF_CASES = [c for c in CASES if c[0] in ("basic", "odd_shapes", "empty_expert", "k4", "one_token")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", HF_CASES, ids=[c[0] for c in HF_CASES])
@pytest.mark.parametrize("backend", ["reference", "torch", "cpu", "triton", "cuda_emu"])
def test_backend_matches_transformers_eager(backend, case, dtype):
    _skip_unavailable(backend)
    _, t, h, i, e, k, routing = case
    tensors, idx, grad_out = make_inputs(t, h, i, e, k, routing, torch.float32, seed=7)
    hf32 = run_hf("eager", tensors, idx, grad_out, torch.float32)
    hf_lp = run_hf("eager", tensors, idx, grad_out, dtype)
    got = run(backend, tensors, idx, grad_out, dtype)
    # transformers accumulates the k contributions in the low-precision output (index_add_), we in fp32
    check_against_fp32_oracle(got, hf_lp, hf32, dtype, factor=2.0)


def test_transformers_grouped_mm_agrees_with_reference():
    """The benchmark peer computes the same function (aligned shapes: grouped_mm needs them)."""
    tensors, idx, grad_out = make_inputs(24, 16, 8, 4, 2, "random", torch.float32, seed=3)
    hf = run_hf("grouped_mm", tensors, idx, grad_out, torch.float32)
    ref = run("reference", tensors, idx, grad_out)
    for name, a, b in zip(NAMES, hf, ref):
        assert_close(a, b, **tolerance(torch.float32, scale=3), name=name)


# ----------------------------------------------------------------------------- csrc pieces (emulator)

@pytest.mark.parametrize("t, k, e, routing", [
    (37, 2, 5, "random"), (300, 2, 4, "random"), (129, 3, 7, "skip_expert"), (1, 1, 1, "random"),
    (70, 4, 6, "random"), (90, 1, 4, "all_one"), (11000, 2, 3, "random"), (1500, 2, 300, "random"),
], ids=["small", "multi_block", "empty_expert", "one", "k4", "one_expert", "chunks_per_lane", "experts_past_block"])
def test_csrc_routing_matches_torch(t, k, e, routing):
    """Histogram / scan / stable permutation against torch's stable sort (bincount, argsort). The scan gives
    each expert kChunk // E threads ("lanes"), each over a range of the cdiv(S, 256) chunks: chunks_per_lane
    has 86 chunks on 85 lanes per expert (ranges of 2, trailing lanes empty); experts_past_block has E = 300 >
    256 threads (two rounds of experts, one lane each)."""
    _skip_unavailable("cuda_emu")
    from moon_fast.ops.moe_cuda import csrc_route
    from moon_fast.ops.moe_routing import route

    _, idx, _ = make_inputs(t, 8, 8, e, k, routing, torch.float32, seed=t)
    got, want = csrc_route(idx, e), route(idx, e)
    assert torch.equal(got.offsets, want.offsets), f"offsets {got.offsets} != {want.offsets}"
    assert torch.equal(got.counts(), torch.bincount(idx.reshape(-1), minlength=e))
    assert torch.equal(got.perm, torch.argsort(idx.reshape(-1), stable=True))
    assert torch.equal(got.perm, want.perm) and torch.equal(got.token, want.token)
    assert torch.equal(got.inv_perm, want.inv_perm)


@pytest.mark.parametrize("bad", [-1, 5, 2**40])
def test_csrc_routing_asserts_on_expert_ids_out_of_range(bad):
    """On a GPU moe_mlp leaves the range check to the routing (moe_routing.assert_all_routed): the kernels
    skip a bad id without writing through it, and the assert sees the slot missing."""
    _skip_unavailable("cuda_emu")
    from moon_fast.ops.moe_cuda import csrc_route

    idx = torch.tensor([[0, 1], [2, bad], [4, 3]])
    with pytest.raises(RuntimeError, match=r"expert_idx has values outside \[0, 5\)"):
        csrc_route(idx, 5)


def _kernels(name):
    """The csrc kernel set behind backend ``name``: csrc/moe.cu under the emulator, or csrc/cpu/."""
    from moon_fast.ops.moe_cuda import CPU_KERNELS, CSRC_KERNELS

    _skip_unavailable(name)
    return {"cuda_emu": CSRC_KERNELS, "cpu": CPU_KERNELS}[name]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernels", ["cuda_emu", "cpu"])
def test_csrc_permute_unpermute_match_torch(kernels, dtype):
    ops = _kernels(kernels)
    from moon_fast.ops.moe_routing import route

    t, k, e, h = 23, 3, 5, 37
    _, idx, _ = make_inputs(t, h, 8, e, k, "random", torch.float32, seed=1)
    r = route(idx, e)
    x = torch.randn(t, h).to(dtype)
    w = torch.rand(t, k).to(dtype)
    y = torch.randn(t * k, h).to(dtype)
    dout = torch.randn(t, h).to(dtype)
    assert torch.equal(ops.permute(x, r.token), x[r.token])
    scaled = ops.permute(x, r.token, w.reshape(-1), r.perm)
    assert_close(scaled, (x.float()[r.token] * w.reshape(-1).float()[r.perm, None]).to(dtype), **tolerance(dtype),
                 name="scaled permute")
    y_tok = y.float()[r.inv_perm].view(t, k, h)
    assert_close(ops.unpermute(y, r.inv_perm, w, k), (w.float()[:, :, None] * y_tok).sum(1).to(dtype),
                 **tolerance(dtype), name="weighted unpermute")
    assert_close(ops.unpermute(y, r.inv_perm, None, k), y_tok.sum(1).to(dtype), **tolerance(dtype), name="unpermute")
    assert_close(ops.unpermute_weight_grad(dout, y, r.inv_perm, k), (y_tok * dout.float()[:, None]).sum(-1).to(dtype),
                 **tolerance(dtype, scale=2), name="weight grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, inter", [(1, 1), (37, 13), (64, 40), (5, 300)], ids=["one", "odd", "vector", "long_row"])
@pytest.mark.parametrize("kernels", ["cuda_emu", "cpu"])
def test_swiglu_kernels_match_autograd(kernels, rows, inter, dtype):
    """SwiGLU and its backward (native on the cpu kernel set) against torch autograd in fp32, with gates
    far into both tails (the exp polynomial's clamps) and lengths that are not a multiple of the vector width."""
    ops = _kernels(kernels)
    gen = torch.Generator().manual_seed(rows * 1000 + inter)
    gu = (torch.randn(rows, 2 * inter, generator=gen) * 4).to(dtype)
    gu[0, 0] = -120.0  # exp(-gate) overflows fp32 without the clamp
    if inter > 1:
        gu[0, 1] = 95.0
    dh = torch.randn(rows, inter, generator=gen).to(dtype)
    gate = gu[:, :inter].float().requires_grad_()
    up = gu[:, inter:].float().requires_grad_()
    h32 = torch.nn.functional.silu(gate) * up
    h32.backward(dh.float())
    tol = tolerance(dtype, scale=2)
    assert_close(ops.swiglu(gu), h32.detach().to(dtype), **tol, name="h")
    dgu, h = ops.swiglu_backward(dh.clone(), gu)  # the native kernel writes h over its dh argument
    assert_close(h, h32.detach().to(dtype), **tol, name="recomputed h")
    assert_close(dgu[:, :inter], gate.grad.to(dtype), **tol, name="d gate")
    assert_close(dgu[:, inter:], up.grad.to(dtype), **tol, name="d up")


def test_cpu_kernels_independent_of_thread_count():
    """Each output row is written by one thread in a fixed order: 1 and 2 threads give identical bits."""
    _skip_unavailable("cpu")
    tensors, idx, grad_out = make_inputs(200, 64, 48, 6, 2, "random", torch.float32, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpu", tensors, idx, grad_out, torch.bfloat16)
        torch.set_num_threads(2)
        two = run("cpu", tensors, idx, grad_out, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, two):
        assert torch.equal(a, b), f"{name} depends on the thread count"


# Grouped GEMM cases: (rows per expert, K, N). "split" puts 600 rows on one expert, so the row tasks and the
# weight gradient's output-row tasks are cut into several chunks; odd sizes test bf16's pairs along K.
GEMM_CASES = {
    "odd": ([13, 0, 7, 21], 37, 19),
    "one_row": ([1], 5, 3),
    "split": ([0, 600, 3], 70, 33),
    "empty": ([0, 0], 8, 4),
}


def _grouped_operands(counts, k, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s, e = sum(counts), len(counts)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    a = torch.randn(s, k, generator=gen).to(dtype)
    # b as the op passes the forward weights: a transposed view of (E, N, K)
    b = torch.randn(e, n, k, generator=gen).to(dtype).transpose(1, 2)
    g = torch.randn(s, n, generator=gen).to(dtype)
    bounds = [0, *offsets.tolist()]
    return a, b, g, offsets, bounds


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_cpu_grouped_gemms_match_matmuls(case, dtype):
    """csrc/cpu/grouped_gemm_cpu.cpp against per-expert fp32 matmuls of the same inputs, on NaN-poisoned outputs."""
    _skip_unavailable("cpu")
    from moon_fast._ext import cpu_ops

    ops = cpu_ops()
    counts, k, n = GEMM_CASES[case]
    a, b, g, offsets, bounds = _grouped_operands(counts, k, n, dtype)
    out = poison_(torch.empty(a.shape[0], n, dtype=dtype))
    ops.moe_grouped_mm(a, b, offsets, out)
    want = torch.cat([a[lo:hi].float() @ b[e].float() for e, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])
    assert_close(out, want.to(dtype), **tolerance(dtype, scale=2), name="grouped mm")

    dw = poison_(torch.empty(len(counts), k, n, dtype=dtype))
    ops.moe_grouped_mm_wgrad(a, g, offsets, dw)
    want_w = torch.stack([a[lo:hi].float().t() @ g[lo:hi].float() for lo, hi in zip(bounds, bounds[1:])])
    assert_close(dw, want_w.to(dtype), **tolerance(dtype, scale=2), name="grouped weight grad")


def test_cpu_grouped_gemms_independent_of_thread_count():
    """The task cut depends on the thread count (about four tasks per thread); the results must not."""
    _skip_unavailable("cpu")
    from moon_fast._ext import cpu_ops

    ops = cpu_ops()
    a, b, g, offsets, _ = _grouped_operands(*GEMM_CASES["split"], torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            out, dw = torch.empty(a.shape[0], b.shape[2], dtype=a.dtype), torch.empty(3, a.shape[1], g.shape[1], dtype=a.dtype)
            ops.moe_grouped_mm(a, b, offsets, out)
            ops.moe_grouped_mm_wgrad(a, g, offsets, dw)
            results.append((out, dw))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_cpu_grouped_gemms_reject_bad_arguments():
    _skip_unavailable("cpu")
    from moon_fast._ext import cpu_ops

    ops = cpu_ops()
    a, b, g = torch.randn(6, 4), torch.randn(2, 4, 3), torch.randn(6, 3)
    out, dw = torch.empty(6, 3), torch.empty(2, 4, 3)
    with pytest.raises(RuntimeError, match="offsets must be a 1-D int32"):
        ops.moe_grouped_mm(a, b, torch.tensor([2, 6]), out)
    with pytest.raises(RuntimeError, match=r"offsets\[-1\] = 5 must equal the row count 6"):
        ops.moe_grouped_mm(a, b, torch.tensor([2, 5], dtype=torch.int32), out)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.moe_grouped_mm_wgrad(a, g, torch.tensor([4, 2], dtype=torch.int32), dw)
    with pytest.raises(RuntimeError, match=r"b \(E, K, N\)"):
        ops.moe_grouped_mm(a, torch.randn(2, 5, 3), torch.tensor([2, 6], dtype=torch.int32), out)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        ops.moe_grouped_mm_wgrad(a, g.double(), torch.tensor([2, 6], dtype=torch.int32), dw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_kernels_round_like_torch(dtype):
    """The fp16 (F16C) and bf16 (bit) conversions of the cpu kernels: fp32 arithmetic rounded once to the
    storage dtype, bit-identical to torch's rounding, at row lengths with and without a vector tail, with
    infinities, NaN and values that overflow the storage dtype."""
    _skip_unavailable("cpu")
    ops = _kernels("cpu")
    gen = torch.Generator().manual_seed(4)
    for h in (8, 21, 64):
        x = (torch.randn(6, h, generator=gen) * 3).to(dtype)
        x[0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")]).to(dtype)
        x[1, 0] = torch.finfo(dtype).max
        rows = torch.tensor([5, 0, 1, 3])
        scale = torch.tensor([0.3, 1.7, 2.0, -0.1]).to(dtype)
        got = ops.permute(x, rows, scale, torch.arange(4))
        want = (x.float()[rows] * scale.float()[:, None]).to(dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)) or (
            torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])
        ), f"h={h}: rounding differs from torch's"


def test_cpu_kernels_reject_bad_arguments():
    _skip_unavailable("cpu")
    from moon_fast._ext import cpu_ops

    ops = cpu_ops()
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"row_idx has values outside \[0, 4\)"):
        ops.moe_permute(x, torch.tensor([0, 4]), None, None, torch.empty(2, 8))
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.moe_swiglu(torch.randn(8, 4).t(), torch.empty(4, 4))
    with pytest.raises(RuntimeError, match=r"gu must be \(S, 2I\)"):
        ops.moe_swiglu(torch.randn(4, 6), torch.empty(4, 4))
    with pytest.raises(RuntimeError, match="out is BFloat16, expected Float"):
        ops.moe_unpermute(x, torch.arange(4), None, 1, torch.empty(4, 8, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- properties

@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda_emu"])
def test_deterministic(backend):
    _skip_unavailable(backend)
    tensors, idx, grad_out = make_inputs(33, 16, 12, 4, 2, "random", torch.float32, seed=5)
    a = run(backend, tensors, idx, grad_out)
    b = run(backend, tensors, idx, grad_out)
    for name, x, y in zip(NAMES, a, b):
        assert torch.equal(x, y), f"{name} differs between two identical calls"


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda_emu"])
def test_frozen_weights_and_int32_indices(backend):
    """Only the gradients asked for are computed; int32 ids and fp32 routing weights on bf16 work."""
    _skip_unavailable(backend)
    tensors, idx, grad_out = make_inputs(19, 16, 8, 3, 2, "random", torch.float32, seed=11)
    hidden = tensors[0].to(torch.bfloat16).requires_grad_()
    weight = tensors[1].requires_grad_()  # fp32 routing weights with bf16 activations
    gate_up, down = (x.to(torch.bfloat16) for x in tensors[2:])
    out = moe_mlp(hidden, idx.int(), weight, gate_up, down, backend=backend)
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.to(torch.bfloat16))
    ref = moe_mlp(hidden.detach().float(), idx, weight.detach(), gate_up.float(), down.float(), backend="reference")
    assert (out.float() - ref).abs().max() < 0.05
    assert hidden.grad is not None and weight.grad is not None and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton", "cuda_emu"])
@pytest.mark.parametrize("wanted", [("hidden",), ("weight",), ("hidden", "weight"), ("gate_up", "down"),
                                    ("down",), ("hidden", "gate_up")], ids="+".join)
def test_gradients_of_a_subset_match_reference(backend, wanted):
    """When only some inputs need gradients (frozen experts, a frozen router), the backward skips the
    others' products: the gradients it does compute must still be the reference's (the scale and SwiGLU
    terms they share with the skipped ones are easy to drop with them)."""
    _skip_unavailable(backend)
    tensors, idx, grad_out = make_inputs(23, 16, 12, 4, 2, "skip_expert", torch.float32, seed=13)
    ref = run("reference", tensors, idx, grad_out)
    names = ("hidden", "weight", "gate_up", "down")
    leaves = [x.detach().clone().requires_grad_(n in wanted) for n, x in zip(names, tensors)]
    out = moe_mlp(*leaves[:1], idx, *leaves[1:], backend=backend)
    out.backward(grad_out)
    assert_close(out, ref[0], **tolerance(torch.float32, scale=3), name="out")
    for n, leaf, r in zip(names, leaves, ref[1:]):
        if n in wanted:
            assert_close(leaf.grad, r, **tolerance(torch.float32, scale=3), name=f"d_{n}")
        else:
            assert leaf.grad is None


def test_grouped_mm_and_loop_paths_agree(monkeypatch):
    """moe_gemm's two paths (torch grouped_mm with device offsets; per-expert loop) give one result,
    including an expert with no rows (its weight gradient must be exactly zero)."""
    from moon_fast.ops import moe_gemm
    from moon_fast.ops.moe_routing import route

    idx = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 2]])
    r = route(idx, 3)
    a, b, g = torch.randn(8, 16), torch.randn(3, 16, 8), torch.randn(8, 8)
    assert moe_gemm._use_grouped_mm(a, b) and moe_gemm.grouped_mm_function() is not None
    fast = moe_gemm.gmm(a, b, r), moe_gemm.gmm_wgrad(a, g, r)
    monkeypatch.setattr(moe_gemm, "_use_grouped_mm", lambda *t: False)
    slow = moe_gemm.gmm(a, b, r), moe_gemm.gmm_wgrad(a, g, r)
    for x, y in zip(fast, slow):
        assert_close(x, y, **tolerance(torch.float32), name="gmm")
    assert torch.equal(slow[1][1], torch.zeros(16, 8))
    ends = [0, *r.offsets.tolist()]
    want = torch.cat([a[ends[e]:ends[e + 1]] @ b[e] for e in range(3)])
    assert_close(slow[0], want, **tolerance(torch.float32), name="gmm vs loop")


# (name, T, H, I, E, k): widths multiples of 16 (the aligned table), not (its own, _UNALIGNED_TILES), and
# I % 16 == 8, where only the launches that see 2I rather than I (dx, wgrad_gate_up) compile aligned
GPU_TILE_CASES = [("aligned", 29, 32, 16, 3, 2), ("unaligned", 29, 40, 24, 3, 2), ("half_aligned", 29, 32, 24, 3, 2)]
ALIGNED_LAUNCHES = {"aligned": "all", "unaligned": (), "half_aligned": ("dx", "wgrad_gate_up")}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_TILE_CASES, ids=[c[0] for c in GPU_TILE_CASES])
def test_triton_gpu_tiles_run_under_the_interpreter(case, dtype, monkeypatch):
    """The tiles a GPU launch takes (kernels/moe.py tile_sizes off the interpreter: 128-row tiles, BK 16 to
    64), run by the interpreter: every launch with tiles larger than the problem, so the masks at those tile
    sizes are what is checked. And each launch takes the unaligned table exactly when a width its kernel
    sees is not a multiple of 16."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    gpu_tile_sizes, plan_tiles, picked = moe_triton.tile_sizes, moe_triton.plan_tiles, []

    def gpu_table(dtype, aligned=True, hopper=True):
        with monkeypatch.context() as m:
            m.setattr(moe_triton, "interpreting", lambda: False)
            return gpu_tile_sizes(dtype, aligned, hopper)

    def recorded(*args, **kwargs):
        picked.append(plan_tiles(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(moe_triton, "tile_sizes", gpu_table)
    monkeypatch.setattr(moe_triton, "plan_tiles", recorded)
    name, t, h, i, e, k = case
    tensors, idx, grad_out = make_inputs(t, h, i, e, k, "random", torch.float32, seed=7)
    ref32 = run("reference", tensors, idx, grad_out)
    ref_lp = run("reference", tensors, idx, grad_out, dtype)
    got = run("triton", tensors, idx, grad_out, dtype)
    aligned_launches = moe_triton.LAUNCHES if ALIGNED_LAUNCHES[name] == "all" else ALIGNED_LAUNCHES[name]
    want = {launch: gpu_table(dtype, launch in aligned_launches)[launch] for launch in moe_triton.LAUNCHES}
    assert picked == [want], picked
    check_against_fp32_oracle(got, ref_lp, ref32, dtype)


def test_triton_tiles_per_launch_and_their_override(monkeypatch):
    """GPU tiles: one entry per launch; $MOON_FAST_MOE_TILES replaces the launches it names, and bad JSON
    fails with the variable's expected form."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    monkeypatch.setattr(moe_triton, "interpreting", lambda: False)  # the GPU table, without a GPU
    monkeypatch.delenv(moe_triton.TILES_ENV, raising=False)
    base = moe_triton.tile_sizes(torch.bfloat16)
    assert set(base) == set(moe_triton.LAUNCHES)
    monkeypatch.setenv(moe_triton.TILES_ENV, '{"dx": [64, 32, 16, 4, 2]}')
    tiles = moe_triton.tile_sizes(torch.bfloat16)
    assert tiles["dx"] == {"BM": 64, "BN": 32, "BK": 16, "num_warps": 4, "num_stages": 2}
    assert {k: v for k, v in tiles.items() if k != "dx"} == {k: v for k, v in base.items() if k != "dx"}
    # keyed by dtype (what benchmarks/moe_triton_tiles.py writes): the other dtypes keep their tiles; 16-bit
    # tiles applied to fp32 overflowed its shared memory on the H100 (tests_moe_best_tiles_override_28faba1.txt)
    monkeypatch.setenv(moe_triton.TILES_ENV, '{"bf16": {"dx": [64, 32, 16, 4, 2]}}')
    assert moe_triton.tile_sizes(torch.bfloat16) == tiles
    monkeypatch.delenv(moe_triton.TILES_ENV)
    fp32 = moe_triton.tile_sizes(torch.float32)
    monkeypatch.setenv(moe_triton.TILES_ENV, '{"bf16": {"dx": [64, 32, 16, 4, 2]}}')
    assert moe_triton.tile_sizes(torch.float32) == fp32
    for bad in ('{"dx": [64, 32]}', '{"dxx": [64, 32, 16, 4, 2]}', '{"bf16": [1, 2]}', '[1]'):
        monkeypatch.setenv(moe_triton.TILES_ENV, bad)
        with pytest.raises(ValueError, match="MOON_FAST_MOE_TILES must be JSON"):
            moe_triton.tile_sizes(torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_tiles_before_hopper(dtype, monkeypatch):
    """Before Hopper, 16-bit launches named in _PRE_HOPPER_TILES take those tiles (the Hopper ones spill on
    sm_80: tests/test_moe_triton_compile.py); every other launch, and fp32, keep the Hopper table; the
    unaligned table still wins where a width is not a multiple of 16."""
    pytest.importorskip("triton")
    import moon_fast.kernels.moe as moe_triton

    monkeypatch.setattr(moe_triton, "interpreting", lambda: False)
    monkeypatch.delenv(moe_triton.TILES_ENV, raising=False)
    hopper = moe_triton.plan_tiles(dtype, 1024, 1024, hopper=True)
    older = moe_triton.plan_tiles(dtype, 1024, 1024, hopper=False)
    changed = {name for name in moe_triton.LAUNCHES if older[name] != hopper[name]}
    if dtype == torch.float32:
        assert not changed
    else:
        assert changed == set(moe_triton._PRE_HOPPER_TILES)
        for name, tiles in moe_triton._PRE_HOPPER_TILES.items():
            assert older[name] == dict(zip(("BM", "BN", "BK", "num_warps", "num_stages"), tiles))
    # down_fwd sees H = 96 and I = 72: the unaligned table's tiles, Hopper or not
    unaligned = moe_triton.plan_tiles(dtype, 96, 72, hopper=False)
    assert unaligned["down_fwd"] == moe_triton.plan_tiles(dtype, 96, 72, hopper=True)["down_fwd"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_forward_weights_layout(dtype):
    """fp32: N-contiguous copies with the same logical values (the exact fp32 dot is slow on K-contiguous
    operands); 16-bit: the stored tensors, no copy."""
    pytest.importorskip("triton")
    from moon_fast.kernels.moe import _forward_weights

    gate_up, down = torch.randn(3, 10, 6).to(dtype), torch.randn(3, 6, 5).to(dtype)
    w_up, w_down = _forward_weights(gate_up, down)
    assert torch.equal(w_up, gate_up) and torch.equal(w_down, down.transpose(1, 2))
    if dtype == torch.float32:
        assert w_up.stride(1) == 1 and w_down.stride(2) == 1  # N (output column) contiguous
    else:
        assert w_up.data_ptr() == gate_up.data_ptr() and w_down.data_ptr() == down.data_ptr()


def test_auto_backend_on_a_gpu_depends_on_dtype(monkeypatch):
    """On CUDA tensors auto takes `cuda` first in bf16 and `triton` first otherwise (the order measured on an
    H100); moe_mlp passes that order to the registry, which follows it."""
    from types import SimpleNamespace

    import moon_fast.ops.moe as moe_op

    gpu = torch.device("cuda")
    assert moe_op._auto_order(SimpleNamespace(device=gpu, dtype=torch.bfloat16))[0] == "cuda"
    for dtype in (torch.float16, torch.float32):
        assert moe_op._auto_order(SimpleNamespace(device=gpu, dtype=dtype)) is None
    assert BACKENDS.auto_order["cuda"][0] == "triton"
    assert moe_op._auto_order(torch.zeros(1, dtype=torch.bfloat16)) is None  # CPU: the CPU order
    monkeypatch.delenv("MOON_FAST_MOE_MLP_BACKEND", raising=False)
    assert BACKENDS.resolve("auto", "cpu", order=("torch", "cpu")).name == "torch"
    monkeypatch.setattr(moe_op, "_auto_order", lambda hidden: ("reference",))
    ran = []
    monkeypatch.setattr(BACKENDS.backends["reference"], "fn", lambda *a: ran.append(1) or a[0])
    tensors, idx, _ = make_inputs(5, 8, 4, 3, 2, "random", torch.float32)
    moe_mlp(tensors[0], idx, *tensors[1:])
    assert ran, "moe_mlp did not follow _auto_order's preference"


def test_auto_backend_on_cpu_is_cpu_then_torch(monkeypatch):
    """auto takes the native CPU kernels, and plain torch where moon_fast._C_cpu is not built."""
    from moon_fast import _ext

    monkeypatch.delenv("MOON_FAST_MOE_MLP_BACKEND", raising=False)
    assert BACKENDS.resolve("auto", "cpu").name == "cpu"
    monkeypatch.setattr(_ext, "cpu_ext_error", lambda: "moon_fast._C_cpu is not built")
    assert BACKENDS.resolve("auto", "cpu").name == "torch"


def test_empty_batch():
    """No tokens (a rank can get none): an empty output, and zero gradients for the weights, not None (DDP
    expects a gradient for every parameter on every rank)."""
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.zeros(0, 2, requires_grad=True)
    gate_up, down = torch.randn(3, 8, 8, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)
    out = moe_mlp(hidden, torch.zeros(0, 2, dtype=torch.long), weight, gate_up, down, backend="torch")
    assert out.shape == (0, 8)
    out.sum().backward()
    assert hidden.grad.shape == (0, 8) and weight.grad.shape == (0, 2)
    assert torch.equal(gate_up.grad, torch.zeros_like(gate_up)) and torch.equal(down.grad, torch.zeros_like(down))


# ----------------------------------------------------------------------------- bad input

def _good():
    return (torch.randn(5, 8), torch.randint(0, 3, (5, 2)), torch.rand(5, 2), torch.randn(3, 12, 8),
            torch.randn(3, 8, 6))


@pytest.mark.parametrize("mutate, match", [
    (lambda a: (a[0], torch.full_like(a[1], 3), *a[2:]), r"expert_idx contains 3, outside \[0, 3\)"),
    (lambda a: (a[0], torch.full_like(a[1], -1), *a[2:]), r"expert_idx contains -1"),
    (lambda a: (a[0], a[1][:, :0], a[2][:, :0], *a[3:]), r"k = 0"),
    (lambda a: (a[0], a[1].float(), *a[2:]), r"expert_idx must be an integer"),
    (lambda a: (a[0], a[1], a[2][:, :1], *a[3:]), r"expert_weight must have the shape"),
    (lambda a: (a[0][None], *a[1:]), r"hidden must be 2-D"),
    (lambda a: (a[0], *a[1:3], a[3][:, :11], a[4]), r"gate_up_proj must be \(E, 2I, H\)"),
    (lambda a: (*a[:4], a[4][:, :, :5]), r"down_proj must be \(E, H, I\)"),
    (lambda a: (a[0], *a[1:3], a[3].half(), a[4]), r"gate_up_proj is torch.float16 but hidden is torch.float32"),
    (lambda a: (a[0][:4], *a[1:]), r"expert_idx must be \(T, k\)"),
    (lambda a: (a[0].tolist(), *a[1:]), r"hidden must be a torch.Tensor, got list"),
    (lambda a: (a[0], a[1], a[2].double(), *a[3:]), r"expert_weight must be float32, float16 or bfloat16 \(it is cast"),
])
def test_bad_input_errors(mutate, match):
    args = mutate(_good())
    with pytest.raises((ValueError, TypeError), match=match):
        moe_mlp(*args, backend="torch")


@pytest.mark.parametrize("bad", [-1, 3, 2**40])
@pytest.mark.parametrize("backend", ["torch", "grouped_mm", "triton", "cuda_emu"])
def test_routing_checks_the_expert_range_itself(backend, bad, monkeypatch):
    """On a GPU moe_mlp skips its own range check for the backends in _ROUTING_CHECKS_RANGE and relies on
    their routing's device-side assert (cuda_emu stands in for cuda: the same csrc routing). Here, with
    moe_mlp's check switched off, each routing must still refuse an id below 0 or at E and above."""
    import moon_fast.ops.moe as moe_op

    if backend == "triton":
        pytest.importorskip("triton")
    _skip_unavailable(backend)
    assert backend.replace("cuda_emu", "cuda") in moe_op._ROUTING_CHECKS_RANGE
    monkeypatch.setattr(moe_op, "_check_expert_range", lambda *args: None)
    hidden, idx, weight, gate_up, down = _good()
    moe_mlp(hidden, idx, weight, gate_up, down, backend=backend)  # good ids pass
    idx[3, 1] = bad
    with pytest.raises(RuntimeError, match=r"expert_idx has values outside \[0, 3\)"):
        moe_mlp(hidden, idx, weight, gate_up, down, backend=backend)


def test_unknown_backend_error():
    from moon_fast.backends import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="unknown backend"):
        moe_mlp(*_good(), backend="nope")


# ----------------------------------------------------------------------------- benchmark module

def test_bench_cases_and_builders_run_tiny():
    """moon_fast/bench/moe.py: cases are well formed; each CPU builder runs forward + backward, and our
    backends and transformers' give the same output on the benchmark's problem."""
    from moon_fast.bench import moe as bench

    for quick in (True, False):
        cases = bench.cases(quick)
        assert cases and all(c.op == "moe" and c.builder == bench.BUILDER for c in cases)
    outs = {}
    for backend in ("reference", "torch", "cpu", "grouped_mm", "hf_eager", "hf_grouped_mm", "dense_gemm", "dense_gemm_rowmajor",
                    "grouped_gemm_floor", "cpu_gemm_floor"):
        work = bench.build(backend=backend, dtype=torch.float32, device=torch.device("cpu"), T=24, H=16, I=8, E=4, k=2)
        out = work.forward()
        work.backward(out)
        assert work.flops_fwd == 6 * 24 * 2 * 16 * 8 and work.flops_bwd == 2 * work.flops_fwd
        outs[backend] = out.detach()
    for backend in ("torch", "cpu", "grouped_mm", "hf_eager", "hf_grouped_mm"):
        assert_close(outs[backend], outs["reference"], **tolerance(torch.float32, scale=3), name=backend)
    from moon_fast.backends import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="takes CPU tensors"):  # a GPU run reports it unavailable
        bench.build(backend="cpu_gemm_floor", dtype=torch.float32, device=torch.device("meta"), T=4, H=8, I=8, E=2, k=1)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("backend", ["torch", "cpu", "cuda_emu"])
def test_forward_under_inference_mode_and_no_grad(backend, mode):
    """Evaluation runs the model under torch.inference_mode: the kernels' outputs are then inference tensors,
    which worker threads (no inherited thread-local state) must still be able to write."""
    _skip_unavailable(backend)
    tensors, idx, _ = make_inputs(300, 24, 20, 4, 2, "random", torch.float32, seed=9)
    want = moe_mlp(*tensors[:1], idx, *tensors[1:], backend="reference")
    with getattr(torch, mode)():
        got = moe_mlp(*tensors[:1], idx, *tensors[1:], backend=backend)
    assert_close(got, want, **tolerance(torch.float32, scale=3), name=f"{backend} under {mode}")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_inside_autocast_runs_in_autocast_dtype_with_grads(backend):
    """fp32 inputs and weights inside torch.autocast(bf16): the op runs in bf16 like a matmul, and
    gradients flow back to the fp32 leaves (the model trains this way)."""
    T, H, inter, E, k = 9, 12, 10, 3, 2
    hidden = torch.randn(T, H, requires_grad=True)
    idx = torch.randint(0, E, (T, k))
    w = torch.rand(T, k, requires_grad=True)
    gate_up = (torch.randn(E, 2 * inter, H) * 0.2).requires_grad_()
    down = (torch.randn(E, H, inter) * 0.2).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe_mlp(hidden, idx, w, gate_up, down, backend=backend)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    expected = moe_mlp(hidden.detach().bfloat16(), idx, w.detach().bfloat16(), gate_up.detach().bfloat16(),
                       down.detach().bfloat16(), backend="reference")
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    for leaf in (hidden, w, gate_up, down):
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()
