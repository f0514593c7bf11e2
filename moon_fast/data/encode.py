"""Embedding MBE-format records with a model (used by evaluation and by consistency filtering)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .catalog import BadRecordCounter, BadRecordError, iter_manifest, resolve
from .collate import COMP_ID, Sample, pack
from .images import ImageCache, load_image, merge_size_of


def load_records(path: str | os.PathLike) -> list[dict]:
    """MBE-format records from a JSON list or JSONL file, with image paths made absolute (relative
    paths are relative to the file's directory)."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecordError(f"{p}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8",
                             cause="not UTF-8") from e
    if p.suffix == ".json" or text.lstrip().startswith("["):
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{p}:{e.lineno}: malformed JSON ({e.msg})", cause="malformed JSON") from e
    else:
        recs = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadRecordError(f"{p}:{i + 1}: malformed JSON ({e.msg})", cause="malformed JSON") from e
    if not isinstance(recs, list):
        raise BadRecordError(f"{p}: expected a JSON list of records or one record per line, got a "
                             f"{type(recs).__name__}", cause="not a list")
    for r in recs:
        if not isinstance(r, dict):
            continue  # check_record_fields says which record and why
        for k in ("image", "query_image"):
            if isinstance(r.get(k), str):
                r[k] = resolve(p.parent, r[k])
        if isinstance(r.get("images"), list):  # the catalog's form: the first one is the product's image
            r["images"] = [resolve(p.parent, x) if isinstance(x, str) else x for x in r["images"]]
    return recs


def check_records(path: str | os.PathLike, bad: BadRecordCounter) -> int:
    """Checks an MBE-format file record by record, as evaluation will read it: each record parses, has a
    title, an image and a category, its other fields have the right types, and its images load. Bad
    records are counted in ``bad`` (named by file:line); returns the number of good ones."""
    p = Path(path)
    good = 0
    for i, rec in iter_manifest(p):
        try:
            if isinstance(rec, Exception):
                raise rec
            _check_record(rec, p, f"{p}:{i + 1}")
        except BadRecordError as e:
            bad.skip(e)
            continue
        bad.ok()
        good += 1
    return good


def _check_record(rec, p: Path, where: str) -> None:
    image = check_record_fields(rec, where)
    where = f"{where} (product {rec.get('product_id', '?')})"
    for key, img in (("image", image), ("query_image", rec.get("query_image"))):
        if img:
            load_image(resolve(p.parent, img), f"{where} ({key})")


def check_record_fields(rec, where: str) -> str:
    """Raises BadRecordError unless ``rec`` is an MBE record: an object with a title, an image and a
    category, ``attributes`` an object, query fields strings. Images are not opened. Returns its image."""
    if not isinstance(rec, dict):
        raise BadRecordError(f"{where}: expected an object, got {type(rec).__name__}", cause="not an object")
    where = f"{where} (product {rec.get('product_id', '?')})"
    images = rec.get("images")
    image = rec.get("image") or (images[0] if isinstance(images, list) and images else None)
    missing = [key for key, value in (("title", rec.get("title")), ("image", image), ("category", rec.get("category")))
               if not (isinstance(value, str) and value.strip())]
    if missing:
        raise BadRecordError(f"{where}: missing field {', '.join(repr(k) for k in missing)} (MBE records need "
                             "title, image and category)", cause="missing field")
    if not isinstance(rec.get("attributes") or {}, dict):
        raise BadRecordError(f"{where}: 'attributes' should be an object of name: value", cause="invalid field")
    for key in ("query_text", "query_image"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise BadRecordError(f"{where}: field '{key}' should be a string", cause="invalid field")
    return image


def _record_fields(r: dict, side: str) -> tuple[str | None, str | None]:
    if side == "query":
        return r.get("query_text") or r.get("title"), r.get("query_image") or r.get("image")
    if side != "product":
        raise ValueError(f"side={side!r}: expected 'product' or 'query'")
    img = r.get("image")
    if img is None and r.get("images"):
        img = r["images"][0]
    return r.get("title"), img


@torch.no_grad()
def encode_records(model, records: list[dict], tokenizer, image_processor, composition: str = "mm",
                   batch_size: int = 64, *, side: str = "product", root: str | os.PathLike | None = None,
                   max_text_tokens: int = 48, device: torch.device | str | None = None) -> torch.Tensor:
    """Embeddings (n, D) of ``records`` in ``composition`` t / i / mm.

    side="product" embeds ``title`` / ``image``; side="query" embeds ``query_text`` / ``query_image``
    (falling back to title / image). Relative image paths resolve against ``root`` (default: as given).
    ``tokenizer``: a TextTokenizer (see load_tokenizer) or a path to one.
    """
    from .tokenizer import TextTokenizer, load_tokenizer

    if composition not in COMP_ID:
        raise ValueError(f"composition={composition!r}: expected one of t, i, mm")
    if not isinstance(tokenizer, TextTokenizer):
        tokenizer = load_tokenizer(tokenizer)
    if not records:
        raise ValueError("encode_records: no records")
    cache = ImageCache(image_processor, max_bytes=0)
    merge = merge_size_of(image_processor)
    was_training = model.training
    model.eval()
    if device is None:
        device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = []
    try:
        for start in range(0, len(records), batch_size):
            samples = []
            for j, r in enumerate(records[start:start + batch_size], start):
                where = f"record {j} (product {r.get('product_id', '?')})"
                text, image = _record_fields(r, side)
                ids: list[int] = []
                pv = thw = None
                if composition in ("i", "mm"):
                    if not image:
                        raise BadRecordError(f"{where}: no image for composition {composition}",
                                             cause="missing field")
                    pv, thw = cache.get(resolve(Path(root), image) if root else image, where)
                    n = int(thw.prod()) // (merge * merge)
                    ids = [tokenizer.vision_start_id] + [tokenizer.image_pad_id] * n + [tokenizer.vision_end_id]
                if composition in ("t", "mm"):
                    t = tokenizer.encode(text or "")[:max_text_tokens]
                    if not t:
                        raise BadRecordError(f"{where}: no text for composition {composition}",
                                             cause="empty text")
                    ids = ids + t
                samples.append(Sample(ids, COMP_ID[composition], pv, thw))
            batch = pack(samples).to(device, dtype=dtype if dtype.is_floating_point else None)
            out.append(model.encode(batch).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
