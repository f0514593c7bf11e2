"""Retrieval and classification metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from utils import unit

from moon_fast.eval.metrics import (
    chunked_topk,
    classification_metrics,
    correct_ranks,
    nearest_prototype,
    retrieval_metrics,
)


def test_retrieval_hand_computed():
    # 2-D embeddings; candidates at angles 0, 30, 60, 90 degrees.
    cand = unit([1, 0], [math.cos(math.pi / 6), math.sin(math.pi / 6)],
                [math.cos(math.pi / 3), math.sin(math.pi / 3)], [0, 1])
    query = unit([1, 0], [1, 0], [0, 1])
    # query 0 -> cand 0 is best (rank 0); query 1 -> cand 3 is worst (rank 3); query 2 -> cand 2: rank 1.
    target = torch.tensor([0, 3, 2])
    m = retrieval_metrics(query, cand, target, ks=(1, 2, 5))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@5"] == pytest.approx(1.0)  # k > number of candidates
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 2) / 3)
    assert m["n_queries"] == 3 and m["n_candidates"] == 4


def test_ties_are_broken_at_random_in_expectation():
    # Three identical candidates: the correct one ties with two others.
    cand = unit([1, 0], [1, 0], [1, 0], [0, 1])
    query = unit([1, 0])
    higher, ties = correct_ranks(query, cand, torch.tensor([1]))
    assert higher.tolist() == [0] and ties.tolist() == [2]
    m = retrieval_metrics(query, cand, torch.tensor([1]), ks=(1, 2, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_collapsed_embeddings_score_chance_not_perfect():
    n = 50
    cand = torch.ones(n, 8) / math.sqrt(8)
    m = retrieval_metrics(cand.clone(), cand, torch.arange(n), ks=(1, 10))
    assert m["recall@1"] == pytest.approx(1 / n)
    assert m["recall@10"] == pytest.approx(10 / n)


def test_ties_after_higher_candidates():
    # one strictly better candidate, then the correct one tied with one other: rank 1 or 2.
    cand = unit([1, 0], [1, 1], [1, 1], [0, 1])
    query = unit([1, 0.2])
    higher, ties = correct_ranks(query, cand, torch.tensor([2]))
    assert higher.tolist() == [1] and ties.tolist() == [1]
    m = retrieval_metrics(query, cand, torch.tensor([2]), ks=(1, 2, 3))
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["recall@3"] == 1.0
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_single_candidate():
    m = retrieval_metrics(unit([1, 0], [0, 1]), unit([0.3, -1]), torch.tensor([0, 0]))
    assert m["recall@1"] == 1.0 and m["recall@10"] == 1.0 and m["mrr"] == 1.0


@pytest.mark.parametrize("qc,cc", [(1, 1), (3, 7), (64, 5), (1000, 1000)])
def test_chunking_matches_full_ranking(qc, cc):
    g = torch.Generator().manual_seed(qc * 31 + cc)
    q = torch.randn(37, 16, generator=g)
    c = torch.randn(53, 16, generator=g)
    target = torch.randint(0, 53, (37,), generator=g)
    higher, ties = correct_ranks(q, c, target, query_chunk=qc, cand_chunk=cc)
    # Reference: the full score matrix (fine at this size), continuous random scores have no ties.
    s = q @ c.T
    ref = (s > s.gather(1, target[:, None])).sum(1)
    assert torch.equal(higher, ref)
    assert ties.sum() == 0
    # top-k agrees with a full sort
    top_s, top_i = chunked_topk(q, c, 5, query_chunk=qc, cand_chunk=cc)
    ref_s, ref_i = s.topk(5, dim=1)
    assert torch.equal(top_i, ref_i)
    torch.testing.assert_close(top_s, ref_s)


def test_tie_counts_match_brute_force_with_many_exact_ties():
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-1, 2, (40, 4), generator=g).float()  # few distinct scores: ties everywhere
    c = torch.randint(-1, 2, (90, 4), generator=g).float()
    t = torch.randint(0, 90, (40,), generator=g)
    higher, ties = correct_ranks(q, c, t, query_chunk=7, cand_chunk=13)
    s = q @ c.T
    st = s.gather(1, t[:, None])
    own = torch.zeros_like(s, dtype=torch.bool).scatter_(1, t[:, None], True)
    assert torch.equal(higher, (s > st).sum(1))
    assert torch.equal(ties, ((s == st) & ~own).sum(1))
    assert ties.sum() > 0


def test_bf16_embeddings_are_scored_in_fp32():
    g = torch.Generator().manual_seed(1)
    c = torch.nn.functional.normalize(torch.randn(40, 32, generator=g), dim=1)
    m32 = retrieval_metrics(c, c, torch.arange(40))
    m16 = retrieval_metrics(c.bfloat16(), c.bfloat16(), torch.arange(40))
    assert m32["recall@1"] == 1.0 and m16["recall@1"] == 1.0


def test_topk_k_larger_than_candidates():
    s, i = chunked_topk(unit([1, 0]), unit([0, 1], [1, 0]), 10)
    assert i.tolist() == [[1, 0]] and s.shape == (1, 2)


def test_retrieval_bad_inputs():
    with pytest.raises(ValueError, match="target indices"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(3, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no candidates"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(0, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((1, 4), float("nan")), torch.randn(3, 4), torch.tensor([0]))


def test_classification_hand_computed():
    true = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    # a: P=2/2 R=2/3 F1=0.8; b: P=1/2 R=1/2 F1=0.5; c: P=1/2 R=1 F1=2/3
    m = classification_metrics(pred, true)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_classification_label_never_true_or_never_predicted():
    # "x" is predicted but never true (recall 0 by definition, precision 0); "b" never predicted.
    m = classification_metrics(["a", "x"], ["a", "b"])
    # a: P=1 R=1 F1=1; b: P=0 R=0; x: P=0 R=0
    assert m["accuracy"] == 0.5
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)
    assert m["n_labels"] == 3


def test_classification_single_sample_and_errors():
    assert classification_metrics([3], [3])["f1"] == 1.0
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="pred has"):
        classification_metrics([1], [1, 2])


def test_nearest_prototype_ties_pick_lowest_index():
    protos = unit([1, 0], [1, 0], [0, 1])
    pred = nearest_prototype(unit([1, 0.1], [0, 1]), protos, chunk=1)
    assert pred.tolist() == [0, 2]


@pytest.mark.gpu
def test_ranks_on_cuda_match_cpu():
    # Small multiples of 1/4: every dot product is exact in fp32 on both devices (and ties are common),
    # so the counts must agree exactly whatever the summation order.
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-3, 4, (300, 32), generator=g).float() / 4
    c = torch.randint(-3, 4, (2000, 32), generator=g).float() / 4
    c[7] = c[3]  # an exact duplicate: at least one tie for query 0
    t = torch.randint(0, 2000, (300,), generator=g)
    t[0] = 3
    h_cpu, ties_cpu = correct_ranks(q, c, t, query_chunk=64, cand_chunk=512)
    h_gpu, ties_gpu = correct_ranks(q.cuda(), c.cuda(), t.cuda(), query_chunk=64, cand_chunk=512)
    assert torch.equal(h_cpu, h_gpu.cpu()) and torch.equal(ties_cpu, ties_gpu.cpu())
    assert ties_cpu[0] >= 1
