"""The MoE scripts (benchmarks/moe_gpu_*.py, moe_triton_tiles.py, moe_launch_count.py) run their logic on the CPU under
the Triton interpreter at tiny shapes (timings read NaN there), so a change to the kernels' launchers
cannot break them unseen between GPU loans."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_gpu_gemm_rows(dtype):
    import moe_gpu_gemm

    rows = moe_gpu_gemm.measure_shape(40, 32, 32, 3, 2, dtype, ["triton", "torch", "grouped_gemm"], dev="cpu")
    # TMA rows in 16-bit: the interpreter runs descriptor loads (on a GPU: only where it has TMA)
    tma = dtype != torch.float32
    assert [r["what"] for r in rows] == (
        ["hbm_copy"] + [f"floor_{n}" for n in ("swiglu_up", "down_fwd", "dh_swiglu", "wgrad_down", "wgrad_gate_up",
                                              "dx", "dh")]
        + ["dense_fwd", "triton_fwd", "dense_bwd", "triton_bwd", "triton_bwd_split"]
        + ["triton_fwd_tma", "triton_bwd_tma", "triton_bwd_split_tma", "triton_fwd_tma_persistent",
           "triton_bwd_tma_persistent", "triton_bwd_split_tma_persistent"] * tma
        + ["torch_gmm_fwd", "torch_gmm_bwd", "grouped_gemm_fwd", "grouped_gemm_bwd"]
        + ["dense_fwdbwd", "op_triton", "op_torch", "op_grouped_gemm", "op_triton_split"]
        + ["op_triton_tma", "op_triton_split_tma", "op_triton_tma_persistent"] * tma)
    skipped = {r["what"]: r["skipped"] for r in rows if "skipped" in r}
    # the grouped_gemm peer needs its package (and bf16) and a GPU; it says so instead of failing
    assert set(skipped) == {"grouped_gemm_fwd", "grouped_gemm_bwd", "op_grouped_gemm"}, skipped
    assert all(reason for reason in skipped.values())
    assert all("error" not in r and math.isnan(r.get("ms", r.get("gbps"))) for r in rows if "skipped" not in r)


@pytest.mark.parametrize("dtype, tma", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
def test_tile_sweep_runs_every_launch(dtype, tma, monkeypatch, capsys):
    """Every launch runs; each prints a line that moe_tile_rereads.py can read back (its fit's input)."""
    import moe_tile_rereads
    import moe_triton_tiles

    monkeypatch.setattr(moe_triton_tiles, "CANDIDATES", {n: c[:1] for n, c in moe_triton_tiles.CANDIDATES.items()})
    rows = moe_triton_tiles.sweep_shape(40, 32, 32, 3, 2, dtype, dev="cpu", tma=tma)
    assert [r["launch"] for r in rows] == list(moe_triton_tiles.CANDIDATES)
    assert all("error" not in r for r in rows), [r.get("error") for r in rows]
    parsed = [m["launch"] for m in map(moe_tile_rereads.LINE.search, capsys.readouterr().out.splitlines()) if m]
    assert parsed == list(moe_triton_tiles.CANDIDATES)


def test_best_tiles_file_sets_only_its_dtype(monkeypatch):
    """What the sweep writes as best_tiles_<dtype>.json, given to $MOON_FAST_MOE_TILES, changes that dtype's
    launches and no other's (a flat bf16 table once reached fp32 and overflowed its shared memory)."""
    import moe_triton_tiles
    import moon_fast.kernels.moe as moe_kernels

    monkeypatch.setattr(moe_kernels, "interpreting", lambda: False)  # the GPU tables, without a GPU
    monkeypatch.delenv(moe_kernels.TILES_ENV, raising=False)
    before = {dt: moe_kernels.tile_sizes(dt) for dt in (torch.bfloat16, torch.float32)}
    best = {("dx", 16384, 8): {"config": [64, 64, 32, 4, 2], "ms": 1.0},
            ("dx", 4096, 8): {"config": [32, 32, 32, 4, 2], "ms": 0.5}}  # the first shape's row wins
    monkeypatch.setenv(moe_kernels.TILES_ENV, json.dumps(moe_triton_tiles.best_tiles(best, "bf16")))
    assert moe_kernels.tile_sizes(torch.bfloat16)["dx"] == {"BM": 64, "BN": 64, "BK": 32, "num_warps": 4,
                                                            "num_stages": 2}
    assert moe_kernels.tile_sizes(torch.float32) == before[torch.float32]


def test_launches_compute_the_op():
    """The launches the scripts time are the op's: the backward's dx launch, scattered and summed over the
    k choices, is the gradient the triton backend returns for hidden."""
    from moe_gpu_launches import MoeLaunches

    from moon_fast.ops import moe_mlp

    m = MoeLaunches(40, 32, 24, 3, 2, torch.float32, "cpu")
    hidden, idx, weight, gate_up, down, grad = (x.detach() for x in m.problem)
    dx = m.launches["dx"].run(m.plan).view(40, 2, 32).sum(1)
    leaf = hidden.clone().requires_grad_()
    moe_mlp(leaf, idx, weight, gate_up, down, backend="triton").backward(grad)
    torch.testing.assert_close(dx, leaf.grad, rtol=1e-4, atol=1e-5)
    # the split dh launch (plain GEMM + elementwise pass) gives what the fused one gives
    for got, want in zip(m.launches["dh"].run(m.plan), m.launches["dh_swiglu"].run(m.plan)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the peers' plain grouped GEMMs compute the same products as our launches
    peer = m.peer_products("torch_gmm")
    torch.testing.assert_close(peer["swiglu_up"](), m.launches["swiglu_up"].run(m.plan)[1], rtol=1e-4, atol=1e-5)
    for name in ("wgrad_down", "wgrad_gate_up"):
        torch.testing.assert_close(peer[name](), m.launches[name].run(m.plan), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="bf16"):
        m.peer_products("grouped_gemm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launch_bytes_are_their_tensors(dtype):
    """Each launch's memory floor counts what it reads and writes: the tensors it is given (the token rows of
    dout and x once each, the weights, the routing weights) and the outputs it returns, at their real sizes."""
    from moe_gpu_launches import MoeLaunches

    t, h, i, e, k = 40, 32, 24, 3, 2
    m = MoeLaunches(t, h, i, e, k, dtype, "cpu")
    hidden, _, _, gate_up, down, grad = m.problem
    nb = lambda *ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    out = {name: launch.run(m.plan) for name, launch in m.launches.items()}
    gu, w = m.saved["gu"], m.saved["w_sorted"]
    h_act, (wh, dgu) = out["swiglu_up"][0], out["dh_swiglu"]
    want = {"swiglu_up": nb(hidden, gate_up, *out["swiglu_up"]),
            "down_fwd": nb(h_act, down, out["down_fwd"]),
            "dh_swiglu": nb(grad, down, w, gu, *out["dh_swiglu"]),
            "wgrad_down": nb(grad, wh, out["wgrad_down"]),
            "wgrad_gate_up": nb(dgu, hidden, out["wgrad_gate_up"]),
            "dx": nb(dgu, gate_up, out["dx"]),
            # the split: dh_swiglu's tensors, plus the plain dh (S, I) written and read back
            "dh": nb(grad, down, w, gu, *out["dh"]) + 2 * t * k * i * h_act.element_size()}
    assert {name: launch.bytes for name, launch in m.launches.items()} == want
    assert all(math.isnan(f["ms"]) for f in m.floors(float("nan")).values())  # no GPU: no floor


def test_probes_run():
    import moe_gpu_probes

    assert moe_gpu_probes.main(["--t", "40", "--width", "32", "--route-t", "1,300", "--device", "cpu"]) == 0


def test_launch_count_writes_its_rows(tmp_path):
    """moe_launch_count.py runs off a GPU (interpreter) and writes one forward and one backward row per backend
    it can count, with the machine stamp."""
    import csv

    import moe_launch_count

    assert moe_launch_count.main(["--out", str(tmp_path), "--shape", "24,16,8,3,2"]) == 0
    with open(tmp_path / "moe_launch_count.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["backend"], r["phase"]) for r in rows] == [
        (b, p) for b in ("triton", "torch", "grouped_mm") for p in ("forward", "backward")]
    triton_total = sum(int(r["launches"]) for r in rows if r["backend"] == "triton")
    assert triton_total == 17 and all(r["torch"] == torch.__version__ for r in rows)


def test_moe_precision_report(tmp_path):
    """benchmarks/moe_precision.py (gpu_check.sh runs it on a GPU): one ratio pair per backend, output and
    gradient that runs here, each a finite number near 1 with the interpreter's rounding mended."""
    import re

    import moe_precision

    out = tmp_path / "precision.txt"
    assert moe_precision.main(["--seeds", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    backends = {line.split()[1] for line in rows}
    assert backends == {"torch", "cpu", "grouped_mm", "triton", "cuda_emu"}, backends
    assert len(rows) == 2 * len(backends)  # fp16 and bf16
    ratios = [float(x) for line in rows for x in re.findall(r" (\d+\.\d+)/", line)]
    assert len(ratios) == 5 * len(rows) and all(0.5 < r < 1.25 for r in ratios), rows


def test_tile_rereads_fit_recovers_a_known_rate(tmp_path):
    """moe_tile_rereads.py on a sweep made up so that each launch costs 0.05 ms plus its row operand's
    re-reads at 2.5 TB/s (bf16, S = 2 * 16384, H = I = 1024): the fit gives that rate and intercept back."""
    import moe_tile_rereads

    lines = []
    for launch, (elems, n) in {"down_fwd": (32768 * 1024, 1024), "dx": (32768 * 2048, 1024)}.items():
        for bn in (64, 128, 256):
            ms = 0.05 + n / bn * elems * 2 / 2.5e12 * 1e3
            lines.append(f"bfloat16 T=16384 E=8 {launch:<14} (128, {bn}, 64, 8, 3): {ms:.6f} ms  1 TFLOP/s")
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("\n".join(lines) + "\n")
    fits = [line for line in moe_tile_rereads.fit(str(sweep), 1024, 2) if "paid at" in line]
    assert len(fits) == 2
    assert all(" 2.50 TB/s (r = 1.00), intercept 0.050 ms" in line for line in fits), fits
