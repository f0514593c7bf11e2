"""MOON2.0 objectives: DSF, inter/intra alignment, objective weights and the total loss against
hand-written computations; ablation flags."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_model_batches import make_triplet_batch
from utils import assert_close

from moon_fast.data.batch import COMPOSITIONS
from moon_fast.model import OBJECTIVES, MoonModel, dsf_margin, dsf_weights
from moon_fast.model.objectives import inter_product_losses, intra_product_loss


def test_dsf_margin_schedule():
    assert dsf_margin(0.0, 0.1, 0.0) == pytest.approx(0.1)
    assert dsf_margin(0.25, 0.1, 0.0) == pytest.approx(0.075)
    assert dsf_margin(1.0, 0.1, 0.0) == pytest.approx(0.0)
    assert dsf_margin(2.0, 0.1, 0.0) == pytest.approx(0.0)  # clamped
    assert dsf_margin(0.5, 0.2, 0.0, "cosine") == pytest.approx(0.1)
    assert dsf_margin(0.25, 0.2, 0.0, "cosine") == pytest.approx(0.2 - 0.2 * 0.5 * (1 - math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="schedule"):
        dsf_margin(0.5, 0.1, 0.0, "step")


def _unit(*vals):
    v = torch.tensor(vals, dtype=torch.float32)
    return v / v.norm()


@pytest.mark.parametrize("mode", ["soft", "hard", "phi"])
def test_dsf_weights_hand_computed(mode):
    q = torch.stack([_unit(1, 0), _unit(1, 0), _unit(0, 1)])
    p = torch.stack([_unit(1, 0), _unit(1, 1), _unit(1, 0)])
    n = torch.stack([_unit(0, 1), _unit(1, 0), _unit(0, 1)])
    # gaps s(q,p) - s(q,n): 1 - 0 = 1; 0.7071 - 1 = -0.2929; 0 - 1 = -1
    gaps = [1.0, math.sqrt(0.5) - 1.0, -1.0]
    res = dsf_weights(q, p, n, progress=0.5, kappa=5.0, margin_start=0.2, margin_end=0.0, threshold=0.6, mode=mode)
    assert res.margin == pytest.approx(0.1)
    phi = [1 / (1 + math.exp(-5.0 * (g - 0.1))) for g in gaps]
    assert_close(res.phi, torch.tensor(phi), atol=1e-6, rtol=1e-5, name="phi")
    kept = [x >= 0.6 for x in phi]
    assert res.kept.tolist() == kept == [True, False, False]
    expected = {"soft": [1.0 if k else x for x, k in zip(phi, kept)],
                "hard": [float(k) for k in kept],
                "phi": phi}[mode]
    assert_close(res.weight, torch.tensor(expected), atol=1e-6, rtol=1e-5, name="weight")
    assert not res.weight.requires_grad


def _hand_infonce(query, keys, target, scale, qgroup=None, kgroup=None):
    """One query: -log softmax over the kept keys (same group as the query and not its target: left out)."""
    s = scale * (keys @ query)
    keep = [c for c in range(keys.shape[0]) if c == target or qgroup is None or kgroup[c] != qgroup]
    return torch.logsumexp(s[keep], 0) - s[target]


def test_inter_product_losses_hand_computed():
    torch.manual_seed(3)
    batch = make_triplet_batch(7, 2)  # triplet 6 shares triplet 0's positive product
    n = batch.encoder.num_samples
    emb = F.normalize(torch.randn(n, 16), dim=-1)
    weight = torch.rand(7)
    scale = torch.tensor(9.0)
    losses, counts = inter_product_losses(emb, batch, scale, weight=weight)
    keys = torch.cat([emb[batch.positive], emb[batch.negative]])
    kg = torch.cat([batch.positive_product_id, batch.negative_product_id]).tolist()
    per = [weight[j] * _hand_infonce(emb[batch.query[j]], keys, j, 9.0, int(batch.positive_product_id[j]), kg)
           for j in range(7)]
    for v, name in enumerate(COMPOSITIONS):
        rows = [j for j in range(7) if int(batch.query_modality[j]) == v]
        assert counts[f"inter_{name}"] == len(rows)
        expected = sum(per[j] for j in rows) / len(rows)  # divided by the count, not the weights
        assert losses[f"inter_{name}"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the duplicate product really is excluded: without groups triplet 0's loss would differ
    assert kg[6] == kg[0]


def test_intra_product_loss_hand_computed():
    torch.manual_seed(4)
    batch = make_triplet_batch(3, 4)
    batch.intra_product_id[3] = batch.intra_product_id[1]  # a duplicate product among the intra pairs
    emb = F.normalize(torch.randn(batch.encoder.num_samples, 8), dim=-1)
    img, txt = emb[batch.intra_image], emb[batch.intra_text]
    pid = batch.intra_product_id.tolist()
    for symmetric in (False, True):
        got = intra_product_loss(emb, batch, torch.tensor(5.0), symmetric=symmetric)
        i2t = [_hand_infonce(img[i], txt, i, 5.0, pid[i], pid) for i in range(4)]
        t2i = [_hand_infonce(txt[i], img, i, 5.0, pid[i], pid) for i in range(4)]
        expected = sum(i2t) / 4 if not symmetric else (sum(i2t) + sum(t2i)) / 8
        assert got.shape == () and got.item() == pytest.approx(expected.item(), rel=1e-5)


def _hand_objective_weights(model, batch, last_only=False):
    """w_m = scale * mean over MoE layers of (1/|B_m|) sum_b sum_z p[z,m] * G~[b,z], in Python."""
    layers = model.moe_layers()[-1:] if last_only else model.moe_layers()
    members = {
        "inter_t": [int(r) for r, m in zip(batch.query, batch.query_modality) if m == 0],
        "inter_i": [int(r) for r, m in zip(batch.query, batch.query_modality) if m == 1],
        "inter_mm": [int(r) for r, m in zip(batch.query, batch.query_modality) if m == 2],
        "intra": batch.intra_image.tolist() + batch.intra_text.tolist(),
    }
    cu = batch.encoder.cu_seqlens.tolist()
    out = [0.0] * len(OBJECTIVES)
    for layer in layers:
        rec = layer.last_routing
        p = layer.alignment.detach().softmax(1).tolist()
        for m, name in enumerate(OBJECTIVES):
            acc = 0.0
            for b in members[name]:
                g = [0.0] * layer.num_experts
                for t in range(cu[b], cu[b + 1]):
                    for e, w in zip(rec.topk_idx[t].tolist(), rec.topk_weight[t].tolist()):
                        g[e] += w / (cu[b + 1] - cu[b])
                acc += sum(p[z][m] * g[z] for z in range(layer.num_experts))
            out[m] += acc / len(members[name]) / len(layers)
    scale = model.moon_config.loss.objective_scale()
    return [scale * x for x in out]


def test_compute_loss_combines_objectives_as_documented():
    torch.manual_seed(5)
    model = MoonModel.from_preset("tiny", loss={"aux_coef": 0.3, "sparsity_coef": 0.2})
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.alignment.normal_()
    batch = make_triplet_batch(6, 3)
    out = model.compute_loss(batch, progress=0.4)
    mt = out.metrics
    assert all(layer.last_routing is None for layer in model.moe_layers())  # dropped after the loss
    model.hidden_states(batch.encoder)  # the same routing again, for the hand computation
    hand_w = _hand_objective_weights(model, batch)
    for m, name in enumerate(OBJECTIVES):
        assert mt[f"weight/{name}"] == pytest.approx(hand_w[m], rel=1e-5), name
    aux = sum(layer.load_balancing_loss().item() for layer in model.moe_layers()) / 2
    sparsity = sum(layer.sparsity_loss().item() for layer in model.moe_layers()) / 2
    assert mt["moe/aux_loss"] == pytest.approx(aux, rel=1e-5)
    assert mt["moe/sparsity_loss"] == pytest.approx(sparsity, rel=1e-5)
    total = sum(mt[f"weight/{m}"] * mt[f"loss/{m}"] for m in OBJECTIVES) + 0.3 * aux + 0.2 * sparsity
    assert out.loss.item() == pytest.approx(total, rel=1e-5)
    assert mt["loss/total"] == pytest.approx(out.loss.item(), rel=1e-6)
    # load fractions per key sum to one
    for key in ("all", "t", "i", "mm", "text_tokens", "image_tokens"):
        assert sum(mt[f"moe/load/{key}/e{z}"] for z in range(4)) == pytest.approx(1.0, rel=1e-5)
    assert mt["dsf/margin"] == pytest.approx(0.06)
    out.loss.backward()
    for layer in model.moe_layers():
        assert layer.alignment.grad.abs().sum() > 0, "W* gets a gradient through w_m and L_sparsity"
        assert layer.router.weight.grad.abs().sum() > 0
    assert model.logit_scale_inter.grad is not None and model.logit_scale_intra.grad is not None


def test_objective_weights_from_last_moe_layer():
    torch.manual_seed(8)
    model = MoonModel.from_preset("tiny", moe={"routing_for_objective_weights": "last"})
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.alignment.normal_(std=2.0)
    batch = make_triplet_batch(6, 3)
    mt = model.compute_loss(batch, progress=0.0).metrics
    model.hidden_states(batch.encoder)
    hand = _hand_objective_weights(model, batch, last_only=True)
    both = _hand_objective_weights(model, batch)
    for m, name in enumerate(OBJECTIVES):
        assert mt[f"weight/{name}"] == pytest.approx(hand[m], rel=1e-5), name
    assert any(abs(a - b) > 1e-4 for a, b in zip(hand, both))


def test_dsf_weights_enter_the_inter_loss():
    torch.manual_seed(6)
    model = MoonModel.from_preset("tiny", loss={"learned_objective_weights": False, "dsf_mode": "hard",
                                                "dsf_margin_start": -10.0, "dsf_margin_end": -10.0})
    batch = make_triplet_batch(6, 2)
    on = model.compute_loss(batch, progress=0.0).metrics  # margin -10: every triplet kept, weight 1
    model.moon_config.loss.dsf = False
    off = model.compute_loss(batch, progress=0.0).metrics
    assert on["dsf/kept_frac"] == 1.0 and "dsf/kept_frac" not in off
    for name in ("inter_t", "inter_i", "inter_mm", "intra"):
        assert on[f"loss/{name}"] == pytest.approx(off[f"loss/{name}"], rel=1e-6)
    model.moon_config.loss.dsf = True
    model.moon_config.loss.dsf_margin_start = model.moon_config.loss.dsf_margin_end = 10.0  # nothing kept
    none = model.compute_loss(batch, progress=0.0)
    assert none.metrics["dsf/kept_frac"] == 0.0
    for name in ("inter_t", "inter_i", "inter_mm"):
        assert none.metrics[f"loss/{name}"] == 0.0
    assert none.metrics["loss/intra"] == pytest.approx(off["loss/intra"], rel=1e-6)


def test_ablation_flags():
    torch.manual_seed(7)
    batch = make_triplet_batch(6, 2)
    m = MoonModel.from_preset("tiny", loss={"intra": False, "learned_objective_weights": False,
                                            "fixed_objective_weights": {"inter_t": 2.0, "inter_i": 0.5,
                                                                        "inter_mm": 1.0, "intra": 1.0}})
    mt = m.compute_loss(batch, progress=0.5).metrics
    assert "loss/intra" not in mt and mt["weight/learned"] == 0.0
    assert (mt["weight/inter_t"], mt["weight/inter_i"], mt["weight/inter_mm"]) == (2.0, 0.5, 1.0)
    dense = MoonModel.from_preset("tiny", moe={"enabled": False})  # learned weights fall back to fixed
    out = dense.compute_loss(batch, progress=0.5)
    assert out.metrics["weight/learned"] == 0.0 and "moe/aux_loss" not in out.metrics
    assert out.loss.item() == pytest.approx(sum(out.metrics[f"loss/{o}"] for o in OBJECTIVES), rel=1e-5)


def test_logit_scale_is_clamped():
    m = MoonModel.from_preset("tiny", loss={"logit_scale_init": 500.0})
    inter, intra = m.logit_scales()
    assert inter.item() == pytest.approx(100.0) and intra.item() == pytest.approx(100.0)
    # the parameter itself is clamped (CLIP), so the loss still has a gradient for it at the cap: clamping
    # exp(parameter) gave it none there, and the scale stuck above the cap for good
    assert m.logit_scale_inter.item() == pytest.approx(math.log(100.0))
    m.compute_loss(make_triplet_batch(6, 3), progress=0.2).loss.backward()
    assert m.logit_scale_inter.grad.abs() > 1e-3 and m.logit_scale_intra.grad.abs() > 1e-3
    fixed = MoonModel.from_preset("tiny", loss={"learnable_logit_scale": False})
    assert not fixed.logit_scale_inter.requires_grad


@pytest.mark.parametrize("moe", [{}, {"num_shared_experts": 1}, {"restrict": "token", "num_experts": 4}])
def test_learned_objective_weights_start_at_one(moe):
    """W* = 0 at initialisation: p_z is uniform over the M objectives, so w_m = M * sum_z G~_z / M = 1 for
    every objective, whatever the routing (G~ sums to 1 over the routed experts), as the fixed-weight
    baseline; with shared experts and restricted routing too."""
    m = MoonModel.from_preset("tiny", moe=moe)
    assert all(bool((layer.alignment == 0).all()) for layer in m.moe_layers())
    out = m.compute_loss(make_triplet_batch(6, 3), progress=0.2)
    for name in OBJECTIVES:
        assert float(out.metrics[f"weight/{name}"]) == pytest.approx(1.0, abs=1e-6), name
