"""ModalityMoE: routing, restricted mode, shared experts, upcycling, and its losses / objective
weights against hand-computed small cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close

from moon_fast.model import ModalityMoE, MoEConfig, RoutingContext, RoutingRecord


def _explicit_moe(x, idx, w, gate_up, down):
    """Per-token, per-choice loop: out_t = sum_j w_tj * down_e(silu(gate_e x) * up_e x)."""
    inter = gate_up.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = gate_up[e] @ x[t]
            out[t] += w[t, j] * (down[e] @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


def _hand_routing(logits: torch.Tensor, k: int):
    """softmax and top-k renormalisation with Python floats."""
    probs, idx, wts = [], [], []
    for row in logits.tolist():
        mx = max(row)
        ex = [math.exp(v - mx) if v != float("-inf") else 0.0 for v in row]
        s = sum(ex)
        p = [e / s for e in ex]
        order = sorted(range(len(p)), key=lambda i: -p[i])[:k]
        tot = sum(p[i] for i in order)
        probs.append(p)
        idx.append(order)
        wts.append([p[i] / tot for i in order])
    return torch.tensor(probs), torch.tensor(idx), torch.tensor(wts)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("shared", [0, 2])
def test_routing_and_forward_match_hand_computation(backend, shared):
    torch.manual_seed(1)
    layer = ModalityMoE(6, 5, num_experts=3, top_k=2, num_shared_experts=shared, backend=backend,
                        initializer_range=0.5)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(3, 6))
    x = torch.randn(7, 6)
    rec = layer.route(x)
    probs, idx, wts = _hand_routing(x @ layer.router.weight.T, 2)
    assert_close(rec.probs, probs, atol=1e-6, rtol=1e-5, name="probs")
    assert torch.equal(rec.topk_idx, idx)
    assert_close(rec.topk_weight, wts, atol=1e-6, rtol=1e-5, name="weights")
    assert_close(rec.topk_weight.sum(-1), torch.ones(7), atol=1e-6, rtol=0, name="sum to one")

    out = layer(x.reshape(1, 7, 6))
    assert out.shape == (1, 7, 6)
    a = layer.shared_weight
    assert a == pytest.approx(shared / (2 + shared))
    expected = _explicit_moe(x, idx, wts * (1 - a), layer.gate_up_proj.detach(), layer.down_proj.detach())
    if shared:
        sidx = torch.arange(3, 3 + shared).expand(7, shared)
        expected += _explicit_moe(x, sidx, torch.full((7, shared), a / shared), layer.gate_up_proj.detach(),
                                  layer.down_proj.detach())
    assert_close(out[0], expected, atol=1e-5, rtol=1e-4, name="output")


def test_forward_gradients_match_explicit():
    torch.manual_seed(2)
    layer = ModalityMoE(4, 3, num_experts=3, top_k=2, num_shared_experts=1, initializer_range=0.5)
    x = torch.randn(5, 4, requires_grad=True)
    layer(x).square().sum().backward()
    got = [x.grad.clone(), layer.router.weight.grad.clone(), layer.gate_up_proj.grad.clone()]
    x.grad = None
    layer.zero_grad()
    logits = x @ layer.router.weight.T
    probs = logits.softmax(-1)
    tw, ti = probs.topk(2, -1)
    tw = tw / tw.sum(-1, keepdim=True) * (1 - layer.shared_weight)
    idx = torch.cat([ti, torch.full((5, 1), 3)], 1)
    w = torch.cat([tw, torch.full((5, 1), layer.shared_weight)], 1)
    _explicit_moe(x, idx, w, layer.gate_up_proj, layer.down_proj).square().sum().backward()
    for g, e, n in zip(got, [x.grad, layer.router.weight.grad, layer.gate_up_proj.grad], ["x", "router", "gate_up"]):
        assert_close(g, e, atol=1e-5, rtol=1e-4, name=n)


def test_restricted_mode_uses_only_group_experts():
    groups = MoEConfig(num_experts=7, top_k=2, restrict="composition").resolved_groups()
    assert groups == {"t": [0, 1], "i": [2, 3, 4], "mm": [5, 6]}
    layer = ModalityMoE(8, 4, num_experts=7, top_k=2, num_shared_experts=1, expert_groups=groups)
    with torch.no_grad():
        layer.router.weight.normal_(std=2.0)
    x = torch.randn(30, 8)
    token_group = torch.arange(30) % 3
    with pytest.raises(RuntimeError, match="RoutingContext"):
        layer(x)
    layer.context = RoutingContext(token_sample=torch.zeros(30, dtype=torch.long), num_samples=1, token_group=token_group)
    out = layer(x)
    rec = layer.last_routing
    allowed = [set(v) for v in groups.values()]
    for t in range(30):
        g = int(token_group[t])
        assert set(rec.topk_idx[t].tolist()) <= allowed[g]
        outside = [e for e in range(7) if e not in allowed[g]]
        assert rec.probs[t, outside].abs().max() == 0
    logits = (x @ layer.router.weight.T).masked_fill(~layer.group_mask[token_group], float("-inf"))
    probs, idx, wts = _hand_routing(logits, 2)
    assert_close(rec.probs, probs, atol=1e-6, rtol=1e-5, name="masked probs")
    a = layer.shared_weight
    expected = _explicit_moe(x, idx, wts * (1 - a), layer.gate_up_proj.detach(), layer.down_proj.detach())
    expected += _explicit_moe(x, torch.full((30, 1), 7), torch.full((30, 1), a), layer.gate_up_proj.detach(),
                              layer.down_proj.detach())
    assert_close(out, expected, atol=1e-5, rtol=1e-4, name="restricted output")


def test_group_validation():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=4, top_k=2, restrict="composition").validate()
    with pytest.raises(ValueError, match="exactly the groups"):
        MoEConfig(num_experts=4, restrict="token", expert_groups={"text": [0, 1]}).validate()
    with pytest.raises(ValueError, match="outside"):
        MoEConfig(num_experts=4, restrict="token", expert_groups={"text": [0, 1], "image": [2, 9]}).validate()
    MoEConfig(num_experts=4, top_k=2, restrict="token").validate()  # 2 + 2
    # wrong types fail here, not inside torch at the first forward
    with pytest.raises(ValueError, match="moe.top_k must be an integer, got 1.5"):
        MoEConfig(num_experts=4, top_k=1.5).validate()
    with pytest.raises(ValueError, match="moe.num_experts must be an integer, got '4'"):
        MoEConfig(num_experts="4").validate()
    with pytest.warns(UserWarning, match="top_k=1: the renormalised routing weight .* is always 1"):
        MoEConfig(num_experts=4, top_k=1).validate()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_shared_experts": -1}, ValueError, "num_shared_experts must be >= 0"),
    ({"num_shared_experts": 1, "shared_weight": 1.5}, ValueError, r"shared_weight .* must be in \[0, 1\)"),
    ({"num_experts": 4.0}, TypeError, "num_experts must be an int, got 4.0"),
])
def test_layer_checks_its_own_arguments(kwargs, error, match):
    """ModalityMoE built directly (without MoEConfig) checks what it would otherwise misuse: a negative
    shared count divided by zero, a shared weight above 1 gave the routed experts a negative weight."""
    with pytest.raises(error, match=match):
        ModalityMoE(8, 4, **kwargs)


@pytest.mark.parametrize("shared", [0, 1, 3])
def test_upcycled_layer_reproduces_dense_mlp(shared):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    dense = Qwen2MLP(Qwen2Config(hidden_size=12, intermediate_size=20, hidden_act="silu"))
    layer = ModalityMoE.from_dense(dense, upcycle=True, num_experts=4, top_k=2, num_shared_experts=shared)
    with torch.no_grad():
        layer.router.weight.normal_(std=3.0)
    x = torch.randn(2, 9, 12)
    with torch.no_grad():
        assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-4, name="upcycled")


# ----------------------------------------------------------------------------- losses, hand-computed

def _record(probs, idx, group=None):
    probs = torch.tensor(probs)
    idx = torch.tensor(idx)
    w = probs.gather(1, idx)
    return RoutingRecord(probs=probs, topk_idx=idx, topk_weight=w / w.sum(-1, keepdim=True),
                         token_group=None if group is None else torch.tensor(group))


PROBS = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.15, 0.6], [0.7, 0.2, 0.1]]


def test_load_balancing_loss_hand_computed():
    layer = ModalityMoE(4, 4, num_experts=3, top_k=1)
    # k=1: f = [2/4, 1/4, 1/4], P = [1.55/4, 1.25/4, 1.2/4]
    rec = _record(PROBS, [[0], [1], [2], [0]])
    expected = 3 * (0.5 * 1.55 / 4 + 0.25 * 1.25 / 4 + 0.25 * 1.2 / 4)
    assert layer.load_balancing_loss(rec).item() == pytest.approx(expected, rel=1e-6)
    # k=2: top-2 sets {0,1} {1,2} {2,0} {0,1} -> f = [3/8, 3/8, 2/8]
    layer2 = ModalityMoE(4, 4, num_experts=3, top_k=2)
    rec2 = _record(PROBS, [[0, 1], [1, 2], [2, 0], [0, 1]])
    expected2 = 3 * (3 / 8 * 1.55 / 4 + 3 / 8 * 1.25 / 4 + 2 / 8 * 1.2 / 4)
    assert layer2.load_balancing_loss(rec2).item() == pytest.approx(expected2, rel=1e-6)
    # peer: transformers' Mixtral load_balancing_loss_func / top_k
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    peer = load_balancing_loss_func((torch.tensor(PROBS).log(),), num_experts=3, top_k=2) / 2
    assert layer2.load_balancing_loss(rec2).item() == pytest.approx(peer.item(), rel=1e-6)
    # perfect balance gives 1
    uniform = _record([[0.25] * 4] * 4, [[0], [1], [2], [3]])
    assert ModalityMoE(4, 4, num_experts=4, top_k=1).load_balancing_loss(uniform).item() == pytest.approx(1.0)


def test_load_balancing_loss_restricted_hand_computed():
    layer = ModalityMoE(4, 4, num_experts=4, top_k=1, expert_groups={"text": [0, 1], "image": [2, 3]})
    probs = [[0.7, 0.3, 0, 0], [0.4, 0.6, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 0.9, 0.1], [0, 0, 0.3, 0.7]]
    rec = _record(probs, [[0], [1], [0], [2], [3]], group=[0, 0, 0, 1, 1])
    g0 = 2 * (2 / 3 * 1.9 / 3 + 1 / 3 * 1.1 / 3)
    g1 = 2 * (0.5 * 0.6 + 0.5 * 0.4)
    assert layer.load_balancing_loss(rec).item() == pytest.approx((3 * g0 + 2 * g1) / 5, rel=1e-6)


def test_load_balancing_loss_gradient_reaches_router():
    layer = ModalityMoE(6, 4, num_experts=4, top_k=2)
    layer(torch.randn(10, 6))
    layer.load_balancing_loss().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_sparsity_loss_hand_computed():
    layer = ModalityMoE(4, 4, num_experts=2, top_k=1, num_objectives=4)
    rows = [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]
    with torch.no_grad():
        layer.alignment.copy_(torch.tensor(rows).log())
    expected = sum(-sum(p * math.log(p) for p in r) for r in rows) / 2
    assert layer.sparsity_loss().item() == pytest.approx(expected, rel=1e-6)
    assert_close(layer.objective_probs(), torch.tensor(rows), atol=1e-7, rtol=1e-6, name="p")
    fresh = ModalityMoE(4, 4, num_experts=3, top_k=1, num_objectives=4)  # W* = 0: maximal entropy
    assert fresh.sparsity_loss().item() == pytest.approx(math.log(4), rel=1e-6)


def test_sample_routing_and_objective_weights_hand_computed():
    layer = ModalityMoE(4, 4, num_experts=3, top_k=2, num_objectives=2)
    idx = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1]])
    w = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.7, 0.3], [0.9, 0.1], [0.2, 0.8]])
    rec = RoutingRecord(probs=torch.rand(5, 3), topk_idx=idx, topk_weight=w)
    g = layer.sample_routing(rec, torch.tensor([0, 0, 1, 1, 1]), 2)
    assert_close(g, torch.tensor([[0.3, 0.45, 0.25], [0.3, 0.3, 0.4]]), atol=1e-6, rtol=1e-6, name="G~")

    layer2 = ModalityMoE(4, 4, num_experts=2, top_k=1, num_objectives=2)
    with torch.no_grad():
        layer2.alignment.copy_(torch.tensor([[0.25, 0.75], [0.6, 0.4]]).log())
    g = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    wts = layer2.objective_weights(g, [torch.tensor([0, 2]), torch.tensor([1])])
    assert_close(wts, torch.tensor([(0.25 + 0.53) / 2, 0.575]), atol=1e-6, rtol=1e-6, name="w_m")
    wts = layer2.objective_weights(g, [torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)])
    assert wts[1].item() == 0.0
    wts[0].backward()
    assert layer2.alignment.grad.abs().sum() > 0  # W* learns through the weights


def test_routing_counts():
    layer = ModalityMoE(4, 4, num_experts=3, top_k=2)
    rec = _record(PROBS, [[0, 1], [1, 2], [2, 0], [0, 1]])
    counts = layer.routing_counts(rec, {"a": torch.tensor([True, True, False, False])})
    assert counts["all"].tolist() == [3, 3, 2]
    assert counts["a"].tolist() == [1, 2, 1]
