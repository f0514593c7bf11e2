"""compute_loss(gather=True) under torch.distributed (2 CPU processes, gloo): every rank's queries
are scored against the products of both ranks; checked against a single-process computation. And the
data-parallel gradient convention: the parameter gradients averaged over ranks (what DDP / DeepSpeed
do) equal the single-process gradients on the concatenated batch."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moon_fast.data.batch import COMPOSITIONS

WORLD = 2


def _batches():
    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_batches import make_triplet_batch

    # Different query-modality mixes per rank; rank 1's second product repeats rank 0's first one
    # (the same product on two ranks is not a negative).
    b0 = make_triplet_batch(5, 3, seed=1)
    b1 = make_triplet_batch(5, 3, seed=2, modality_offset=1, id_offset=1000, duplicate_product=False)
    b1.positive_product_id[1] = b0.positive_product_id[0]
    return [b0, b1]


def _model():
    from moon_fast.model import MoonModel

    torch.manual_seed(11)
    return MoonModel.from_preset("tiny", loss={"dsf": False}).eval()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model()
        out = model.compute_loss(_batches()[rank], progress=0.5, gather=True)
        torch.save(out.metrics, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _hand(emb_q, keys, target, scale, qgroup, kgroup):
    s = scale * (keys @ emb_q)
    keep = [c for c in range(keys.shape[0]) if c == target or kgroup[c] != qgroup]
    return (torch.logsumexp(s[keep], 0) - s[target]).item()


@pytest.mark.distributed
def test_gather_scores_queries_against_all_ranks(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model()
    batches = _batches()
    with torch.no_grad():
        embs = [model.encode(b.encoder) for b in batches]
    scale = model.logit_scales()[0].item()
    keys = torch.cat([torch.cat([e[b.positive], e[b.negative]]) for e, b in zip(embs, batches)])
    kgroup = torch.cat([torch.cat([b.positive_product_id, b.negative_product_id]) for b in batches]).tolist()
    for rank, (emb, b) in enumerate(zip(embs, batches)):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        q = b.query.numel()
        per = [_hand(emb[b.query[j]], keys, rank * 2 * q + j, scale, int(b.positive_product_id[j]), kgroup)
               for j in range(q)]
        for v, name in enumerate(COMPOSITIONS):
            rows = [j for j in range(q) if int(b.query_modality[j]) == v]
            expected = sum(per[j] for j in rows) / len(rows)
            assert got[f"loss/inter_{name}"] == pytest.approx(expected, rel=1e-4), (rank, name)
    # intra, symmetric: each rank's mean over its own pairs, every image against the texts of both
    # ranks and every text against the images of both ranks
    img = torch.cat([e[b.intra_image] for e, b in zip(embs, batches)])
    txt = torch.cat([e[b.intra_text] for e, b in zip(embs, batches)])
    pid = torch.cat([b.intra_product_id for b in batches]).tolist()
    s2 = model.logit_scales()[1].item()
    per = [0.5 * (_hand(img[i], txt, i, s2, pid[i], pid) + _hand(txt[i], img, i, s2, pid[i], pid))
           for i in range(len(pid))]
    start = 0
    for r, b in enumerate(batches):
        n = b.intra_product_id.numel()
        expected = sum(per[start:start + n]) / n
        start += n
        assert torch.load(tmp_path / f"rank{r}.pt")["loss/intra"] == pytest.approx(expected, rel=1e-4), r


# ----------------------------------------------------------------------------- gradients

# inter only; intra only (inter weights 0); both. Fixed objective weights and no load-balancing loss:
# both are per-rank batch statistics by the method's definition (a rank's routing), so a 2-rank step
# legitimately differs from one process holding both batches there. DSF is on (per-triplet weights).
GRAD_CASES = {
    "inter": {"loss": {"intra": False, "learned_objective_weights": False, "aux_coef": 0.0}},
    "intra": {"loss": {"learned_objective_weights": False, "aux_coef": 0.0,
                       "fixed_objective_weights": {"inter_t": 0.0, "inter_i": 0.0, "inter_mm": 0.0, "intra": 1.0}}},
    "both": {"loss": {"learned_objective_weights": False, "aux_coef": 0.0}},
}


def _grad_batches():
    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_batches import make_triplet_batch

    # Equal sizes per rank (6 triplets: 2 queries of each modality; 3 intra pairs); a product shared
    # across ranks (not a negative of itself on the other rank).
    b0 = make_triplet_batch(6, 3, seed=3)
    b1 = make_triplet_batch(6, 3, seed=4, id_offset=1000, duplicate_product=False)
    b1.positive_product_id[1] = b0.positive_product_id[0]
    return [b0, b1]


def _grad_model(case: str):
    from moon_fast.model import MoonModel

    torch.manual_seed(5)
    model = MoonModel.from_preset("tiny", **GRAD_CASES[case]).eval()
    with torch.no_grad():  # W* and the logit scales away from their symmetric init values
        for layer in model.moe_layers():
            layer.alignment.normal_()
        model.logit_scale_intra.fill_(2.0)
    return model


def _grads(model, batch, gather: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.compute_loss(batch, progress=0.3, gather=gather).loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def _grad_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        batch = _grad_batches()[rank]
        torch.save({case: _grads(_grad_model(case), batch, gather=True) for case in GRAD_CASES},
                   os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_gradients_averaged_over_ranks_match_single_process(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_batches import concat_triplet_batches

    mp.spawn(_grad_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"grads{r}.pt") for r in range(WORLD)]
    whole = concat_triplet_batches(_grad_batches())
    for case in GRAD_CASES:
        single = _grads(_grad_model(case), whole, gather=False)
        assert set(single) == set(ranks[0][case])
        checked = 0
        for name, g in single.items():
            avg = sum(r[case][name] for r in ranks) / WORLD
            tol = 2e-4 * g.abs().max().item() + 1e-8
            err = (avg - g).abs().max().item()
            assert err <= tol, (case, name, err, g.abs().max().item(), (avg.norm() / g.norm().clamp_min(1e-30)).item())
            checked += int(g.abs().max().item() > 0)
        # the case exercises the encoder and the logit scale of its objectives
        assert checked > len(single) // 2, (case, checked, len(single))
        if case != "intra":
            assert single["logit_scale_inter"].abs().item() > 0
        if case != "inter":
            assert single["logit_scale_intra"].abs().item() > 0
