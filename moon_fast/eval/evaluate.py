"""Zero-shot evaluation of a checkpoint on MBE-format records (MBE2.0 style).

Tasks, each from the records' own fields (one record = one product):

* retrieval ``t2mm``, ``i2mm``, ``mm2mm``, ``t2i``, ``i2t``: queries are the records' QUERY side
  (``query_text`` / ``query_image``, falling back to ``title`` / ``image``, see
  :func:`moon_fast.data.encode_records`), candidates the records' PRODUCT side (``title`` for t,
  ``image`` for i, both for mm). Query j's one correct candidate is product j (products with the same
  content simply tie, see :mod:`moon_fast.eval.metrics`); metrics recall@1/5/10 and mrr.
* ``classification``: each product's mm embedding against the text embeddings of every category path
  in the records (``"a > b"`` embedded as text); the nearest prototype is the prediction.
* ``attribute``: for each attribute name, the product's mm embedding against the text embeddings of
  that attribute's values seen in the records (``label_template``, default ``"{name}: {value}"``);
  metrics over all (product, attribute) pairs, macro over all (name, value) labels, plus
  ``accuracy/<name>`` per attribute.

The result is ``{task: {metric: value}}``; ``n_queries`` / ``n_candidates`` / ``n_samples`` /
``n_labels`` say how large each task was, and ``n_query_fallback`` how many queries fell back to the
product's own title / image (a warning says so: such queries are easier than real ones).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from moon_fast.eval.metrics import DEFAULT_KS, classification_metrics, nearest_prototype, retrieval_metrics

RETRIEVAL_TASKS = {  # task: (query composition, candidate composition)
    "t2mm": ("t", "mm"),
    "i2mm": ("i", "mm"),
    "mm2mm": ("mm", "mm"),
    "t2i": ("t", "i"),
    "i2t": ("i", "t"),
}
ZERO_SHOT_TASKS = ("classification", "attribute")
ALL_TASKS = tuple(RETRIEVAL_TASKS) + ZERO_SHOT_TASKS


# ----------------------------------------------------------------------------- locating things

def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").exists()


def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path | None]:
    """(model directory, run directory or None). ``checkpoint`` is a run directory (its ``final/``
    model, else its newest ``checkpoints/step_*``) or a saved model directory."""
    p = Path(checkpoint)
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {p}: no such directory (give a run directory or a saved model directory)")
    if _is_model_dir(p):
        # a run's final/ or checkpoints/step_*/: the run is the folder above holding config.yaml
        for run in (p.parent, p.parent.parent):
            if (run / "config.yaml").exists():
                return p, run
        return p, None
    if (p / "final").is_dir() and _is_model_dir(p / "final"):
        return p / "final", p
    steps = sorted((p / "checkpoints").glob("step_*")) if (p / "checkpoints").is_dir() else []
    steps = [s for s in steps if _is_model_dir(s)]
    if steps:
        return steps[-1], p
    raise FileNotFoundError(f"--checkpoint {p}: neither a saved model (no config.json) nor a run directory "
                            "(no final/ or checkpoints/step_*/ with a config.json)")


def run_data_dir(run: Path) -> Path | None:
    """The catalog directory a run trained on, from its ``config.yaml``: ``data.path``, or the
    synthetic catalog named by ``data.synth_products`` / ``data.synth_seed`` when the path is empty
    (generated into the cache if it is not there). None when the config names neither."""
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        return None
    import yaml

    try:
        with open(cfg_path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{cfg_path} is not valid YAML ({str(e)[:300]}); pass --data to evaluate on a file "
                         "instead of the run's own held-out set") from e
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if not isinstance(data, dict):
        return None
    if data.get("path"):
        p = Path(data["path"])
        return p if p.is_absolute() or p.exists() else (run / p)
    if "synth_products" in data:
        from moon_fast.data import ensure_synthetic

        return Path(ensure_synthetic(products=int(data["synth_products"]), seed=int(data.get("synth_seed", 0)),
                                     verbose=False))
    return None


def default_eval_data(model_dir: Path, run: Path | None) -> Path:
    """The held-out MBE file: the run's catalog's ``heldout.jsonl``, else the default synthetic
    catalog's (generated on first use)."""
    if run is not None:
        d = run_data_dir(run)
        if d is not None:
            return d / "heldout.jsonl"
    from moon_fast.data import ensure_synthetic

    return Path(ensure_synthetic(verbose=False)) / "heldout.jsonl"


def _load_image_processor(model, model_dir: Path):
    """The checkpoint's own preprocessor_config.json when it has one (model.source_dir), else the one
    built from the model's vision config (moon_fast.model.image_processor_for decides)."""
    from moon_fast.data import image_processor_for

    return image_processor_for(model)


def _load_tokenizer(model_dir: Path, data_file: Path, run: Path | None = None):
    """The checkpoint's own tokenizer, else the one beside the data, else the run's catalog's."""
    from moon_fast.data import load_tokenizer

    for cand in (model_dir, data_file.parent, *([run_data_dir(run)] if run is not None else [])):
        if cand is None:
            continue
        if (cand / "tokenizer.json").exists() or (cand / "tokenizer_config.json").exists():
            return load_tokenizer(cand)
    raise FileNotFoundError(f"no tokenizer in {model_dir} or {data_file.parent}: save the tokenizer with the model "
                            "(moon-fast train does) or put tokenizer.json beside the data")


# ----------------------------------------------------------------------------- evaluation

def evaluate_embeddings(query: dict[str, torch.Tensor], product: dict[str, torch.Tensor], *,
                        category_proto: torch.Tensor | None = None, categories: list[str] | None = None,
                        true_category: list[str] | None = None,
                        attribute_proto: dict[str, tuple[list[str], torch.Tensor]] | None = None,
                        true_attributes: list[dict] | None = None, ks=DEFAULT_KS,
                        tasks=ALL_TASKS) -> dict[str, dict[str, float]]:
    """The metrics from precomputed embeddings (no model): ``query[c]`` / ``product[c]`` are (n, D)
    for composition c; row j of each is record j. Used by :func:`evaluate_checkpoint` and tests."""
    results: dict[str, dict[str, float]] = {}
    for task, (qc, cc) in RETRIEVAL_TASKS.items():
        if task in tasks:
            n = query[qc].shape[0]
            results[task] = retrieval_metrics(query[qc], product[cc], torch.arange(n, device=query[qc].device), ks=ks)
    mm = product.get("mm")
    if "classification" in tasks and category_proto is not None:
        pred = nearest_prototype(mm, category_proto.to(mm.device)).tolist()
        results["classification"] = classification_metrics([categories[i] for i in pred], true_category)
    if "attribute" in tasks and attribute_proto:
        preds, trues, per_name = [], [], {}
        for name, (values, proto) in attribute_proto.items():
            rows = [j for j, a in enumerate(true_attributes) if name in a]
            if not rows:
                continue
            idx = torch.tensor(rows, device=mm.device)
            p = [values[i] for i in nearest_prototype(mm[idx], proto.to(mm.device)).tolist()]
            t = [str(true_attributes[j][name]) for j in rows]
            preds += [(name, v) for v in p]
            trues += [(name, v) for v in t]
            per_name[name] = sum(a == b for a, b in zip(p, t)) / len(t)
        if trues:
            results["attribute"] = classification_metrics(preds, trues)
            results["attribute"].update({f"accuracy/{k}": v for k, v in per_name.items()})
    return results


def _check_records(records: list[dict], source) -> None:
    """The data layer's field checks, record by record; the images are opened when they are embedded."""
    from moon_fast.data.encode import check_record_fields

    if not records:
        raise ValueError(f"{source}: no records to evaluate")
    for i, r in enumerate(records):
        check_record_fields(r, f"{source}: record {i}")


@torch.no_grad()
def evaluate_checkpoint(checkpoint, data=None, output=None, batch_size: int = 64, *,
                        tasks=ALL_TASKS, device=None, label_template: str = "{name}: {value}",
                        limit: int | None = None, verbose: bool = True) -> dict[str, dict[str, float]]:
    """Evaluates a run directory or saved model directory on ``data`` (an MBE JSON/JSONL file; default
    the run's held-out products) and returns ``{task: {metric: value}}``; writes it to ``output``
    (JSON) when given. ``limit`` evaluates the first ``limit`` records only."""
    from moon_fast.data import encode_records, load_records
    from moon_fast.model import MoonModel

    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(ALL_TASKS)}")
    t0 = time.perf_counter()
    model_dir, run = resolve_checkpoint(checkpoint)
    data_file = Path(data) if data is not None else default_eval_data(model_dir, run)
    if not data_file.is_file():
        raise FileNotFoundError(f"--data {data_file}: no such file (an MBE-format JSON or JSONL file)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 record, got {limit}")
    records = load_records(data_file)
    if limit is not None:
        records = records[:limit]
    _check_records(records, data_file)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MoonModel.from_pretrained(str(model_dir)).to(dev).eval()
    tokenizer = _load_tokenizer(model_dir, data_file, run)
    processor = _load_image_processor(model, model_dir)
    enc = lambda recs, comp, side="product": encode_records(  # noqa: E731
        model, recs, tokenizer, processor, comp, batch_size, side=side, device=dev).to(dev)

    need_q = {RETRIEVAL_TASKS[t][0] for t in tasks if t in RETRIEVAL_TASKS}
    need_p = {RETRIEVAL_TASKS[t][1] for t in tasks if t in RETRIEVAL_TASKS}
    if set(tasks) & set(ZERO_SHOT_TASKS):
        need_p.add("mm")
    query = {c: enc(records, c, "query") for c in sorted(need_q)}
    product = {c: enc(records, c) for c in sorted(need_p)}

    categories = sorted({r["category"] for r in records})
    cat_proto = enc([{"title": c} for c in categories], "t") if "classification" in tasks else None
    attr_proto = {}
    if "attribute" in tasks:
        names = sorted({k for r in records for k in (r.get("attributes") or {})})
        for name in names:
            values = sorted({str(r["attributes"][name]) for r in records if name in (r.get("attributes") or {})})
            texts = [{"title": label_template.format(name=name, value=v)} for v in values]
            attr_proto[name] = (values, enc(texts, "t"))
    results = evaluate_embeddings(query, product, category_proto=cat_proto, categories=categories,
                                  true_category=[r["category"] for r in records], attribute_proto=attr_proto,
                                  true_attributes=[r.get("attributes") or {} for r in records], tasks=tasks)
    _note_query_fallbacks(results, records)
    if verbose:
        print(f"evaluated {model_dir} on {len(records)} records of {data_file} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _note_query_fallbacks(results: dict, records: list[dict]) -> None:
    """Records without ``query_text`` / ``query_image`` are queried by their own title / image, which their
    candidates contain: those retrieval figures are easier than with real queries. Each retrieval task gets
    ``n_query_fallback`` (queries that fell back), and a warning says so when there are any."""
    needs = {"t": ("query_text",), "i": ("query_image",), "mm": ("query_text", "query_image")}
    flagged = []
    for task, (comp, _) in RETRIEVAL_TASKS.items():
        if task in results:
            n = sum(1 for r in records if not all(r.get(k) for k in needs[comp]))
            results[task]["n_query_fallback"] = n
            if n:
                flagged.append(f"{task} {n}")
    if flagged:
        warnings.warn(f"queries that fell back to the product's own title / image (no query_text / query_image in "
                      f"the record): {', '.join(flagged)} of {len(records)}; those retrieval figures overstate what "
                      "real queries would give", stacklevel=3)


# ----------------------------------------------------------------------------- presenting

MAIN_METRICS = ("recall@1", "recall@5", "recall@10", "mrr", "accuracy", "precision", "recall", "f1")


def format_results(results: dict[str, dict[str, float]]) -> str:
    """One row per task, one column per main metric (percentages for rates)."""
    cols = [m for m in MAIN_METRICS if any(m in v for v in results.values())]
    lines = ["task".ljust(15) + "".join(c.rjust(11) for c in cols) + "        n"]
    for task, mets in results.items():
        n = mets.get("n_queries", mets.get("n_samples", ""))
        cells = "".join((f"{100 * mets[c]:.2f}" if c in mets else "").rjust(11) for c in cols)
        lines.append(task.ljust(15) + cells + f"{n:>9}")
    return "\n".join(lines)


def load_eval(path: str | os.PathLike) -> dict:
    """An eval.json, or the eval.json inside a run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / "eval.json"
    if not p.exists():
        raise FileNotFoundError(f"{p}: no eval.json (run `moon-fast eval --checkpoint {path}` first)")
    try:
        with open(p) as f:
            results = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); write it again with `moon-fast eval`") from e
    if not (isinstance(results, dict) and all(isinstance(m, dict) and all(isinstance(v, (int, float))
                                                                          for v in m.values())
                                              for m in results.values())):
        raise ValueError(f"{p} is not an eval result ({{task: {{metric: number}}}}, as `moon-fast eval` writes)")
    return results


def format_comparison(paths: list[str], metrics=("recall@1", "recall@10", "mrr", "accuracy", "f1")) -> str:
    """A task/metric x run table of several eval.json files (e.g. the ablation runs); values in %."""
    evals = [load_eval(p) for p in paths]
    names = [Path(p).name if Path(p).is_dir() else str(p) for p in paths]
    w = max(12, *(len(n) for n in names)) + 2
    lines = ["task/metric".ljust(24) + "".join(n.rjust(w) for n in names)]
    tasks = list(dict.fromkeys(t for e in evals for t in e))
    for t in tasks:
        for m in metrics:
            if not any(m in e.get(t, {}) for e in evals):
                continue
            cells = "".join((f"{100 * e[t][m]:.2f}" if m in e.get(t, {}) else "-").rjust(w) for e in evals)
            lines.append(f"{t}/{m}".ljust(24) + cells)
    return "\n".join(lines)
