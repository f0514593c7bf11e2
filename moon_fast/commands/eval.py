"""`moon-fast eval`: zero-shot retrieval, classification and attribute prediction of a checkpoint.

    moon-fast eval --checkpoint RUN_OR_MODEL_DIR [--data MBE.jsonl] [--output eval.json]
    moon-fast eval --compare RUN1 RUN2 ...          # tabulate the eval.json of several runs

``--checkpoint`` is a run directory (its final model and its catalog's held-out products) or a saved
model directory (the default synthetic catalog's held-out products unless ``--data`` is given). The
JSON is ``{task: {metric: value}}``: t2mm, i2mm, mm2mm, t2i, i2t (recall@1/5/10, mrr), classification
and attribute (accuracy, precision, recall, f1; macro). Default output: ``<run>/eval.json`` for the
run's own held-out set, ``<run>/eval_<data file stem>.json`` with ``--data``.

Ablations (MOON2.0's, on our data) are separate training runs with config overrides, compared with
``--compare``; see benchmarks/ablation.sh.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot retrieval / classification / attribute evaluation",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="run directory or saved model directory")
    p.add_argument("--data", default=None, help="MBE-format JSON/JSONL records (default: the held-out set)")
    p.add_argument("--output", default=None, help="JSON file to write (default: beside the checkpoint)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="records per encoder forward")
    p.add_argument("--tasks", default=None, help="comma-separated subset of t2mm,i2mm,mm2mm,t2i,i2t,"
                                                 "classification,attribute")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N records only")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--compare", nargs="+", metavar="RUN_OR_JSON",
                   help="print a table of several runs' eval.json (run directories or JSON files) and exit")
    p.set_defaults(func=run)


def default_output(checkpoint: str, data: str | None) -> Path:
    from moon_fast.eval.evaluate import resolve_checkpoint

    model_dir, run = resolve_checkpoint(checkpoint)
    base = run if run is not None else model_dir
    return base / ("eval.json" if data is None else f"eval_{Path(data).stem}.json")


def output_problem(output: Path) -> str | None:
    """Why ``output`` cannot be written (checked before the evaluation, not after it), or None."""
    if output.is_dir():
        return f"--output {output} is a directory: give a file name, e.g. {output / 'eval.json'}"
    parent = output.parent
    while not parent.exists():  # the directories that the write will create
        parent = parent.parent
    if not parent.is_dir():
        return f"--output {output}: {parent} is a file, not a directory"
    try:  # a real probe: permission bits do not tell (root, read-only mounts, /proc)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        return f"--output {output}: cannot write in {parent} ({e.strerror})"
    return None


def device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used here, or None."""
    import torch

    if device is None:
        return None
    try:
        dev = torch.device(device)
    except RuntimeError:
        return f"--device {device!r}: not a device (cuda, cuda:N or cpu)"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is visible here; use --device cpu"
    if dev.type not in ("cuda", "cpu"):
        return f"--device {device}: evaluation runs on cuda or cpu"
    return None


def run(args) -> int:
    from moon_fast.eval.evaluate import ALL_TASKS, evaluate_checkpoint, format_comparison, format_results

    if args.compare:
        if args.checkpoint:
            print("error: give either --compare (tabulate earlier results) or --checkpoint (evaluate), not both",
                  file=sys.stderr)
            return 2
        try:
            print(format_comparison(args.compare))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.checkpoint:
        print("error: --checkpoint DIR is required (a run directory or a saved model directory)", file=sys.stderr)
        return 2
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks is not None else ALL_TASKS
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not tasks:
        print(f"error: --tasks: {'unknown ' + ', '.join(unknown) if unknown else 'no task given'}; known: "
              f"{', '.join(ALL_TASKS)}", file=sys.stderr)
        return 2
    try:
        output = Path(args.output or default_output(args.checkpoint, args.data))
        problem = output_problem(output) or device_problem(args.device)
        if problem:
            raise ValueError(problem)
        results = evaluate_checkpoint(args.checkpoint, data=args.data, output=output, batch_size=args.batch_size,
                                      tasks=tasks, device=args.device, limit=args.limit)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_results(results))
    print(f"\nwrote {output}")
    return 0
