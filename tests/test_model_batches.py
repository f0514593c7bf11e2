"""Synthetic packed batches for the model tests (random tokens and pixels; no data pipeline)."""

from __future__ import annotations

import torch

from moon_fast.data.batch import (
    IMAGE,
    IMAGE_PAD_ID,
    MULTIMODAL,
    TEXT,
    VISION_END_ID,
    VISION_START_ID,
    EncoderBatch,
    TripletBatch,
)

PIXEL_DIM = 3 * 2 * 14 * 14  # channels * temporal_patch * patch * patch
FIRST_TEXT_ID = 5


def sample_tokens(composition: int, n_text: int, grid: tuple[int, int, int], gen: torch.Generator,
                  vocab: int = 4096, merge: int = 2) -> torch.Tensor:
    text = torch.randint(FIRST_TEXT_ID, vocab, (n_text,), generator=gen)
    if composition == TEXT:
        return text
    n_img = grid[0] * grid[1] * grid[2] // (merge * merge)
    image = torch.tensor([VISION_START_ID] + [IMAGE_PAD_ID] * n_img + [VISION_END_ID])
    return image if composition == IMAGE else torch.cat([image, text])


def make_encoder_batch(specs, *, gen: torch.Generator | None = None, vocab: int = 4096,
                       grid: tuple[int, int, int] = (1, 8, 8), grids=None) -> EncoderBatch:
    """specs: [(composition, n_text_tokens)]; grids: optional per-image grids (in image order)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    ids, lengths, comps, thw = [], [], [], []
    img_i = 0
    for comp, n_text in specs:
        g = grid
        if comp != TEXT:
            g = tuple(grids[img_i]) if grids is not None else grid
            thw.append(g)
            img_i += 1
        t = sample_tokens(comp, n_text, g, gen, vocab)
        ids.append(t)
        lengths.append(t.numel())
        comps.append(comp)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    pixel_values = image_grid_thw = None
    if thw:
        image_grid_thw = torch.tensor(thw, dtype=torch.long)
        n_patches = int(image_grid_thw.prod(-1).sum())
        pixel_values = torch.randn(n_patches, PIXEL_DIM, generator=gen)
    return EncoderBatch(input_ids=torch.cat(ids), cu_seqlens=cu, max_seqlen=max(lengths),
                        composition=torch.tensor(comps), pixel_values=pixel_values, image_grid_thw=image_grid_thw)


def make_triplet_batch(n_triplets: int = 6, n_intra: int = 3, *, seed: int = 0, n_text: int = 6,
                       duplicate_product: bool = True, vocab: int = 4096, modality_offset: int = 0,
                       id_offset: int = 0) -> TripletBatch:
    """Queries cycle through t / i / mm; positives and negatives are multimodal products; the last
    triplet reuses the first one's positive product (same id: must not be its negative)."""
    gen = torch.Generator().manual_seed(seed)
    specs = []
    q_rows, q_mod, p_rows, n_rows, pid, nid = [], [], [], [], [], []
    for j in range(n_triplets):
        mod = (TEXT, IMAGE, MULTIMODAL)[(j + modality_offset) % 3]
        q_rows.append(len(specs))
        specs.append((mod, n_text + j % 3))
        q_mod.append(mod)
        p_rows.append(len(specs))
        specs.append((MULTIMODAL, n_text + 1))
        n_rows.append(len(specs))
        specs.append((MULTIMODAL, n_text + 2))
        pid.append(id_offset + 100 + j)
        nid.append(id_offset + 200 + j)
    if duplicate_product and n_triplets > 1:
        pid[-1] = pid[0]
    ii, it, iid = [], [], []
    for j in range(n_intra):
        ii.append(len(specs))
        specs.append((IMAGE, 0))
        it.append(len(specs))
        specs.append((TEXT, n_text + 3))
        iid.append(id_offset + 300 + j)
    enc = make_encoder_batch(specs, gen=gen, vocab=vocab)
    corrupted = torch.zeros(n_triplets, dtype=torch.bool)
    corrupted[::4] = True
    L = torch.tensor
    return TripletBatch(encoder=enc, query=L(q_rows), query_modality=L(q_mod), positive=L(p_rows),
                        negative=L(n_rows), positive_product_id=L(pid), negative_product_id=L(nid),
                        intra_image=L(ii, dtype=torch.long), intra_text=L(it, dtype=torch.long),
                        intra_product_id=L(iid, dtype=torch.long), corrupted=corrupted)


def concat_triplet_batches(batches) -> TripletBatch:
    """The batches' samples in one packed batch (in order; row indices shifted): what a single
    process holds when data-parallel ranks hold ``batches``."""
    encs = [b.encoder for b in batches]
    offsets = [0]
    for e in encs[:-1]:
        offsets.append(offsets[-1] + e.num_samples)
    lengths = torch.cat([e.cu_seqlens[1:] - e.cu_seqlens[:-1] for e in encs])
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    pix = [e.pixel_values for e in encs if e.pixel_values is not None]
    thw = [e.image_grid_thw for e in encs if e.image_grid_thw is not None]
    enc = EncoderBatch(input_ids=torch.cat([e.input_ids for e in encs]), cu_seqlens=cu,
                       max_seqlen=max(e.max_seqlen for e in encs), composition=torch.cat([e.composition for e in encs]),
                       pixel_values=torch.cat(pix) if pix else None, image_grid_thw=torch.cat(thw) if thw else None)

    def rows(name):
        return torch.cat([getattr(b, name) + o for b, o in zip(batches, offsets)])

    def cat(name):
        return torch.cat([getattr(b, name) for b in batches])

    return TripletBatch(encoder=enc, query=rows("query"), query_modality=cat("query_modality"),
                        positive=rows("positive"), negative=rows("negative"),
                        positive_product_id=cat("positive_product_id"), negative_product_id=cat("negative_product_id"),
                        intra_image=rows("intra_image"), intra_text=rows("intra_text"),
                        intra_product_id=cat("intra_product_id"),
                        corrupted=cat("corrupted") if all(b.corrupted is not None for b in batches) else None)
