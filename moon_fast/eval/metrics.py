"""Retrieval and zero-shot classification metrics, exact and memory-bounded.

Retrieval (:func:`retrieval_metrics`): every query has ONE correct candidate (an index into the
candidate set; MBE-style product retrieval, where the query's own product is the answer). Scores are
dot products of the embeddings (cosine similarity for the L2-normalised embeddings the model returns).
The score matrix is never materialised: queries are taken ``query_chunk`` at a time and candidates
``cand_chunk`` at a time, so memory is O(query_chunk x cand_chunk) whatever the number of candidates.

Rank and ties. The rank of a query's correct candidate is the number of OTHER candidates that score
strictly higher (``> s_true + tie_tol``), 0 = first place. Candidates within ``tie_tol`` of the correct
candidate's score are ties; the metrics are the EXPECTED values when ties are broken uniformly at
random: with ``h`` higher and ``t`` tied candidates the correct one is at rank ``h + j`` for
j = 0..t, each with probability 1 / (t + 1). So ``recall@k = clip((k - h) / (t + 1), 0, 1)`` and
``mrr = mean_j 1 / (h + j + 1)``. Why not count ties as wins: a collapsed model whose embeddings are all
equal would then score recall@1 = 1.0; under this rule it scores chance (k / N), as it should. The
tolerance (default 1e-6, about 10 fp32 ulps of a cosine) absorbs the rounding difference between the
correct candidate's score computed as a row dot product and the other scores computed by matrix
product; the correct candidate itself is excluded by index, never by value.

``recall@k`` with ``k >= number of candidates`` is 1.0. MRR is over the full ranking (not cut at 10).

Zero-shot classification (:func:`classification_metrics`): accuracy and macro-averaged precision,
recall and F1 over the labels that occur in the ground truth or the predictions (sklearn's default
label set); a label never predicted has precision 0, a label never true has recall 0 (sklearn's
``zero_division=0``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_KS = (1, 5, 10)


def _check_embeddings(query: torch.Tensor, cand: torch.Tensor) -> None:
    if query.dim() != 2 or cand.dim() != 2:
        raise ValueError(f"query and candidates must be 2-D (n, D); got query {tuple(query.shape)}, "
                         f"candidates {tuple(cand.shape)}")
    if query.shape[1] != cand.shape[1]:
        raise ValueError(f"query dim {query.shape[1]} != candidate dim {cand.shape[1]}: embed both with the same model")
    if cand.shape[0] == 0:
        raise ValueError("no candidates: the candidate set must hold at least one embedding")
    for name, t in (("query", query), ("candidates", cand)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} embeddings contain NaN or inf; check the model's outputs")


def correct_ranks(query: torch.Tensor, cand: torch.Tensor, target: torch.Tensor, *,
                  query_chunk: int = 1024, cand_chunk: int = 16384,
                  tie_tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, how many other candidates score strictly higher than its correct one, and how
    many tie with it (within ``tie_tol``).

    query: (Nq, D), cand: (Nc, D), target: (Nq,) long in [0, Nc). Returns (higher, ties), both (Nq,) long.
    Scores are computed in fp32 (bf16/fp16 embeddings are upcast per chunk).
    """
    _check_embeddings(query, cand)
    target = torch.as_tensor(target, dtype=torch.long, device=query.device)
    if target.shape != (query.shape[0],):
        raise ValueError(f"target must be (n_queries,) = ({query.shape[0]},), got {tuple(target.shape)}")
    nq, nc = query.shape[0], cand.shape[0]
    if nq and (int(target.min()) < 0 or int(target.max()) >= nc):
        raise ValueError(f"target indices must lie in [0, {nc}); got range [{int(target.min())}, {int(target.max())}]")
    higher = torch.zeros(nq, dtype=torch.long, device=query.device)
    ties = torch.zeros(nq, dtype=torch.long, device=query.device)
    for q0 in range(0, nq, query_chunk):
        q = query[q0:q0 + query_chunk].float()
        tgt = target[q0:q0 + query_chunk]
        s_true = (q * cand[tgt].float()).sum(-1, keepdim=True)  # (qc, 1)
        rows = torch.arange(q.shape[0], device=q.device)
        for c0 in range(0, nc, cand_chunk):
            s = q @ cand[c0:c0 + cand_chunk].float().T  # (qc, cc): the only score block in memory
            # The correct candidate never competes with itself.
            own = (tgt >= c0) & (tgt < c0 + s.shape[1])
            if own.any():
                s[rows[own], tgt[own] - c0] = float("nan")  # NaN compares False both ways
            # two comparisons per score (the element-wise passes, not the GEMM, dominate on a CPU)
            hi = (s > s_true + tie_tol).sum(1)
            ties[q0:q0 + q.shape[0]] += (s >= s_true - tie_tol).sum(1) - hi
            higher[q0:q0 + q.shape[0]] += hi
    return higher, ties


def expected_recall_at_k(higher: torch.Tensor, ties: torch.Tensor, k: int) -> torch.Tensor:
    """(Nq,) float: probability that the correct candidate is in the top ``k`` under random tie-breaking."""
    return ((k - higher).double() / (ties + 1).double()).clamp(0.0, 1.0)


def expected_reciprocal_rank(higher: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """(Nq,) float: E[1 / (rank + 1)] with rank uniform over higher .. higher + ties.

    Uses sum_{j=0..t} 1/(h+j+1) = H(h+t+1) - H(h) with the digamma function (H = harmonic numbers)."""
    h = higher.double()
    t = ties.double()
    with_ties = (torch.special.digamma(h + t + 2) - torch.special.digamma(h + 1)) / (t + 1)
    return torch.where(ties == 0, 1.0 / (h + 1), with_ties)  # exact in the common no-tie case


def retrieval_metrics(query: torch.Tensor, cand: torch.Tensor, target: torch.Tensor,
                      ks: Sequence[int] = DEFAULT_KS, **kwargs) -> dict[str, float]:
    """{"recall@k": ..., "mrr": ..., "n_queries": ..., "n_candidates": ...} for one query/candidate set.

    Keyword arguments go to :func:`correct_ranks` (``query_chunk``, ``cand_chunk``, ``tie_tol``)."""
    if query.shape[0] == 0:
        raise ValueError("no queries: retrieval metrics need at least one query")
    higher, ties = correct_ranks(query, cand, target, **kwargs)
    out = {f"recall@{k}": float(expected_recall_at_k(higher, ties, k).mean()) for k in ks}
    out["mrr"] = float(expected_reciprocal_rank(higher, ties).mean())
    out["n_queries"] = int(query.shape[0])
    out["n_candidates"] = int(cand.shape[0])
    return out


def chunked_topk(query: torch.Tensor, cand: torch.Tensor, k: int, *, query_chunk: int = 1024,
                 cand_chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` candidates per query with a running top-k over candidate chunks.

    query: (Nq, D), cand: (Nc, D). Returns (scores (Nq, k'), indices (Nq, k')) sorted best first,
    k' = min(k, Nc). Equal scores keep the lower candidate index first within a chunk
    (``torch.topk`` order is not guaranteed stable across chunks for exact ties)."""
    _check_embeddings(query, cand)
    k = min(k, cand.shape[0])
    nq = query.shape[0]
    best_s = torch.empty(nq, k, dtype=torch.float32, device=query.device)
    best_i = torch.empty(nq, k, dtype=torch.long, device=query.device)
    for q0 in range(0, nq, query_chunk):
        q = query[q0:q0 + query_chunk].float()
        run_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        run_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for c0 in range(0, cand.shape[0], cand_chunk):
            s = q @ cand[c0:c0 + cand_chunk].float().T
            idx = torch.arange(c0, c0 + s.shape[1], device=q.device).expand_as(s)
            all_s = torch.cat([run_s, s], 1)
            all_i = torch.cat([run_i, idx], 1)
            top = all_s.topk(min(k, all_s.shape[1]), dim=1, sorted=True)
            run_s, run_i = top.values, all_i.gather(1, top.indices)
        best_s[q0:q0 + q.shape[0]] = run_s
        best_i[q0:q0 + q.shape[0]] = run_i
    return best_s, best_i


def nearest_prototype(emb: torch.Tensor, prototypes: torch.Tensor, *, chunk: int = 4096) -> torch.Tensor:
    """(N,) long: index of the highest-scoring prototype for each row of ``emb`` (N, D); prototypes (C, D).
    Equal scores pick the lowest prototype index (``argmax`` semantics)."""
    _check_embeddings(emb, prototypes)
    out = torch.empty(emb.shape[0], dtype=torch.long, device=emb.device)
    for i in range(0, emb.shape[0], chunk):
        out[i:i + chunk] = (emb[i:i + chunk].float() @ prototypes.float().T).argmax(1)
    return out


def classification_metrics(pred: Sequence, true: Sequence) -> dict[str, float]:
    """Accuracy and macro precision / recall / F1 of predicted labels (any hashable values).

    The macro average is over the union of labels in ``true`` and ``pred``; a label's precision is 0
    when it is never predicted, its recall 0 when it never occurs, its F1 0 when P + R = 0."""
    pred = [p.item() if isinstance(p, torch.Tensor) else p for p in pred]
    true = [t.item() if isinstance(t, torch.Tensor) else t for t in true]
    if len(pred) != len(true):
        raise ValueError(f"pred has {len(pred)} labels but true has {len(true)}")
    if not true:
        raise ValueError("no samples: classification metrics need at least one labelled sample")
    labels = list(dict.fromkeys(list(true) + list(pred)))
    tp = dict.fromkeys(labels, 0)
    n_pred = dict.fromkeys(labels, 0)
    n_true = dict.fromkeys(labels, 0)
    for p, t in zip(pred, true):
        n_pred[p] += 1
        n_true[t] += 1
        if p == t:
            tp[p] += 1
    precs, recs, f1s = [], [], []
    for c in labels:
        p = tp[c] / n_pred[c] if n_pred[c] else 0.0
        r = tp[c] / n_true[c] if n_true[c] else 0.0
        precs.append(p)
        recs.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    n = len(labels)
    return {
        "accuracy": sum(tp.values()) / len(true),
        "precision": sum(precs) / n,
        "recall": sum(recs) / n,
        "f1": sum(f1s) / n,
        "n_samples": len(true),
        "n_labels": n,
    }
