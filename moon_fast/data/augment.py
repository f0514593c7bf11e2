"""Image-text co-augmentation of a catalog's TRAIN products (held-out products are never touched).

1. Text enrichment: salient entities E from title and description, then a richer title
   T+ = rewrite(T, E). The rewriter is a generative model loaded from a local directory
   (``--text-model DIR``, any transformers causal LM) or, for the synthetic catalog, the
   ``AttributeEnricher``: a template rewrite from the product's attributes, named as such in the
   output so nobody mistakes it for a model.
2. Visual expansion: new views of the main image varying background, viewpoint and lighting. Without
   an image-editing model these are classical image operations (``ClassicalExpander``: rotation and
   perspective-like squeeze, brightness / colour temperature, background replacement of the
   border-connected background).
3. Consistency filtering: each new (image, text) pair is embedded with the model
   (``--model DIR``, a saved MoonModel); pairs whose image-text cosine falls below
   ``--min-similarity`` or below the original pair's similarity minus ``--max-drop`` are dropped.
   Without a model, filtering is skipped and the output says so.

The output is a new catalog directory: products with enriched titles and extra images, the original
triplets (less those that do not parse or name a product the source lacks) plus image-query triplets on
the new views, and the original held-out file copied unchanged.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from .catalog import (
    BadRecordCounter,
    BadRecordError,
    Catalog,
    Product,
    iter_manifest,
    manifest_files,
    parse_triplet,
)
from .images import load_image

STOP = {"a", "an", "the", "in", "of", "with", "and", "by", "from", "it", "is", "for", "to", "as", "its", "comes",
        "range", "finish", "surface", "pattern"}


def extract_entities(title: str, description: str = "", attributes: dict | None = None) -> list[str]:
    """Salient entities: attribute values named in the text first, then content words of the title and
    description in order of appearance (deduplicated)."""
    text = f"{title} {description}".lower()
    ents: list[str] = []
    for v in (attributes or {}).values():
        v = str(v).lower()
        if v and v in text and v not in ents:
            ents.append(v)
    for w in re.findall(r"[a-z][a-z&\-]+", text):
        if w not in STOP and w not in ents and len(w) > 2:
            ents.append(w)
    return ents


class AttributeEnricher:
    """The synthetic catalog's text enricher: a deterministic template rewrite from attributes and
    entities (NOT a generative model)."""

    name = "attribute-enricher (template rewrite from product attributes; no generative model)"

    def __call__(self, p: Product, entities: list[str]) -> str:
        a = p.attributes
        leaf = p.category.split(" > ")[-1] if p.category else "product"
        parts = [p.title]
        desc = [a[k] for k in ("size", "colour", "pattern", "material") if k in a]
        if desc:
            parts.append(f"a {' '.join(desc)} {leaf}")
        if p.category:
            parts.append(f"category {p.category.replace(' > ', ' / ')}")
        extra = [e for e in entities if e not in " ".join(parts).lower()][:3]
        if extra:
            parts.append(", ".join(extra))
        return "; ".join(parts)


class GenerativeEnricher:
    """T+ from a local transformers causal LM under a fixed prompt (greedy, short)."""

    PROMPT = ("Rewrite this e-commerce product title so that it names the product's key attributes.\n"
              "Title: {title}\nKey attributes: {entities}\nRewritten title:")

    def __init__(self, model_dir: str, max_new_tokens: int = 32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
        self.max_new_tokens = max_new_tokens
        self.name = f"generative rewrite by {model_dir}"

    def __call__(self, p: Product, entities: list[str]) -> str:
        import torch

        prompt = self.PROMPT.format(title=p.title, entities=", ".join(entities[:8]))
        ids = self.tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, do_sample=False)
        text = self.tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        text = text.strip().split("\n")[0].strip()
        return text or p.title


@dataclass
class ClassicalExpander:
    """New views by classical image operations (no editing model)."""

    name: str = "classical image operations (background replacement, rotation/squeeze, lighting)"
    backgrounds: tuple = ((244, 228, 205), (205, 222, 240), (170, 205, 150), (70, 70, 80), (225, 210, 170))

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        img = img.convert("RGB")
        w, h = img.size
        # Background: pixels close to the corner colour and connected to the border become a new colour.
        bg = img.getpixel((0, 0))
        mask = Image.new("L", img.size, 0)
        px, mk = img.load(), mask.load()
        stack = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]
        seen = set()
        while stack:
            x, y = stack.pop()
            if (x, y) in seen or not (0 <= x < w and 0 <= y < h):
                continue
            seen.add((x, y))
            if sum(abs(a - b) for a, b in zip(px[x, y], bg)) > 30:
                continue
            mk[x, y] = 255
            stack += [(x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)]
        new_bg = Image.new("RGB", img.size, rng.choice(self.backgrounds))
        img = Image.composite(new_bg, img, mask)
        # Viewpoint: rotation and a horizontal squeeze, refilled with the new background.
        fill = new_bg.getpixel((0, 0))
        img = img.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC, fillcolor=fill)
        sq = rng.uniform(0.75, 1.0)
        small = img.resize((max(1, int(w * sq)), h), Image.BICUBIC)
        canvas = Image.new("RGB", img.size, fill)
        canvas.paste(small, ((w - small.size[0]) // 2, 0))
        img = canvas
        # Lighting: brightness and a warm / cool cast.
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.2))
        r, g, b = img.split()
        cast = rng.uniform(-12, 12)
        r = r.point(lambda v: max(0, min(255, int(v + cast))))
        b = b.point(lambda v: max(0, min(255, int(v - cast))))
        return ImageOps.autocontrast(Image.merge("RGB", (r, g, b)), cutoff=0) if rng.random() < 0.2 else \
            Image.merge("RGB", (r, g, b))


def augment_catalog(source: str, output: str, *, views: int = 1, seed: int = 0, text_model: str | None = None,
                    model: str | None = None, min_similarity: float = 0.0, max_drop: float = 0.2,
                    enrich_text: bool = True, max_bad_fraction: float = 0.05, verbose: bool = True) -> dict:
    """Writes an augmented copy of catalog ``source`` into ``output``; returns a report dict.

    Bad records of the source (a product that does not parse, a main image that does not load, a triplet
    naming a product the catalog lacks) are skipped and counted as in training: more than
    ``max_bad_fraction`` of them stops with TooManyBadRecords; the report lists them."""
    src, out = Path(source), Path(output)
    if src.resolve() == out.resolve():
        raise ValueError("augment: --output must differ from the source catalog")
    if views < 0:
        raise ValueError(f"views={views}: need 0 or more new views per product")
    if not math.isfinite(max_drop) or max_drop < 0:
        raise ValueError(f"max_drop={max_drop}: must be a similarity drop >= 0 (e.g. 0.2)")
    if not -1 <= min_similarity <= 1:  # also refuses nan
        raise ValueError(f"min_similarity={min_similarity}: must be a cosine similarity in [-1, 1]")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction={max_bad_fraction}: must be a fraction in [0, 1]")
    cat = Catalog(src, bad=BadRecordCounter(max_fraction=max_bad_fraction, knob="--max-bad-fraction"))
    triplets = list(_usable_triplets(src, cat))  # before writing anything: too many bad ones stop here
    rng = random.Random(seed)
    (out / "images_aug").mkdir(parents=True, exist_ok=True)
    enricher = None
    if enrich_text:
        enricher = GenerativeEnricher(text_model) if text_model else AttributeEnricher()
    expander = ClassicalExpander()

    scorer = None
    if model:
        scorer = _Scorer(model)
    report = {"source": str(src), "text_enricher": enricher.name if enricher else None, "visual_expander":
              expander.name, "consistency_filter": f"MoonModel {model}" if model else "skipped (no --model given)",
              "products": 0, "enriched": 0, "views_made": 0, "views_kept": 0}
    products, new_triplets = [], []
    for p in cat.products:
        rec = {"product_id": p.product_id, "title": p.title, "description": p.description,
               "images": [str(Path(x).relative_to(src)) if Path(x).is_relative_to(src) else x for x in p.images],
               "category": p.category, "attributes": p.attributes, "split": p.split}
        if p.split == "train":  # evaluation data is never augmented
            try:
                base = load_image(p.images[0], p.where)
            except BadRecordError as e:  # kept unchanged (training skips it too); nothing to augment
                cat.bad.skip(e)
                products.append(rec)
                continue
            cat.bad.ok()
            report["products"] += 1
            if enricher:
                rec["title_original"] = p.title
                rec["title"] = enricher(p, extract_entities(p.title, p.description, p.attributes))
                report["enriched"] += 1
            cands = []
            for v in range(views):
                img = expander(base, rng)
                name = f"images_aug/{p.product_id}_aug{v}.png"
                cands.append((img, name))
            report["views_made"] += len(cands)
            if scorer is not None:
                ref = scorer.similarity([base], [rec["title"]])[0]
                sims = scorer.similarity([c[0] for c in cands], [rec["title"]] * len(cands))
                cands = [c for c, s in zip(cands, sims) if s >= min_similarity and s >= ref - max_drop]
            for img, name in cands:
                img.save(out / name, compress_level=1)
                rec["images"].append(name)
                new_triplets.append({"composition": "i", "query_image": name, "positive_id": p.product_id,
                                     "negative_id": _some_negative(cat, p, rng), "corrupted": False,
                                     "augmented": True})
            report["views_kept"] += len(cands)
        products.append(rec)

    # Images of the source are linked (or copied) so relative paths keep working.
    for sub in ("images",):
        if (src / sub).is_dir() and not (out / sub).exists():
            try:
                (out / sub).symlink_to((src / sub).resolve(), target_is_directory=True)
            except OSError:
                shutil.copytree(src / sub, out / sub)
    with open(out / "products.jsonl", "w") as f:
        for r in products:
            f.write(json.dumps(r) + "\n")
    with open(out / "triplets.jsonl", "w") as f:
        for rec in triplets:
            f.write(json.dumps(rec) + "\n")
        for t in new_triplets:
            f.write(json.dumps(t) + "\n")
    report["bad_records"] = cat.bad.state_dict()
    for name in ("heldout.jsonl", "tokenizer.json", "catalog.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    with open(out / "augment.json", "w") as f:
        json.dump(report, f, indent=1)
    if verbose:
        print(json.dumps(report, indent=1))
    return report


def _usable_triplets(src: Path, cat: Catalog):
    """The source's triplet records (as written) that parse and name products of ``cat``: a triplet of a
    product that did not load (a truncated or bad products file) would be a bad record in the output."""
    for tf in manifest_files(src, "triplets"):
        for i, rec in iter_manifest(tf):
            try:
                if isinstance(rec, Exception):
                    raise rec
                t = parse_triplet(rec, src, f"{tf}:{i + 1}")
                for pid in (t.positive_id, t.negative_id):
                    cat.get(pid, t.where)
            except BadRecordError as e:
                cat.bad.skip(e)
                continue
            cat.bad.ok()
            yield rec


def _some_negative(cat: Catalog, p: Product, rng: random.Random) -> str:
    same = [q for q in cat.products if q.category == p.category and q.product_id != p.product_id
            and q.split == "train"]
    pool = same or [q for q in cat.products if q.product_id != p.product_id and q.split == "train"]
    return rng.choice(pool).product_id


class _Scorer:
    """Image-text cosine with a saved MoonModel (its own tokenizer and image processor)."""

    def __init__(self, model_dir: str):
        from moon_fast.model import MoonModel

        from .images import image_processor_for
        from .tokenizer import load_tokenizer

        self.model = MoonModel.from_pretrained(model_dir).eval()
        self.tok = load_tokenizer(model_dir)
        self.proc = image_processor_for(self.model)

    def similarity(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        import tempfile

        from .encode import encode_records

        with tempfile.TemporaryDirectory() as d:
            recs = []
            for i, (im, t) in enumerate(zip(images, texts)):
                path = f"{d}/{i}.png"
                im.save(path)
                recs.append({"title": t, "image": path})
            ei = encode_records(self.model, recs, self.tok, self.proc, "i")
            et = encode_records(self.model, recs, self.tok, self.proc, "t")
        return (ei * et).sum(-1).tolist()
