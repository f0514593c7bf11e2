"""MOON2.0 dual-level alignment objectives, all through ``moon_fast.ops.contrastive_loss``.

Inter-product (one objective per query modality v in t, i, mm):
    queries q_j (Q of them), keys = [positives p_1..p_Q ; hard negatives n_1..n_Q] (2Q, all
    multimodal products); query j's positive is key j, its negatives every other key (its own hard
    negative, the other triplets' positives and negatives = in-batch negatives, and, with
    ``gather=True`` under torch.distributed, the keys of every rank). Keys showing the query's own
    positive product (same product id) are not negatives (groups = product ids).
    L_inter^v = (1/|Q_v|) sum_{j in Q_v} w_j l_j   with w_j the DSF weight (1 without DSF).
    The per-query losses come from ONE contrastive_loss call over all queries (reduction="none"), so
    it also works under gather when ranks hold different numbers of queries per modality.

Intra-product: image-only view of product i against the text-only views (positive: its own text;
negatives: the other products' texts, same-product duplicates excluded), optionally symmetric.
L_intra = (1/P) sum_i l_i over the P local products (l_i = both directions averaged when symmetric).

Data-parallel convention (``gather=True``, every objective): each rank returns the mean over its
LOCAL queries of their losses against the keys of ALL ranks, and the gradients are such that the
average over ranks of the parameter gradients (what DDP / DeepSpeed do) equals the single-process
gradient of the loss on the concatenated batch, when ranks hold equally many queries (per modality
for inter_v). The average over ranks of the returned values is then the global loss. Two parts:

* contrastive_loss(reduction="none", gather=True) routes every rank's share of the gradient to the
  rank owning each embedding (its gathers sum the column gradients), so rank r's encoder gradient is
  d(sum over ranks of local sums)/d(rank r's embeddings); divided by the local count c and averaged
  over ranks that is d(global mean)/d(params);
* the logit scale is replicated: the op all-reduces (sums) its gradient, so every rank would receive
  world_size x d(global mean)/d(scale) and the average would keep that factor. :func:`dp_replicated`
  scales the gradient reaching the parameter by 1/world_size.

(``reduction="mean"`` under gather follows the other convention, sum over ranks: its encoder
gradients would be averaged down by 1/world_size; not used here.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moon_fast.data.batch import COMPOSITIONS, TripletBatch
from moon_fast.ops import contrastive_loss


def gather_world_size(gather: bool) -> int:
    """The number of ranks whose keys a ``gather=True`` loss sees (1 without a process group)."""
    if gather and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def dp_replicated(x: torch.Tensor, gather: bool) -> torch.Tensor:
    """``x`` (a replicated value such as a logit scale, fed to a gather=True loss) with its gradient
    multiplied by 1/world_size, so that data-parallel averaging of the op's all-reduced (summed)
    gradient gives the single-process gradient (module docstring). The value is unchanged."""
    ws = gather_world_size(gather)
    if ws == 1:
        return x
    return x / ws + (x - x / ws).detach()


def inter_product_losses(emb: torch.Tensor, batch: TripletBatch, logit_scale: torch.Tensor, *,
                         weight: torch.Tensor | None = None, gather: bool = False,
                         backend: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """emb (n, D) normalised embeddings of batch.encoder's samples.

    Returns ({"inter_t": loss, ...} for the query modalities present, {"inter_t": count, ...})."""
    q_rows, p_rows, n_rows = batch.query, batch.positive, batch.negative
    num_q = q_rows.numel()
    if num_q == 0:
        return {}, {}
    if not (p_rows.numel() == n_rows.numel() == num_q == batch.query_modality.numel()):
        raise ValueError(f"TripletBatch: query ({num_q}), positive ({p_rows.numel()}), negative ({n_rows.numel()}) "
                         f"and query_modality ({batch.query_modality.numel()}) must have the same length")
    logit_scale = dp_replicated(logit_scale, gather)
    query = emb[q_rows]
    keys = torch.cat([emb[p_rows], emb[n_rows]], dim=0)
    key_group = torch.cat([batch.positive_product_id, batch.negative_product_id]).long()
    per_query = contrastive_loss(query, keys, logit_scale, target=torch.arange(num_q, device=emb.device),
                                 query_group=batch.positive_product_id.long(), key_group=key_group, weight=weight,
                                 gather=gather, reduction="none", backend=backend)
    modality = batch.query_modality.to(per_query.device).long()
    counts = torch.bincount(modality, minlength=len(COMPOSITIONS)).tolist()
    sums = torch.zeros(len(COMPOSITIONS), device=per_query.device, dtype=per_query.dtype).index_add(0, modality, per_query)
    losses, present = {}, {}
    for v, name in enumerate(COMPOSITIONS):
        if counts[v]:
            losses[f"inter_{name}"] = sums[v] / counts[v]
            present[f"inter_{name}"] = counts[v]
    return losses, present


def intra_product_loss(emb: torch.Tensor, batch: TripletBatch, logit_scale: torch.Tensor, *, symmetric: bool = True,
                       gather: bool = False, backend: str = "auto") -> torch.Tensor | None:
    """Image views against text views of the same P products: the scalar mean over the P local
    pairs (under gather against the texts/images of every rank); None when P == 0."""
    img_rows, txt_rows = batch.intra_image, batch.intra_text
    if img_rows.numel() == 0:
        return None
    if img_rows.numel() != txt_rows.numel() or batch.intra_product_id.numel() != img_rows.numel():
        raise ValueError(f"TripletBatch: intra_image ({img_rows.numel()}), intra_text ({txt_rows.numel()}) and "
                         f"intra_product_id ({batch.intra_product_id.numel()}) must have the same length")
    pid = batch.intra_product_id.long()
    # reduction="none" + local mean: the data-parallel convention of the module docstring (the op's
    # "mean" under gather is the global mean with sum-over-ranks gradients: 1/world under averaging).
    per_pair = contrastive_loss(emb[img_rows], emb[txt_rows], dp_replicated(logit_scale, gather), query_group=pid,
                                key_group=pid, symmetric=symmetric, gather=gather, reduction="none",
                                backend=backend)
    return per_pair.sum() / img_rows.numel()


def objective_members(batch: TripletBatch, objectives: tuple[str, ...]) -> list[torch.Tensor]:
    """B_m per objective: the encoder sample rows whose routing defines w_m (inter_v: the queries of
    modality v; intra: the image and text views)."""
    out = []
    for name in objectives:
        if name == "intra":
            out.append(torch.cat([batch.intra_image, batch.intra_text]).long())
        else:
            v = COMPOSITIONS.index(name.split("_", 1)[1])
            out.append(batch.query[batch.query_modality == v].long())
    return out
