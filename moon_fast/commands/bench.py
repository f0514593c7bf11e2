"""`moon-fast bench`: kernel and end-to-end benchmarks against the reference and peer libraries.

    moon-fast bench [--ops contrastive,attention,moe,train] [--quick] [--output DIR]
    moon-fast bench --report DIR/results.json [MORE.json ...]     # prints the README performance section
    moon-fast bench --ops moe --label T=4096,E=8 --backends torch,hf_grouped_mm --interleave 15

With ``--interleave ROUNDS`` the backends of each case are instead timed in turn, round after round, in
one process (``moon_fast/bench/interleaved.py``): forward+backward medians and per-round ratios against
the first backend listed, free of the drift between processes. Writes ``interleaved.json`` and
``interleaved.md``.

For each op, backend, dtype and shape (the cases of ``moon_fast/bench/<op>.py``): forward, backward and
forward+backward time (median, p20/p80), peak memory, TFLOP/s and GB/s from explicit formulas, and %
of the peaks measured on this machine at the start of the run. Writes ``results.csv``,
``results.json`` (machine, versions, commit, date), PNG plots and ``report.md`` under ``--output``,
and prints a table.
"""

from __future__ import annotations

import os
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="kernel and end-to-end benchmarks (CSV, JSON, plots, report)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="contrastive,attention,moe,train",
                   help="comma-separated ops: contrastive, attention, moe, train (and gemm, the harness self-check)")
    p.add_argument("--quick", action="store_true", help="small shapes: a few minutes on a CPU")
    p.add_argument("--output", default="bench_results", help="directory for results.csv/json, plots, report.md")
    p.add_argument("--backends", default=None, help="only these backends (comma-separated)")
    p.add_argument("--dtypes", default=None, help="only these dtypes (comma-separated: fp32,bf16,fp16)")
    p.add_argument("--label", action="append", default=None, metavar="LABEL",
                   help="only cases with this label, e.g. 'T=4096,E=8' or 'd=128 causal S=1024' (repeatable)")
    p.add_argument("--interleave", type=int, default=None, metavar="ROUNDS",
                   help="time the backends of each case in turn for ROUNDS rounds in one process; "
                        "ratios against the first backend of --backends")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 1, GPU 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per mode (default: 3 with --quick, 10; 20 on a GPU)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case before it is recorded as failed")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop starting new cases after this long, shared equally among the ops (the rest are recorded as skipped)")
    p.add_argument("--process-per-case", choices=("yes", "no", "auto"), default="auto",
                   help="measure each case in a fresh process (clean memory figures; default except with "
                        "--quick on a CPU, where one worker process measures all cases to save start-up time)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--report", nargs="+", metavar="RESULTS_JSON",
                   help="print the markdown performance section from these results.json files and exit")
    # Hidden: the first case of each (op, backend, dtype) only, 1 repeat, small peak probes (tests).
    p.add_argument("--tiny", action="store_true", help=argparse_suppress())
    p.set_defaults(func=run)


def run_interleaved(args, cases, warmup: int, backends: list[str] | None) -> int:
    import json

    from moon_fast.bench import harness, interleaved

    if args.interleave < 1:
        print("error: --interleave needs at least 1 round", file=sys.stderr)
        return 2
    if not cases:
        print("error: no case matches --ops/--backends/--dtypes/--label (labels are listed in results.csv "
              "of a normal run)", file=sys.stderr)
        return 2
    if backends:  # the order given is the order of the rows and of the ratios (first = baseline)
        cases = sorted(cases, key=lambda c: backends.index(c.backend))  # stable: groups keep their order
    machine = harness.machine_info()
    settings = {"command": "moon-fast bench " + " ".join(sys.argv[2:]), "rounds": args.interleave, "warmup": warmup}

    def save(groups: list[dict]) -> None:  # after every group: an interrupted run keeps what it measured
        with open(os.path.join(args.output, "interleaved.json"), "w") as f:
            json.dump({"machine": machine, "settings": settings, "groups": groups}, f, indent=1)

    groups = interleaved.run_groups(cases, rounds=args.interleave, warmup=warmup, on_group=save)
    table = interleaved.format_table(groups)
    with open(os.path.join(args.output, "interleaved.md"), "w") as f:
        f.write(f"{machine['device']} ({machine['host_cpu']}, {machine['host_cpu_isa']}, {machine['cpu_threads']} threads, "
                f"LD_PRELOAD {machine.get('ld_preload')}), torch "
                f"{machine['torch']}, commit {machine['commit']}, {machine['date']}; {args.interleave} rounds\n\n"
                + table + "\n")
    print(table)
    print(f"\nwrote {args.output}/interleaved.json and interleaved.md")
    return 0


def check_numbers(args) -> str | None:
    """The first bad numeric option as an error message, or None."""
    if args.repeats is not None and args.repeats < 1:
        return f"--repeats must be at least 1 (timed calls per mode), got {args.repeats}"
    if args.warmup is not None and args.warmup < 0:
        return f"--warmup must be 0 or more, got {args.warmup}"
    if args.timeout <= 0:
        return f"--timeout must be a positive number of seconds per case, got {args.timeout:g}"
    if args.time_budget is not None and args.time_budget <= 0:
        return f"--time-budget must be a positive number of seconds, got {args.time_budget:g}"
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        return f"--output {args.output} is a file, not a directory: give a directory for the results"
    return None


def check_selection(all_cases, backends, dtypes, labels) -> str | None:
    """An error message for each --backends / --dtypes / --label value that no case of the chosen ops
    has on this machine (a typo would otherwise select nothing, and a normal run would then overwrite the
    results in --output with an empty table), listing the values there are; or None."""
    problems = []
    for flag, wanted, have in (("--backends", backends, {c.backend for c in all_cases}),
                               ("--dtypes", dtypes, {c.dtype for c in all_cases}),
                               ("--label", labels, {c.label for c in all_cases})):
        unknown = [w for w in wanted or [] if w not in have]
        if unknown:
            choices = sorted(have)
            shown = ", ".join(choices[:30]) + (f", ... ({len(choices)} in all)" if len(choices) > 30 else "")
            problems.append(f"{flag}: no case of these ops has {', '.join(map(repr, unknown))} here; "
                            f"there are: {shown or 'none'}")
    return "\n".join(f"error: {p}" for p in problems) or None


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def run(args) -> int:
    from moon_fast.bench import report

    if args.report:
        missing = [p for p in args.report if not os.path.isfile(p)]
        if missing:
            print(f"error: --report: no such file: {', '.join(missing)} (run `moon-fast bench` first)", file=sys.stderr)
            return 2
        try:
            print(report.render(args.report))
        except ValueError as e:
            print(f"error: --report: {e}", file=sys.stderr)
            return 2
        return 0

    import torch

    from moon_fast.bench import harness, runner
    from moon_fast.bench.peaks import measure_peaks, merge_peaks

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in runner.OP_MODULES]
    if unknown:
        print(f"error: --ops: unknown op(s) {', '.join(unknown)}; known: {', '.join(runner.OP_MODULES)}",
              file=sys.stderr)
        return 2
    bad = check_numbers(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    gpu = torch.cuda.is_available()
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else (3 if gpu else 1))
    repeats = args.repeats if args.repeats is not None else (
        1 if args.tiny else (20 if gpu else (3 if args.quick else 10)))
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    all_cases, _ = runner.collect_cases(ops, quick=args.quick or args.tiny)
    bad = check_selection(all_cases, split(args.backends), split(args.dtypes), args.label)
    if bad:
        print(bad, file=sys.stderr)
        return 2
    cases, missing = runner.collect_cases(ops, quick=args.quick or args.tiny, tiny=args.tiny,
                                          backends=split(args.backends), dtypes=split(args.dtypes))
    if args.label:
        cases = [c for c in cases if c.label in args.label]
    if not cases and not missing:
        print("error: no case matches --ops/--backends/--dtypes/--label together (each matches some case; "
              "their combination none)", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    if args.interleave is not None:
        return run_interleaved(args, cases, warmup, split(args.backends))
    shared = args.process_per_case == "no" or (args.process_per_case == "auto" and (args.quick or args.tiny) and not gpu)

    machine = harness.machine_info()
    print(f"measuring peaks on {machine['device']} ...", file=sys.stderr, flush=True)
    machine["peaks"] = measure_peaks(small=args.tiny)
    print(f"{len(cases)} cases ({', '.join(ops)}); warm-up {warmup}, repeats {repeats}", file=sys.stderr, flush=True)

    settings = {"command": "moon-fast bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"]
                else "moon-fast bench --ops " + args.ops + (" --quick" if args.quick else ""),
                "ops": ops, "quick": args.quick, "tiny": args.tiny, "warmup": warmup, "repeats": repeats,
                "process_per_case": not shared}
    json_path = os.path.join(args.output, "results.json")

    def save(done: list[dict]) -> None:  # after every case: an interrupted run still leaves its files
        rows = runner.add_derived([dict(r) for r in missing + done], machine["peaks"])
        runner.write_json(json_path, rows, machine, settings)
        runner.write_csv(os.path.join(args.output, "results.csv"), rows, machine)

    # With a time budget each op gets an equal share of what is left when it starts (an op that
    # finishes early leaves its rest to the next), so a long op cannot starve the ones after it.
    import time

    done: list[dict] = []
    t_start = time.perf_counter()
    op_order = list(dict.fromkeys(c.op for c in cases))
    for i, op in enumerate(op_order):
        budget = None
        if args.time_budget is not None:
            budget = (args.time_budget - (time.perf_counter() - t_start)) / (len(op_order) - i)
        done += runner.run_cases([c for c in cases if c.op == op], warmup=warmup, repeats=repeats,
                                 timeout_s=args.timeout, time_budget_s=budget, shared_process=shared,
                                 on_progress=lambda rows, prev=list(done): save(prev + rows))
    if cases:
        print("measuring peaks again ...", file=sys.stderr, flush=True)
        machine["peaks"] = merge_peaks(machine["peaks"], measure_peaks(small=args.tiny))
    save(done)
    rows = runner.add_derived(missing + done, machine["peaks"])
    plots = []
    if not args.no_plots:
        from moon_fast.bench.plots import make_plots

        where = f" ({machine['device']}, {machine['date'][:10]})"
        plots = make_plots(rows, args.output, title_suffix=where)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(report.render([json_path]) + "\n")
    print(runner.format_table(rows))
    print(f"\nwrote {args.output}/results.csv, results.json, report.md" +
          (f" and {len(plots)} plots" if plots else ""))
    if done and all(r["status"].startswith("error") for r in done):
        print(f"error: all {len(cases)} cases failed (see the status column)", file=sys.stderr)
        return 1
    return 0
