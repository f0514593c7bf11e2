"""End-to-end training-step benchmark (op name ``train``): one optimizer step of the MOON2.0 model.

A step is ``compute_loss`` forward (the packed encode of queries, positives, negatives and the intra
views, DSF, all objectives), ``loss.backward()`` and an AdamW step. The harness's ``fwd`` row is
``compute_loss``, ``bwd`` the backward plus the optimizer step, ``fwd+bwd`` the whole step; rows carry
``samples`` (triplets) and ``tokens`` per step so the bench command reports samples/s and tokens/s.

Backends (Case.backend):

* ``reference``: MoonModel with every op on its ``reference`` backend (the oracle implementations:
  materialised logits, per-expert loops, materialised attention).
* ``auto``: MoonModel with every op on ``auto`` (the fast backends this device has).
* ``hf_open_clip``: the plain baseline at the same dense size: transformers' ``Qwen2VLModel`` (MoE
  replaced by the dense MLP, SDPA attention, the usual PADDED batch with an attention mask), embeddings
  mean-pooled over the mask and L2-normalised, and open_clip's ``ClipLoss`` between queries and their
  positive products (what one writes without this project). It encodes the same samples.

One fixed batch from the synthetic catalog is reused for every step: this measures compute, not data
loading. FLOPs: ``model.flops_per_token`` (6 x active params + attention) x tokens, split 1/3
forward, 2/3 backward; approximate (see that method).
"""

from __future__ import annotations

import torch

from moon_fast.bench.harness import Case, Workload

# Backbone sizes. "tiny" is the CPU preset; "small" and "base" are for a GPU (random weights).
SIZES = {
    "tiny": {},
    "small": {"text_config": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                              "num_attention_heads": 8, "num_key_value_heads": 2,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [8, 12, 12]}},
              "vision_config": {"depth": 4, "embed_dim": 256, "num_heads": 4}},
    "base": {"text_config": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 8,
                             "num_attention_heads": 12, "num_key_value_heads": 2,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [16, 24, 24]}},
             "vision_config": {"depth": 8, "embed_dim": 768, "num_heads": 12}},
}


def _batch(n_triplets: int, products: int = 200):
    """One TripletBatch of ``n_triplets`` from the (cached) synthetic catalog."""
    from moon_fast.data import (
        Catalog,
        ImageCache,
        SampleBuilder,
        TripletLoader,
        ensure_synthetic,
        load_tokenizer,
    )
    from moon_fast.data.images import default_image_processor

    root = ensure_synthetic(products=products, seed=0, verbose=False)
    tok = load_tokenizer(root)
    builder = SampleBuilder(tok, ImageCache(default_image_processor()))
    loader = TripletLoader(root, Catalog(root), builder, micro_batch=n_triplets)
    return loader.next()


def _moon_model(size: str, backend: str, moe: bool = True):
    from moon_fast.model import MoonModel

    ops = backend if backend in ("reference", "auto") else "auto"
    return MoonModel.from_preset("tiny", backbone=SIZES[size] or None, moe={"enabled": moe},
                                 backends={"moe": ops, "attention": ops, "contrastive": ops})


def _padded(batch, pad_id: int, image_token_id: int):
    """The packed EncoderBatch as a padded (n, Lmax) batch, as transformers' processors produce it."""
    enc = batch.encoder
    cu = enc.cu_seqlens.tolist()
    n, lmax = len(cu) - 1, int(enc.max_seqlen)
    ids = torch.full((n, lmax), pad_id, dtype=torch.long, device=enc.input_ids.device)
    mask = torch.zeros(n, lmax, dtype=torch.long, device=ids.device)
    for j in range(n):
        ln = cu[j + 1] - cu[j]
        ids[j, :ln] = enc.input_ids[cu[j]:cu[j + 1]]
        mask[j, :ln] = 1
    mm_types = (ids == image_token_id).int()
    return ids, mask, mm_types


def build(*, backend: str, dtype: torch.dtype, device: torch.device, size: str = "tiny",
          triplets: int = 8) -> Workload:
    batch = _batch(triplets).to(device)
    samples = int(batch.query.numel())
    tokens = int(batch.encoder.input_ids.numel())
    if backend == "hf_open_clip":
        return _build_hf(batch, dtype, device, size, samples, tokens)
    model = _moon_model(size, backend).to(device=device, dtype=dtype).train()
    batch = batch.to(device, dtype=dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    n_img = int((batch.encoder.input_ids == model.backbone.config.image_token_id).sum())
    fpt = model.flops_per_token(seq_len=tokens // max(1, batch.encoder.num_samples),
                                image_token_fraction=n_img / max(1, tokens))
    total = fpt * tokens

    def forward():
        return model.compute_loss(batch, progress=0.5).loss

    def backward(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Workload(forward=forward, backward=backward, flops_fwd=total / 3, flops_bwd=2 * total / 3,
                    meta={"samples": samples, "tokens": tokens, "params": model.num_parameters(),
                          "active_params": model.num_parameters(active=True)})


def _build_hf(batch, dtype, device, size, samples, tokens) -> Workload:
    try:
        from open_clip.loss import ClipLoss
    except ImportError as e:
        from moon_fast.backends import BackendUnavailable

        raise BackendUnavailable(f"open_clip is not installed (pip install open_clip_torch): {e}") from e
    from transformers import Qwen2VLModel

    from moon_fast.model.presets import preset_backbone_config

    cfg = preset_backbone_config("tiny", SIZES[size] or None)  # the same backbone, dense MLPs

    cfg._attn_implementation = "sdpa"
    model = Qwen2VLModel(cfg).to(device=device, dtype=dtype).train()
    ids, mask, mm_types = _padded(batch, cfg.text_config.pad_token_id or 0, cfg.image_token_id)
    enc = batch.encoder
    pixel_values = enc.pixel_values.to(dtype) if enc.pixel_values is not None else None
    loss_fn = ClipLoss()
    logit_scale = torch.tensor(1 / 0.07, device=device, dtype=torch.float32).log().exp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n_params = sum(p.numel() for p in model.language_model.parameters()) - model.language_model.embed_tokens.weight.numel()
    tc = cfg.text_config
    head_dim = tc.hidden_size // tc.num_attention_heads
    seq = tokens // max(1, enc.num_samples)
    fpt = 6 * n_params + 6 * tc.num_hidden_layers * seq * tc.num_attention_heads * head_dim
    total = fpt * tokens  # counted on real tokens; the padding the baseline computes is not useful work

    def forward():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                    image_grid_thw=enc.image_grid_thw, mm_token_type_ids=mm_types, use_cache=False)
        h = out.last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        return loss_fn(emb[batch.query], emb[batch.positive], logit_scale)

    def backward(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Workload(forward=forward, backward=backward, flops_fwd=total / 3, flops_bwd=2 * total / 3,
                    meta={"samples": samples, "tokens": tokens, "padded_tokens": int(ids.numel()),
                          "params": sum(p.numel() for p in model.parameters())})


def cases(quick: bool) -> list[Case]:
    gpu = torch.cuda.is_available()
    if quick or not gpu:
        configs = [("tiny", 8)] if quick else [("tiny", 8), ("tiny", 32)]
        dtypes = ("bf16",) if gpu else ("fp32",)
    else:
        configs = [("small", 32), ("base", 32)]
        dtypes = ("bf16",)
    out = []
    for size, n in configs:
        for dt in dtypes:
            for backend in ("reference", "auto", "hf_open_clip"):
                out.append(Case("train", backend, dt, {"size": size, "triplets": n}, "moon_fast.bench.train_e2e:build",
                                label=f"{size} x{n}"))
    return out
