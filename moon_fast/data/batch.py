"""The packed batch that the data pipeline produces and the model consumes.

Samples of the three compositions (text only ``t``, image only ``i``, image+text ``mm``) are packed
into one token stream without padding; ``cu_seqlens`` gives the sample boundaries. An image is
represented in the stream, as in Qwen2-VL, by ``<|vision_start|>``, then one ``<|image_pad|>`` per
merged vision patch (``t * h * w / spatial_merge_size**2`` of them), then ``<|vision_end|>``; its pixels
are rows of ``pixel_values`` in the layout of transformers' Qwen2-VL image processor.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

COMPOSITIONS = ("t", "i", "mm")  # index = composition id
TEXT, IMAGE, MULTIMODAL = 0, 1, 2

# Special tokens of the synthetic-catalog tokenizer, with fixed ids so the tiny model presets can name
# them. A real checkpoint's tokenizer brings its own ids (read from its config).
SPECIAL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
PAD_ID, EOS_ID, VISION_START_ID, VISION_END_ID, IMAGE_PAD_ID = range(len(SPECIAL_TOKENS))


@dataclass
class EncoderBatch:
    """One packed forward of the backbone.

    input_ids:      (L,) long, all samples concatenated, no padding.
    cu_seqlens:     (n + 1,) int32, cumulative sample lengths; sample j is input_ids[cu[j]:cu[j+1]].
    max_seqlen:     int, the longest sample.
    composition:    (n,) long, TEXT / IMAGE / MULTIMODAL per sample.
    pixel_values:   (P, C * temporal_patch * patch * patch) float, the patches of all images in sample
                    order, or None when no sample has an image.
    image_grid_thw: (n_images, 3) long, (t, h, w) patch grid per image in sample order, or None.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    composition: torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> EncoderBatch:
        """Moves tensors to ``device``; ``dtype`` applies to pixel_values only."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, dtype=dtype if (f.name == "pixel_values" and dtype) else None, non_blocking=True)
            out[f.name] = v
        return EncoderBatch(**out)


@dataclass
class TripletBatch:
    """A training batch of (query, positive product, hard-negative product) triplets, plus the
    image-only and text-only views of products for intra-product alignment, all encoded in ONE
    packed forward (``encoder``). Index tensors point at rows (samples) of ``encoder``.

    query:               (Q,) long, rows of the queries.
    query_modality:      (Q,) long, TEXT / IMAGE / MULTIMODAL of each query.
    positive:            (Q,) long, rows of the positive products (always multimodal).
    negative:            (Q,) long, rows of the hard-negative products (multimodal).
    positive_product_id: (Q,) long, catalog ids (same product twice in a batch is not a negative).
    negative_product_id: (Q,) long.
    intra_image:         (P,) long, rows of image-only views of P products.
    intra_text:          (P,) long, rows of text-only views of the same P products.
    intra_product_id:    (P,) long.
    corrupted:           (Q,) bool, synthetic ground truth: triplet deliberately mismatched (for DSF
                         statistics only; never used by the loss).
    """

    encoder: EncoderBatch
    query: torch.Tensor
    query_modality: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    positive_product_id: torch.Tensor
    negative_product_id: torch.Tensor
    intra_image: torch.Tensor
    intra_text: torch.Tensor
    intra_product_id: torch.Tensor
    corrupted: torch.Tensor | None = None

    def check(self) -> None:
        """ValueError naming the field when an index tensor is not integer, points outside the encoder's
        samples, or disagrees with what it indexes (a query's modality and its sample's composition; the
        (Q,) and (P,) lengths). A mislabelled batch otherwise trains the wrong objective silently, or fails
        with a bare IndexError deep inside the loss."""
        n = self.encoder.composition.shape[0]
        q = self.query.shape[0] if self.query.dim() == 1 else -1
        p = self.intra_image.shape[0] if self.intra_image.dim() == 1 else -1
        lengths = {"query": q, "query_modality": q, "positive": q, "negative": q, "positive_product_id": q,
                   "negative_product_id": q, "intra_image": p, "intra_text": p, "intra_product_id": p}
        if self.corrupted is not None:
            lengths["corrupted"] = q
        for name, want in lengths.items():
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != want or t.is_floating_point() or t.is_complex():
                raise ValueError(f"TripletBatch.{name} must be a 1-D integer tensor of length "
                                 f"{'Q' if want == q else 'P'} = {want}, got {t.dtype} of shape {tuple(t.shape)}")
        # One host synchronisation for all the value checks (a training step makes this call on the GPU);
        # the failing one is looked for only when something failed.
        rows = ("query", "positive", "negative", "intra_image", "intra_text")
        in_range = [((getattr(self, name) >= 0) & (getattr(self, name) < n)).all() for name in rows]
        query = self.query.clamp(0, max(n - 1, 0))  # indexing with a bad row would raise before the message
        modality = (self.query_modality == self.encoder.composition[query]).all() if q and n else None
        checks = in_range + ([modality] if modality is not None else [])
        if bool(torch.stack(checks).all()):
            return
        for name, ok in zip(rows, in_range):
            if not bool(ok):
                raise ValueError(f"TripletBatch.{name} has rows outside the encoder's {n} samples")
        raise ValueError("TripletBatch.query_modality disagrees with the composition of the query samples "
                         "(encoder.composition[query]): the objectives would be weighted for the wrong modality")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TripletBatch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, EncoderBatch):
                v = v.to(device, dtype)
            elif isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            out[f.name] = v
        return TripletBatch(**out)
