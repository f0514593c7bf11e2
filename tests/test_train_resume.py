"""A resume that changes train.max_steps or optim.*: the resumed steps follow this run's schedule and
optimizer settings, on both engines (one process, tiny model, CPU, fp32). They used to follow the saved
ones: the first step after a resume with more steps ran at the old schedule's rate, and a changed optim.lr
was ignored while config.resume.yaml recorded it. The exact resume with unchanged settings:
tests/test_train_distributed.py, and the audit notes in tests/test_train_accum.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from moon_fast.train.engine import lr_lambda

REPO = Path(__file__).resolve().parents[1]
COMMON = ["train.global_batch=8", "train.log_every=1", "train.checkpoint_every=2", "train.evaluate=false",
          "train.progress=false", "train.dtype=fp32", "optim.warmup_steps=1", "optim.min_lr_ratio=0.05"]


@pytest.fixture
def catalog(small_catalog):
    return small_catalog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(engine: str, catalog: Path, out: Path, *overrides: str, resume: bool = False, crash: str = ""):
    """One process of `moon-fast train` (DeepSpeed's process group and global state stay out of pytest);
    ``crash``: MOON_FAST_CRASH (the process is killed there)."""
    env = dict(os.environ, MOON_FAST_CACHE=str(out.parent / "cache"), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", CUDA_VISIBLE_DEVICES="",
               MOON_FAST_CRASH=crash)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "moon_fast.cli", "train", "--config", "ci", "--data", str(catalog), "--output",
           str(out), f"distributed.engine={engine}", *COMMON, *overrides] + (["--resume"] if resume else [])
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert (p.returncode != 0) == bool(crash), f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}"
    return p


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_resume_follows_this_runs_schedule_and_optim(engine, catalog, tmp_path):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    out = tmp_path / "run"
    _train(engine, catalog, out, "train.max_steps=2", "optim.lr=1e-3")
    p = _train(engine, catalog, out, "train.max_steps=5", "optim.lr=2e-3", "optim.weight_decay=0.05", resume=True)
    assert "this run's optim.lr 0.001 -> 0.002, optim.weight_decay 0.01 -> 0.05" in p.stderr
    recs = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(recs) == [1, 2, 3, 4, 5]
    old, new = lr_lambda(1, 2, 0.05), lr_lambda(1, 5, 0.05)
    for step in (1, 2):
        assert recs[step]["lr"] == pytest.approx(1e-3 * old(step - 1), rel=1e-9), step
    for step in (3, 4, 5):  # step 3 ran at the old schedule's floor, 5e-5, before
        assert recs[step]["lr"] == pytest.approx(2e-3 * new(step - 1), rel=1e-9), step


def test_resume_with_unchanged_settings_changes_nothing(catalog, tmp_path):
    """The torch engine killed after its step-2 checkpoint and resumed with the same settings: steps 3-4
    bit-identical to the uninterrupted run (loss, lr, grad_norm), and no setting reported as changed.
    (DeepSpeed's twin: tests/test_train_distributed.py test_kill_and_resume_matches_uninterrupted.)"""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _train("torch", catalog, whole, "train.max_steps=4")
    _train("torch", catalog, cut, "train.max_steps=4", crash="step:2")
    p = _train("torch", catalog, cut, "train.max_steps=4", resume=True)
    assert "resumed from" in p.stderr and "this run's" not in p.stderr
    a, b = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, cut))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert (ra["step"], ra["loss"], ra["lr"], ra["grad_norm"]) == (rb["step"], rb["loss"], rb["lr"], rb["grad_norm"])
