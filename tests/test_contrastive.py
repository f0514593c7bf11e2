"""contrastive_loss / multi_contrastive_loss: every backend against `reference`, forward and backward.

Tolerances: fp32 results must match the fp32 reference to 2e-4 relative to the largest entry of each
compared tensor (summation order only). fp16/bf16 (FlashAttention's criterion): the backend's error
against the fp32 reference on the same (rounded) inputs must be at most 2x the error of the
reference run in that dtype, plus 1e-3 of the largest entry.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from moon_fast.backends import BackendUnavailable
from moon_fast.ops import contrastive_loss, multi_contrastive_loss
from moon_fast.ops.contrastive import BACKENDS

FAST_BACKENDS = ["torch", "triton", "cuda_emu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _skip_unavailable(backend: str, device: torch.device) -> None:
    """Skips only for a missing GPU; any other unavailable backend (e.g. a broken cuda_emu build or a
    missing triton) fails the test."""
    reason = BACKENDS.why_unavailable(backend, device)
    if reason and backend == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU: {reason}")
    assert reason is None, f"backend {backend} should run here: {reason}"


def make_inputs(n, m, d, *, scale=20.0, dtype=torch.float32, device="cpu", gen=None, normalise=True):
    q = torch.randn(n, d, generator=gen)
    k = torch.randn(m, d, generator=gen)
    if normalise:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    return q.to(device, dtype), k.to(device, dtype), torch.tensor(float(scale), device=device)


def run(backend, q, k, s, *, upstream=None, **kw):
    """Loss and gradients (query, key, logit_scale) of sum(loss * upstream)."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    loss = contrastive_loss(q, k, s, backend=backend, **kw)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.device)
    (loss * up).sum().backward()
    return loss.detach(), q.grad, k.grad, s.grad


def check(actual, expected, *, tol=2e-4, floor=1e-5, names=("loss", "dquery", "dkey", "dscale")):
    """Max abs error <= tol * max|expected| + floor (floor: float32 rounding of logits of size ~100)."""
    for a, e, name in zip(actual, expected, names):
        assert a is not None and e is not None, f"{name}: missing"
        a, e = a.detach().float().cpu(), e.detach().float().cpu()
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        bound = tol * max(e.abs().max().item(), 1e-6)
        err = (a - e).abs().max().item()
        assert err <= bound + floor, f"{name}: max abs error {err:.3g} > {bound + floor:.3g}"


def check_low_precision(actual, ref_lp, ref32, *, factor=2.0, floor=1e-3,
                        names=("loss", "dquery", "dkey", "dscale")):
    for a, r, e, name in zip(actual, ref_lp, ref32, names):
        a, r, e = (t.detach().float().cpu() for t in (a, r, e))
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a - e).abs().max().item()
        allowed = factor * (r - e).abs().max().item() + floor * max(e.abs().max().item(), 1e-6)
        assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} (2x reference's own error)"


def options(case: str, n: int, m: int, gen: torch.Generator) -> dict:
    """Named option sets, fresh random targets/groups/weights per case."""
    tg = torch.randint(0, m, (n,), generator=gen)
    qg = torch.randint(0, 4, (n,), generator=gen)
    kg = torch.randint(0, 4, (m,), generator=gen)
    w = torch.rand(n, generator=gen)
    w[::3] = 0.0  # filtered-out samples (DSF)
    perm = torch.randperm(m, generator=gen)[:n]
    return {
        "plain": {},
        "targets": {"target": tg},
        "groups": {"query_group": qg, "key_group": kg},
        "weights": {"weight": w},
        "sym": {"symmetric": True},
        "sym_perm_groups": {"symmetric": True, "target": perm, "query_group": qg, "key_group": kg},
        "all": {"symmetric": True, "target": tg, "query_group": qg, "key_group": kg, "weight": w},
        "all_rows": {"target": tg, "query_group": qg, "key_group": kg, "weight": w},
        # one group (a batch from one category): a column that is nobody's positive is excluded by every row,
        # so its column log-sum-exp is over nothing (-inf) and must contribute no gradient
        "sym_all_excluded": {"symmetric": True, "target": (torch.arange(n) * 2).clamp(max=m - 1),
                             "query_group": torch.zeros(n, dtype=torch.long), "key_group": torch.zeros(m, dtype=torch.long)},
    }[case]


CASES = ["plain", "targets", "groups", "weights", "sym", "sym_perm_groups", "all", "all_rows"]


def _upstream(reduction, n, gen):
    if reduction == "none":
        return torch.randn(n, generator=gen)  # arbitrary per-query upstream gradient (Liger's bug)
    return torch.tensor(0.5 + torch.rand((), generator=gen).item())


# ----------------------------------------------------------------------------- torch (full grid)

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n,m,d,chunk", [(1, 1, 8, None), (1, 9, 8, 1), (37, 37, 24, 5), (23, 61, 17, 7)])
def test_torch_matches_reference(case, reduction, n, m, d, chunk):
    gen = _gen("torch", case, reduction, n, m, d)
    scale = float(torch.empty(()).uniform_(1, 100, generator=gen))
    q, k, s = make_inputs(n, m, d, scale=scale, gen=gen)
    kw = dict(options(case, n, m, gen), reduction=reduction)
    up = _upstream(reduction, n, gen)
    expected = run("reference", q, k, s, upstream=up, **kw)
    check(run("torch", q, k, s, upstream=up, chunk_size=chunk, **kw), expected, floor=2e-6 * max(10.0, scale))


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("chunk", [3, 64])
def test_torch_logit_scale_range_and_chunks(scale, chunk):
    gen = _gen("scale", scale, chunk)
    q, k, s = make_inputs(50, 71, 33, scale=scale, gen=gen)
    kw = options("all", 50, 71, gen)
    check(run("torch", q, k, s, chunk_size=chunk, **kw), run("reference", q, k, s, **kw),
          floor=2e-6 * max(10.0, scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "all", "all_rows"])
def test_torch_low_precision(dtype, case):
    gen = _gen("lp", dtype, case)
    q, k, s = make_inputs(45, 67, 40, scale=30.0, dtype=dtype, gen=gen)
    kw = options(case, 45, 67, gen)
    ref32 = run("reference", q.float(), k.float(), s, **kw)
    ref_lp = run("reference", q, k, s, **kw)
    check_low_precision(run("torch", q, k, s, chunk_size=16, **kw), ref_lp, ref32)


def test_gradient_paths_partial_requires_grad():
    """The fused forward (grads computed in forward) and the recompute path agree with the reference
    when only some inputs need a gradient, and under no_grad nothing is stored."""
    gen = _gen("partial")
    q, k, s = make_inputs(19, 29, 12, gen=gen)
    for which in ("query", "key", "scale"):
        for backend in ("reference", "torch"):
            qq, kk, ss = q.clone(), k.clone(), s.clone()
            t = {"query": qq, "key": kk, "scale": ss}[which].requires_grad_()
            contrastive_loss(qq, kk, ss, backend=backend, chunk_size=4).backward()
            if backend == "reference":
                ref = t.grad
            else:
                torch.testing.assert_close(t.grad, ref, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        a = contrastive_loss(q, k, s, backend="torch", symmetric=True)
    torch.testing.assert_close(a, contrastive_loss(q, k, s, backend="reference", symmetric=True))


def test_large_logit_range_fallback():
    """Logits spanning far more than float32's exp range (a key opposite to every query at scale 100,
    unnormalised inputs): the column log-sum-exp must stay exact."""
    gen = _gen("range")
    q, k, _ = make_inputs(24, 24, 8, gen=gen)
    k[5] = -q.sum(0) * 3  # far below every other logit in its column
    q[7] *= 4  # one row far above the others
    s = torch.tensor(100.0)
    from moon_fast.ops import contrastive_torch

    before = dict(contrastive_torch.FALLBACKS)
    for kw in ({"symmetric": True}, {"symmetric": True, "reduction": "none"}, {}):
        up = _upstream(kw.get("reduction", "mean"), 24, gen)
        check(run("torch", q, k, s, upstream=up, chunk_size=5, **kw), run("reference", q, k, s, upstream=up, **kw),
              floor=1e-4)
    # every exact fallback of the fast float32 path ran (row chunks, columns, gradient chunks)
    assert all(contrastive_torch.FALLBACKS[key] > before[key] for key in before), contrastive_torch.FALLBACKS


def test_matches_open_clip():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    gen = _gen("clip")
    q, k, s = make_inputs(33, 33, 16, scale=14.3, gen=gen)
    qq, kk, ss = (t.clone().requires_grad_() for t in (q, k, s))
    open_clip_loss.ClipLoss()(qq, kk, ss).backward()
    expected = (None, qq.grad, kk.grad, ss.grad)
    for backend in ("reference", "torch"):
        got = run(backend, q, k, s, symmetric=True, chunk_size=7)
        check(got[1:], expected[1:], names=("dquery", "dkey", "dscale"))
    ref_loss = open_clip_loss.ClipLoss()(q, k, s)
    torch.testing.assert_close(contrastive_loss(q, k, s, symmetric=True), ref_loss, atol=1e-5, rtol=1e-5)


def test_zero_weights_mean_is_zero():
    q, k, s = make_inputs(6, 6, 4, gen=_gen("zero"))
    for backend in ("reference", "torch"):
        loss, dq, dk, ds = run(backend, q, k, s, weight=torch.zeros(6))
        assert loss.item() == 0.0 and dq.abs().max() == 0 and dk.abs().max() == 0 and ds.abs() == 0


def test_groups_exclude_false_negatives_by_hand():
    """Independent check of the exclusion rule on a tiny case computed with explicit sums."""
    q, k, s = make_inputs(3, 4, 5, scale=5.0, gen=_gen("hand"))
    qg, kg = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1, 2])
    target = torch.tensor([1, 2, 3])
    logits = (q @ k.T) * 5.0
    expected = []
    for i in range(3):
        keep = [j for j in range(4) if not (kg[j] == qg[i] and j != target[i])]
        expected.append(torch.logsumexp(logits[i, keep], 0) - logits[i, target[i]])
    for backend in ("reference", "torch"):
        got = contrastive_loss(q, k, s, target=target, query_group=qg, key_group=kg, reduction="none",
                               backend=backend)
        torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- every fast backend

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case,reduction,n,m,d,scale", [
    ("plain", "mean", 1, 1, 8, 1.0),
    ("all_rows", "mean", 23, 41, 19, 100.0),
    ("all", "none", 17, 30, 9, 30.0),
    ("sym", "sum", 21, 21, 16, 14.3),
    ("targets", "none", 1, 7, 5, 50.0),
    ("all", "mean", 50, 70, 40, 100.0),
    ("sym_all_excluded", "none", 4, 8, 16, 30.0),
    ("sym_all_excluded", "mean", 23, 61, 17, 100.0),
])
def test_backend_matches_reference_fp32(backend, case, reduction, n, m, d, scale, device):
    _skip_unavailable(backend, device)
    gen = _gen(backend, case, reduction, n, m, d)
    q, k, s = make_inputs(n, m, d, scale=scale, gen=gen, device=device)
    kw = {key: v.to(device) for key, v in options(case, n, m, gen).items() if isinstance(v, torch.Tensor)}
    kw.update({key: v for key, v in options(case, n, m, _gen(backend, case, reduction, n, m, d, "o")).items()
               if not isinstance(v, torch.Tensor)})
    kw["reduction"] = reduction
    up = _upstream(reduction, n, gen)
    check(run(backend, q, k, s, upstream=up, chunk_size=6, **kw), run("reference", q, k, s, upstream=up, **kw),
          floor=2e-6 * max(10.0, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["all", "sym_perm_groups"])
def test_triton_with_the_gpu_blocks(case, dtype, monkeypatch, device):
    """On a GPU the kernels take other blocks than under the interpreter (kernels/contrastive.py _gpu_config):
    row and column blocks of different sizes (transposed in the column kernels), a backward stepping fewer
    columns than the forward, and K loops over D in chunks of 64 (forward) and 32 (backward), the last one
    partial here (D = 100). The same kernels with those blocks, under the interpreter, against the
    reference."""
    import moon_fast.kernels.contrastive as kernels

    _skip_unavailable("triton", device)
    monkeypatch.setattr(kernels, "_config", kernels._gpu_config)
    cfg = kernels._gpu_config(100, dtype)
    assert cfg["bwd"]["BC"] < cfg["fwd"]["BC"] and (dtype == torch.float32 or cfg["fwd"]["BR"] != cfg["fwd"]["BC"])
    assert (cfg["fwd"]["BD"], cfg["bwd"]["BD"], cfg["DP"]) == (64, 32, 128)
    gen = _gen("gpu_blocks", case, dtype)
    n, m, d = 45, 71, 100
    q, k, s = make_inputs(n, m, d, scale=30.0, dtype=dtype, gen=gen, device=device)
    kw = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in options(case, n, m, gen).items()}
    up = _upstream("none", n, gen)
    got = run("triton", q, k, s, upstream=up, reduction="none", **kw)
    if dtype == torch.float32:
        check(got, run("reference", q, k, s, upstream=up, reduction="none", **kw), floor=6e-5)
    else:
        ref_lp = run("reference", q, k, s, upstream=up, reduction="none", **kw)
        check_low_precision(got, ref_lp, run("reference", q.float(), k.float(), s, upstream=up, reduction="none",
                                             **kw))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_low_precision(backend, dtype, device):
    _skip_unavailable(backend, device)
    gen = _gen(backend, dtype)
    q, k, s = make_inputs(29, 45, 24, scale=30.0, dtype=dtype, gen=gen, device=device)
    kw = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in options("all", 29, 45, gen).items()}
    ref32 = run("reference", q.float(), k.float(), s, **kw)
    ref_lp = run("reference", q, k, s, **kw)
    check_low_precision(run(backend, q, k, s, chunk_size=8, **kw), ref_lp, ref32)


# ----------------------------------------------------------------------------- multi-objective

def _multi_inputs(gen, sizes=(9, 14, 5), m=23, d=11):
    qs = [torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1) for n in sizes]
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=1)
    targets = [torch.randint(0, m, (n,), generator=gen) for n in sizes]
    kg = torch.randint(0, 3, (m,), generator=gen)
    groups = [torch.randint(0, 3, (sizes[0],), generator=gen), None, torch.randint(0, 3, (sizes[2],), generator=gen)]
    weights = [torch.rand(n, generator=gen) for n in sizes]
    return qs, k, targets, kg, groups, weights


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda_emu", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multi_matches_separate_losses(backend, reduction, device):
    _skip_unavailable(backend, device)
    gen = _gen("multi", backend, reduction)
    qs, k, targets, kg, groups, weights = _multi_inputs(gen)
    qs, targets, weights = ([x.to(device) for x in xs] for xs in (qs, targets, weights))
    groups = [g.to(device) if g is not None else None for g in groups]
    k, kg, s = k.to(device), kg.to(device), torch.tensor(17.0, device=device)
    up = torch.randn(3 if reduction != "none" else sum(q.shape[0] for q in qs), generator=gen).to(device)

    def grads(fn):
        qq = [q.clone().requires_grad_() for q in qs]
        kk, ss = k.clone().requires_grad_(), s.clone().requires_grad_()
        out = fn(qq, kk, ss)
        (out * up).sum().backward()
        return [out.detach()] + [q.grad for q in qq] + [kk.grad, ss.grad]

    def separate(qq, kk, ss):
        outs = [contrastive_loss(q, kk, ss, target=t, query_group=g, key_group=kg if g is not None else None,
                                 weight=w, reduction=reduction, backend="reference")
                for q, t, g, w in zip(qq, targets, groups, weights)]
        return torch.cat(outs) if reduction == "none" else torch.stack(outs)

    def fused(qq, kk, ss):
        return multi_contrastive_loss(qq, kk, ss, targets=targets, query_groups=groups, key_group=kg,
                                      weights=weights, reduction=reduction, backend=backend, chunk_size=4)

    expected, got = grads(separate), grads(fused)
    names = ["loss", "dq0", "dq1", "dq2", "dkey", "dscale"]
    check(got, expected, names=names)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(query=torch.randn(4, 7)), "query has embedding dimension 7"),
    (lambda a: a.update(query=torch.randn(9, 8)), "query has N=9 rows but key has only M=6"),
    (lambda a: a.update(target=torch.tensor([0, 1, 2, 6])), "target has index 6 out of range"),
    (lambda a: a.update(target=torch.tensor([0.0, 1, 2, 3])), "target must be an integer tensor"),
    (lambda a: a.update(query=torch.randint(0, 3, (4, 8))), "query must be a floating tensor"),
    (lambda a: a.update(key=torch.randint(0, 3, (6, 8))), "key must be a floating tensor"),
    (lambda a: a["query"].__setitem__((1, 2), float("nan")), "query contains NaN or inf"),
    (lambda a: a["key"].__setitem__((0, 0), float("inf")), "key contains NaN or inf"),
    (lambda a: a.update(logit_scale=torch.tensor(float("nan"))), "logit_scale is NaN or inf"),
    (lambda a: a.update(logit_scale=torch.ones(2)), "logit_scale must be a scalar"),
    (lambda a: a.update(query=torch.randn(0, 8)), "query is an empty batch"),
    (lambda a: a.update(key=torch.randn(0, 8)), "key is an empty batch"),
    (lambda a: a.update(query=torch.randn(4, 8, device="meta")), "query is on meta but key is on cpu"),
    (lambda a: a.update(query=torch.randn(4, 8, dtype=torch.float16)), "query has dtype torch.float16"),
    (lambda a: a.update(weight=torch.tensor([1.0, -1, 1, 1])), "weight has negative entries"),
    (lambda a: a.update(weight=torch.ones(3)), r"weight must have shape \(4,\)"),
    (lambda a: a.update(query_group=torch.zeros(4, dtype=torch.long)), "key_group is missing"),
    (lambda a: a.update(reduction="avg"), "reduction must be one of"),
    (lambda a: a.update(chunk_size=0), "chunk_size must be >= 1, got 0"),  # 0 used to mean the default
    (lambda a: a.update(query=torch.randint(0, 3, (4, 8))), r"bfloat16 or float64\), got torch.int64"),
])
def test_bad_input_errors_name_the_argument(mutate, match):
    args = {"query": torch.randn(4, 8), "key": torch.randn(6, 8), "logit_scale": torch.tensor(10.0)}
    mutate(args)
    q, k, s = args.pop("query"), args.pop("key"), args.pop("logit_scale")
    with pytest.raises(ValueError, match=match):
        contrastive_loss(q, k, s, **args)


def test_multi_bad_input():
    k = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"queries\[1\] has embedding dimension 3"):
        multi_contrastive_loss([torch.randn(2, 4), torch.randn(2, 3)], k, torch.tensor(1.0))
    with pytest.raises(ValueError, match="targets must be a sequence with one entry per query set"):
        multi_contrastive_loss([torch.randn(2, 4)], k, torch.tensor(1.0), targets=[None, None])
    with pytest.raises(ValueError, match="queries must be a non-empty sequence"):
        multi_contrastive_loss([], k, torch.tensor(1.0))


def test_unknown_backend_is_clear():
    q, k, s = make_inputs(2, 2, 3)
    with pytest.raises(BackendUnavailable, match="unknown backend 'nope'"):
        contrastive_loss(q, k, s, backend="nope")


# ----------------------------------------------------------------------------- csrc tile kernels

def test_csrc_tile_ops_match_torch_tile_ops():
    """The csrc kernels (under the CPU emulator) against the torch tile ops on one tile with fully
    excluded (-inf) columns, a running column state with -inf maxima, and a column part narrower than
    the tile."""
    _skip_unavailable("cuda_emu", torch.device("cpu"))
    from moon_fast.ops.contrastive_csrc import CsrcTileOps
    from moon_fast.ops.contrastive_torch import TORCH_TILE_OPS as T

    C = CsrcTileOps("emu")
    gen = _gen("tile")
    S = torch.randn(5, 70, generator=gen) * 20
    S[:, 3] = float("-inf")
    S[1, 10:20] = float("-inf")
    torch.testing.assert_close(C.row_lse(S), T.row_lse(S), atol=1e-5, rtol=1e-6)
    cm_a = torch.full((40,), float("-inf"))
    cm_a[::2] = torch.randn(20, generator=gen) * 20
    cs_a = torch.where(cm_a == float("-inf"), 0.0, torch.rand(40, generator=gen) + 0.5)
    cm_b, cs_b = cm_a.clone(), cs_a.clone()
    C.col_merge_(S[:, :40], cm_a, cs_a)
    T.col_merge_(S[:, :40], cm_b, cs_b)
    torch.testing.assert_close(cm_a, cm_b)
    torch.testing.assert_close(cs_a, cs_b, atol=1e-6, rtol=1e-5)
    lse = T.row_lse(S)
    a, pc = torch.rand(5, generator=gen), torch.rand(5, generator=gen)
    clse = cm_b + cs_b.log()
    b = torch.rand(40, generator=gen)
    pos = torch.tensor([0, 5, 39, 69, 12])
    G1, G2 = S.clone(), S.clone()
    C.grad_(G1, lse, a, clse, b, pos, pc)
    T.grad_(G2, lse, a, clse, b, pos, pc)
    torch.testing.assert_close(G1, G2, atol=1e-6, rtol=1e-5)
    G1, G2 = S.clone(), S.clone()
    l1, l2 = C.row_softmax_grad_(G1, a, pos), T.row_softmax_grad_(G2, a, pos)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(G1, G2, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_inside_autocast_computes_in_float32(backend):
    """Inside torch.autocast(bf16) the loss runs in float32 (as autocast treats cross-entropy), with
    fp32 and bf16 inputs mixed; it equals the fp32 loss outside autocast, gradients included."""
    q = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(11, 16), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(q, k.bfloat16(), scale, symmetric=True, backend=backend)
    loss.backward()
    grads = (q.grad.clone(), k.grad.clone(), scale.grad.clone())
    for t in (q, k, scale):
        t.grad = None
    expected = contrastive_loss(q, k.bfloat16().float(), scale, symmetric=True, backend="reference")
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, (q.grad, k.grad, scale.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_float64_passes_triton_over(monkeypatch):
    """The Triton kernels take fp32 / fp16 / bf16. float64 embeddings: ``auto`` passes triton over (on a GPU it
    comes first; here the CPU order is made to start with it) and asking for it by name says why; before,
    both raised a KeyError from inside the launcher."""
    pytest.importorskip("triton")
    monkeypatch.setitem(BACKENDS.auto_order, "cpu", ("triton", "torch"))
    q, k, s = make_inputs(6, 6, 8, dtype=torch.float64)
    want = contrastive_loss(q, k, s, backend="reference")
    assert torch.allclose(contrastive_loss(q, k, s), want, rtol=1e-5)
    with pytest.raises(BackendUnavailable, match="backend 'triton' takes float32, float16 or bfloat16 embeddings, "
                                                 "not float64"):
        contrastive_loss(q, k, s, backend="triton")
