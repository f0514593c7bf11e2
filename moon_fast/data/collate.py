"""Packing samples of the three compositions into one padding-free batch (``cu_seqlens``).

A sample is a token list plus, for ``i`` and ``mm``, one image: the image becomes
``<|vision_start|>`` + ``t*h*w / merge**2`` x ``<|image_pad|>`` + ``<|vision_end|>`` at the start of the
sample, followed by the text tokens for ``mm`` (as in Qwen2-VL's chat format, image before text).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import IMAGE, MULTIMODAL, TEXT, EncoderBatch, TripletBatch
from .catalog import BadRecordError, Catalog, Product, Triplet
from .images import ImageCache, merge_size_of
from .tokenizer import TextTokenizer

COMP_ID = {"t": TEXT, "i": IMAGE, "mm": MULTIMODAL}


@dataclass
class Sample:
    """One sequence of the packed batch. pixel_values (P, patch_dim) and grid_thw (3,) for i / mm."""

    input_ids: list[int]
    composition: int
    pixel_values: torch.Tensor | None = None
    grid_thw: torch.Tensor | None = None


def pack(samples: list[Sample]) -> EncoderBatch:
    """Concatenates samples into an EncoderBatch (no padding). Raises ValueError on an empty list."""
    if not samples:
        raise ValueError("pack: no samples (an empty batch cannot be encoded)")
    ids, lens, comps, pvs, grids = [], [], [], [], []
    for s in samples:
        if not s.input_ids:
            raise ValueError("pack: a sample has no tokens")
        ids.extend(s.input_ids)
        lens.append(len(s.input_ids))
        comps.append(s.composition)
        if s.pixel_values is not None:
            pvs.append(s.pixel_values)
            grids.append(s.grid_thw)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return EncoderBatch(
        input_ids=torch.tensor(ids, dtype=torch.long), cu_seqlens=cu, max_seqlen=max(lens),
        composition=torch.tensor(comps, dtype=torch.long),
        pixel_values=torch.cat(pvs).float() if pvs else None,
        image_grid_thw=torch.stack(grids).long() if grids else None,
    )


class SampleBuilder:
    """Turns texts and image paths into Samples with a tokenizer and an image cache."""

    def __init__(self, tokenizer: TextTokenizer, images: ImageCache, max_text_tokens: int = 48):
        self.tok = tokenizer
        self.images = images
        self.merge = merge_size_of(images.processor)
        self.max_text_tokens = max_text_tokens

    def text_ids(self, text: str, where: str) -> list[int]:
        ids = self.tok.encode(text or "")[: self.max_text_tokens]
        if not ids:
            raise BadRecordError(f"{where}: text {text!r} has no tokens", cause="empty text")
        return ids

    def image_ids(self, grid_thw: torch.Tensor) -> list[int]:
        n = int(grid_thw.prod()) // (self.merge * self.merge)
        return [self.tok.vision_start_id] + [self.tok.image_pad_id] * n + [self.tok.vision_end_id]

    def sample(self, composition: str, text: str | None, image: str | None, where: str) -> Sample:
        if composition == "t":
            return Sample(self.text_ids(text, where), TEXT)
        pv, thw = self.images.get(image, where)
        ids = self.image_ids(thw)
        if composition == "mm":
            ids = ids + self.text_ids(text, where)
        return Sample(ids, COMP_ID[composition], pv, thw)

    def product(self, p: Product, composition: str = "mm", where: str = "") -> Sample:
        return self.sample(composition, p.title, p.images[0], where or f"product {p.product_id}")


@dataclass
class PreparedTriplet:
    """A triplet with every sample built (so a bad image is found before the batch is assembled)."""

    query: Sample
    positive: Sample
    negative: Sample
    intra_image: Sample
    intra_text: Sample
    positive_index: int
    negative_index: int
    corrupted: bool


def prepare_triplet(t: Triplet, catalog: Catalog, builder: SampleBuilder) -> PreparedTriplet:
    """Builds all samples of a triplet; raises BadRecordError naming the triplet on any failure."""
    pos = catalog.get(t.positive_id, t.where)
    neg = catalog.get(t.negative_id, t.where)
    where_p = f"{t.where} (positive {pos.product_id})"
    return PreparedTriplet(
        query=builder.sample(t.composition, t.query_text, t.query_image, f"{t.where} (query)"),
        positive=builder.product(pos, "mm", where_p),
        negative=builder.product(neg, "mm", f"{t.where} (negative {neg.product_id})"),
        intra_image=builder.product(pos, "i", where_p),
        intra_text=builder.product(pos, "t", where_p),
        positive_index=pos.index, negative_index=neg.index, corrupted=t.corrupted,
    )


def collate_triplets(items: list[PreparedTriplet]) -> TripletBatch:
    """Packs Q prepared triplets into one TripletBatch. Row order in the encoder batch: queries,
    positives, negatives, intra image views, intra text views (Q rows each)."""
    q = len(items)
    if q == 0:
        raise ValueError("collate_triplets: no triplets")
    samples = ([it.query for it in items] + [it.positive for it in items] + [it.negative for it in items]
               + [it.intra_image for it in items] + [it.intra_text for it in items])
    ar = torch.arange(q)
    pos_id = torch.tensor([it.positive_index for it in items], dtype=torch.long)
    return TripletBatch(
        encoder=pack(samples), query=ar, query_modality=torch.tensor([it.query.composition for it in items]),
        positive=ar + q, negative=ar + 2 * q, positive_product_id=pos_id,
        negative_product_id=torch.tensor([it.negative_index for it in items], dtype=torch.long),
        intra_image=ar + 3 * q, intra_text=ar + 4 * q, intra_product_id=pos_id.clone(),
        corrupted=torch.tensor([it.corrupted for it in items], dtype=torch.bool),
    )
