"""The training loop: data -> model.compute_loss -> engine (DeepSpeed ZeRO or torch), with logging,
atomic checkpoints, exact resume, the final model in transformers' format and a zero-shot evaluation.

Run directory layout: ``config.yaml`` (the resolved config it ran with), ``metrics.jsonl``,
``checkpoints/step_XXXXXX/``, ``final/`` (model + tokenizer + image processor), ``eval.json``, ``tb/``,
``profile/`` (when train.profile_steps is set).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moon_fast.ops.contrastive import NonFiniteInput

from .checkpoint import _crash_point, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import Config, ConfigError, micro_batch, save_config, validate
from .distributed import all_reduce_mean, all_reduce_sum, barrier, setup, teardown, union_keys
from .engine import deepspeed_available, make_engine
from .metrics import MetricsWriter, device_peak, peak_memory_mb


def _say(info, *a) -> None:
    if info.is_main:
        print(*a, file=sys.stderr, flush=True)


def resolve_data(cfg: Config, info) -> Path:
    """The catalog directory; the embedded synthetic catalog is generated on first use (rank 0 first)."""
    if cfg.data.path:
        return Path(cfg.data.path).resolve()
    from moon_fast.data.synth import ensure_synthetic

    if info.is_main:
        path = ensure_synthetic(cfg.data.synth_products, cfg.data.synth_seed)
    barrier()
    if not info.is_main:
        path = ensure_synthetic(cfg.data.synth_products, cfg.data.synth_seed, verbose=False)
    return Path(path).resolve()


def build_model(cfg: Config):
    from moon_fast.model import MoonModel

    opts = copy.deepcopy(cfg.model.options)
    m = cfg.model
    if not (m.pretrained or m.backbone_checkpoint or m.preset):
        raise ConfigError("model: set model.backbone_checkpoint (a local Qwen2-VL / Qwen2.5-VL directory), "
                          "model.pretrained (a saved MoonModel) or model.preset (a random-init backbone)")
    if m.pretrained:
        # the options change the saved config before the model is built (applied after, an option that shapes
        # the model, e.g. moe.num_experts, was ignored in training but written into final/, which then failed
        # to load): one that does not fit the saved weights is an error here
        try:
            model = MoonModel.from_pretrained(m.pretrained, **opts)
        except ValueError as e:
            if not opts:
                raise
            raise ConfigError(f"model: model.options {opts} do not fit the saved model {m.pretrained} (only options "
                              f"that keep its weights' shapes, e.g. loss.* and backends.*, can change): {e}") from e
    elif m.backbone_checkpoint:
        model = MoonModel.from_backbone_checkpoint(m.backbone_checkpoint, **opts)
    else:
        model = MoonModel.from_preset(m.preset, **opts)
    if m.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recomputes each decoder layer in the backward (transformers' checkpointing of its decoder layers,
    non-reentrant) instead of keeping its activations. Newer transformers name it
    ``activation_checkpointing_enable``; older versions ``gradient_checkpointing_enable``, now deprecated."""
    target = getattr(model, "backbone", model)
    for name, kwargs in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                         ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        if hasattr(target, name):
            getattr(target, name)(**{kwargs: {"use_reentrant": False}})
            return
    raise ConfigError(f"model.activation_checkpointing: {type(target).__name__} does not support it")


def build_tokenizer(cfg: Config, data_dir: Path):
    """The checkpoint's own tokenizer when it has one, else the catalog's tokenizer.json, else one
    trained on the catalog's text now."""
    from moon_fast.data.tokenizer import TextTokenizer, load_tokenizer, train_tokenizer

    for d in (cfg.model.pretrained, cfg.model.backbone_checkpoint):
        if d and ((Path(d) / "tokenizer.json").exists() or (Path(d) / "tokenizer_config.json").exists()):
            return load_tokenizer(d)
    if (data_dir / "tokenizer.json").exists():
        return load_tokenizer(data_dir)
    from moon_fast.data.catalog import Catalog

    cat = Catalog(data_dir)
    tok = train_tokenizer([p.title for p in cat.products] + [p.description for p in cat.products if p.description])
    return TextTokenizer(tok, source="trained on the catalog")


def _vocab_size(model) -> int | None:
    try:
        return int(model.moon_config.backbone.text_config.vocab_size)
    except AttributeError:
        emb = getattr(model, "get_input_embeddings", None)
        return emb().num_embeddings if emb else None


def train(cfg: Config, output: str | os.PathLike, resume: bool = False) -> dict:
    """Runs (or resumes) a training run into ``output``; returns a summary dict (rank 0's view).
    Every rank of a torchrun / deepspeed launch calls this."""
    engine_kind = cfg.distributed.engine
    if engine_kind == "auto":
        engine_kind = "deepspeed" if deepspeed_available() else "torch"
    cfg = copy.deepcopy(cfg)
    cfg.distributed.engine = engine_kind
    info = setup(cfg.distributed.backend, need_group=engine_kind == "deepspeed")
    try:
        summary = _train(cfg, Path(output), resume, info)
    except BaseException:
        teardown(info, failed=True)  # a barrier here hung every rank of a run where one rank failed
        raise
    teardown(info)
    return summary


def _train(cfg: Config, out: Path, resume: bool, info) -> dict:
    validate(cfg, info.world)
    engine_kind = cfg.distributed.engine
    t_start = time.perf_counter()
    ckpt = None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} is a file: give a directory for the run")
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            interrupted = sorted(p.name for p in (out / "checkpoints").glob(".tmp-*"))
            why = (f"only the interrupted save {', '.join(interrupted)}" if interrupted
                   else "missing checkpoint directory" if not (out / "checkpoints").is_dir() else "none complete")
            raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'} ({why}); start without "
                              f"--resume to train this run from the beginning")
    elif list_checkpoints(out):  # complete ones; an interrupted first save (.tmp-) does not count
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue it, or choose another --output")
    gpu = info.device.type == "cuda"
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16}[cfg.train.dtype]

    with _data_errors():  # the synthetic catalog the config names is generated here when missing
        data_dir = resolve_data(cfg, info)
    cfg.data.path = str(data_dir)

    seed = cfg.train.seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        model = build_model(cfg)
    except ConfigError:
        raise
    except ValueError as e:  # the model's own checks (options, a damaged checkpoint): a config problem here
        raise ConfigError(f"model: {e}") from e
    with _data_errors():  # with no tokenizer.json, one is trained on the catalog's text
        tokenizer = build_tokenizer(cfg, data_dir)
    vs = _vocab_size(model)
    if vs is not None and tokenizer.vocab_size > vs:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vs}")

    from moon_fast.data import BadRecordCounter, Catalog, ImageCache, SampleBuilder, TripletLoader
    from moon_fast.data.images import image_processor_for
    from moon_fast.data.loader import Prefetcher

    processor = image_processor_for(model)
    bad = BadRecordCounter(max_fraction=cfg.data.max_bad_fraction, grace=cfg.data.bad_record_grace)
    mb = micro_batch(cfg, info.world)
    with _data_errors():
        catalog = Catalog(data_dir, bad=bad)
        builder = SampleBuilder(tokenizer, ImageCache(processor, cfg.data.image_cache_mb << 20),
                                cfg.data.max_text_tokens)
        loader = TripletLoader(data_dir, catalog, builder, micro_batch=mb, grad_accum=cfg.train.grad_accum,
                               rank=info.rank, world=info.world, seed=seed, mode=cfg.data.mode, bad=bad)
    # Every rank read the same manifests so far: their bad records count once in the log, not once per rank;
    # what each rank meets later (its own samples' images, its own stream shards) is summed over the ranks.
    bad_at_start = bad.bad

    # Counted before the engine exists: ZeRO-3 partitions the parameters (numel 0 on every rank).
    n_params = sum(p.numel() for p in model.parameters())
    count_flops = _flop_counter(model)
    if engine_kind == "torch":
        model.to(info.device)
    engine = make_engine(model, cfg, info.world, info.device, dtype, mb)
    start = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, engine, info.rank, info.world)
        start = state["meta"]["step"]
        check_resume(ckpt, state["meta"], cfg, info.world)
        changed = engine.apply_optim_config()
        try:
            loader.load_state_dict(state["data"])
        except ValueError as e:  # another data mode or catalog than the checkpoint's (the loader says which)
            raise ConfigError(f"--resume from {ckpt}: {e}") from e
        _say(info, f"resumed from {ckpt} at step {start}"
                   + (f"; this run's {', '.join(changed)}" if changed else ""))
    loader = Prefetcher(loader, enabled=cfg.data.prefetch)
    max_steps = cfg.train.max_steps
    peak, peak_src = device_peak(info.device, dtype)
    _say(info, f"training {cfg.model.pretrained or cfg.model.backbone_checkpoint or cfg.model.preset} on {data_dir}: "
               f"{len(catalog)} products, world {info.world} x micro {mb} x accum {cfg.train.grad_accum} = global "
               f"{cfg.train.global_batch}, {engine_kind} ZeRO-{cfg.distributed.zero_stage}, {dtype}, "
               f"{info.device}, params {n_params}, peak {peak:.3g} TFLOP/s ({peak_src})")

    # Written once the model, data and checkpoint are known to load: a run refused above leaves no directory
    # holding only a config.yaml, and a refused --resume no config.resume.yaml.
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / ("config.yaml" if not resume else "config.resume.yaml"))
        if resume and not (out / "config.yaml").exists():
            save_config(cfg, out / "config.yaml")
    barrier()
    writer = MetricsWriter(out, info.is_main, cfg.train.tensorboard, resume)
    if resume:
        writer.truncate_after(start)
    from tqdm import tqdm

    bar = tqdm(total=max_steps, initial=start, disable=not (info.is_main and cfg.train.progress),
               dynamic_ncols=True, mininterval=1.0, desc="train", file=sys.stderr)
    win = _Window()
    prof = None
    gather = cfg.train.gather and info.world > 1
    last_record: dict = {}
    step = start
    while step < max_steps:
        if cfg.train.profile_steps and step + 1 == cfg.train.profile_steps[0]:
            prof = _start_profiler(gpu)
        t0 = time.perf_counter()
        data_s = 0.0
        lr = engine.lr()  # the rate this step uses (DeepSpeed's scheduler moves on in the last micro backward)
        for _ in range(cfg.train.grad_accum):
            td = time.perf_counter()
            with _data_errors():
                batch = loader.next()
            win.tokens += batch.encoder.input_ids.numel()
            win.flops += count_flops(batch.encoder) if count_flops else 0.0
            win.samples += batch.query.numel()
            batch = batch.to(info.device, dtype=dtype)
            data_s += time.perf_counter() - td
            with (torch.profiler.record_function("forward") if prof else contextlib.nullcontext()):
                try:
                    res = engine.forward(batch, step / max_steps, gather)
                except NonFiniteInput as e:
                    done = list_checkpoints(out)
                    raise Diverged(f"training diverged at step {step + 1}: the embeddings are no longer finite "
                                   f"({e}). Lower optim.lr (now {cfg.optim.lr:g}) or set optim.grad_clip (now "
                                   f"{cfg.optim.grad_clip:g}); the last complete checkpoint is "
                                   f"{done[-1] if done else 'none'}") from e
            engine.backward(res.loss)
            win.add(float(res.loss.detach()), res.metrics)
        engine.step()
        if gpu:
            torch.cuda.synchronize()
        step += 1
        win.time += time.perf_counter() - t0
        win.data_time += data_s
        win.steps += 1
        if prof is not None and step == cfg.train.profile_steps[1]:
            _stop_profiler(prof, out, info.rank, cfg.train.profile_steps)
            prof = None
        if step % cfg.train.log_every == 0 or step == max_steps or step == start + 1:
            rec = win.reduce(info.world)
            rec.update(step=step, lr=lr, grad_norm=engine.last_grad_norm,
                       bad_records=bad_at_start + int(all_reduce_sum(bad.bad - bad_at_start)))
            if count_flops:
                rec["mfu"] = rec["tflops"] / (peak * info.world)
            rec["peak_memory_mb"] = peak_memory_mb(info.device)
            ds = loader.state_dict()
            rec["epoch"] = round(ds["pos"] / ds["n"], 3) if ds["mode"] == "memory" else ds["epoch"]
            last_record = rec
            writer.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", sps=f"{rec['samples_per_s']:.1f}", refresh=False)
            if not cfg.train.progress:
                _say(info, f"step {step}/{max_steps} loss {rec['loss']:.4f} samples/s {rec['samples_per_s']:.1f} "
                           f"tokens/s {rec['tokens_per_s']:.0f}")
            win = _Window()
        bar.update(1)
        if step % cfg.train.checkpoint_every == 0 or step == max_steps:
            save_checkpoint(out, step, engine, info.rank, info.world, {"data": loader.state_dict()},
                            {"max_steps": max_steps, "global_batch": cfg.train.global_batch,
                             "seed": cfg.train.seed},
                            cfg.train.keep_checkpoints)
        _crash_point("step", step)
    bar.close()
    writer.close()
    loader.close()

    final = out / "final"
    with engine.gathered_params():
        if info.is_main:
            model.save_pretrained(str(final))
            tokenizer.save(final)
            processor.save_pretrained(str(final))
    barrier()
    summary = {"run": str(out), "steps": step, "train_seconds": time.perf_counter() - t_start,
               "last": last_record, "data": str(data_dir), "bad_records": bad.state_dict()}
    if info.is_main and cfg.train.evaluate:
        heldout = data_dir / "heldout.jsonl"
        if heldout.exists():
            from moon_fast.eval import evaluate_checkpoint

            try:
                summary["eval"] = evaluate_checkpoint(str(out), data=str(heldout), output=str(out / "eval.json"),
                                                      batch_size=cfg.train.eval_batch_size)
            except Exception as e:  # noqa: BLE001  the trained model is saved: keep the run, report the eval
                summary["eval_error"] = f"{type(e).__name__}: {e}"
                _say(info, f"the held-out evaluation failed ({summary['eval_error'][:500]}); the model is saved in "
                           f"{final}: evaluate it with `moon-fast eval --checkpoint {out}` once {heldout} is fixed")
        else:
            _say(info, f"no {heldout}: skipping the zero-shot evaluation")
    barrier()
    return summary


@contextlib.contextmanager
def _data_errors():
    """The data layer's ValueErrors (an empty catalog, an unreadable shard, no usable triplet) name the file
    and the fix: report them like config errors, not as tracebacks. Bad single records are skipped and
    counted before this (BadRecordCounter); what reaches here ends the run."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from e


class Diverged(RuntimeError):
    """The loss's inputs stopped being finite during training (a learning rate too high, no clipping)."""


def _flop_counter(model):
    """A function giving the training FLOPs of one packed encoder batch from ``model.flop_terms()``: the
    language model per token, attention per token times its own sequence's length (the sum of L_i^2 over
    the packed sequences), the vision tower per image token. (One flops_per_token() with its defaults,
    64-token sequences and no image tokens, left out most of the vision tower's FLOPs.) None without
    flop_terms. Taken before the engine exists: ZeRO-3 partitions the parameters."""
    if not hasattr(model, "flop_terms"):
        return None
    base, per_length, per_image_token = model.flop_terms()
    image_id = getattr(getattr(getattr(model, "backbone", None), "config", None), "image_token_id", None)

    def count(enc) -> float:
        lengths = (enc.cu_seqlens[1:] - enc.cu_seqlens[:-1]).double()
        images = int((enc.input_ids == image_id).sum()) if image_id is not None and enc.pixel_values is not None else 0
        return base * enc.input_ids.numel() + per_length * float((lengths * lengths).sum()) + per_image_token * images

    return count


def check_resume(ckpt: Path, meta: dict, cfg: Config, world: int) -> None:
    """A resume must be able to continue exactly: the same global batch (the data position counts
    triplets) and seed (it orders the data), in stream mode the same number of processes (each has its own
    position in its shards), and steps left to train."""
    for key, now in (("global_batch", cfg.train.global_batch), ("seed", cfg.train.seed)):
        if meta.get(key) not in (None, now):
            raise ConfigError(f"--resume: {ckpt} was trained with train.{key}={meta[key]}, this run asks for "
                              f"{now}; an exact resume needs the same train.{key}")
    if cfg.data.mode == "stream" and meta.get("world_size") not in (None, world):
        raise ConfigError(f"--resume: {ckpt} was written by {meta['world_size']} processes and this run has {world}; "
                          "in data.mode=stream each process has its own position in its shards, so resume with "
                          f"{meta['world_size']} processes (data.mode=memory can change the number)")
    if meta["step"] >= cfg.train.max_steps:
        raise ConfigError(f"--resume: {ckpt} is at step {meta['step']}, and train.max_steps={cfg.train.max_steps} "
                          f"leaves nothing to train: raise train.max_steps (or --max-steps)")


class _Window:
    """Accumulates a logging window's losses, metrics, tokens and time on one rank."""

    def __init__(self):
        self.loss_sum, self.n, self.tokens, self.samples = 0.0, 0, 0, 0
        self.flops = 0.0
        self.time = self.data_time = 0.0
        self.steps = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, loss: float, metrics: dict) -> None:
        self.loss_sum += loss
        self.n += 1
        for k, v in (metrics or {}).items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def reduce(self, world: int) -> dict:
        keys = union_keys(list(self.sums))
        vals = {"loss": self.loss_sum / max(1, self.n), "time": self.time, "data_time": self.data_time}
        for k in keys:
            vals["s/" + k] = self.sums.get(k, 0.0)
            vals["c/" + k] = float(self.counts.get(k, 0))
        vals = all_reduce_mean(vals, world)
        tokens = all_reduce_sum(self.tokens)
        samples = all_reduce_sum(self.samples)
        flops = all_reduce_sum(self.flops)
        t = max(vals["time"], 1e-9)  # mean over ranks of the window's wall time
        rec = {"loss": vals["loss"], "samples_per_s": samples / t, "tokens_per_s": tokens / t,
               "step_time_s": t / max(1, self.steps), "data_time_frac": vals["data_time"] / t}
        if flops:
            rec["tflops"] = flops / t / 1e12
        for k in keys:
            c = vals["c/" + k]
            if c > 0:
                rec[k] = vals["s/" + k] / c
        return rec


def _start_profiler(gpu: bool):
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    prof = torch.profiler.profile(activities=acts, record_shapes=True, with_stack=False)
    prof.__enter__()
    return prof


def _stop_profiler(prof, out: Path, rank: int, steps) -> None:
    prof.__exit__(None, None, None)
    d = out / "profile"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"trace_rank{rank}_steps{steps[0]}-{steps[1]}.json"
    prof.export_chrome_trace(str(path))
    if rank == 0:
        print(f"profiler trace of steps {steps[0]}..{steps[1]} written to {path}", file=sys.stderr)
