"""contrastive_loss / multi_contrastive_loss: InfoNCE without the N x M similarity matrix (issue 3).

Semantics (every backend computes exactly this; ``reference`` materialises it):

* logits ``S[i, j] = logit_scale * query[i] . key[j]`` (embeddings as given: the caller normalises);
* query i's positive is key ``target[i]`` (default ``i``); every other key is a negative, except keys
  j with ``key_group[j] == query_group[i]`` and ``j != target[i]`` (false negatives, e.g. the same
  product twice in a batch), which are left out of the denominator;
* ``l_i = logsumexp_j S[i, j] - S[i, target[i]]`` over the keys kept;
* ``symmetric=True`` adds the key-to-query direction: key ``target[i]`` against all N queries with
  positive query i (with default targets: the first N keys, as CLIP does), the same exclusions, and
  the per-query loss becomes ``0.5 * (l_i + l'_i)``; with default targets and no groups the mean
  equals open_clip ``ClipLoss()(query, key, logit_scale)``;
* ``weight`` (N,) (non-negative, e.g. Dynamic Sample Filtering; it gets no gradient):
  ``reduction="mean"`` is ``sum(w * l) / sum(w)`` (0 when every weight is 0), ``"sum"`` is
  ``sum(w * l)``, ``"none"`` returns the (N,) vector ``w * l`` (per-query, both directions averaged
  when symmetric, so that ``none.sum() == sum``);
* ``gather=True`` under torch.distributed: every rank scores its local queries against the keys of
  all ranks (and, when symmetric, the keys ``target`` against the queries of all ranks). ``target``
  indexes the rank's *local* keys. Every rank must pass the same N and M. The returned mean/sum is
  the loss of the concatenated global batch (identical on every rank; "none" returns the local
  queries' rows), and the gradients reaching the local ``query``, ``key`` and ``logit_scale`` are
  those of the global loss: query/key get their rows of the global gradient, the replicated
  ``logit_scale`` the full gradient. Note for data-parallel training: the encoder parameters'
  gradient of the global loss is then the SUM over ranks of the local parameter gradients, while
  DDP/DeepSpeed average (a 1/world factor on encoder gradients only; Adam is invariant to it,
  global-norm clipping is not). Without an initialised process group (or with one rank) gather=True
  is the single-process loss;
* the loss is float32 whatever the input dtype; the matrix products run in the inputs' dtype.

Backends: ``reference`` (materialised logits, F.cross_entropy), ``torch`` (chunked online
log-sum-exp, O((N+M)·D + chunk·M) memory), ``triton`` (fused kernels, no N x M tensor at all),
``cuda`` / ``cuda_emu`` (the torch path with its memory-bound parts in csrc/contrastive.cu).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moon_fast.backends import (
    BackendUnavailable,
    cuda_emu_unavailable,
    cuda_ext_unavailable,
    float32_under_autocast,
    op_backends,
    triton_unavailable,
)
from moon_fast.ops import contrastive_dist as cdist
from moon_fast.ops.contrastive_core import Problem, reference_problem

BACKENDS = op_backends("contrastive_loss", {"cuda": ("triton", "cuda", "torch"), "cpu": ("torch",)})

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- backends

@BACKENDS.register("reference", description="materialised N x M logits and F.cross_entropy (the oracle)")
def _reference(p: Problem, chunk_size: int | None = None) -> torch.Tensor:
    return reference_problem(p)


@BACKENDS.register("torch", description="chunked online log-sum-exp, gradients fused/recomputed; any device")
def _torch(p: Problem, chunk_size: int | None = None) -> torch.Tensor:
    from moon_fast.ops.contrastive_torch import TORCH_TILE_OPS, chunked_problem

    return chunked_problem(p, TORCH_TILE_OPS, chunk_size)


@BACKENDS.register("triton", unavailable=triton_unavailable,
                   description="fused Triton forward/backward kernels (FlashAttention style)")
def _triton(p: Problem, chunk_size: int | None = None) -> torch.Tensor:
    from moon_fast.kernels.contrastive import triton_problem

    return triton_problem(p)


@BACKENDS.register("cuda", unavailable=cuda_ext_unavailable,
                   description="csrc lse-merge and gradient kernels, GEMMs on cuBLAS")
def _cuda(p: Problem, chunk_size: int | None = None) -> torch.Tensor:
    from moon_fast.ops.contrastive_torch import chunked_problem, csrc_tile_ops

    return chunked_problem(p, csrc_tile_ops("cuda"), chunk_size)


@BACKENDS.register("cuda_emu", unavailable=cuda_emu_unavailable,
                   description="the cuda backend's kernels under the CPU emulator (tests)")
def _cuda_emu(p: Problem, chunk_size: int | None = None) -> torch.Tensor:
    from moon_fast.ops.contrastive_torch import chunked_problem, csrc_tile_ops

    return chunked_problem(p, csrc_tile_ops("emu"), chunk_size)


# ----------------------------------------------------------------------------- validation

class NonFiniteInput(ValueError):
    """An input of the loss holds NaN or inf (in training: usually a diverged model)."""


def _fail(name: str, msg: str, error=ValueError):
    raise error(f"contrastive_loss: {name} {msg}")


def _check_embeddings(name: str, x, device=None, dtype=None, dim=None) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(name, f"must be a torch.Tensor of shape (n, D), got {type(x).__name__}")
    if x.dim() != 2:
        _fail(name, f"must be 2-D (n, D), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        _fail(name, f"must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}; convert with "
                    ".float()")
    if x.shape[0] == 0:
        _fail(name, "is an empty batch (0 rows): pass at least one row")
    if x.shape[1] == 0:
        _fail(name, "has embedding dimension 0")
    if dim is not None and x.shape[1] != dim:
        _fail(name, f"has embedding dimension {x.shape[1]} but key has {dim}: query and key must share D")
    if device is not None and x.device != device:
        _fail(name, f"is on {x.device} but key is on {device}: move every input to one device")
    if dtype is not None and x.dtype != dtype:
        _fail(name, f"has dtype {x.dtype} but key has {dtype}: cast the embeddings to one dtype")
    if not bool(torch.isfinite(x).all()):
        _fail(name, "contains NaN or inf: check the encoder output (and its normalisation) before the loss",
              NonFiniteInput)


def _check_scale(logit_scale, device) -> torch.Tensor:
    if not isinstance(logit_scale, torch.Tensor):
        if isinstance(logit_scale, (int, float)):
            logit_scale = torch.tensor(float(logit_scale), device=device)
        else:
            _fail("logit_scale", f"must be a scalar tensor, got {type(logit_scale).__name__}")
    if logit_scale.numel() != 1:
        _fail("logit_scale", f"must be a scalar (one element), got shape {tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        _fail("logit_scale", f"must be a floating tensor, got {logit_scale.dtype}")
    if logit_scale.device != device:
        _fail("logit_scale", f"is on {logit_scale.device} but key is on {device}: move it to the same device")
    if not bool(torch.isfinite(logit_scale).all()):
        _fail("logit_scale", "is NaN or inf (if it is learnable, clamp it, e.g. logit_scale.exp().clamp(max=100))")
    return logit_scale.reshape(())


def _check_index(name: str, x, n: int, device, *, upper: int | None = None) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        _fail(name, f"must be a tensor of shape ({n},), got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        _fail(name, f"must be an integer tensor (torch.long), got {x.dtype}")
    if x.shape != (n,):
        _fail(name, f"must have shape ({n},), got {tuple(x.shape)}")
    if x.device != device:
        _fail(name, f"is on {x.device} but key is on {device}: move it to the same device")
    x = x.long()
    if upper is not None and n and (bool((x < 0).any()) or bool((x >= upper).any())):
        bad = x[(x < 0) | (x >= upper)][0].item()
        _fail(name, f"has index {bad} out of range [0, {upper}) (it indexes the {upper} local keys)")
    return x


def _check_weight(name: str, w, n: int, device) -> torch.Tensor | None:
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        _fail(name, f"must be a tensor of shape ({n},), got {type(w).__name__}")
    if not w.is_floating_point():
        _fail(name, f"must be a floating tensor, got {w.dtype}")
    if w.shape != (n,):
        _fail(name, f"must have shape ({n},), got {tuple(w.shape)}")
    if w.device != device:
        _fail(name, f"is on {w.device} but key is on {device}: move it to the same device")
    if not bool(torch.isfinite(w).all()):
        _fail(name, "contains NaN or inf")
    if bool((w < 0).any()):
        _fail(name, "has negative entries: weights must be >= 0")
    return w.detach().float()


# ----------------------------------------------------------------------------- problem building

def _coefficients(weights: list[torch.Tensor], reduction: str, factor: float, gather: bool):
    """Per-row coefficients and segments for each objective's rows (lists of (N_m,) tensors)."""
    coefs = []
    for w in weights:
        if reduction == "mean":
            total = w.sum()
            if gather:
                total = cdist.all_reduce_nograd(total)
            coefs.append(w * (factor / total.clamp_min(torch.finfo(torch.float32).tiny)))
        else:
            coefs.append(w * factor)
    return coefs


def _finish(out_local: torch.Tensor, reduction: str, gather: bool) -> torch.Tensor:
    """Under gather, the value of a mean/sum is the global one on every rank, while the autograd
    graph keeps only this rank's share (the other shares' gradients arrive through the gathers)."""
    if gather and reduction != "none":
        total = cdist.all_reduce_nograd(out_local)
        return out_local + (total - out_local.detach())
    return out_local


def _scalar(out: torch.Tensor, reduction: str) -> torch.Tensor:
    return out if reduction == "none" else out.reshape(())


def _run(problem: Problem, backend: str, chunk_size: int | None) -> torch.Tensor:
    dev = problem.rows.device
    order = None
    if problem.rows.dtype == torch.float64:  # the Triton kernels take fp32 / fp16 / bf16: auto passes them over
        order = [n for n in BACKENDS.auto_order.get(dev.type, ("torch",)) if n != "triton"]
    impl = BACKENDS.resolve(backend, dev, order=order)
    if impl.name == "triton" and problem.rows.dtype == torch.float64:
        raise BackendUnavailable("contrastive_loss: backend 'triton' takes float32, float16 or bfloat16 embeddings, "
                                 "not float64: cast them with .float(), or use backend='torch'")
    return impl.fn(problem, chunk_size)


@float32_under_autocast
def contrastive_loss(query, key, logit_scale, *, target=None, query_group=None, key_group=None,
                     weight=None, symmetric=False, gather=False, reduction="mean", backend="auto",
                     chunk_size=None):
    """InfoNCE of ``query`` (N, D) against ``key`` (M, D), M >= N; see the module docstring.

    Returns a float32 scalar (mean, sum) or (N,) (none). ``chunk_size`` (rows per chunk) tunes the
    ``torch``/``cuda`` backends (default: chosen from M); it never changes the result."""
    _check_embeddings("key", key)
    device, dtype, dim = key.device, key.dtype, key.shape[1]
    _check_embeddings("query", query, device, dtype, dim)
    n, m = query.shape[0], key.shape[0]
    if n > m:
        _fail("query", f"has N={n} rows but key has only M={m}: contrastive_loss needs M >= N "
              "(every query's positive is a key; add negatives or swap the arguments)")
    scale = _check_scale(logit_scale, device)
    if reduction not in _REDUCTIONS:
        _fail("reduction", f"must be one of {_REDUCTIONS}, got {reduction!r}")
    target = _check_index("target", target, n, device, upper=m)
    if (query_group is None) != (key_group is None):
        _fail("query_group" if query_group is None else "key_group",
              "is missing: pass query_group and key_group together (or neither)")
    qg = _check_index("query_group", query_group, n, device)
    kg = _check_index("key_group", key_group, m, device)
    w = _check_weight("weight", weight, n, device)
    if w is None:
        w = torch.ones(n, dtype=torch.float32, device=device)
    if target is None:
        target = torch.arange(n, device=device)

    rank, ws = cdist.world()
    if gather and ws > 1:
        cdist.check_same_sizes([n, m, dim], ["query rows N", "key rows M", "embedding dim D"])
    gather = gather and ws > 1

    factor = 0.5 if symmetric else 1.0
    (coef,) = _coefficients([w], reduction, factor, gather)
    seg, n_seg, bounds = (torch.arange(n, device=device), n, None) if reduction == "none" else \
        (torch.zeros(n, dtype=torch.long, device=device), 1, (0, n))

    if not gather:
        ids = (target, torch.arange(m, device=device)) if qg is not None else (None, None)
        p = Problem(query, key, scale, target, coef, seg, n_seg, col_coef=coef if symmetric else None,
                    row_group=qg, col_group=kg, row_id=ids[0], col_id=ids[1], seg_bounds=bounds)
        return _scalar(_run(p, backend, chunk_size), reduction)

    # ---- gather: local rows against the keys (and, when symmetric, queries) of every rank
    scale = cdist.AllReduceGrad.apply(scale)
    t_glob = target + rank * m
    keys_all = cdist.gather_grad(key)
    kg_all = cdist.gather_nograd(kg) if kg is not None else None
    ids = (t_glob, torch.arange(ws * m, device=device)) if qg is not None else (None, None)
    p = Problem(query, keys_all, scale, t_glob, coef, seg, n_seg, row_group=qg, col_group=kg_all,
                row_id=ids[0], col_id=ids[1], seg_bounds=bounds)
    out = _run(p, backend, chunk_size)
    if symmetric:
        # Key target[i] against all queries, positive = query i (global index). Exclusion of query i'
        # for key j: same group and target[i'] != j (the rule of the single-process matrix, transposed).
        queries_all = cdist.gather_grad(query)
        rows = keys_all[t_glob]
        pos = torch.arange(n, device=device) + rank * n
        if qg is not None:
            rg, cg = kg_all[t_glob], cdist.gather_nograd(qg)
            rid, cid = t_glob, cdist.gather_nograd(t_glob)
        else:
            rg = cg = rid = cid = None
        p_rev = Problem(rows, queries_all, scale, pos, coef, seg, n_seg, row_group=rg, col_group=cg,
                        row_id=rid, col_id=cid, seg_bounds=bounds)
        out = out + _run(p_rev, backend, chunk_size)
    return _scalar(_finish(out, reduction, gather), reduction)


@float32_under_autocast
def multi_contrastive_loss(queries: Sequence[torch.Tensor], key, logit_scale, *, targets=None, query_groups=None,
                           key_group=None, weights=None, gather=False, reduction="mean", backend="auto",
                           chunk_size=None):
    """Several query sets (N_m, D) against the same keys (M, D), in one pass over the keys.

    Returns float32 (n_objectives,) for mean/sum: entry m is ``contrastive_loss(queries[m], key, ...,
    target=targets[m], query_group=query_groups[m], weight=weights[m])``; for reduction="none" the
    concatenation of the per-query losses of all objectives, shape (sum N_m,). ``targets``,
    ``query_groups`` and ``weights`` are sequences with one entry (or None) per objective."""
    if isinstance(queries, torch.Tensor) or not isinstance(queries, Sequence) or len(queries) == 0:
        _fail("queries", "must be a non-empty sequence of (N_m, D) tensors (one per objective)")
    _check_embeddings("key", key)
    device, dtype, dim = key.device, key.dtype, key.shape[1]
    k = len(queries)

    def per_obj(name, seq):
        if seq is None:
            return [None] * k
        if isinstance(seq, torch.Tensor) or len(seq) != k:
            _fail(name, f"must be a sequence with one entry per query set ({k}), or None")
        return list(seq)

    targets, query_groups, weights = per_obj("targets", targets), per_obj("query_groups", query_groups), \
        per_obj("weights", weights)
    m = key.shape[0]
    scale = _check_scale(logit_scale, device)
    if reduction not in _REDUCTIONS:
        _fail("reduction", f"must be one of {_REDUCTIONS}, got {reduction!r}")
    kg = _check_index("key_group", key_group, m, device)
    ts, qgs, ws_ = [], [], []
    for i, q in enumerate(queries):
        _check_embeddings(f"queries[{i}]", q, device, dtype, dim)
        n = q.shape[0]
        if n > m:
            _fail(f"queries[{i}]", f"has N={n} rows but key has only M={m}: needs M >= N")
        t = _check_index(f"targets[{i}]", targets[i], n, device, upper=m)
        ts.append(torch.arange(n, device=device) if t is None else t)
        g = _check_index(f"query_groups[{i}]", query_groups[i], n, device)
        if g is not None and kg is None:
            _fail("key_group", f"is missing: query_groups[{i}] is given, so key_group must be too")
        qgs.append(g)
        w = _check_weight(f"weights[{i}]", weights[i], n, device)
        ws_.append(torch.ones(n, dtype=torch.float32, device=device) if w is None else w)

    rank, world_size = cdist.world()
    if gather and world_size > 1:
        cdist.check_same_sizes([m, dim] + [q.shape[0] for q in queries],
                               ["key rows M", "embedding dim D"] + [f"queries[{i}] rows" for i in range(k)])
    gather = gather and world_size > 1

    sizes = [q.shape[0] for q in queries]
    rows = torch.cat(list(queries), 0) if k > 1 else queries[0]
    coef = torch.cat(_coefficients(ws_, reduction, 1.0, gather))
    n_tot = rows.shape[0]
    if reduction == "none":
        seg, n_seg, bounds = torch.arange(n_tot, device=device), n_tot, None
    else:
        seg = torch.repeat_interleave(torch.arange(k, device=device), torch.tensor(sizes, device=device))
        n_seg = k
        bounds = tuple(int(b) for b in torch.tensor([0] + sizes).cumsum(0).tolist())
    offset = rank * m if gather else 0
    pos = torch.cat(ts) + offset
    cols = cdist.gather_grad(key) if gather else key
    if gather:
        scale = cdist.AllReduceGrad.apply(scale)
    if kg is not None:
        cg = cdist.gather_nograd(kg) if gather else kg
        # A query set without groups excludes nothing: give its rows a group no key has.
        none_group = (cg.min() - 1).reshape(1)
        rg = torch.cat([g if g is not None else none_group.expand(n) for g, n in zip(qgs, sizes)])
        rid, cid = pos, torch.arange(cols.shape[0], device=device)
    else:
        rg = cg = rid = cid = None
    p = Problem(rows, cols, scale, pos, coef, seg, n_seg, row_group=rg, col_group=cg, row_id=rid, col_id=cid,
                seg_bounds=bounds)
    return _finish(_run(p, backend, chunk_size), reduction, gather)
