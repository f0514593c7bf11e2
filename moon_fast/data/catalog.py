"""The product catalog format (see FORMAT.md): manifests of products and of training triplets, as JSONL
or Parquet, one file or a directory of shards, with image files beside them.

A record that cannot be used (malformed JSON, a missing field, an unknown product, an image that is
missing or does not decode) raises :class:`BadRecordError` naming the record; the loaders skip it and
count it in a :class:`BadRecordCounter`, which stops the run only past a configured rate.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("moon_fast.data")

MANIFEST_SUFFIXES = (".jsonl", ".json", ".parquet")


class BadRecordError(ValueError):
    """A record that cannot be used. The message is "<where>: <what>" (where = file:line or product id);
    ``cause`` is a short label of the kind of problem ("corrupt image", "malformed JSON"), by which
    :class:`BadRecordCounter` groups its summary (so it stays small however many records are bad)."""

    def __init__(self, message: str, cause: str = "bad record"):
        super().__init__(message)
        self.cause = cause


class TooManyBadRecords(RuntimeError):
    pass


@dataclass
class BadRecordCounter:
    """Counts records seen and skipped; raises once the skipped fraction exceeds ``max_fraction``
    (checked after ``grace`` records, so one early bad record does not end a run). ``knob`` is the
    setting that the message tells the user to raise."""

    max_fraction: float = 0.05
    grace: int = 50
    seen: int = 0
    bad: int = 0
    shown: int = 0
    max_shown: int = 20
    max_examples: int = 3
    reasons: dict = field(default_factory=dict)  # cause -> {"count": n, "examples": [where, ...]}
    knob: str = "data.max_bad_fraction"

    def ok(self, n: int = 1) -> None:
        self.seen += n

    def skip(self, err: Exception | str) -> None:
        self.seen += 1
        self.bad += 1
        msg = str(err)
        cause = getattr(err, "cause", None) or (type(err).__name__ if isinstance(err, Exception) else
                                                  "bad record")
        r = self.reasons.setdefault(cause, {"count": 0, "examples": []})
        r["count"] += 1
        where = msg.split(": ", 1)[0] or msg[:100]  # messages are "<where>: <what>"
        if len(r["examples"]) < self.max_examples and where not in r["examples"]:
            r["examples"].append(where)
        if self.shown < self.max_shown:
            self.shown += 1
            log.warning("skipping bad record: %s", msg)
            if self.shown == self.max_shown:
                log.warning("further bad records are counted but not shown")
        self.check()

    def check(self) -> None:
        if self.seen >= self.grace and self.bad > self.max_fraction * self.seen:
            raise TooManyBadRecords(
                f"{self.bad} of {self.seen} records were bad ({self.bad / self.seen:.1%} > "
                f"{self.knob}={self.max_fraction:.1%}); reasons: {self.summary()}. "
                f"Fix the data (`moon-fast data check DIR` lists every bad record) or raise {self.knob}.")

    def summary(self) -> str:
        """The bad records by cause, most frequent first, with a few examples each:
        ``corrupt image: 3 (e.g. triplets.jsonl:4 (positive p1), ...); malformed JSON: 1 (...)``."""
        by_count = sorted(self.reasons.items(), key=lambda kv: -kv[1]["count"])
        return "; ".join(f"{cause}: {r['count']} (e.g. {', '.join(r['examples'])})" for cause, r in by_count)

    def state_dict(self) -> dict:
        reasons = {k: {"count": r["count"], "examples": list(r["examples"])} for k, r in self.reasons.items()}
        return {"seen": self.seen, "bad": self.bad, "reasons": reasons}

    def load_state_dict(self, s: dict) -> None:
        self.seen, self.bad = s["seen"], s["bad"]
        # Checkpoints written before reasons had examples hold a bare count per reason.
        self.reasons = {k: {"count": r, "examples": []} if isinstance(r, int) else
                        {"count": r["count"], "examples": list(r["examples"])} for k, r in s["reasons"].items()}


@dataclass
class Product:
    """One catalog product. ``images`` are absolute paths; ``index`` is its row in the catalog."""

    product_id: str
    title: str
    images: list[str]
    category: str
    attributes: dict
    description: str = ""
    split: str = "train"
    index: int = -1
    where: str = ""  # file:line (product id), for messages


@dataclass
class Triplet:
    """A training triplet. ``composition`` says which query parts are present (t, i or mm)."""

    composition: str
    positive_id: str
    negative_id: str
    query_text: str | None = None
    query_image: str | None = None  # absolute path
    corrupted: bool = False
    where: str = ""  # file:line, for messages


def resolve(root: Path, p: str) -> str:
    return p if os.path.isabs(p) else str(root / p)


def manifest_files(path: str | os.PathLike, stem: str) -> list[Path]:
    """The manifest files of ``stem`` ("products" / "triplets") in a catalog: ``path`` itself if it is a
    file, else ``<path>/<stem>.{jsonl,json,parquet}`` or the shards in ``<path>/<stem>/`` (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    for suf in MANIFEST_SUFFIXES:
        if (p / f"{stem}{suf}").is_file():
            return [p / f"{stem}{suf}"]
    d = p / stem
    if d.is_dir():
        shards = sorted(f for f in d.iterdir() if f.suffix in MANIFEST_SUFFIXES)
        if shards:
            return shards
    raise FileNotFoundError(f"no {stem} manifest in {p}: expected {stem}.jsonl, {stem}.parquet or a "
                            f"{stem}/ directory of shards (see moon_fast/data/FORMAT.md)")


def iter_manifest(path: Path, start: int = 0) -> Iterator[tuple[int, dict | BadRecordError]]:
    """(row number, record) pairs from one manifest file from row ``start`` on; a row that does not
    parse is yielded as a BadRecordError naming file and line. A Parquet file that cannot be read at
    all raises ValueError naming it (skipping it would silently drop all its rows)."""
    if path.suffix == ".parquet":
        yield from _iter_parquet(path, start)
        return
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            yield 0, BadRecordError(f"{path}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8",
                                    cause="not UTF-8")
            return
        except json.JSONDecodeError as e:
            yield 0, BadRecordError(f"{path}: not valid JSON ({e})", cause="malformed JSON")
            return
        if not isinstance(data, list):
            yield 0, BadRecordError(f"{path}: expected a JSON list of records", cause="malformed JSON")
            return
        for i, rec in enumerate(data[start:], start):
            yield i, rec
        return
    with open(path, "rb") as f:  # bytes, so that one badly encoded line is one bad record
        for i, raw in enumerate(f):
            if i < start:
                continue
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                yield i, BadRecordError(f"{path}:{i + 1}: not valid UTF-8 (byte {e.start} of the line); "
                                        f"re-save the file as UTF-8", cause="not UTF-8")
                continue
            if not line:
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRecordError(f"{path}:{i + 1}: malformed JSON ({e.msg})", cause="malformed JSON")


def _iter_parquet(path: Path, start: int) -> Iterator[tuple[int, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> ValueError:
        return ValueError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); it may be truncated "
                          f"or not Parquet at all: re-write it or remove it from the catalog")

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise unreadable(e) from e
    row = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if row + n <= start:
            row += n
            continue
        try:
            recs = pf.read_row_group(rg).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise unreadable(e) from e
        for rec in recs:
            if row >= start:
                yield row, rec
            row += 1


def _need(rec: dict, key: str, where: str, types=str):
    v = rec.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        raise BadRecordError(f"{where}: missing field '{key}'", cause="missing field")
    if not isinstance(v, types):
        raise BadRecordError(f"{where}: field '{key}' should be {types}, got {type(v).__name__}",
                             cause="invalid field")
    return v


def parse_product(rec: dict, root: Path, where: str) -> Product:
    if not isinstance(rec, dict):
        raise BadRecordError(f"{where}: expected an object, got {type(rec).__name__}", cause="not an object")
    pid = str(_need(rec, "product_id", where, (str, int)))
    where = f"{where} (product {pid})"
    images = rec.get("images")
    if images is None and rec.get("image"):
        images = [rec["image"]]
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images or not all(isinstance(x, str) and x for x in images):
        raise BadRecordError(f"{where}: missing field 'images' (a list of image paths)", cause="missing field")
    attrs = rec.get("attributes") or {}
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{where}: 'attributes' is not a JSON object", cause="invalid field") from e
    if isinstance(attrs, list):  # Parquet map columns arrive as [(key, value), ...]
        try:
            attrs = dict(attrs)
        except (TypeError, ValueError) as e:  # a list that is not of pairs, e.g. [1, 2]
            raise BadRecordError(f"{where}: 'attributes' should be an object of name: value, got the list "
                                 f"{str(attrs)[:60]}", cause="invalid field") from e
    if not isinstance(attrs, dict):
        raise BadRecordError(f"{where}: 'attributes' should be an object of name: value", cause="invalid field")
    return Product(product_id=pid, title=_need(rec, "title", where), images=[resolve(root, x) for x in images],
                   category=str(rec.get("category") or ""), attributes={str(k): str(v) for k, v in attrs.items()},
                   description=str(rec.get("description") or ""), split=str(rec.get("split") or "train"),
                   where=where)


def parse_triplet(rec: dict, root: Path, where: str) -> Triplet:
    if not isinstance(rec, dict):
        raise BadRecordError(f"{where}: expected an object, got {type(rec).__name__}", cause="not an object")
    qt, qi = rec.get("query_text"), rec.get("query_image")
    comp = rec.get("composition") or ("mm" if qt and qi else "t" if qt else "i" if qi else None)
    if comp not in ("t", "i", "mm"):
        raise BadRecordError(f"{where}: 'composition' must be t, i or mm (got {comp!r}), or give query_text "
                             f"and/or query_image", cause="invalid field")
    if comp in ("t", "mm") and not (isinstance(qt, str) and qt.strip()):
        raise BadRecordError(f"{where}: composition {comp} needs a non-empty 'query_text'", cause="missing field")
    if comp in ("i", "mm") and not (isinstance(qi, str) and qi):
        raise BadRecordError(f"{where}: composition {comp} needs 'query_image'", cause="missing field")
    return Triplet(composition=comp, positive_id=str(_need(rec, "positive_id", where, (str, int))),
                   negative_id=str(_need(rec, "negative_id", where, (str, int))),
                   query_text=qt if comp != "i" else None,
                   query_image=resolve(root, qi) if comp != "t" else None,
                   corrupted=bool(rec.get("corrupted", False)), where=where)


class Catalog:
    """All products of a catalog directory, by id (the product table is held in memory; triplets can
    be streamed). Malformed product records are skipped and counted in ``bad``."""

    def __init__(self, root: str | os.PathLike, bad: BadRecordCounter | None = None):
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"data directory {self.root} does not exist")
        self.bad = bad or BadRecordCounter()
        self.products: list[Product] = []
        self.by_id: dict[str, Product] = {}
        for f in manifest_files(self.root, "products"):
            for i, rec in iter_manifest(f):
                where = f"{f}:{i + 1}"
                try:
                    if isinstance(rec, Exception):
                        raise rec
                    p = parse_product(rec, self.root, where)
                    if p.product_id in self.by_id:
                        raise BadRecordError(f"{where}: duplicate product_id {p.product_id}",
                                             cause="duplicate product")
                except BadRecordError as e:
                    self.bad.skip(e)
                    continue
                self.bad.ok()
                p.index = len(self.products)
                self.products.append(p)
                self.by_id[p.product_id] = p
        if not self.products:
            raise ValueError(f"{self.root}: no usable products")

    def __len__(self) -> int:
        return len(self.products)

    def get(self, pid: str, where: str) -> Product:
        p = self.by_id.get(pid)
        if p is None:
            raise BadRecordError(f"{where}: unknown product {pid}", cause="unknown product")
        return p
