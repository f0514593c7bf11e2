"""The end-to-end training-step benchmark's workloads run one real step each (tiny preset, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from moon_fast.bench import train_e2e


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    import os

    old = os.environ.get("MOON_FAST_CACHE")
    os.environ["MOON_FAST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield train_e2e._batch(4, products=40)
    finally:
        if old is None:
            os.environ.pop("MOON_FAST_CACHE")
        else:
            os.environ["MOON_FAST_CACHE"] = old


def test_padded_batch_holds_the_packed_samples(batch):
    ids, mask, mm = train_e2e._padded(batch, pad_id=0, image_token_id=4)
    cu = batch.encoder.cu_seqlens.tolist()
    assert ids.shape == (len(cu) - 1, batch.encoder.max_seqlen)
    for j in range(len(cu) - 1):
        n = cu[j + 1] - cu[j]
        assert torch.equal(ids[j, :n], batch.encoder.input_ids[cu[j]:cu[j + 1]])
        assert mask[j].sum() == n and not mask[j, n:].any()
    assert torch.equal(mm.bool(), ids == 4)


@pytest.mark.parametrize("backend", ["reference", "auto", "hf_open_clip"])
def test_one_training_step(backend, batch, monkeypatch):
    monkeypatch.setattr(train_e2e, "_batch", lambda n, products=200: batch)
    w = train_e2e.build(backend=backend, dtype=torch.float32, device=torch.device("cpu"), size="tiny", triplets=4)
    loss = w.forward()
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    w.backward(loss)
    assert w.meta["samples"] == 4 and w.meta["tokens"] == batch.encoder.input_ids.numel()
    assert w.flops_bwd == pytest.approx(2 * w.flops_fwd) and w.flops_fwd > 0
    # the step changed the loss (the optimizer stepped)
    assert float(w.forward().detach()) != float(loss.detach())
