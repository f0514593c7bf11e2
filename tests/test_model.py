"""MoonModel: packed forward against plain transformers, fast against reference backends end to end,
upcycling, save/load, clear errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from test_model_batches import make_encoder_batch, make_triplet_batch
from utils import assert_close

from moon_fast.data.batch import (
    IMAGE,
    IMAGE_PAD_ID,
    MULTIMODAL,
    TEXT,
    VISION_END_ID,
    VISION_START_ID,
    EncoderBatch,
)
from moon_fast.model import ModalityMoE, MoonModel, image_processor_for
from moon_fast.model.backbone import packed_mrope_positions

REFERENCE = {"moe": "reference", "attention": "reference", "contrastive": "reference"}
MIXED = [(TEXT, 7), (IMAGE, 0), (MULTIMODAL, 5), (TEXT, 1), (MULTIMODAL, 9), (IMAGE, 0)]


def _plain_per_sample(backbone, batch: EncoderBatch) -> list[torch.Tensor]:
    """Each sample alone through transformers' own Qwen2VLModel.forward (eager attention)."""
    plain = copy.deepcopy(backbone)
    plain.set_attn_implementation("eager")
    cu = batch.cu_seqlens.tolist()
    outs, img, patch = [], 0, 0
    for j in range(batch.num_samples):
        ids = batch.input_ids[cu[j]:cu[j + 1]]
        kw = {}
        if bool((ids == IMAGE_PAD_ID).any()):
            grid = batch.image_grid_thw[img:img + 1]
            n = int(grid.prod())
            kw = dict(pixel_values=batch.pixel_values[patch:patch + n], image_grid_thw=grid,
                      mm_token_type_ids=(ids == IMAGE_PAD_ID).int()[None])
            img, patch = img + 1, patch + n
        plain.rope_deltas = None
        outs.append(plain(input_ids=ids[None], use_cache=False, **kw).last_hidden_state[0])
    return outs


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2.5"])
@pytest.mark.parametrize("attn", ["moon_fast", "sdpa"])
def test_dense_reference_matches_transformers(preset, attn):
    model = MoonModel.from_preset(preset, moe={"enabled": False},
                                  backends={**REFERENCE, "attn_implementation": attn}).eval()
    grids = [(1, 8, 8), (1, 4, 6), (1, 6, 4), (1, 8, 8)]  # non-square grids exercise h/w positions
    batch = make_encoder_batch(MIXED, grids=grids)
    with torch.no_grad():
        packed = model.hidden_states(batch)
        expected = _plain_per_sample(model.backbone, batch)
    cu = batch.cu_seqlens.tolist()
    for j, e in enumerate(expected):
        assert_close(packed[cu[j]:cu[j + 1]], e, atol=2e-5, rtol=2e-4, name=f"sample {j}")


def test_packed_positions_match_get_rope_index():
    model = MoonModel.from_preset("tiny", moe={"enabled": False})
    grids = [(1, 4, 6), (1, 8, 8), (1, 6, 2), (1, 2, 2)]
    specs = [(MULTIMODAL, 3), (TEXT, 4), (IMAGE, 0), (MULTIMODAL, 0), (MULTIMODAL, 6)]
    batch = make_encoder_batch(specs, grids=grids)
    text_pos, pos = packed_mrope_positions(batch.input_ids, batch.cu_seqlens, batch.image_grid_thw,
                                           image_token_id=IMAGE_PAD_ID, merge=2)
    cu, img = batch.cu_seqlens.tolist(), 0
    for j in range(batch.num_samples):
        ids = batch.input_ids[cu[j]:cu[j + 1]]
        assert torch.equal(text_pos[cu[j]:cu[j + 1]], torch.arange(ids.numel()))
        n_img = int(bool((ids == IMAGE_PAD_ID).any()))
        grid = batch.image_grid_thw[img:img + n_img] if n_img else None
        img += n_img
        if grid is None:
            expected = torch.arange(ids.numel()).expand(3, -1)
        else:
            expected, _ = model.backbone.get_rope_index(ids[None], (ids == IMAGE_PAD_ID).int()[None], image_grid_thw=grid)
            expected = expected[:, 0]
        assert torch.equal(pos[:, cu[j]:cu[j + 1]], expected), f"sample {j}"


def test_packed_encode_equals_one_sample_at_a_time():
    """No attention or MoE leakage between packed samples (MoE on, restricted routing, fast path)."""
    model = MoonModel.from_preset("tiny", moe={"num_experts": 6, "restrict": "composition"}).eval()
    batch = make_encoder_batch(MIXED)
    with torch.no_grad():
        emb = model.encode(batch)
        assert emb.shape == (len(MIXED), model.embedding_dim) and emb.dtype == torch.float32
        assert_close(emb.norm(dim=-1), torch.ones(len(MIXED)), atol=1e-5, rtol=0, name="norms")
        cu, img = batch.cu_seqlens.tolist(), 0
        for j in range(batch.num_samples):
            ids = batch.input_ids[cu[j]:cu[j + 1]]
            has = bool((ids == IMAGE_PAD_ID).any())
            one = EncoderBatch(ids, torch.tensor([0, ids.numel()], dtype=torch.int32), ids.numel(),
                               batch.composition[j:j + 1],
                               batch.pixel_values[img * 64:(img + 1) * 64] if has else None,
                               batch.image_grid_thw[img:img + 1] if has else None)
            img += int(has)
            assert_close(model.encode(one)[0], emb[j], atol=2e-5, rtol=1e-4, name=f"sample {j}")


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("options", [
    {},
    {"moe": {"num_shared_experts": 1, "top_k": 1}},
    {"moe": {"restrict": "token"}, "embedding": {"head": "linear", "dim": 48}, "loss": {"dsf_mode": "phi"}},
])
def test_fast_backends_match_reference_end_to_end(options):
    fast = MoonModel.from_preset("tiny", **copy.deepcopy(options))
    ref = copy.deepcopy(fast)
    ref.moon_config.backends.moe = ref.moon_config.backends.contrastive = ref.moon_config.backends.attention = "reference"
    for layer in ref.moe_layers():
        layer.backend = "reference"
    batch = make_triplet_batch(6, 3)
    out_f = fast.compute_loss(batch, progress=0.3)
    out_f.loss.backward()
    out_r = ref.compute_loss(batch, progress=0.3)
    out_r.loss.backward()
    assert_close(out_f.loss, out_r.loss, atol=1e-5, rtol=1e-5, name="loss")
    gf, gr = _grads(fast), _grads(ref)
    assert set(gf) == set(gr) and len(gf) > 20
    for name in gr:
        scale = gr[name].abs().max().item() + 1e-6
        assert_close(gf[name], gr[name], atol=1e-4 * scale, rtol=1e-3, name=name)
    copy.deepcopy(fast)  # no autograd graph left on the model after the loss
    for k in out_r.metrics:
        assert out_f.metrics[k] == pytest.approx(out_r.metrics[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("moe", [
    {},
    {"num_shared_experts": 2},
    {"num_experts": 6, "restrict": "composition"},
    {"num_experts": 4, "restrict": "token", "layers": [1]},
])
def test_upcycled_moe_reproduces_dense(moe):
    dense = MoonModel.from_preset("tiny", moe={"enabled": False}).eval()
    cfg = copy.deepcopy(dense.moon_config)
    cfg.moe.enabled = True
    for k, v in moe.items():
        setattr(cfg.moe, k, v)
    moe_model = MoonModel(copy.deepcopy(dense.backbone), cfg, upcycle=True).eval()
    layers = moe_model.moe_layers()
    assert len(layers) == len(moe.get("layers", [0, 1]))
    for layer in layers:  # a router far from uniform: outputs must not depend on it
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    batch = make_encoder_batch(MIXED)
    with torch.no_grad():
        assert_close(moe_model.hidden_states(batch), dense.hidden_states(batch), atol=1e-5, rtol=1e-4, name="hidden")
        assert_close(moe_model.encode(batch), dense.encode(batch), atol=1e-5, rtol=1e-4, name="embedding")


@pytest.mark.parametrize("overrides", [
    {},
    {"embedding": {"head": "linear", "dim": 32}, "moe": {"num_shared_experts": 1, "restrict": "token"}},
    {"moe": {"enabled": False}},
])
def test_save_load_roundtrip(tmp_path, overrides):
    model = MoonModel.from_preset("tiny", **copy.deepcopy(overrides))
    with torch.no_grad():  # make the non-backbone parameters differ from their init
        model.logit_scale_inter.add_(0.5)
        for layer in model.moe_layers():
            layer.alignment.normal_()
    model.save_pretrained(str(tmp_path))
    for f in ("config.json", "model.safetensors", "moon_config.json", "moon_heads.safetensors",
              "preprocessor_config.json"):
        assert (tmp_path / f).is_file(), f
    loaded = MoonModel.from_pretrained(str(tmp_path))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd2)
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    batch = make_encoder_batch(MIXED)
    with torch.no_grad():
        assert torch.equal(model.eval().encode(batch), loaded.eval().encode(batch))
    assert loaded.moon_config.to_dict() == model.moon_config.to_dict()
    if not model.moon_config.moe.enabled:  # a dense save is a plain transformers checkpoint
        from transformers import Qwen2VLModel

        plain = Qwen2VLModel.from_pretrained(str(tmp_path))
        assert torch.equal(plain.language_model.layers[0].mlp.up_proj.weight,
                           model.backbone.language_model.layers[0].mlp.up_proj.weight)


def test_save_load_bf16(tmp_path):
    model = MoonModel.from_preset("tiny").to(torch.bfloat16)
    model.save_pretrained(str(tmp_path))
    loaded = MoonModel.from_pretrained(str(tmp_path))
    assert loaded.dtype == torch.bfloat16
    batch = make_encoder_batch(MIXED)
    with torch.no_grad():
        assert torch.equal(model.eval().encode(batch), loaded.eval().encode(batch))


def test_from_backbone_checkpoint_upcycles(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from moon_fast.model.presets import preset_backbone_config

    hf = Qwen2VLForConditionalGeneration(preset_backbone_config("tiny")).eval()
    hf.save_pretrained(str(tmp_path))
    model = MoonModel.from_backbone_checkpoint(str(tmp_path), backends=REFERENCE).eval()
    assert len(model.moe_layers()) == 2
    layer = model.moe_layers()[0]
    dense = hf.model.language_model.layers[0].mlp
    assert torch.equal(layer.gate_up_proj[3], torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
    batch = make_encoder_batch(MIXED[:3])
    with torch.no_grad():
        packed = model.hidden_states(batch)
        expected = _plain_per_sample(hf.model, batch)
    cu = batch.cu_seqlens.tolist()
    for j, e in enumerate(expected):
        assert_close(packed[cu[j]:cu[j + 1]], e, atol=2e-5, rtol=2e-4, name=f"sample {j}")


# ----------------------------------------------------------------------------- errors

def _one(ids, comp, pixel=None, grid=None):
    ids = torch.tensor(ids)
    return EncoderBatch(ids, torch.tensor([0, ids.numel()], dtype=torch.int32), ids.numel(), torch.tensor([comp]),
                        pixel, grid)


def test_clear_errors_on_bad_batches():
    model = MoonModel.from_preset("tiny", moe={"enabled": False})
    with pytest.raises(ValueError, match="neither image nor text"):
        model.encode(_one([VISION_START_ID, VISION_END_ID], TEXT))
    with pytest.raises(ValueError, match="pixel_values is None"):
        model.encode(_one([VISION_START_ID] + [IMAGE_PAD_ID] * 16 + [VISION_END_ID], IMAGE))
    good = make_encoder_batch([(TEXT, 3), (TEXT, 2)])
    empty = EncoderBatch(good.input_ids, torch.tensor([0, 5, 5], dtype=torch.int32), 5, good.composition)
    with pytest.raises(ValueError, match="sample 1 .*neither image nor text"):
        model.encode(empty)
    with pytest.raises(ValueError, match="composition 't'"):
        bad = make_encoder_batch([(MULTIMODAL, 3)])
        bad.composition[0] = TEXT
        model.encode(bad)
    bad = make_encoder_batch([(IMAGE, 0)])
    with pytest.raises(ValueError, match="patch rows"):
        model.encode(EncoderBatch(bad.input_ids, bad.cu_seqlens, bad.max_seqlen, bad.composition,
                                  bad.pixel_values[:10], bad.image_grid_thw))
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode(_one([5, 99999], TEXT))


def test_clear_errors_on_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MoonModel.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        MoonModel.from_backbone_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Qwen2-VL / Qwen2.5-VL checkpoint.*llama"):
        MoonModel.from_pretrained(str(tmp_path))
    plain = tmp_path / "plain"
    from transformers import Qwen2VLModel

    from moon_fast.model.presets import preset_backbone_config

    Qwen2VLModel(preset_backbone_config("tiny")).save_pretrained(str(plain))
    with pytest.raises(ValueError, match="from_backbone_checkpoint"):
        MoonModel.from_pretrained(str(plain))
    # a checkpoint that lacks weights (a lost shard): transformers would initialise them at random, silently
    from safetensors.torch import load_file, save_file

    weights = load_file(str(plain / "model.safetensors"))
    lost = sorted(k for k in weights if ".layers.1." in k)
    save_file({k: v for k, v in weights.items() if k not in lost}, str(plain / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold the whole backbone .*missing \['language_model.layers.1"):
        MoonModel.from_backbone_checkpoint(str(plain))


def _corrupt_config_list(d):
    (d / "config.json").write_text("[]")


def _corrupt_moon_config_json(d):
    (d / "moon_config.json").write_text("{'moe': 1}")


def _corrupt_moon_config_list(d):
    (d / "moon_config.json").write_text("[]")


def _corrupt_weights(d):
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:64])


def _corrupt_shapes(d):  # weights of another size than config.json describes
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 2 * cfg["text_config"]["intermediate_size"]
    (d / "config.json").write_text(json.dumps(cfg))


def _corrupt_backend_name(d):
    cfg = json.loads((d / "moon_config.json").read_text())
    cfg["backends"]["moe"] = "tritn"
    (d / "moon_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_config_list, r"config.json is not a JSON object \(it holds a list\)"),
    (_corrupt_moon_config_json, r"moon_config.json cannot be read: the checkpoint is corrupt.*JSONDecodeError"),
    (_corrupt_moon_config_list, r"moon_config.json is not a JSON object"),
    (_corrupt_weights, r"model.safetensors cannot be read: the checkpoint is corrupt"),
    (_corrupt_shapes, r"model.safetensors do not match the shapes config.json describes"),
    (_corrupt_backend_name, r"backends.moe 'tritn' is not a moe_mlp backend; known: auto, reference"),
])
def test_corrupt_saved_model_files_are_named(tmp_path, corrupt, message):
    """A damaged save gets a ValueError naming the file (a library's own error told neither which file nor
    what to do; a typo'd backend used to fail only at the first forward pass)."""
    MoonModel.from_preset("tiny").save_pretrained(str(tmp_path))
    corrupt(tmp_path)
    with pytest.raises(ValueError, match=message):
        MoonModel.from_pretrained(str(tmp_path))


def test_config_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoonModel.from_preset("tiny", moe={"restrict": "composition"})  # 4 experts / 3 groups < top_k 2
    with pytest.raises(ValueError, match="unknown option moe.experts"):
        MoonModel.from_preset("tiny", moe={"experts": 4})
    with pytest.raises(ValueError, match="out of range"):
        MoonModel.from_preset("tiny", moe={"layers": [5]})
    m = MoonModel.from_preset("tiny", **{"loss.dsf": False, "moe.layers": [-1]})
    assert not m.moon_config.loss.dsf and len(m.moe_layers()) == 1
    assert isinstance(m.backbone.language_model.layers[1].mlp, ModalityMoE)


# ----------------------------------------------------------------------------- processing and accounting

def test_image_processor_for_tiny_gives_16_tokens(tmp_path):
    from PIL import Image

    model = MoonModel.from_preset("tiny")
    proc = image_processor_for(model)
    out = proc(images=[Image.new("RGB", (112, 112), (200, 10, 10)), Image.new("RGB", (224, 224))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    assert out["pixel_values"].shape == (128, 3 * 2 * 14 * 14)
    model.save_pretrained(str(tmp_path))
    again = image_processor_for(MoonModel.from_pretrained(str(tmp_path)))
    assert again.to_dict()["merge_size"] == 2 and os.path.isfile(tmp_path / "preprocessor_config.json")


def test_parameter_and_flop_accounting():
    model = MoonModel.from_preset("tiny")  # 2 MoE layers, 4 experts, top 2
    layer = model.moe_layers()[0]
    per_expert = 2 * 256 * 128 + 128 * 256
    assert layer.gate_up_proj[0].numel() + layer.down_proj[0].numel() == per_expert
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(active=True) == total - 2 * 2 * per_expert
    lm = model.backbone.language_model
    n_lm = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens")) - 2 * 2 * per_expert
    assert model.flops_per_token(seq_len=10) == 6 * n_lm + 6 * 2 * 10 * 128
    dense = MoonModel.from_preset("tiny", moe={"enabled": False})
    assert dense.flops_per_token(seq_len=10) < model.flops_per_token(seq_len=10)


@pytest.mark.parametrize("attn", ["moon_fast", "sdpa"])
def test_compute_loss_under_autocast(attn):
    """bf16 autocast (the torch engine's mixed precision): attention (ours, the default, and transformers'
    sdpa), MoE and loss run; result near fp32. Ours used to fail: the rotary embedding hands back float32 q, k
    beside a bf16 v, and flash_attention did not cast as autocast does."""
    torch.manual_seed(0)
    model = MoonModel.from_preset("tiny", moe={"num_shared_experts": 1},
                                  backends={"attn_implementation": attn})
    batch = make_triplet_batch(6, 3)
    ref = model.compute_loss(batch, progress=0.2).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.compute_loss(batch, progress=0.2)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(ref, rel=0.05)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def _mislabel(b):
    b.query_modality = (b.query_modality + 1) % 3


@pytest.mark.parametrize("mutate, match", [
    (_mislabel, "query_modality disagrees with the composition of the query samples"),
    (lambda b: setattr(b, "query", b.query.clone().fill_(99)), r"query has rows outside the encoder's \d+ samples"),
    (lambda b: setattr(b, "positive", b.positive.float()), "positive must be a 1-D integer tensor of length Q"),
    (lambda b: setattr(b, "corrupted", torch.zeros(1, dtype=torch.bool)), "corrupted must be a 1-D integer tensor"),
    (lambda b: setattr(b, "intra_text", b.intra_text[:-1]), "intra_text must be a 1-D integer tensor of length P"),
])
def test_compute_loss_checks_the_batch(mutate, match):
    """A mislabelled or malformed TripletBatch is refused before the encoder runs (a wrong query_modality
    used to train the wrong objective silently; bad rows failed with a bare IndexError inside the loss)."""
    model = MoonModel.from_preset("tiny")
    batch = make_triplet_batch(6, 3)
    mutate(batch)
    with pytest.raises(ValueError, match=match):
        model.compute_loss(batch, progress=0.5)


def test_compute_loss_checks_progress():
    model = MoonModel.from_preset("tiny")
    for bad in (float("nan"), None, 1.5):
        with pytest.raises(ValueError, match="progress .* must be a number in \\[0, 1\\]"):
            model.compute_loss(make_triplet_batch(6, 3), progress=bad)


def test_activation_checkpointing_recomputes_and_keeps_the_gradients():
    """model.activation_checkpointing (on in configs/base.yaml) through the trainer's build_model: the decoder
    layers keep fewer activations for the backward and recompute them there, and the gradients are the ones
    of the run without it (MoE routing and our attention recomputed; fp32, CPU: bitwise)."""
    from moon_fast.train.config import load_config
    from moon_fast.train.trainer import build_model

    batch = make_triplet_batch(6, 3)

    def step(checkpointing: bool):
        torch.manual_seed(0)
        cfg = load_config("ci", [f"model.activation_checkpointing={str(checkpointing).lower()}"])
        model = build_model(cfg).train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model.compute_loss(batch, progress=0.2).loss
        loss.backward()
        return loss.item(), sum(saved), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, saved, grads = step(False)
    loss_ck, saved_ck, grads_ck = step(True)
    assert loss_ck == loss
    assert saved_ck < 0.7 * saved, (saved_ck, saved)  # what the forward kept for the backward
    assert grads_ck.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.equal(grads_ck[name], g), name
