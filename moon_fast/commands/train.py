"""`moon-fast train`: contrastive pre-training on DeepSpeed ZeRO (or plain torch), one or many processes.

    moon-fast train --config tiny --output runs/tiny                 # CPU, embedded synthetic catalog
    moon-fast train --config tiny --output runs/tiny --resume --max-steps 400
    moon-fast train --config tiny --nproc-per-node 2 distributed.zero_stage=2 train.global_batch=16
    torchrun --nnodes 2 --nproc-per-node 8 ... -m moon_fast.cli train --config base --data DIR ...
    deepspeed --num_gpus 8 moon_fast/cli.py train --config base --data DIR ...
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (DeepSpeed ZeRO / torch; presets: tiny, ci, base)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="a preset name (moon_fast/configs/*.yaml) or a YAML file")
    p.add_argument("--data", help="catalog directory (default: the embedded synthetic catalog)")
    p.add_argument("--output", help="run directory (default: runs/<config>-<time>)")
    p.add_argument("--max-steps", type=int, help="train up to this step (also with --resume)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="start this many local processes (via torch.distributed.run); not needed under torchrun")
    # The `deepspeed` launcher passes --local_rank=N to every process (the env has LOCAL_RANK too).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides with dotted keys, e.g. train.global_batch=64 distributed.zero_stage=2")
    p.set_defaults(func=run)


def _config(args):
    from moon_fast.train.config import load_config

    ov = list(args.overrides)
    if args.data:
        ov.append(f"data.path={args.data}")
    if args.max_steps is not None:
        ov.append(f"train.max_steps={args.max_steps}")
    return load_config(args.config, ov)


def run(args) -> int:
    from moon_fast.train.config import ConfigError, validate

    try:
        cfg = _config(args)
        if args.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node={args.nproc_per_node}: must be >= 1")
        if args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
            validate(cfg, args.nproc_per_node)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    output = args.output or os.path.join("runs", f"{os.path.basename(args.config).split('.')[0]}-"
                                                  f"{time.strftime('%Y%m%d-%H%M%S')}")
    if args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return _spawn(args, output)
    from moon_fast.data.catalog import TooManyBadRecords
    from moon_fast.train.trainer import Diverged, train

    try:
        summary = train(cfg, output, resume=args.resume)
    except (ConfigError, TooManyBadRecords, Diverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def _spawn(args, output: str) -> int:
    """Re-runs this command under torch.distributed.run with --nproc-per-node local workers."""
    import subprocess

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
            "-m", "moon_fast.cli", "train", "--config", args.config, "--output", output]
    if args.data:
        argv += ["--data", args.data]
    if args.max_steps is not None:
        argv += ["--max-steps", str(args.max_steps)]
    if args.resume:
        argv.append("--resume")
    argv += list(args.overrides)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc_per_node)))
    return subprocess.call(argv, env=env)


def format_summary(s: dict) -> str:
    last = s.get("last") or {}
    lines = [f"run: {s['run']}  ({s['steps']} steps in {s['train_seconds']:.0f} s)"]
    if last:
        lines.append(f"last window: loss {last.get('loss', float('nan')):.4f}  samples/s {last.get('samples_per_s', 0):.1f}"
                     f"  tokens/s {last.get('tokens_per_s', 0):.0f}  TFLOP/s {last.get('tflops', 0):.4f}"
                     f"  MFU {100 * last.get('mfu', 0):.1f}%  peak mem {last.get('peak_memory_mb', 0):.0f} MB")
    ev = s.get("eval")
    if ev:
        parts = [f"{t} R@10 {100 * ev[t]['recall@10']:.1f}%" for t in ("t2mm", "i2mm", "mm2mm", "t2i", "i2t")
                 if t in ev and "recall@10" in ev[t]]
        for t in ("classification", "attribute"):
            if t in ev and "accuracy" in ev[t]:
                parts.append(f"{t} acc {100 * ev[t]['accuracy']:.1f}%")
        lines.append("held-out: " + ", ".join(parts))
    if s.get("bad_records", {}).get("bad"):
        lines.append(f"bad records skipped: {s['bad_records']['bad']} of {s['bad_records']['seen']}")
    return "\n".join(lines)
