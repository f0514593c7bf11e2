"""The data pipeline: synthetic catalog, tokenizer, packing, bad records, per-rank loading and resume."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from moon_fast.data import (
    BadRecordCounter,
    BadRecordError,
    Catalog,
    ImageCache,
    SampleBuilder,
    TooManyBadRecords,
    TripletLoader,
    default_image_processor,
    load_tokenizer,
    pack,
    synthesize,
)
from moon_fast.data.batch import (
    IMAGE,
    IMAGE_PAD_ID,
    MULTIMODAL,
    SPECIAL_TOKENS,
    TEXT,
    VISION_END_ID,
    VISION_START_ID,
)
from moon_fast.data.render import COLOURS, View, render


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("cat") / "c", products=40, seed=3, workers=1, verbose=False)


@pytest.fixture(scope="module")
def processor():
    return default_image_processor()


def _builder(root, processor):
    return SampleBuilder(load_tokenizer(root), ImageCache(processor))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != "catalog.json":
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_synth_deterministic_and_seed_dependent(tmp_path, catalog_dir):
    again = synthesize(tmp_path / "again", products=40, seed=3, workers=2, verbose=False)
    other = synthesize(tmp_path / "other", products=40, seed=4, workers=1, verbose=False)
    assert _digest(again) == _digest(catalog_dir)
    assert _digest(other) != _digest(catalog_dir)


def test_synth_content_follows_attributes(catalog_dir):
    products = [json.loads(line) for line in (catalog_dir / "products.jsonl").read_text().splitlines()]
    triplets = [json.loads(line) for line in (catalog_dir / "triplets.jsonl").read_text().splitlines()]
    heldout = [json.loads(line) for line in (catalog_dir / "heldout.jsonl").read_text().splitlines()]
    held_ids = {p["product_id"] for p in products if p["split"] == "heldout"}
    assert held_ids == {r["product_id"] for r in heldout} and 0 < len(held_ids) < len(products)
    for p in products:  # every visible attribute is named in the title
        a = p["attributes"]
        for k in ("colour", "material", "size"):
            assert a[k] in p["title"], (k, p["title"])
        assert p["category"].split(" > ")[-1] in p["title"]
        for img in p["images"]:
            assert (catalog_dir / img).is_file()
    used = {t["positive_id"] for t in triplets} | {t["negative_id"] for t in triplets}
    assert not used & held_ids, "held-out products must never appear in training triplets"
    assert {t["composition"] for t in triplets} == {"t", "i", "mm"}
    for t in triplets:
        assert ("query_text" in t) == (t["composition"] in ("t", "mm"))
        assert ("query_image" in t) == (t["composition"] in ("i", "mm"))
    assert any(t["corrupted"] for t in triplets)
    for r in heldout:  # MBE format
        assert {"product_id", "title", "image", "category", "attributes", "query_text", "query_image"} <= set(r)


def test_render_draws_the_colour():
    for colour, rgb in COLOURS.items():
        attrs = dict(shape="square", colour=colour, pattern="solid", material="matte", size="large")
        img = render(attrs, View.main())
        assert img.size == (112, 112)
        assert img.getpixel((56, 56)) == rgb, colour
        other = render(attrs, View(background="dark", angle=20, light=0.8))
        assert other.tobytes() != img.tobytes()


def test_tokenizer_special_ids_and_vocab(catalog_dir):
    tok = load_tokenizer(catalog_dir)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.backend.token_to_id(t) == i
    assert tok.vocab_size <= 4096
    ids = tok.encode("acme large red striped matte ball")
    unk = tok.backend.token_to_id("[UNK]")
    assert ids and unk not in ids and min(ids) >= len(SPECIAL_TOKENS)


def test_pack_three_compositions(catalog_dir, processor):
    b = _builder(catalog_dir, processor)
    cat = Catalog(catalog_dir)
    p = cat.products[0]
    samples = [b.sample("t", "red ball", None, "x"), b.sample("i", None, p.images[0], "x"),
               b.sample("mm", p.title, p.images[1], "x")]
    batch = pack(samples)
    n_text = len(b.tok.encode("red ball"))
    n_title = len(b.tok.encode(p.title))
    lens = [n_text, 18, 18 + n_title]  # 112x112 -> 8x8 patches -> 16 tokens + start + end
    assert batch.cu_seqlens.tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert batch.cu_seqlens.dtype == torch.int32 and batch.max_seqlen == max(lens)
    assert batch.composition.tolist() == [TEXT, IMAGE, MULTIMODAL]
    assert batch.image_grid_thw.tolist() == [[1, 8, 8], [1, 8, 8]]
    assert batch.pixel_values.shape == (128, 3 * 2 * 14 * 14) and batch.pixel_values.dtype == torch.float32
    ids = batch.input_ids
    img = ids[lens[0]:lens[0] + 18]
    assert img[0] == VISION_START_ID and img[-1] == VISION_END_ID and (img[1:-1] == IMAGE_PAD_ID).all()
    assert (ids == IMAGE_PAD_ID).sum() == 32
    # The pixel rows are the processor's own output (stored as fp16 in the cache).
    from PIL import Image

    ref = processor(images=[Image.open(p.images[0]).convert("RGB")], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch.pixel_values[:64], ref, atol=2e-3, rtol=2e-3)
    with pytest.raises(ValueError, match="no samples"):
        pack([])


def test_triplet_batch_layout(catalog_dir, processor):
    cat = Catalog(catalog_dir)
    loader = TripletLoader(catalog_dir, cat, _builder(catalog_dir, processor), micro_batch=6)
    tb = loader.next()
    q = 6
    assert tb.encoder.num_samples == 5 * q
    comp = tb.encoder.composition
    assert (comp[tb.positive] == MULTIMODAL).all() and (comp[tb.negative] == MULTIMODAL).all()
    assert (comp[tb.intra_image] == IMAGE).all() and (comp[tb.intra_text] == TEXT).all()
    assert torch.equal(comp[tb.query], tb.query_modality)
    assert torch.equal(tb.intra_product_id, tb.positive_product_id)
    assert tb.corrupted.dtype == torch.bool and tb.corrupted.shape == (q,)


def _seqs(batch, rows: str) -> list[list[int]]:
    cu, ids = batch.encoder.cu_seqlens.tolist(), batch.encoder.input_ids.tolist()
    return [ids[cu[j]:cu[j + 1]] for j in getattr(batch, rows).tolist()]


def _pids(batch):
    return batch.positive_product_id.tolist() + batch.negative_product_id.tolist()


def test_global_batch_independent_of_world_size_and_resume(catalog_dir, processor):
    cat = Catalog(catalog_dir)
    b = _builder(catalog_dir, processor)
    one = TripletLoader(catalog_dir, cat, b, micro_batch=8, world=1, seed=1)
    two = [TripletLoader(catalog_dir, cat, b, micro_batch=4, world=2, rank=r, seed=1) for r in range(2)]
    for _ in range(3):
        full = one.next()
        halves = [ld.next() for ld in two]
        assert full.positive_product_id.tolist() == sum((h.positive_product_id.tolist() for h in halves), [])
        for rows in ("query", "positive", "negative", "intra_image", "intra_text"):
            assert _seqs(full, rows) == _seqs(halves[0], rows) + _seqs(halves[1], rows), rows
    state = one.state_dict()
    expect = [_pids(one.next()) for _ in range(2)]
    again = TripletLoader(catalog_dir, cat, b, micro_batch=8, world=1, seed=1)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [_pids(again.next()) for _ in range(2)] == expect
    # Epochs wrap around with a new order.
    n = len(one.triplets)
    assert one._index(n) != one._index(0) or one._index(n + 1) != one._index(1)


def _write_bad_catalog(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)
    products = (dst / "products.jsonl").read_text().splitlines()
    train = [json.loads(line) for line in products if json.loads(line)["split"] == "train"]
    (dst / train[0]["images"][0]).write_bytes(b"not a png")          # corrupt image
    (dst / train[1]["images"][0]).unlink()                            # missing file
    products.insert(3, '{"product_id": "broken", "title": ')          # malformed JSON
    (dst / "products.jsonl").write_text("\n".join(products) + "\n")
    with open(dst / "triplets.jsonl", "a") as f:
        f.write(json.dumps({"composition": "t", "query_text": "x", "positive_id": "nope", "negative_id": "nope"}) + "\n")
        f.write(json.dumps({"composition": "i", "positive_id": train[2]["product_id"],
                            "negative_id": train[3]["product_id"]}) + "\n")  # image query without an image


def test_bad_records_are_named_skipped_and_counted(tmp_path, catalog_dir, processor, caplog):
    bad_dir = tmp_path / "bad"
    _write_bad_catalog(catalog_dir, bad_dir)
    counter = BadRecordCounter(max_fraction=0.5, grace=10)
    with caplog.at_level(logging.WARNING, logger="moon_fast.data"):
        cat = Catalog(bad_dir, bad=counter)
        loader = TripletLoader(bad_dir, cat, _builder(bad_dir, processor), micro_batch=8, bad=counter)
        for _ in range(len(loader.triplets) // 8 + 1):
            batch = loader.next()
            assert batch.query.numel() == 8  # bad triplets are replaced, batch size stays
    text = caplog.text
    assert "malformed JSON" in text and "products.jsonl:4" in text
    assert "corrupt image" in text and "image file not found" in text
    assert "unknown product nope" in text and "needs 'query_image'" in text
    assert counter.bad >= 5 and counter.seen > counter.bad
    # A strict limit stops the run with a message giving the rate and the knob.
    strict = BadRecordCounter(max_fraction=0.001, grace=1)
    with pytest.raises(TooManyBadRecords, match="max_bad_fraction"):
        Catalog(bad_dir, bad=strict)


def test_stream_mode_shards_per_rank_and_resume(tmp_path, catalog_dir, processor):
    import shutil

    d = tmp_path / "sharded"
    shutil.copytree(catalog_dir, d)
    lines = (d / "triplets.jsonl").read_text().splitlines()
    (d / "triplets.jsonl").unlink()
    (d / "triplets").mkdir()
    for k in range(4):
        (d / "triplets" / f"part-{k:03d}.jsonl").write_text("\n".join(lines[k::4]) + "\n")
    cat = Catalog(d)
    b = _builder(d, processor)
    ranks = [TripletLoader(d, cat, b, micro_batch=3, world=2, rank=r, mode="stream") for r in range(2)]
    seen = [[], []]
    for r, ld in enumerate(ranks):
        for _ in range(4):
            seen[r].append(ld.next().positive_product_id.tolist())
    assert seen[0] != seen[1]
    state = ranks[0].state_dict()
    nxt = ranks[0].next().positive_product_id.tolist()
    fresh = TripletLoader(d, cat, b, micro_batch=3, world=2, rank=0, mode="stream")
    fresh.load_state_dict(state)
    assert fresh.next().positive_product_id.tolist() == nxt


def test_augment_keeps_heldout_and_enriches_train(tmp_path, catalog_dir):
    from moon_fast.data.augment import augment_catalog

    out = tmp_path / "aug"
    report = augment_catalog(str(catalog_dir), str(out), views=1, seed=0, verbose=False)
    assert "attribute-enricher" in report["text_enricher"]
    assert (out / "heldout.jsonl").read_bytes() == (catalog_dir / "heldout.jsonl").read_bytes()
    before = {json.loads(x)["product_id"]: json.loads(x) for x in (catalog_dir / "products.jsonl").read_text().splitlines()}
    after = Catalog(out)
    for p in after.products:
        old = before[p.product_id]
        if p.split == "heldout":
            assert p.title == old["title"] and len(p.images) == len(old["images"])
        else:
            assert p.title != old["title"] and p.attributes["colour"] in p.title
            assert len(p.images) == len(old["images"]) + 1 and Path(p.images[-1]).is_file()
    assert report["views_kept"] == report["products"]


def test_prefetcher_position_is_that_of_consumed_batches(catalog_dir, processor):
    from moon_fast.data.loader import Prefetcher

    cat = Catalog(catalog_dir)
    b = _builder(catalog_dir, processor)
    plain = TripletLoader(catalog_dir, cat, b, micro_batch=4, seed=2)
    pre = Prefetcher(TripletLoader(catalog_dir, cat, b, micro_batch=4, seed=2))
    try:
        for _ in range(3):
            assert _pids(pre.next()) == _pids(plain.next())
            assert pre.state_dict()["pos"] == plain.state_dict()["pos"]  # the prefetched batch is not counted
    finally:
        pre.close()


# ---- bad input: each case fails with a message naming the file / record and what to do ----

def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.timeout(30)  # the bug this guards against was an endless loop
def test_stream_mode_empty_shards_raise(tmp_path, catalog_dir, processor):
    d = _copy(catalog_dir, tmp_path / "empty")
    (d / "triplets.jsonl").unlink()
    (d / "triplets").mkdir()
    (d / "triplets" / "part-000.jsonl").write_text("")
    (d / "triplets" / "part-001.jsonl").write_text("\n   \n\n")
    cat = Catalog(d)
    for world in (1, 2, 3):  # whole shards per rank (1, 2) or strided rows (3)
        loader = TripletLoader(d, cat, _builder(d, processor), micro_batch=2, world=world, mode="stream")
        with pytest.raises(ValueError, match=r"no usable triplets in .*triplets/ shards.*data check"):
            loader.next()


def test_undecodable_lines_and_bad_attributes_are_bad_records(tmp_path, catalog_dir, caplog):
    d = _copy(catalog_dir, tmp_path / "enc")
    lines = (d / "products.jsonl").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"title": "', b'"title": "\xff', 1)   # not UTF-8
    rec = json.loads(lines[2])
    rec["attributes"] = [1, 2]                                          # not name: value
    lines[2] = json.dumps(rec).encode()
    (d / "products.jsonl").write_bytes(b"\n".join(lines))
    counter = BadRecordCounter(max_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="moon_fast.data"):
        cat = Catalog(d, bad=counter)
    assert len(cat) == 38 and counter.bad == 2
    assert "products.jsonl:2: not valid UTF-8" in caplog.text
    assert "products.jsonl:3 (product" in caplog.text and "'attributes' should be an object" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pages"])
def test_unreadable_parquet_names_the_file(tmp_path, catalog_dir, damage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = _copy(catalog_dir, tmp_path / "pq")
    f = d / "products.parquet"
    pq.write_table(pa.Table.from_pylist(_lines(d / "products.jsonl")), f)
    (d / "products.jsonl").unlink()
    assert len(Catalog(d)) == 40
    data = f.read_bytes()
    f.write_bytes({"garbage": b"not parquet" * 10, "truncated": data[: len(data) // 2],
                   "pages": data[:4] + b"\xff" * 400 + data[404:]}[damage])  # footer intact, pages not
    with pytest.raises(ValueError, match=r"products\.parquet: not a readable Parquet file"):
        Catalog(d)


def test_data_check_reads_heldout(tmp_path, catalog_dir, capsys):
    from moon_fast.cli import main

    d = _copy(catalog_dir, tmp_path / "held")
    assert main(["data", "check", str(d)]) == 0
    held = (d / "heldout.jsonl").read_text().splitlines()
    rec = json.loads(held[0])
    rec["image"] = "images/nope.png"
    (d / "heldout.jsonl").write_text("\n".join([json.dumps(rec), "{not json"] + held[1:]) + "\n")
    capsys.readouterr()
    assert main(["data", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"{len(held) - 1} good held-out records; 2 bad" in out
    assert "missing image: 1 (e.g. " in out and "heldout.jsonl:1 (product" in out
    assert "malformed JSON: 1 (e.g. " in out and "heldout.jsonl:2" in out


def test_bad_record_summary_groups_by_cause(tmp_path, catalog_dir, processor, capsys):
    from moon_fast.cli import main

    d = _copy(catalog_dir, tmp_path / "corrupt")
    train = [p for p in _lines(d / "products.jsonl") if p["split"] == "train"]
    for p in train[:3]:
        (d / p["images"][0]).write_bytes(b"not a png")
    counter = BadRecordCounter(max_fraction=0.01, grace=20)
    loader = TripletLoader(d, Catalog(d, bad=counter), _builder(d, processor), micro_batch=8, bad=counter)
    with pytest.raises(TooManyBadRecords, match=r"reasons: corrupt image: \d+ \(e\.g\. \S+triplets\.jsonl:\d+"):
        for _ in range(100):
            loader.next()
    assert list(counter.reasons) == ["corrupt image"]
    # `data check` groups too: one entry per cause, a few examples each (not one per product).
    assert main(["data", "check", str(d)]) == 1
    out = capsys.readouterr().out
    assert "checked; corrupt image: " in out and out.count("(e.g. ") == 1
    c = BadRecordCounter(max_fraction=1.0)
    for i in range(1000):
        c.skip(BadRecordError(f"products.jsonl:{i + 1} (product p{i}): corrupt image", cause="corrupt image"))
    examples = [f"products.jsonl:{i + 1} (product p{i})" for i in range(3)]
    assert c.reasons == {"corrupt image": {"count": 1000, "examples": examples}}
    assert len(c.summary()) < 200


def test_synth_refuses_degenerate_settings(tmp_path, capsys):
    from moon_fast.cli import main

    for kw, msg in [({"triplets_per_product": 0}, "at least 1 triplet"),
                    ({"triplets_per_product": -2}, "at least 1 triplet"),
                    ({"heldout": 0.96}, "leaves 0 of 10 products for training"),
                    ({"heldout": 0.9}, "leaves 1 of 10 products for training; need at least 2"),
                    ({"mix": (1, float("nan"), 1)}, "finite, non-negative")]:
        with pytest.raises(ValueError, match=msg):
            synthesize(tmp_path / "x", products=10, workers=1, verbose=False, **kw)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file is a file, not a directory"):
        synthesize(tmp_path / "file" / "x", products=10, workers=1, verbose=False)
    assert main(["data", "synth", "--output", str(tmp_path / "m"), "--mix", "a:b:c"]) == 2
    assert "--mix 'a:b:c': expected three numbers" in capsys.readouterr().err
    # Small catalogs: a triplet's negative is never its positive (it was, through the fallbacks).
    for seed in range(4):
        out = synthesize(tmp_path / f"s{seed}", products=10, heldout=0.5, seed=seed, workers=1, verbose=False)
        trip = _lines(out / "triplets.jsonl")
        assert trip and all(t["positive_id"] != t["negative_id"] for t in trip)


def test_augment_bad_input(tmp_path, catalog_dir, caplog):
    from moon_fast.data.augment import augment_catalog

    for kw, msg in [({"views": -1}, "views=-1"), ({"max_drop": float("nan")}, "max_drop=nan"),
                    ({"min_similarity": float("nan")}, "min_similarity=nan")]:
        with pytest.raises(ValueError, match=msg):
            augment_catalog(str(catalog_dir), str(tmp_path / "x"), verbose=False, **kw)
    # A corrupt main image: that product is skipped (counted, reported), the others are augmented.
    d = _copy(catalog_dir, tmp_path / "img")
    train = [p for p in _lines(d / "products.jsonl") if p["split"] == "train"]
    (d / train[0]["images"][0]).write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="moon_fast.data"):
        report = augment_catalog(str(d), str(tmp_path / "img_aug"), verbose=False)
    assert report["products"] == len(train) - 1
    assert report["bad_records"]["reasons"]["corrupt image"]["count"] == 1
    assert f"(product {train[0]['product_id']}): corrupt image" in caplog.text
    # A truncated products file: triplets naming the products it lost are dropped, not copied.
    d = _copy(catalog_dir, tmp_path / "cut")
    lines = (d / "products.jsonl").read_text().splitlines()
    (d / "products.jsonl").write_text("\n".join(lines[:30]) + "\n" + lines[30][:40])
    out = tmp_path / "cut_aug"
    report = augment_catalog(str(d), str(out), verbose=False, max_bad_fraction=1.0)
    kept = {p["product_id"] for p in _lines(out / "products.jsonl")}
    assert len(kept) == 30 and report["bad_records"]["reasons"]["unknown product"]["count"] > 0
    for t in _lines(out / "triplets.jsonl"):
        assert t["positive_id"] in kept and t["negative_id"] in kept
    with pytest.raises(TooManyBadRecords, match="--max-bad-fraction"):  # by default, that many stops it
        augment_catalog(str(d), str(tmp_path / "cut_aug2"), verbose=False)
