"""Test conventions shared by the whole suite.

* Triton runs in interpreter mode when there is no GPU (set here, before anything imports triton).
* Every test starts from a fixed seed (``seed`` fixture is autouse); tests that want fresh inputs per
  parametrisation derive them from the seed and their parameters.
* Markers: ``gpu`` (deselected when no CUDA GPU is present, with the reason), ``distributed``
  (spawns processes), ``slow`` (run in CI; `make test-fast` leaves them out).
* Per-dtype tolerances and output poisoning live in tests/utils.py.
"""

from __future__ import annotations

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield 0


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory):
    """A 16-product synthetic catalog for training tests (read-only: copy it to change it)."""
    from moon_fast.data import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "cat", products=16, seed=2, workers=1, verbose=False)


@pytest.fixture
def in_process(monkeypatch, tmp_path):
    """Makes trainer.train run in this process as rank 0 of 1 (no process group), with its own cache."""
    from utils import OneCpuProcess

    from moon_fast.train import trainer

    monkeypatch.setattr(trainer, "setup", lambda *a, **k: OneCpuProcess())
    monkeypatch.setenv("MOON_FAST_CACHE", str(tmp_path / "cache"))
    return trainer
