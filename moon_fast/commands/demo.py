"""`moon-fast demo` (what `make demo` runs): synthesise the default catalog if absent, train the tiny
preset on the CPU (a few minutes), evaluate zero-shot on the held-out products, print a summary."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="synthesise, train the tiny preset on CPU, evaluate, summarise")
    p.add_argument("--output", help="run directory (default: <cache>/demo-run, replaced on each demo)")
    p.add_argument("--config", default="tiny", help="preset or YAML (default tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=50")
    p.set_defaults(func=run)


def run(args) -> int:
    from moon_fast.data.synth import cache_dir
    from moon_fast.train.config import ConfigError, load_config
    from moon_fast.train.trainer import train

    try:
        cfg = load_config(args.config, list(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output) if args.output else cache_dir() / "demo-run"
    if not args.output and out.exists():
        shutil.rmtree(out)
    from moon_fast.data.catalog import TooManyBadRecords
    from moon_fast.train.trainer import Diverged

    try:
        summary = train(cfg, out)
    except (ConfigError, TooManyBadRecords, Diverged) as e:  # as `moon-fast train` reports them
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_demo(summary, out))
    return 0


def format_demo(s: dict, out: Path) -> str:
    rows = []
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    first, last = metrics[0], metrics[-1]
    n_steps = s["steps"]
    rows.append("=" * 72)
    rows.append(f"moon-fast demo: tiny preset, {n_steps} steps on the CPU in {s['train_seconds']:.0f} s "
                f"(including data, evaluation)")
    rows.append(f"throughput (last window): {last['samples_per_s']:.1f} triplets/s, {last['tokens_per_s']:.0f} "
                f"tokens/s, {last.get('tflops', 0) * 1e3:.2f} GFLOP/s model FLOPs, MFU {100 * last.get('mfu', 0):.1f}% "
                f"of the measured CPU matmul rate")
    rows.append(f"loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}")
    ev = s.get("eval")
    if ev:
        n = sum(1 for x in (Path(s["data"]) / "heldout.jsonl").read_text().splitlines() if x.strip())
        rows.append(f"zero-shot on {n} held-out products (chance recall@10 = {100 * min(1, 10 / n):.1f}%):")
        for task in ("t2mm", "i2mm", "mm2mm", "t2i", "i2t"):
            if task in ev:
                r = ev[task]
                rows.append(f"  {task:<6} recall@1 {100 * r['recall@1']:5.1f}%  recall@10 {100 * r['recall@10']:5.1f}%"
                            f"  mrr {r['mrr']:.3f}")
        for task in ("classification", "attribute"):
            if task in ev and "accuracy" in ev[task]:
                rows.append(f"  {task:<14} accuracy {100 * ev[task]['accuracy']:5.1f}%")
    rows.append(f"run directory: {out} (metrics.jsonl, checkpoints/, final/, eval.json, tb/)")
    rows.append("=" * 72)
    return "\n".join(rows)
