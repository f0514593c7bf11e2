"""`moon-fast eval` on a tiny random model and a small synthetic catalog (end to end, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest

from moon_fast.cli import main

RETRIEVAL = ("t2mm", "i2mm", "mm2mm", "t2i", "i2t")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from moon_fast.data import synthesize
    from moon_fast.model import MoonModel

    base = tmp_path_factory.mktemp("eval")
    cat = synthesize(base / "catalog", products=30, seed=3, workers=1, verbose=False)
    run = base / "run"
    MoonModel.from_preset("tiny").save_pretrained(str(run / "final"))
    shutil.copy(cat / "tokenizer.json", run / "final" / "tokenizer.json")
    (run / "config.yaml").write_text(f"data:\n  path: {cat}\n")
    return run, cat


def _check_shape(res: dict, n: int):
    assert set(res) == set(RETRIEVAL) | {"classification", "attribute"}
    for t in RETRIEVAL:
        m = res[t]
        assert m["n_queries"] == m["n_candidates"] == n
        assert m["n_query_fallback"] == 0  # the synthetic records have queries of their own
        assert 0 <= m["recall@1"] <= m["recall@5"] <= m["recall@10"] <= 1
        assert 1 / n <= m["mrr"] <= 1
        assert m["recall@10"] == 1.0 if n <= 10 else True  # k >= candidates
    for t in ("classification", "attribute"):
        for k in ("accuracy", "precision", "recall", "f1"):
            assert 0 <= res[t][k] <= 1
    assert res["classification"]["n_samples"] == n


def test_eval_run_dir_defaults_and_compare(run_dir, capsys):
    run, cat = run_dir
    assert main(["eval", "--checkpoint", str(run)]) == 0
    res = json.loads((run / "eval.json").read_text())
    n_held = sum(1 for line in (cat / "heldout.jsonl").read_text().splitlines() if line.strip())
    _check_shape(res, n_held)
    out = capsys.readouterr().out
    assert "t2mm" in out and "classification" in out
    # --compare tabulates runs side by side
    assert main(["eval", "--compare", str(run), str(run / "eval.json")]) == 0
    assert "t2mm/recall@1" in capsys.readouterr().out


def test_eval_model_dir_with_data_and_limit(run_dir, tmp_path):
    run, cat = run_dir
    out = tmp_path / "e.json"
    assert main(["eval", "--checkpoint", str(run / "final"), "--data", str(cat / "heldout.jsonl"),
                 "--output", str(out), "--limit", "3", "--tasks", "t2i,classification"]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"t2i", "classification"}
    assert res["t2i"]["n_candidates"] == 3 and res["t2i"]["recall@5"] == 1.0


def test_eval_counts_and_warns_about_queries_that_fall_back(run_dir, tmp_path):
    """A record without query_text / query_image is queried by its own title / image, which its candidate
    holds: easier than a real query. Each retrieval task counts those queries, and a warning says so."""
    from moon_fast.eval import evaluate_checkpoint

    run, cat = run_dir
    records = [json.loads(line) for line in (cat / "heldout.jsonl").read_text().splitlines() if line.strip()][:6]
    for r in records:
        r["image"] = str(cat / r["image"])
        r["query_image"] = str(cat / r["query_image"])
    del records[0]["query_text"], records[1]["query_text"]
    records[2]["query_image"] = None
    data = tmp_path / "partial.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(UserWarning, match="t2mm 2, i2mm 1, mm2mm 3, t2i 2, i2t 1 of 6; those retrieval figures"):
        res = evaluate_checkpoint(run, data=data, verbose=False)
    assert {t: res[t]["n_query_fallback"] for t in RETRIEVAL} == {"t2mm": 2, "i2mm": 1, "mm2mm": 3, "t2i": 2, "i2t": 1}


def test_eval_reads_the_catalog_images_list(run_dir):
    """A record may name its image as the catalog does, ``images: [...]`` (the first is the product's), with
    paths relative to the file like ``image``: it evaluates as the same record with ``image``."""
    from moon_fast.eval import evaluate_checkpoint

    run, cat = run_dir
    records = [json.loads(line) for line in (cat / "heldout.jsonl").read_text().splitlines() if line.strip()][:5]
    (cat / "five.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for r in records:
        r["images"] = [r.pop("image")]
    (cat / "five_images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = ("t2mm", "i2mm", "classification")
    assert (evaluate_checkpoint(run, data=cat / "five_images.jsonl", tasks=tasks, verbose=False)
            == evaluate_checkpoint(run, data=cat / "five.jsonl", tasks=tasks, verbose=False))


def test_eval_errors(run_dir, tmp_path, capsys):
    run, _ = run_dir
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"product_id": "x", "title": "t"}) + "\n")
    assert main(["eval", "--checkpoint", str(run), "--data", str(bad), "--output", str(tmp_path / "o.json")]) == 2
    assert "record 0 (product x): missing field 'image', 'category'" in capsys.readouterr().err
    # the data layer's field checks: these used to pass the eval's own check and fail later as tracebacks
    for rec, message in (({"product_id": "y", "title": "t", "image": "a.png", "category": "c", "attributes": ["red"]},
                          "'attributes' should be an object"),
                         ({"product_id": "z", "title": "t", "image": "a.png", "category": "c", "query_text": 3},
                          "field 'query_text' should be a string"),
                         (3, "record 0: expected an object, got int")):
        bad.write_text(json.dumps(rec) + "\n")
        assert main(["eval", "--checkpoint", str(run), "--data", str(bad), "--output", str(tmp_path / "o.json")]) == 2
        assert message in capsys.readouterr().err
    for text, message in (('{"title": "t"}', "expected a JSON list of records or one record per line, got a dict"),
                          ('[{"title": "t"},', "bad.json:1: malformed JSON")):
        (tmp_path / "bad.json").write_text(text)
        assert main(["eval", "--checkpoint", str(run), "--data", str(tmp_path / "bad.json")]) == 2
        assert message in capsys.readouterr().err


def test_eval_bad_options_fail_before_the_evaluation(run_dir, tmp_path, capsys):
    """Bad numbers, output paths, devices and task lists are refused up front (an unwritable --output used to
    fail only after the whole evaluation; --limit 0 evaluated everything, --limit -1 all but one)."""
    run, _ = run_dir
    for argv in (["--limit", "0"], ["--limit", "-1"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--checkpoint", str(run), *argv])
        assert exc.value.code == 2
        assert "must be at least 1" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    for argv, message in ((["--output", str(tmp_path)], "is a directory: give a file name"),
                          (["--output", str(tmp_path / "afile" / "e.json")], "is a file, not a directory"),
                          (["--device", "bogus"], "not a device"),
                          (["--tasks", ","], "no task given"),
                          (["--compare", str(run)], "give either --compare")):
        assert main(["eval", "--checkpoint", str(run), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "evaluated" not in err, argv


def test_eval_corrupt_files_are_named(run_dir, tmp_path, capsys):
    """A corrupt checkpoint file or eval.json gets an error naming it, not a library's traceback."""
    run, _ = run_dir
    model = tmp_path / "model"
    shutil.copytree(run / "final", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", "--checkpoint", str(model), "--output", str(tmp_path / "e.json")]) == 2
    assert f"{weights} cannot be read: the checkpoint is corrupt" in capsys.readouterr().err
    for text, message in (('{"t2i": ', "is not valid JSON"), ("[1, 2]", "is not an eval result")):
        (tmp_path / "bad.json").write_text(text)
        assert main(["eval", "--compare", str(tmp_path / "bad.json")]) == 2
        assert message in capsys.readouterr().err
