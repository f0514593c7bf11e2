"""What the trainer logs as model FLOPs (tflops, mfu): the FLOPs of the batches it trained on."""

from __future__ import annotations

import json

import pytest
from test_model_batches import make_encoder_batch

from moon_fast.data.batch import IMAGE, MULTIMODAL, TEXT
from moon_fast.model import MoonModel
from moon_fast.train import trainer
from moon_fast.train.config import load_config


def test_flop_counter_sums_flops_per_token_over_the_packed_sequences():
    """Each packed sequence at its own length and image-token share, as model.flops_per_token defines them
    (computed here sequence by sequence, independently of the counter's per-batch sums)."""
    model = MoonModel.from_preset("tiny")
    batch = make_encoder_batch([(TEXT, 7), (IMAGE, 0), (MULTIMODAL, 5), (TEXT, 19), (MULTIMODAL, 1)])
    cu = batch.cu_seqlens.tolist()
    image_id = model.backbone.config.image_token_id
    want = 0.0
    for a, b in zip(cu[:-1], cu[1:]):
        n_img = int((batch.input_ids[a:b] == image_id).sum())
        want += (b - a) * model.flops_per_token(seq_len=b - a, image_token_fraction=n_img / (b - a))
    assert trainer._flop_counter(model)(batch) == pytest.approx(want, rel=1e-12)
    # images counted: the tiny model's vision tower more than doubles an image token's FLOPs
    assert want > 2 * batch.input_ids.numel() * model.flops_per_token(seq_len=0)


def test_logged_tflops_are_the_counted_flops_over_the_step_time(small_catalog, in_process, monkeypatch, tmp_path):
    """The trainer logs the counter's FLOPs of the window's batches over the window's time (it used to log
    flops_per_token() with its defaults times tokens/s)."""
    monkeypatch.setattr(trainer, "_flop_counter", lambda model: lambda enc: 1e9 * enc.input_ids.numel())
    cfg = load_config("ci", [f"data.path={small_catalog}", "train.max_steps=2", "train.grad_accum=2", "train.evaluate=false",
                             "distributed.engine=torch"])
    trainer.train(cfg, tmp_path / "run")
    for rec in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()):
        assert rec["tflops"] == pytest.approx(1e9 * rec["tokens_per_s"] / 1e12, rel=1e-9)
        assert rec["mfu"] > 0
