"""Image loading and the backbone's preprocessing (transformers' Qwen2-VL image processor), with a
bounded cache of preprocessed patches so each image file is decoded once per run."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .catalog import BadRecordError


def default_image_processor(patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
                            image_size: int = 112):
    """A Qwen2VLImageProcessor that keeps ``image_size`` square images at their size (used when the
    model package does not provide ``image_processor_for``)."""
    from transformers import Qwen2VLImageProcessor

    px = image_size * image_size
    return Qwen2VLImageProcessor(patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                                 merge_size=merge_size, min_pixels=px, max_pixels=px)


def image_processor_for(model_or_config=None, image_size: int = 112):
    """The model's processor (``moon_fast.model.image_processor_for``) when available, else ours."""
    if model_or_config is not None:
        try:
            from moon_fast.model import image_processor_for as model_ipf
        except ImportError:
            model_ipf = None
        if model_ipf is not None:
            return model_ipf(model_or_config)
    return default_image_processor(image_size=image_size)


def merge_size_of(processor) -> int:
    return int(getattr(processor, "merge_size", 2))


def load_image(path: str, where: str = ""):
    """An RGB PIL image; a missing or undecodable file raises BadRecordError naming the record."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise BadRecordError(f"{where}: image file not found: {path}", cause="missing image") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadRecordError(f"{where}: corrupt image {path} ({type(e).__name__}: {e})",
                             cause="corrupt image") from e


class ImageCache:
    """path -> (pixel rows (P, C*T*p*p), grid_thw (3,)) through ``processor``; keeps up to
    ``max_bytes`` of results. Rows are returned in ``store_dtype`` (float16 halves the footprint and the
    bytes the collator copies; ``pack`` converts the whole batch to float32 in one go)."""

    def __init__(self, processor, max_bytes: int = 512 << 20, store_dtype=torch.float16):
        self.processor = processor
        self.max_bytes = max_bytes
        self.store_dtype = store_dtype
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def process(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def get(self, path: str, where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None:
                self._cache.move_to_end(path)
                return hit

        img = load_image(path, where)
        try:
            pv, thw = self.process([img])
        except Exception as e:  # the processor rejects odd images (e.g. 1x1): a bad record, not a crash
            raise BadRecordError(f"{where}: image {path} could not be preprocessed ({e})",
                                 cause="unprocessable image") from e
        entry = (pv.to(self.store_dtype), thw[0])
        with self._lock:
            if self.max_bytes > 0:
                self._cache[path] = entry
                self._bytes += entry[0].numel() * entry[0].element_size()
                while self._bytes > self.max_bytes and self._cache:
                    _, old = self._cache.popitem(last=False)
                    self._bytes -= old[0].numel() * old[0].element_size()
        return entry
