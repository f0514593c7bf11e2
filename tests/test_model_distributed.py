"""compute_loss(gather=True) under torch.distributed (2 CPU processes, gloo): every rank's queries
are scored against the products of both ranks; checked against a single-process computation."""

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
    # intra, symmetric, mean over the global batch: every image against the texts of both ranks
    img = torch.cat([e[b.intra_image] for e, b in zip(embs, batches)])
    txt = torch.cat([e[b.intra_text] for e, b in zip(embs, batches)])
    pid = torch.cat([b.intra_product_id for b in batches]).tolist()
    s2 = model.logit_scales()[1].item()
    n = len(pid)
    expected = sum(_hand(img[i], txt, i, s2, pid[i], pid) + _hand(txt[i], img, i, s2, pid[i], pid)
                   for i in range(n)) / (2 * n)
    for r in range(WORLD):
        assert torch.load(tmp_path / f"rank{r}.pt")["loss/intra"] == pytest.approx(expected, rel=1e-4)
