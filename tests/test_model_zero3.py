"""The model under DeepSpeed ZeRO-3 (1 CPU process, gloo): parameters are partitioned and gathered
only around module calls, so every parameter the loss reads outside a module's forward (the MoE
layers' W*, the logit scales) must go through a module call of its own (moon_fast.model.param_call).
The gradients of one compute_loss under ZeRO-3 must equal plain autograd's, for every parameter."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("deepspeed", reason="deepspeed is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# learned objective weights and the load-balancing loss on: W* and the router get gradients from the
# loss code outside the layers' forwards.
LOSS = {"learned_objective_weights": True, "aux_coef": 0.01, "sparsity_coef": 0.01}


def _setup():
    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_batches import make_triplet_batch

    from moon_fast.model import MoonModel

    torch.manual_seed(7)
    model = MoonModel.from_preset("tiny", loss=LOSS).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.alignment.normal_()
    return model, make_triplet_batch(4, 2, seed=5)


def _plain_grads() -> dict[str, torch.Tensor]:
    model, batch = _setup()
    model.compute_loss(batch, progress=0.2).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _zero3_worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what DeepSpeed expects from a launcher
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    try:
        torch.set_num_threads(1)
        import deepspeed

        from moon_fast.train import engine as engine_mod
        from moon_fast.train.config import load_config

        # The model alone is ZeRO-3 safe (ParamCall): the engine registers no external parameters.
        cfg = load_config("ci", ["distributed.engine=deepspeed", "distributed.zero_stage=3", "train.global_batch=4"])
        model, batch = _setup()
        eng = engine_mod.make_engine(model, cfg, 1, torch.device("cpu"), torch.float32, 4)
        out = eng.forward(batch, 0.2, False)
        eng.backward(out.loss)
        grads = {}
        for n, p in model.named_parameters():
            g = deepspeed.utils.safe_get_full_grad(p)
            if g is not None:
                grads[n] = g.detach().clone().reshape(p.ds_shape)
        torch.save({"loss": float(out.loss), "grads": grads}, os.path.join(out_dir, "zero3.pt"))
    finally:
        dist.destroy_process_group()


def test_zero3_gradients_match_plain_autograd(tmp_path):
    mp.spawn(_zero3_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=1, join=True)
    got = torch.load(tmp_path / "zero3.pt")
    want = _plain_grads()
    for name in ("logit_scale_inter", "logit_scale_intra"):
        assert name in want and want[name].abs().item() > 0, name
    assert any(n.endswith("alignment") for n in want)
    for name, g in want.items():
        assert name in got["grads"], f"{name}: no gradient under ZeRO-3"
        tol = 1e-4 * g.abs().max().item() + 1e-7
        err = (got["grads"][name] - g).abs().max().item()
        assert err <= tol, (name, err, g.abs().max().item())
