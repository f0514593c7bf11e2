"""Evaluation tasks from precomputed embeddings (no model), run-dir resolution and the comparison table."""

from __future__ import annotations

import json

import pytest
from utils import unit

from moon_fast.eval.evaluate import (
    evaluate_embeddings,
    format_comparison,
    format_results,
    resolve_checkpoint,
)


def test_evaluate_embeddings_by_hand():
    prod = unit([1, 0], [0, 1], [-1, 0], [0, -1])
    # text queries: exact matches except query 3, which points at product 1 (its own product is last).
    q_t = unit([1, 0], [0, 1], [-1, 0], [0.1, 1])
    query = {"t": q_t, "i": prod.clone(), "mm": prod.clone()}
    product = {"t": prod.clone(), "i": prod.clone(), "mm": prod.clone()}
    cats = ["a", "b"]
    cat_proto = unit([1, 0.5], [-1, 0.2])  # products 0, 1 -> "a"; 2, 3 -> "b" (no ties)
    true_cat = ["a", "b", "b", "b"]
    attr_proto = {"colour": (["red", "blue"], unit([1, 0], [0, 1]))}
    true_attr = [{"colour": "red"}, {"colour": "blue"}, {"colour": "red"}, {}]
    r = evaluate_embeddings(query, product, category_proto=cat_proto, categories=cats, true_category=true_cat,
                            attribute_proto=attr_proto, true_attributes=true_attr)
    assert set(r) == {"t2mm", "i2mm", "mm2mm", "t2i", "i2t", "classification", "attribute"}
    # query 3 ranks its product last of 4 (scores 0.1*0, ..., -1): rank 3
    assert r["t2mm"]["recall@1"] == pytest.approx(3 / 4)
    assert r["t2mm"]["mrr"] == pytest.approx((1 + 1 + 1 + 1 / 4) / 4)
    assert r["i2mm"]["recall@1"] == 1.0 and r["i2t"]["recall@10"] == 1.0
    # classification: predictions a, a, b, b vs truth a, b, b, b
    assert r["classification"]["accuracy"] == pytest.approx(3 / 4)
    # attribute: product 0 -> red (right), 1 -> blue (right), 2 = (-1, 0) -> red scores -1, blue 0 -> blue (wrong)
    assert r["attribute"]["accuracy"] == pytest.approx(2 / 3)
    assert r["attribute"]["accuracy/colour"] == pytest.approx(2 / 3)
    assert r["attribute"]["n_samples"] == 3
    # macro over the (name, value) labels: colour=red P 1/1, R 1/2; colour=blue P 1/2, R 1/1; F1 2/3 each
    assert r["attribute"]["precision"] == pytest.approx(0.75)
    assert r["attribute"]["recall"] == pytest.approx(0.75)
    assert r["attribute"]["f1"] == pytest.approx(2 / 3)
    table = format_results(r)
    assert "t2mm" in table and "75.00" in table


def test_comparison_table(tmp_path):
    for name, v in (("full", 0.9), ("no_moe", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"t2i": {"recall@10": v, "mrr": v / 2}}))
    out = format_comparison([str(tmp_path / "full"), str(tmp_path / "no_moe")])
    assert "full" in out and "no_moe" in out and "90.00" in out and "50.00" in out and "t2i/mrr" in out
    with pytest.raises(FileNotFoundError, match="eval.json"):
        format_comparison([str(tmp_path)])


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("data: {}\n")
    assert resolve_checkpoint(run) == (run / "final", run)
    assert resolve_checkpoint(run / "final") == (run / "final", run)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_checkpoint(tmp_path / "model") == (tmp_path / "model", None)
    with pytest.raises(FileNotFoundError, match="neither a saved model"):
        resolve_checkpoint(tmp_path)
