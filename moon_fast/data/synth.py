"""The embedded default catalog: procedurally generated products whose images and texts follow the
same attributes (category/shape, colour, pattern, material, size; brand is text-only), so a model can
learn real image-text alignment from it.

``synthesize(output, products=N, seed=S)`` writes, deterministically for a seed:

* ``products.jsonl``  one product per line (see FORMAT.md), ``split`` "train" or "heldout";
* ``triplets.jsonl``  training triplets of train products only (query text / image / both, positive,
  hard negative, and ``corrupted`` for the deliberately mismatched ones);
* ``heldout.jsonl``   held-out products in the MBE evaluation format (never augmented, never trained on);
* ``images/``         PNG renders: view 0 is the standardised main image, views 1.. are other shots
  (background, viewpoint, lighting) used as image queries;
* ``tokenizer.json``  a WordPiece tokenizer trained on the catalog's text;
* ``catalog.json``    what was generated, with which knobs.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .render import COLOURS, MATERIALS, PATTERNS, SIZES, View, render

# category path -> shape drawn
CATEGORIES = {
    "sports > ball": "circle", "home > cushion": "square", "home > clock": "ring",
    "toys > kite": "diamond", "outdoor > tent": "triangle", "accessories > badge": "star",
    "gifts > card": "heart", "kitchen > plate": "ellipse", "stationery > notebook": "tall-rectangle",
    "electronics > speaker": "hexagon", "apparel > t-shirt": "t-shape", "home > vase": "vase",
}
BRANDS = ("acme", "nordvik", "lumo", "kestrel", "orbita", "paloma", "zenko", "bricks&co", "velta", "moda")
LEAF_SYNONYMS = {
    "ball": ["ball", "sphere"], "cushion": ["cushion", "pillow"], "clock": ["clock", "wall clock"],
    "kite": ["kite"], "tent": ["tent", "camping tent"], "badge": ["badge", "pin"], "card": ["card", "greeting card"],
    "plate": ["plate", "dish"], "notebook": ["notebook", "journal"], "speaker": ["speaker", "loudspeaker"],
    "t-shirt": ["t-shirt", "tee"], "vase": ["vase", "flower vase"],
}
PATTERN_WORDS = {"solid": ["plain", "solid"], "striped": ["striped", "stripy"], "dotted": ["dotted", "polka-dot"],
                 "checked": ["checked", "checkered"], "wavy": ["wavy", "wave-pattern"]}
COLOUR_WORDS = {c: [c] for c in COLOURS} | {"navy": ["navy", "dark blue"], "teal": ["teal", "blue-green"],
                                            "purple": ["purple", "violet"]}
ATTRIBUTE_NAMES = ("colour", "shape", "pattern", "material", "size", "brand")


def leaf(category: str) -> str:
    return category.split(" > ")[-1]


def _product_attrs(rng: random.Random) -> tuple[str, dict]:
    category = rng.choice(sorted(CATEGORIES))
    attrs = {
        "colour": rng.choice(sorted(COLOURS)), "shape": CATEGORIES[category],
        "pattern": rng.choice(PATTERNS), "material": rng.choice(MATERIALS),
        "size": rng.choice(sorted(SIZES)), "brand": rng.choice(BRANDS),
    }
    return category, attrs


def title_of(category: str, a: dict, rng: random.Random) -> str:
    """A product title from templates over its attributes (every visible attribute is named)."""
    lf, pat = leaf(category), PATTERN_WORDS[a["pattern"]][0]
    templates = [
        f"{a['brand']} {a['size']} {a['colour']} {pat} {a['material']} {lf}",
        f"{a['brand']} {lf} in {a['colour']}, {pat} {a['material']} finish, {a['size']}",
        f"{a['colour']} {pat} {lf} by {a['brand']} ({a['material']}, {a['size']})",
        f"{a['size']} {a['material']} {lf} - {a['colour']} {pat} - {a['brand']}",
    ]
    return rng.choice(templates)


def description_of(category: str, a: dict, rng: random.Random) -> str:
    top, lf = category.split(" > ")
    s = [f"A {a['size']} {lf} from the {top} range of {a['brand']}.",
         f"It comes in {a['colour']} with a {PATTERN_WORDS[a['pattern']][0]} pattern and a {a['material']} surface.",
         rng.choice(["Ideal as a gift.", "Ships in two days.", "Easy to clean.", "A customer favourite.",
                     "Limited edition."])]
    return " ".join(s)


def query_of(category: str, a: dict, rng: random.Random) -> str:
    """A search query paraphrasing a subset of the product's attributes (synonyms, reordering)."""
    lf = rng.choice(LEAF_SYNONYMS[leaf(category)])
    col = rng.choice(COLOUR_WORDS[a["colour"]])
    pat = rng.choice(PATTERN_WORDS[a["pattern"]])
    templates = [
        f"{col} {pat} {lf}",
        f"{col} {lf} with {pat} pattern",
        f"looking for a {a['material']} {lf} in {col}",
        f"{a['size']} {col} {pat} {lf}",
        f"{a['brand']} {lf} {col} {pat}",
        f"{pat} {a['material']} {lf}, {col}",
        f"{col} {a['material']} {lf} {a['size']}",
    ]
    return rng.choice(templates)


def _render_product(job: tuple) -> None:
    root, pid, attrs, views_seed, n_views = job
    rng = random.Random(views_seed)
    for v in range(n_views):
        view = View.main() if v == 0 else View.random(rng)
        render(attrs, view).save(os.path.join(root, "images", f"{pid}_{v}.png"), compress_level=1)


def _hard_negative(i: int, products: list[dict], by_category: dict, rng: random.Random) -> int:
    """A train product of the same category differing in colour or pattern (a hard negative)."""
    p = products[i]
    same = [j for j in by_category[p["category"]] if j != i]
    rng.shuffle(same)
    for j in same:
        q = products[j]["attributes"]
        a = p["attributes"]
        if q["colour"] != a["colour"] or q["pattern"] != a["pattern"]:
            return j
    j = rng.randrange(len(products) - 1)
    return j + (j >= i)


def synthesize(output: str | os.PathLike, products: int = 1000, seed: int = 0, heldout: float = 0.2,
               views: int = 2, triplets_per_product: int = 3, mix: tuple[float, float, float] = (1, 1, 1),
               corrupt_rate: float = 0.1, vocab_size: int = 4096, workers: int | None = None,
               verbose: bool = True) -> Path:
    """Writes a synthetic catalog into ``output`` (see the module docstring) and returns its path.

    products: number of products (train + held-out); heldout: fraction held out for evaluation (at
    least 2 products must stay for training, so that a triplet's negative differs from its positive);
    views: images per product (>= 2: the main view and at least one query view);
    mix: relative frequency of text / image / multimodal queries; corrupt_rate: fraction of triplets
    whose positive is replaced by an unrelated product (noise for Dynamic Sample Filtering).
    """
    if products < 10:
        raise ValueError(f"products={products}: need at least 10 products")
    if not 0 < heldout < 1:
        raise ValueError(f"heldout={heldout}: must be a fraction in (0, 1)")
    n_held = max(1, round(products * heldout))
    if products - n_held < 2:  # a triplet's negative must be another train product than its positive
        raise ValueError(f"heldout={heldout} leaves {products - n_held} of {products} products for training; "
                         f"need at least 2 (a negative must differ from the positive): lower heldout or add "
                         f"products")
    if triplets_per_product < 1:
        raise ValueError(f"triplets_per_product={triplets_per_product}: need at least 1 triplet per product")
    if views < 2:
        raise ValueError(f"views={views}: need at least 2 (the main image and a query view)")
    if len(mix) != 3 or not all(math.isfinite(w) and w >= 0 for w in mix) or sum(mix) <= 0:
        raise ValueError(f"mix={mix}: need three finite, non-negative weights (text, image, multimodal), "
                         f"not all 0")
    if not 0 <= corrupt_rate < 1:
        raise ValueError(f"corrupt_rate={corrupt_rate}: must be in [0, 1)")
    t0 = time.perf_counter()
    root = Path(output)
    try:
        (root / "images").mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a path through an existing file
        file = next((a for a in (root, *root.parents) if a.exists() and not a.is_dir()), None)
        why = f"{file} is a file, not a directory" if file else f"{e.strerror}: {e.filename}"
        raise ValueError(f"output={output}: cannot create the catalog directory ({why}); give a new or "
                         f"existing directory") from e
    rng = random.Random(seed)

    held = set(rng.sample(range(products), n_held))
    catalog, jobs = [], []
    for i in range(products):
        prng = random.Random(rng.getrandbits(64))
        category, attrs = _product_attrs(prng)
        pid = f"p{i:06d}"
        catalog.append({
            "product_id": pid, "title": title_of(category, attrs, prng),
            "description": description_of(category, attrs, prng),
            "images": [f"images/{pid}_{v}.png" for v in range(views)],
            "category": category, "attributes": attrs, "split": "heldout" if i in held else "train",
        })
        jobs.append((str(root), pid, {k: attrs[k] for k in ("shape", "colour", "pattern", "material", "size")},
                     prng.getrandbits(64), views))
        catalog[-1]["_query"] = query_of(category, attrs, prng)

    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_render_product, jobs, chunksize=64))
    else:
        for job in jobs:
            _render_product(job)

    train_idx = [i for i in range(products) if i not in held]
    by_category: dict[str, list[int]] = {}
    for i in train_idx:
        by_category.setdefault(catalog[i]["category"], []).append(i)
    train_products = catalog  # negatives are drawn among train products only (by_category)
    trng = random.Random(seed + 1)
    triplets = []
    comps = ("t", "i", "mm")
    for i in train_idx:
        p = catalog[i]
        for _ in range(triplets_per_product):
            comp = trng.choices(comps, weights=mix)[0]
            neg = _hard_negative(i, train_products, by_category, trng)
            while neg in held or neg == i:
                neg = trng.choice(train_idx)
            t = {"composition": comp}
            if comp in ("t", "mm"):
                t["query_text"] = query_of(p["category"], p["attributes"], trng)
            if comp in ("i", "mm"):
                t["query_image"] = p["images"][trng.randrange(1, views)]
            pos, corrupted = i, trng.random() < corrupt_rate
            if corrupted:  # an unrelated product of another category stands in for the positive
                others = [j for j in train_idx if catalog[j]["category"] != p["category"]]
                if set(others) - {neg}:  # else (tiny catalogs) the triplet stays uncorrupted
                    pos = trng.choice(others)
                    while pos == neg:  # the negative cannot also be the positive
                        pos = trng.choice(others)
                corrupted = pos != i
            t.update(positive_id=catalog[pos]["product_id"], negative_id=catalog[neg]["product_id"],
                     corrupted=corrupted)
            triplets.append(t)

    with open(root / "products.jsonl", "w") as f:
        for p in catalog:
            f.write(json.dumps({k: v for k, v in p.items() if not k.startswith("_")}) + "\n")
    with open(root / "triplets.jsonl", "w") as f:
        for t in triplets:
            f.write(json.dumps(t) + "\n")
    with open(root / "heldout.jsonl", "w") as f:
        for i in sorted(held):
            p = catalog[i]
            f.write(json.dumps({
                "product_id": p["product_id"], "title": p["title"], "image": p["images"][0],
                "category": p["category"], "attributes": p["attributes"], "query_text": p["_query"],
                "query_image": p["images"][1],
            }) + "\n")

    from .tokenizer import train_tokenizer

    texts = [p["title"] for p in catalog] + [p["description"] for p in catalog]
    texts += [t["query_text"] for t in triplets if "query_text" in t]
    texts += [f"{p['category']} {k} {v}" for p in catalog for k, v in p["attributes"].items()]
    train_tokenizer(texts, vocab_size=vocab_size).save(str(root / "tokenizer.json"))

    info = {"generator": "moon_fast.data.synth", "version": 1, "products": products, "seed": seed,
            "heldout": n_held, "train": len(train_idx), "views": views, "triplets": len(triplets),
            "triplets_per_product": triplets_per_product, "mix": {"t": mix[0], "i": mix[1], "mm": mix[2]},
            "corrupt_rate": corrupt_rate, "corrupted": sum(t["corrupted"] for t in triplets),
            "categories": sorted(CATEGORIES), "attributes": list(ATTRIBUTE_NAMES)}
    # catalog.json is written last: its presence marks a complete catalog (see ensure_synthetic).
    with open(root / "catalog.json.tmp", "w") as f:
        json.dump(info, f, indent=1)
    os.replace(root / "catalog.json.tmp", root / "catalog.json")
    if verbose:
        print(f"synthesised {products} products ({len(train_idx)} train, {n_held} held-out), "
              f"{len(triplets)} triplets, {products * views} images into {root} "
              f"in {time.perf_counter() - t0:.1f} s")
    return root


DEFAULT_SYNTH = {"products": 1000, "seed": 0}


def cache_dir() -> Path:
    """Where the embedded default catalog lives: $MOON_FAST_CACHE or ~/.cache/moon_fast."""
    return Path(os.environ.get("MOON_FAST_CACHE") or Path.home() / ".cache" / "moon_fast")


def ensure_synthetic(products: int = DEFAULT_SYNTH["products"], seed: int = DEFAULT_SYNTH["seed"],
                     root: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """The default synthetic catalog, generated on first use into the cache directory and reused
    after (a lock file keeps concurrent ranks / processes from generating it twice)."""
    import fcntl

    base = Path(root) if root is not None else cache_dir()
    out = base / f"synthetic-n{products}-s{seed}"
    if (out / "catalog.json").exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "catalog.json").exists():
            if verbose:
                print(f"no synthetic catalog at {out}: generating it (first use)")
            synthesize(out, products=products, seed=seed, verbose=verbose)
    return out
