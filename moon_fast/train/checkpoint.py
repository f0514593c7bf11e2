"""Atomic, exactly-resumable checkpoints.

``<run>/checkpoints/step_XXXXXX/`` holds the engine state (model, optimizer, scheduler: DeepSpeed's
own files or ``torch_state.pt``), ``rank_XXXXX.pt`` per rank (RNG states and data position) and
``meta.json``. Everything is written into ``.tmp-step_XXXXXX`` first; after every rank has finished,
rank 0 writes ``COMPLETE`` (fsynced) and renames the directory. A crash at any point leaves either a
``.tmp-`` directory (ignored, removed by the next save) or a complete checkpoint, never a directory that
looks complete but is not. Assumes a file system shared by the ranks (as DeepSpeed does).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError
from .distributed import barrier

COMPLETE = "COMPLETE"


def _name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.name.startswith("step_") and (p / COMPLETE).exists()]
    return sorted(out, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    c = list_checkpoints(run_dir)
    return c[-1] if c else None


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _crash_point(name: str, step: int) -> None:
    """Test hooks: MOON_FAST_CRASH=<name>:<step> kills this process (SIGKILL) at that point;
    MOON_FAST_RAISE=<name>:<step>:<rank> raises an exception there on that rank only (the others go on)."""
    want = os.environ.get("MOON_FAST_CRASH", "")
    if want == f"{name}:{step}":
        print(f"MOON_FAST_CRASH: killing the process at {name} of step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    rank = os.environ.get("RANK", "0")
    if os.environ.get("MOON_FAST_RAISE", "") == f"{name}:{step}:{rank}":
        raise RuntimeError(f"MOON_FAST_RAISE: rank {rank} fails at {name} of step {step}")


def save_checkpoint(run_dir: Path, step: int, engine, rank: int, world: int, rank_state: dict, meta: dict,
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-{_name(step)}", root / _name(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(".tmp-*"):  # leftovers of a crashed save
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir()
    barrier()
    engine.save(tmp, rank)
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{rank:05d}.pt")
    barrier()
    _crash_point("save", step)
    if rank == 0:
        _fsync_write(tmp / "meta.json", json.dumps({**meta, "step": step, "world_size": world,
                                                     "engine": engine.name, "time": time.time()}, indent=1))
        _fsync_write(tmp / COMPLETE, "")
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: damaged, or written by another engine."""


def _damaged(path: Path, e: Exception) -> CheckpointError:
    older = [p for p in list_checkpoints(path.parent.parent) if p != path]
    fallback = (f"remove it (rm -r {path}) to resume from {older[-1]}" if older
                else "there is no older complete checkpoint: start the run again without --resume")
    return CheckpointError(f"--resume: {path} cannot be loaded, it is damaged ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}); {fallback}")


def load_checkpoint(path: Path, engine, rank: int, world: int) -> dict:
    """Restores the engine and returns this rank's saved state (RNG restored here). CheckpointError, naming
    the checkpoint and the older one to fall back on, if it cannot be read."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise _damaged(path, e) from e
    if meta.get("engine") != engine.name:
        raise CheckpointError(f"{path} was written by the {meta.get('engine')} engine, this run uses {engine.name}: "
                              f"set distributed.engine={meta.get('engine')}")
    f = path / f"rank_{rank:05d}.pt"
    if not f.exists():
        f = path / "rank_00000.pt"  # a different world size: data position is global in memory mode
    try:
        engine.load(path)
        state = torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  torch, DeepSpeed and pickle raise many types for a damaged file
        raise _damaged(path, e) from e
    if meta.get("world_size") == world:
        set_rng_state(state["rng"])
    state["meta"] = meta
    return state
