"""gather=True across 2 gloo processes equals one process on the concatenated batch: the loss and the
gradients of query, key and logit_scale (no world-size factor on any of them)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moon_fast.ops import contrastive_loss, multi_contrastive_loss

WORLD, N_LOCAL, M_LOCAL, D = 2, 5, 7, 6

CONFIGS = [
    ("torch", dict(reduction="mean")),
    ("torch", dict(reduction="mean", symmetric=True)),
    ("torch", dict(reduction="sum", symmetric=True, groups=True, weights=True, targets=True)),
    ("torch", dict(reduction="none", symmetric=True, groups=True, weights=True)),
    ("torch", dict(reduction="mean", groups=True, weights=True, targets=True)),
    ("reference", dict(reduction="mean", symmetric=True, groups=True, weights=True)),
    ("triton", dict(reduction="mean", symmetric=True, groups=True, targets=True)),
]


def global_inputs(cfg_index: int):
    g = torch.Generator().manual_seed(1000 + cfg_index)
    n, m = WORLD * N_LOCAL, WORLD * M_LOCAL
    q = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(m, D, generator=g), dim=1)
    local_t = torch.stack([torch.randperm(M_LOCAL, generator=g)[:N_LOCAL] for _ in range(WORLD)])
    qg, kg = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    w = torch.rand(n, generator=g)
    up = torch.randn(n, generator=g)
    return q, k, local_t, qg, kg, w, up


def kwargs_for(opts, rank, inputs, *, local: bool):
    q, k, local_t, qg, kg, w, up = inputs
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL) if local else slice(None)
    cols = slice(rank * M_LOCAL, (rank + 1) * M_LOCAL) if local else slice(None)
    kw = {"reduction": opts["reduction"], "symmetric": opts.get("symmetric", False)}
    if local:
        kw["target"] = local_t[rank] if opts.get("targets") else torch.arange(N_LOCAL)
    else:
        lt = local_t if opts.get("targets") else torch.arange(N_LOCAL).expand(WORLD, -1)
        kw["target"] = (lt + torch.arange(WORLD)[:, None] * M_LOCAL).reshape(-1)
    if opts.get("groups"):
        kw["query_group"], kw["key_group"] = qg[rows], kg[cols]
    if opts.get("weights"):
        kw["weight"] = w[rows]
    return q[rows], k[cols], kw, up[rows]


def loss_and_grads(backend, q, k, kw, up, gather):
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    s = torch.tensor(12.0, requires_grad=True)
    loss = contrastive_loss(q, k, s, gather=gather, backend=backend, chunk_size=3, **kw)
    (loss * (up if kw["reduction"] == "none" else 0.7)).sum().backward()
    return loss.detach(), q.grad, k.grad, s.grad


def multi_and_grads(rank, gather):
    g = torch.Generator().manual_seed(7)
    qs = [torch.randn(WORLD * n, D, generator=g) for n in (3, 4)]
    k = torch.randn(WORLD * M_LOCAL, D, generator=g)
    if gather:
        qs = [q[rank * (q.shape[0] // WORLD):(rank + 1) * (q.shape[0] // WORLD)] for q in qs]
        k = k[rank * M_LOCAL:(rank + 1) * M_LOCAL]
        targets = [torch.arange(q.shape[0]) for q in qs]
    else:
        targets = [torch.cat([torch.arange(q.shape[0] // WORLD) + r * M_LOCAL for r in range(WORLD)]) for q in qs]
    qs = [q.clone().requires_grad_() for q in qs]
    k = k.clone().requires_grad_()
    s = torch.tensor(5.0, requires_grad=True)
    out = multi_contrastive_loss(qs, k, s, targets=targets, gather=gather, backend="torch", chunk_size=2)
    (out * torch.tensor([0.3, 1.1])).sum().backward()
    return [out.detach()] + [q.grad for q in qs] + [k.grad, s.grad]


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = []
        for i, (backend, opts) in enumerate(CONFIGS):
            q, k, kw, up = kwargs_for(opts, rank, global_inputs(i), local=True)
            results.append(loss_and_grads(backend, q, k, kw, up, gather=True))
        results.append(multi_and_grads(rank, gather=True))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for i, (backend, opts) in enumerate(CONFIGS):
        q, k, kw, up = kwargs_for(opts, 0, global_inputs(i), local=False)
        loss, dq, dk, ds = loss_and_grads(backend, q, k, kw, up, gather=False)
        for r in range(WORLD):
            got_loss, got_dq, got_dk, got_ds = per_rank[r][i]
            rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
            cols = slice(r * M_LOCAL, (r + 1) * M_LOCAL)
            where = f"config {i} {backend} {opts} rank {r}"
            expected_loss = loss[rows] if opts["reduction"] == "none" else loss
            pairs = [("loss", got_loss, expected_loss), ("dquery", got_dq, dq[rows]), ("dkey", got_dk, dk[cols]),
                     ("dscale", got_ds, ds)]
            for name, got, exp in pairs:
                err = (got - exp).abs().max().item()
                assert err <= 1e-5 + 1e-4 * exp.abs().max().item(), f"{where}: {name} max abs error {err:.3g}"
    expected = multi_and_grads(0, gather=False)
    for r in range(WORLD):
        got = per_rank[r][-1]
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        for j, n in enumerate((3, 4)):
            torch.testing.assert_close(got[1 + j], expected[1 + j][r * n:(r + 1) * n], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[3], expected[3][r * M_LOCAL:(r + 1) * M_LOCAL], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[4], expected[4], atol=1e-5, rtol=1e-4)
