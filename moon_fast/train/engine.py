"""The optimisation engine: DeepSpeed (ZeRO 0-3) or plain PyTorch, behind one small interface.

Both use torch's AdamW (DeepSpeed takes it as a client optimizer; with ``offload_optimizer`` DeepSpeed
builds its CPU Adam instead) and a LambdaLR warmup + cosine schedule stepped once per optimizer step.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .config import Config


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _apply_optim(optimizer, scheduler, o) -> list[str]:
    """The groups are param_groups' [decay, no decay] (DeepSpeed keeps their order); the scheduler's lambda
    is this run's (LambdaLR does not save a closure), its step count the checkpoint's."""
    g0 = optimizer.param_groups[0]
    have = {"lr": scheduler.base_lrs[0], "betas": tuple(g0["betas"]), "eps": g0["eps"],
            "weight_decay": g0["weight_decay"]}
    want = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    changed = [f"optim.{k} {have[k]} -> {v}" for k, v in want.items() if have[k] != v]
    for i, g in enumerate(optimizer.param_groups):
        g["betas"], g["eps"], g["initial_lr"] = want["betas"], o.eps, o.lr
        g["weight_decay"] = o.weight_decay if i == 0 else 0.0
    scheduler.base_lrs = [o.lr] * len(scheduler.base_lrs)
    for g, base, lam in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        g["lr"] = base * lam(scheduler.last_epoch)
    return changed


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, scalars (logit scales), embeddings' 1-D params, and the MoE layers'
    dual-alignment matrices W* (``.alignment``): the method regularises W* by L_sparsity alone, and decay
    would pull its objective distributions towards uniform, against L_sparsity."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith(".alignment") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LossModule(nn.Module):
    """Makes ``compute_loss`` the module's forward, so DeepSpeed's engine (and ZeRO-3's parameter
    gathering hooks, which fire on module calls) see the training computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, progress: float, gather: bool):
        return self.model.compute_loss(batch, progress=progress, gather=gather)


class Engine:
    name = "base"

    def __init__(self, model: nn.Module, cfg: Config, world: int, device: torch.device, dtype: torch.dtype,
                 micro_batch: int):
        self.model, self.cfg, self.world, self.device, self.dtype = model, cfg, world, device, dtype
        self.micro_batch = micro_batch
        self.last_grad_norm: float | None = None

    def gathered_params(self):
        """Context in which every parameter is whole on every rank (saving the final model)."""
        return contextlib.nullcontext()

    def apply_optim_config(self) -> list[str]:
        """After a checkpoint load: the optimizer and schedule take this run's ``optim.*`` and
        ``train.max_steps``, not the saved ones (the saved lr was the old schedule's: a resume with more steps
        ran its first step at the old rate, and a changed optim.lr was ignored). Unchanged values change
        nothing, so an exact resume stays exact. Returns what changed, as "name old -> new"."""
        return _apply_optim(self.scheduler.optimizer, self.scheduler, self.cfg.optim)


class TorchEngine(Engine):
    """Plain PyTorch: one process, or several with gradients all-reduced (mean) before the step."""

    name = "torch"

    def __init__(self, model, cfg, world, device, dtype, micro_batch):
        super().__init__(model, cfg, world, device, dtype, micro_batch)
        o = cfg.optim
        self.module = LossModule(model).to(device)
        self.optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o.warmup_steps, cfg.train.max_steps, o.min_lr_ratio))
        self.accum = cfg.train.grad_accum
        self.autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())
        if world > 1:  # identical start on every rank
            for p in model.parameters():
                dist.broadcast(p.data, 0)

    def forward(self, batch, progress, gather):
        with self.autocast:
            return self.module(batch, progress, gather)

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            off = 0
            for p, g in zip(params, grads):
                n = g.numel()
                p.grad = flat[off:off + n].view_as(p).clone()
                off += n
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.last_grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, path: Path, rank: int) -> None:
        if rank == 0:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, path / "torch_state.pt")

    def load(self, path: Path) -> None:
        s = torch.load(path / "torch_state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 0-3 from ``distributed.*``; bf16 when the run's dtype is bf16."""

    name = "deepspeed"

    def __init__(self, model, cfg, world, device, dtype, micro_batch):
        super().__init__(model, cfg, world, device, dtype, micro_batch)
        import deepspeed

        o, t, d = cfg.optim, cfg.train, cfg.distributed
        ds = {
            "train_batch_size": t.global_batch,
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": t.grad_accum,
            "gradient_clipping": o.grad_clip,
            "zero_optimization": {"stage": d.zero_stage},
            "bf16": {"enabled": dtype == torch.bfloat16},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
            "wall_clock_breakdown": False,
        }
        optimizer = None
        if d.offload_optimizer:
            ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps,
                                                            "weight_decay": o.weight_decay}}
        else:
            optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                          eps=o.eps)
        _merge(ds, d.deepspeed)
        sched = lr_lambda(o.warmup_steps, t.max_steps, o.min_lr_ratio)
        _patch_scalar_broadcast()
        self.module = LossModule(model)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, config=ds, dist_init_required=False,
            lr_scheduler=(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched)),
            model_parameters=None if optimizer is not None else param_groups(model, o.weight_decay))

    def forward(self, batch, progress, gather):
        return self.ds(batch, progress, gather)

    def backward(self, loss):
        # DeepSpeed counts micro-batches in its step(): it must follow every micro-batch's backward, and
        # updates only at the accumulation boundary. Called once per optimizer step (as it was), a run with
        # grad_accum=2 updated every second step, on four micro-batches' gradients.
        self.ds.backward(loss)
        self.ds.step()

    def step(self):
        """The update itself ran in the last micro-batch's backward (DeepSpeed's step at the boundary)."""
        norm = self.ds.get_global_grad_norm()
        self.last_grad_norm = None if norm is None else float(norm)

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def save(self, path: Path, rank: int) -> None:
        self.ds.save_checkpoint(str(path), tag="deepspeed", save_latest=False)

    def load(self, path: Path) -> None:
        out, _ = self.ds.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if out is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")

    def gathered_params(self):
        if self.cfg.distributed.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return contextlib.nullcontext()


def _patch_scalar_broadcast() -> None:
    """DeepSpeed 0.19's parameter broadcasts (engine start, ZeRO-3 conversion) do
    ``p.data.view(torch.uint8)``, which fails on a 0-dim parameter (e.g. a learnable logit scale):
    "self.dim() cannot be 0 to view Float as Byte". There, 0-dim parameters are broadcast through a
    1-element view of the same storage (their shape is left as it is)."""
    from deepspeed.runtime.engine import DeepSpeedEngine as _DSE

    if getattr(_DSE._broadcast_model, "_moon_fast_patched", False):
        return
    orig = _DSE._broadcast_model

    def _broadcast_model(self):
        scalars = [(p, p.data) for p in self.module.parameters() if p.dim() == 0]
        for p, d in scalars:
            p.data = d.view(1)
        try:
            orig(self)
        finally:
            for p, d in scalars:
                p.data = d

    _broadcast_model._moon_fast_patched = True
    _DSE._broadcast_model = _broadcast_model

    # ZeRO-3 broadcasts every parameter the same way when it converts it to a partitioned one.
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.zero.partition_parameters import Init

    orig_init = Init._zero_init_param

    def _zero_init_param(self, param):
        if param.dim() != 0:
            return orig_init(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if ds_dist.get_world_group() == group else ds_dist.get_global_rank(group, 0)
        ds_dist.broadcast(param.data.view(1).view(torch.uint8), src, group)
        param.partition()

    Init._zero_init_param = _zero_init_param


def _merge(a: dict, b: dict) -> None:
    for k, v in (b or {}).items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails at import
        return False
    return True


def make_engine(model, cfg, world, device, dtype, micro_batch) -> Engine:
    kind = cfg.distributed.engine
    if kind == "auto":
        kind = "deepspeed" if deepspeed_available() else "torch"
    if kind == "deepspeed":
        if not deepspeed_available():
            raise RuntimeError("distributed.engine=deepspeed but deepspeed is not installed: pip install deepspeed, "
                               "or set distributed.engine=torch")
        return DeepSpeedEngine(model, cfg, world, device, dtype, micro_batch)
    if cfg.distributed.zero_stage > 0 and world > 1:
        print(f"note: distributed.engine=torch ignores zero_stage={cfg.distributed.zero_stage} (no sharding)")
    return TorchEngine(model, cfg, world, device, dtype, micro_batch)
