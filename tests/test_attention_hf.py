"""The transformers integration: a tiny Qwen2-VL / Qwen2.5-VL with ``attn_implementation="moon_fast"``
matches the same weights with ``"sdpa"`` (fp32, forward and backward): vision encoder over images of
different sizes, causal language model with padding, and packed samples (position_ids restarts and
explicit cu_seq_lens)."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close

transformers = pytest.importorskip("transformers")

from moon_fast.ops import attention_hf  # noqa: E402
from moon_fast.ops.attention_hf import moon_fast_attention_forward, register_attention  # noqa: E402

IMG, VSTART, VEND = 190, 191, 192


@pytest.fixture(autouse=True)
def _registered_and_counted(monkeypatch):
    assert register_attention() == "moon_fast"
    assert register_attention() == "moon_fast"  # idempotent
    calls = []
    real = attention_hf.flash_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("cu_seqlens_q") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_hf, "flash_attention", spy)
    attention_hf.set_attention_backend(None)
    yield calls
    attention_hf.set_attention_backend(None)


def _config(kind="qwen2_vl"):
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, in_chans=3)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMG,
                                          vision_start_token_id=VSTART, vision_end_token_id=VEND)
    vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=56,
                  fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG,
                                         vision_start_token_id=VSTART, vision_end_token_id=VEND)


def _models(kind="qwen2_vl"):
    cfg = _config(kind)
    cls = transformers.Qwen2VLModel if kind == "qwen2_vl" else transformers.Qwen2_5_VLModel
    torch.manual_seed(0)
    ref = cls._from_config(cfg, attn_implementation="sdpa").eval()
    ours = cls._from_config(cfg, attn_implementation="moon_fast").eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "moon_fast"
    return ref, ours


def _image_batch(padding_side="right"):
    """Two samples with images of different sizes (8x8 and 4x6 patch grids), right/left padded."""
    grid = torch.tensor([[1, 8, 8], [1, 4, 6]])
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    seqs = []
    for n_img, pre, post in ((16, 3, 4), (6, 2, 9)):
        body = torch.randint(10, 180, (pre + post,), generator=g).tolist()
        seqs.append(body[:pre] + [VSTART] + [IMG] * n_img + [VEND] + body[pre:])
    length = max(map(len, seqs))
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if padding_side == "right" else slice(length - len(s), length)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                mm_token_type_ids=(ids == IMG).long())


def _forward_backward(model, batch, valid):
    model.zero_grad()
    out = model(**batch).last_hidden_state
    g = torch.Generator().manual_seed(2)
    w = torch.randn(out.shape, generator=g).to(out.device)
    (out * w * valid[..., None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _compare(ref, ours, batch, valid, atol=2e-5):
    out_r, g_r = _forward_backward(ref, batch, valid)
    out_o, g_o = _forward_backward(ours, batch, valid)
    assert_close(out_o[valid], out_r[valid], atol=atol, rtol=1e-4, name="hidden states")
    assert set(g_r) == set(g_o)
    for name in g_r:
        assert_close(g_o[name], g_r[name], atol=atol * 5, rtol=1e-3, name=f"grad {name}")


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_backbone_matches_sdpa_with_images_and_padding(kind, padding_side, backend, _registered_and_counted):
    ref, ours = _models(kind)
    attention_hf.set_attention_backend(backend)
    batch = _image_batch(padding_side)
    _compare(ref, ours, batch, batch["attention_mask"].bool())
    calls = _registered_and_counted
    # Vision blocks (per image) and language layers (unpadded: varlen) all went through flash_attention.
    assert len(calls) >= 2 * 2 + 2 and any(calls), calls


def test_packed_samples_match_sdpa(_registered_and_counted):
    """Three text samples packed into one row; position_ids restart per sample (4-row Qwen2-VL form:
    text positions first). SDPA builds a block-causal mask from them; we get cu_seqlens."""
    ref, ours = _models()
    lens = [7, 12, 5]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(10, 180, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]  # (1, S)
    position_ids = pos[None].expand(4, 1, -1).clone()
    batch = dict(input_ids=ids, position_ids=position_ids)
    _compare(ref, ours, batch, torch.ones(1, sum(lens), dtype=torch.bool))
    assert all(_registered_and_counted), "packed samples must reach flash_attention as varlen"
    # The same packing given explicitly as FlashAttentionKwargs.
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    out_kw = ours(**batch, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=12, max_length_k=12).last_hidden_state
    out_ref = ref(**batch).last_hidden_state
    assert_close(out_kw, out_ref, atol=2e-5, rtol=1e-4, name="cu_seq_lens kwargs")
    # And each sample alone gives the same hidden states (no leakage across samples).
    a = 0
    for n in lens:
        alone = ours(input_ids=ids[:, a:a + n]).last_hidden_state
        assert_close(out_kw[:, a:a + n], alone, atol=2e-5, rtol=1e-4, name=f"sample at {a}")
        a += n


class _Module(torch.nn.Module):
    is_causal = True


def test_4d_mask_falls_back_to_masked_attention():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 9, 16, generator=g)
    k = torch.randn(2, 2, 9, 16, generator=g)
    v = torch.randn(2, 2, 9, 16, generator=g)
    keep = torch.rand(2, 1, 9, 9, generator=g) > 0.3
    keep[..., 0] = True
    out, _ = moon_fast_attention_forward(_Module(), q, k, v, keep, scaling=0.25)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    want = (p @ v.repeat_interleave(2, 1)).transpose(1, 2)
    assert_close(out, want, atol=1e-5, rtol=1e-4, name="4-D mask")


def test_unsupported_features_raise():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        moon_fast_attention_forward(_Module(), q, q, q, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="sliding"):
        moon_fast_attention_forward(_Module(), q, q, q, None, sliding_window=4)


def test_backbone_on_triton_backend(_registered_and_counted):
    """The same model-level check with the Triton kernels (interpreter on the CPU): strided q/k/v from
    the fused vision qkv projection, varlen language model after unpadding, GQA."""
    from moon_fast.backends import triton_unavailable

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert triton_unavailable(dev) is None, triton_unavailable(dev)  # conftest enables the interpreter
    ref, ours = _models()
    ref, ours = ref.to(dev), ours.to(dev)
    attention_hf.set_attention_backend("triton")
    batch = {k: v.to(dev) for k, v in _image_batch("right").items()}
    _compare(ref, ours, batch, batch["attention_mask"].bool())


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_packed_vision_attention_matches_sdpa(kind, _registered_and_counted):
    """pack_vision_attention: one varlen call per vision layer (all images, or all windows in
    Qwen2.5-VL), same outputs and gradients as transformers' SDPA path; enabled=False restores it."""
    ref, ours = _models(kind)
    depth = ours.config.vision_config.depth
    assert attention_hf.pack_vision_attention(ours) == depth
    batch = _image_batch()
    calls = _registered_and_counted
    ours.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert calls == [True] * depth  # two images of different sizes, one call per layer
    calls.clear()
    _compare(ref, ours, batch, batch["attention_mask"].bool())
    assert attention_hf.pack_vision_attention(ours, enabled=False) == depth
    calls.clear()
    ours.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    assert len(calls) > depth  # per image (or window) again
