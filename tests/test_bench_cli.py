"""`moon-fast bench` end to end on tiny shapes, and the roofline / report arithmetic."""

from __future__ import annotations

import csv
import json

import pytest

from moon_fast.bench import report, runner
from moon_fast.cli import main


def _check_outputs(out, ops):
    data = json.loads((out / "results.json").read_text())
    m = data["machine"]
    for key in ("date", "commit", "device", "host_cpu", "host_cpu_isa", "torch", "triton", "transformers", "peaks"):
        assert key in m
    assert m["peaks"]["gemm_tflops"]["fp32"] > 0 and m["peaks"]["bandwidth_gbps"] > 0
    assert {r["op"] for r in data["results"]} == set(ops)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["results"])
    assert set(runner.CSV_COLUMNS) == set(rows[0])
    assert all(r["date"] == m["date"] for r in rows)
    md = (out / "report.md").read_text()
    assert "## Performance" in md and "Measured on" in md
    return data, rows


def test_bench_tiny_gemm_writes_every_file(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--ops", "gemm", "--tiny", "--output", str(out)]) == 0
    data, rows = _check_outputs(out, {"gemm"})
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["mode"] for r in ok} == {"fwd", "bwd", "fwd+bwd"} and {r["dtype"] for r in ok} == {"fp32", "bf16"}
    for r in ok:
        assert r["p20_s"] <= r["p50_s"] <= r["p80_s"]
        assert r["tflops"] == pytest.approx(r["flops"] / r["p50_s"] / 1e12)
        assert r["pct_peak"] is not None and r["bound"] in ("compute", "memory")
    for png in ("gemm_fp32.png", "gemm_bf16.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "gemm" in printed and "p50 ms" in printed
    # --report renders the same file
    assert main(["bench", "--report", str(out / "results.json")]) == 0
    assert "#### gemm" in capsys.readouterr().out


def test_unknown_op_and_missing_module(tmp_path, capsys):
    assert main(["bench", "--ops", "nope", "--output", str(tmp_path)]) == 2
    assert "unknown op" in capsys.readouterr().err
    cases, missing = runner.collect_cases(["gemm"], quick=True, tiny=True, dtypes=["fp32"])
    assert [c.label for c in cases] == ["n=64"] and not missing
    runner.OP_MODULES["broken_for_test"] = "moon_fast.bench.does_not_exist"
    try:
        cases, missing = runner.collect_cases(["broken_for_test"], quick=True)
    finally:
        del runner.OP_MODULES["broken_for_test"]
    assert not cases and missing[0]["status"].startswith("unavailable: moon_fast.bench.does_not_exist")


def test_roofline_by_hand():
    peaks = {"gemm_tflops": {"fp32": 2.0, "bf16": 8.0}, "bandwidth_gbps": 100.0}
    rows = [
        # compute-bound: intensity 1e3 flop/byte x 100 GB/s = 100 TFLOP/s > 2 -> roof 2 TFLOP/s
        dict(op="x", backend="b", dtype="fp32", label="", mode="fwd", status="ok", p50_s=1.0, flops=1e12,
             tflops=1.0, gbps=1.0, extra={"bytes": 1e9, "samples": 10}),
        # memory-bound: intensity 10 flop/byte x 100 GB/s = 1 TFLOP/s < 8 -> roof 1 TFLOP/s
        dict(op="x", backend="b", dtype="bf16", label="", mode="fwd", status="ok", p50_s=1.0, flops=1e12,
             tflops=0.5, gbps=100.0, extra={"bytes": 1e11}),
        dict(op="x", backend="b", dtype="bf16", label="", mode="fwd", status="oom", p50_s=None, extra={}),
    ]
    runner.add_derived(rows, peaks)
    assert rows[0]["pct_peak"] == pytest.approx(50.0) and rows[0]["bound"] == "compute"
    assert rows[0]["samples_per_s"] == pytest.approx(10.0)
    assert rows[1]["pct_peak"] == pytest.approx(50.0) and rows[1]["bound"] == "memory"
    assert rows[2]["pct_peak"] is None


def test_report_speedup_and_status(tmp_path):
    res = [dict(op="contrastive", backend=b, dtype="fp32", label="B=64", mode="fwd+bwd", status="ok", p50_s=t,
                p20_s=t, p80_s=t, peak_mem_bytes=2**20, tflops=None, pct_peak=None) for b, t in
           (("reference", 0.004), ("torch", 0.002))]
    res.append(dict(op="contrastive", backend="triton", dtype="fp32", label="B=64", mode="fwd",
                    status="not timed: triton interpreter on CPU"))
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"machine": {"device": "cpu", "date": "2026-01-01"}, "settings": {}, "results": res}))
    md = report.render([str(p)])
    assert "| fp32 | B=64 | 4 ms, 1 MiB | 2 ms (2x), 1 MiB | not timed |" in md
    assert "CPU figures" in md


@pytest.mark.slow
def test_bench_quick_all_ops_tiny(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--tiny", "--output", str(out)]) == 0
    data, _ = _check_outputs(out, set(runner.DEFAULT_OPS))
    errors = [r for r in data["results"] if r["status"].startswith("error")]
    assert not errors, errors


def test_shared_worker_survives_a_crashing_case(tmp_path, monkeypatch):
    from moon_fast.bench.harness import Case

    (tmp_path / "crashing_bench_mod.py").write_text(
        "import os\n\ndef build(**kw):\n    os._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{__import__('os').environ.get('PYTHONPATH', '')}")
    ok = Case("gemm", "torch", "fp32", {"n": 16}, "moon_fast.bench.gemm:build", label="n=16")
    bad = Case("gemm", "torch", "fp32", {}, "crashing_bench_mod:build", label="crash")
    rows = runner.run_cases([ok, bad, ok], warmup=0, repeats=1, timeout_s=120, shared_process=True)
    by_label = {}
    for r in rows:
        by_label.setdefault(r["label"], set()).add(r["status"])
    assert by_label["n=16"] == {"ok"}
    assert len(by_label["crash"]) == 1 and next(iter(by_label["crash"])).startswith("error")
    assert sum(r["label"] == "n=16" and r["mode"] == "fwd+bwd" for r in rows) == 2


def test_time_budget_skips_remaining_cases():
    from moon_fast.bench.harness import Case

    c = Case("gemm", "torch", "fp32", {"n": 16}, "moon_fast.bench.gemm:build", label="n=16")
    rows = runner.run_cases([c, c], warmup=0, repeats=1, timeout_s=60, time_budget_s=-1.0)
    assert [r["status"].startswith("skipped: time budget") for r in rows] == [True, True]


def test_plot_axes_from_labels():
    from moon_fast.bench.plots import axis_of

    a = axis_of(["d=64 S=512", "d=64 S=1024", "d=128 S=512", "d=128 causal S=512", "d=128 causal S=2048",
                 "sweepT:T=128,E=8", "sweepT:T=1024,E=8", "T=512,E=8", "tiny x8"])
    assert a["d=64 S=1024"] == ("d=64", "S", 1024.0)
    assert a["d=128 S=512"] == ("d=128", "S", 512.0)
    assert a["d=128 causal S=2048"] == ("d=128 causal", "S", 2048.0)
    assert a["sweepT:T=1024,E=8"] == ("sweepT:E=8", "T", 1024.0)
    assert a["T=512,E=8"] == ("T=512,E=8", None, None)  # alone in its family: bars
    assert a["tiny x8"] == ("tiny x8", None, None)


def sleepy_build(*, backend, dtype, device, seconds):
    """A workload whose forward sleeps ``seconds`` (the interleaved comparison's self-check)."""
    import time

    from moon_fast.backends import BackendUnavailable
    from moon_fast.bench.harness import Workload

    if backend == "missing":
        raise BackendUnavailable("the 'missing' backend is never installed")
    return Workload(forward=lambda: time.sleep(seconds), flops_fwd=1e9)


def test_interleaved_ratios_and_unavailable():
    from moon_fast.bench.harness import Case
    from moon_fast.bench.interleaved import compare, format_table

    builder = f"{__name__}:sleepy_build"
    cases = [Case("toy", name, "fp32", {"seconds": s}, builder, label="x")
             for name, s in (("fast", 0.002), ("slow", 0.012), ("missing", 0.0))]
    res = compare(cases, rounds=4, warmup=0)
    be = res["backends"]
    assert res["baseline"] == "fast" and len(be["fast"]["times_s"]) == 4
    assert be["fast"]["p50_s"] >= 0.002 and be["slow"]["p50_s"] >= 0.012
    assert be["slow"]["ratio_min"] > 1.5  # sleeps of 2 and 12 ms: the ratio cannot come out below 1.5
    assert be["missing"]["status"].startswith("unavailable:") and "times_s" not in be["missing"]
    table = format_table([res])
    assert "baseline" in table and "unavailable" in table
    with pytest.raises(ValueError, match="op, dtype and label"):
        compare([cases[0], Case("toy", "slow", "bf16", {"seconds": 0.0}, builder, label="x")], rounds=1)


def test_bench_interleave_cli(tmp_path, capsys):
    out = tmp_path / "il"
    assert main(["bench", "--ops", "gemm", "--quick", "--dtypes", "fp32", "--label", "n=64", "--label", "n=128",
                 "--interleave", "2", "--output", str(out)]) == 0
    data = json.loads((out / "interleaved.json").read_text())
    assert [g["label"] for g in data["groups"]] == ["n=64", "n=128"]
    assert all(len(g["backends"]["torch"]["times_s"]) == 2 for g in data["groups"])
    assert data["machine"]["torch"] and "| gemm | fp32 | n=64 | torch |" in (out / "interleaved.md").read_text()
    assert main(["bench", "--ops", "gemm", "--quick", "--label", "no such", "--interleave", "2",
                 "--output", str(out)]) == 2
    assert "--label: no case of these ops has 'no such' here; there are: n=" in capsys.readouterr().err


def test_bench_selection_typos_fail_before_anything_is_written(tmp_path, capsys):
    """A --backends / --dtypes / --label value no case has (a typo) is an error that lists the values there
    are, and the results of the run before in --output stay as they were (they used to be overwritten
    with an empty table, exit code 0); so do a combination matching nothing and bad numbers."""
    out = tmp_path / "b"
    assert main(["bench", "--ops", "gemm", "--tiny", "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for argv, message in ((["--backends", "refernce"], "--backends: no case of these ops has 'refernce' here; there "
                                                       "are: torch"),
                          (["--dtypes", "float32"], "--dtypes: no case of these ops has 'float32' here; there are: "),
                          (["--label", "n=7"], "--label: no case of these ops has 'n=7' here"),
                          (["--dtypes", "fp32", "--label", "no such"], "'no such'"),
                          (["--repeats", "0"], "--repeats must be at least 1"),
                          (["--timeout", "-5"], "--timeout must be a positive number"),
                          (["--time-budget", "0"], "--time-budget must be a positive number"),
                          (["--warmup", "-1"], "--warmup must be 0 or more")):
        assert main(["bench", "--ops", "gemm", "--quick", "--output", str(out), *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (tmp_path / "afile").write_text("x")
    assert main(["bench", "--ops", "gemm", "--tiny", "--output", str(tmp_path / "afile")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_bench_exits_1_when_every_case_failed(tmp_path, monkeypatch, capsys):
    from dataclasses import asdict

    from moon_fast.bench import runner
    from moon_fast.bench.harness import Result

    def failing(cases, **kw):
        return [asdict(Result(op=c.op, backend=c.backend, dtype=c.dtype, label=c.label, params=c.params,
                              mode="fwd+bwd", status="error: RuntimeError: boom")) for c in cases]

    monkeypatch.setattr(runner, "run_cases", failing)
    assert main(["bench", "--ops", "gemm", "--tiny", "--no-plots", "--output", str(tmp_path / "o")]) == 1
    assert "cases failed" in capsys.readouterr().err


def test_bench_report_rejects_what_is_not_a_results_file(tmp_path, capsys):
    (tmp_path / "corrupt.json").write_text('{"machine": ')
    (tmp_path / "eval.json").write_text(json.dumps({"t2i": {"recall@1": 0.5}}))
    for name, message in (("corrupt.json", "is not valid JSON"), ("eval.json", "is not a results.json")):
        assert main(["bench", "--report", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_cli_turns_on_huge_pages_before_torch(preset, expected):
    """moon_fast.cli sets THP_MEM_ALLOC_ENABLE=1 (unless the user set it) before torch is imported: torch
    reads it once, at its first allocation."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import sys, moon_fast.cli, os; assert 'torch' not in sys.modules; "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_interleaved_ratios_are_medians_of_per_round_ratios():
    """benchmarks/interleaved_ratios.py: A / B per round, then the median (not a ratio of medians); a backend
    that did not run gives no ratio."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "interleaved_ratios.py"
    spec = importlib.util.spec_from_file_location("interleaved_ratios", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    group = {"backends": {"a": {"status": "ok", "times_s": [1.0, 4.0, 3.0]},
                          "b": {"status": "ok", "times_s": [2.0, 2.0, 1.0]},
                          "c": {"status": "unavailable: no GPU"}}}
    # per round 0.5, 2, 3: median 2 (the ratio of medians would be 3 / 2 = 1.5)
    assert mod.pair_ratios(group, "a", "b") == (2.0, 0.5, 3.0)
    assert mod.pair_ratios(group, "a", "c") is None and mod.pair_ratios(group, "a", "missing") is None
