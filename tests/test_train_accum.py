"""Gradient accumulation (train.grad_accum > 1), one process, tiny model, CPU, fp32.

Why not simply "grad_accum=2 x micro 4 gives the weights of grad_accum=1 x micro 8": the objectives
are not sums over triplets. The contrastive negatives, the DSF statistics, the learned objective
weights and the MoE load-balancing loss are computed per micro batch, and without ranks there is no
gather across micro batches (trainer: gather only when world > 1). So the loss of two micro batches of
4 is legitimately not the loss of one batch of 8 (on this catalog at step 1: see _reference), and
neither are the weights after the step.

What accumulation must do instead: the step's gradient is the MEAN of the micro batches' gradients,
each micro batch's loss taken on its own, and the optimizer steps once per step. The test runs the
trainer with grad_accum=2, global_batch=8 and compares it with a hand-made reference that takes the
same two micro batches of 4 (the same 8 triplets as a grad_accum=1 step: checked on the loader), runs
them separately through the same initial model (built the trainer's way, same seed), averages their
gradients (backward of loss / 2), clips and applies one AdamW step with the trainer's schedule. Two
steps, so the second step's data position, micro-step counter and optimizer state are covered too.

Compared, per step: the logged loss (mean of the micro losses), the logged grad_norm (the norm of the
accumulated gradient before clipping) and the final weights. The grad_norm is what catches a wrong
scale of the accumulated gradient (e.g. the sum instead of the mean): AdamW's update is invariant to
that scale (up to eps), and clipping to 1 erases it too, so the weights alone would not see it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from utils import OneCpuProcess

from moon_fast.train import trainer
from moon_fast.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
ARGS = ["train.global_batch=8", "train.grad_accum=2", f"train.max_steps={STEPS}", "train.log_every=1",
        "train.checkpoint_every=100", "train.evaluate=false", "train.progress=false", "train.dtype=fp32"]


@pytest.fixture
def catalog(small_catalog):
    return small_catalog


def _triplets(batch) -> list[tuple]:
    """What identifies the triplets of a batch: query tokens, modality, positive and negative products."""
    ids, cu = batch.encoder.input_ids.tolist(), batch.encoder.cu_seqlens.tolist()
    return [(tuple(ids[cu[q]:cu[q + 1]]), int(m), int(p), int(n))
            for q, m, p, n in zip(batch.query.tolist(), batch.query_modality, batch.positive_product_id,
                                  batch.negative_product_id)]


def _reference(cfg):
    """The hand-made accumulation: per step, two micro batches of 4 through the model one at a time,
    backward of loss / 2 each (gradients = their mean), clip, one AdamW + LambdaLR step. Returns
    ([(mean micro loss, grad norm before clipping, learning rate)] per step, {name: initial weight}, the model after)."""
    from moon_fast.data import Catalog, ImageCache, SampleBuilder, TripletLoader
    from moon_fast.data.images import image_processor_for
    from moon_fast.train.engine import lr_lambda, param_groups

    seed, data_dir, o = cfg.train.seed, Path(cfg.data.path), cfg.optim
    torch.manual_seed(seed)  # the trainer's initialisation, in its order
    np.random.seed(seed)
    random.seed(seed)
    model = trainer.build_model(cfg)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokenizer = trainer.build_tokenizer(cfg, data_dir)
    catalog = Catalog(data_dir)
    builder = SampleBuilder(tokenizer, ImageCache(image_processor_for(model), 64 << 20),
                            cfg.data.max_text_tokens)
    halves = TripletLoader(data_dir, catalog, builder, micro_batch=4, seed=seed)
    whole = TripletLoader(data_dir, catalog, builder, micro_batch=8, seed=seed)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o.warmup_steps, STEPS, o.min_lr_ratio))
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for step in range(STEPS):
        micro = [halves.next(), halves.next()]
        full = whole.next()
        # The loader splits a step's global batch, it does not change it: the 8 triplets of a
        # grad_accum=1 step are the two micro batches' 4 + 4, in order.
        assert _triplets(full) == _triplets(micro[0]) + _triplets(micro[1]), step
        if step == 0:  # why the weights of a grad_accum=1 run are no reference (module docstring)
            with torch.no_grad():
                one = float(model.compute_loss(full, progress=0.0).loss)
                two = [float(model.compute_loss(b, progress=0.0).loss) for b in micro]
            assert abs(one - sum(two) / 2) > 1e-3 * abs(one), (one, two)
        losses = []
        for b in micro:
            loss = model.compute_loss(b, progress=step / STEPS, gather=False).loss
            (loss / 2).backward()
            losses.append(float(loss.detach()))
        norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out.append((sum(losses) / 2, float(norm), lr))
    return out, initial, model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(engine: str, catalog: Path, out: Path, monkeypatch, tmp_path: Path) -> None:
    overrides = [f"distributed.engine={engine}", *ARGS]
    if engine == "torch":  # in this process, as tests/test_train_failures.py does
        monkeypatch.setattr(trainer, "setup", lambda *a, **k: OneCpuProcess())
        monkeypatch.setenv("MOON_FAST_CACHE", str(tmp_path / "cache"))
        trainer.train(load_config("ci", [f"data.path={catalog}", *overrides]), out)
        return
    # DeepSpeed in a process of its own (its process group and module-level state stay out of pytest's).
    env = dict(os.environ, MOON_FAST_CACHE=str(tmp_path / "cache"), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               CUDA_VISIBLE_DEVICES="")  # on the CPU, as the reference
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "moon_fast.cli", "train", "--config", "ci", "--data", str(catalog),
           "--output", str(out), *overrides]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-6000:]}")


# DeepSpeed: its step() counts micro-batches and must follow each one's backward; the engine called it once
# per optimizer step, so with grad_accum=2 it updated every second step (step 1 logged grad_norm None)
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_accumulated_steps_match_the_mean_of_micro_batch_gradients(engine, catalog, monkeypatch, tmp_path):
    """grad_accum=2 x micro 4 against the hand-made reference (module docstring), torch and DeepSpeed
    (ZeRO-1, the ci preset's stage).

    Tolerances: fp32 throughout, the same model, data and operations as the reference, so only the
    summation order may differ (DeepSpeed accumulates into its own buffers and computes the norm its own
    way). The torch engine matches the reference bit for bit here. Loss and grad_norm: rel 1e-5 (a
    DeepSpeed run differs by ~3e-7). Weights: AdamW moves each weight
    by up to lr * warmup factor = 5e-4, 1e-3 per step here; its update g / (|g| + eps) (and at step 2
    m / sqrt(v)) amplifies tiny gradient differences where the gradient is near zero, which is why
    such a DeepSpeed differs by up to 4.5e-7 = 3e-4 of the largest move. Allowed: 5e-3 of it (7.5e-6);
    a dropped, doubled or foreign micro batch changes most moves by their own size."""
    if engine == "deepspeed":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    cfg = load_config("ci", [f"data.path={catalog}", f"distributed.engine={engine}", *ARGS])
    want, initial, ref = _reference(cfg)
    out = tmp_path / "run"
    _run(engine, catalog, out, monkeypatch, tmp_path)

    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r, (loss, norm, lr) in zip(recs, want):
        assert r["loss"] == pytest.approx(loss, rel=1e-5), (r["step"], r["loss"], loss)
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-5), (r["step"], r["grad_norm"], norm)
        assert r["lr"] == pytest.approx(lr, rel=1e-6), (r["step"], r["lr"], lr)  # the rate the step used

    from moon_fast.model import MoonModel

    got = dict(MoonModel.from_pretrained(str(out / "final")).named_parameters())
    want_p = dict(ref.named_parameters())
    assert sorted(got) == sorted(want_p)
    moved = max((want_p[n].detach() - initial[n]).abs().max().item() for n in want_p)
    assert moved > 1e-4  # the reference did train
    for n, w in want_p.items():
        err = (got[n].detach() - w.detach()).abs().max().item()
        assert err <= 5e-3 * moved, (n, err, moved)
