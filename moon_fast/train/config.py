"""Training configuration: dataclasses, YAML presets shipped in moon_fast/configs/, and ``key=value``
overrides with dotted keys, all validated before any work starts."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    """preset: a named random-init backbone (moon_fast.model presets, e.g. "tiny"; null in configs that
    need a real checkpoint, so that a run without one fails instead of training a toy model);
    pretrained: a saved MoonModel directory to continue from; backbone_checkpoint: a local Qwen2(.5)-VL
    checkpoint directory to build the model from; options: MoonConfig overrides (moe.*, loss.*,
    embedding.*, backends.*); activation_checkpointing: recompute decoder layers in the backward."""

    preset: str | None = "tiny"
    pretrained: str | None = None
    backbone_checkpoint: str | None = None
    options: dict = field(default_factory=dict)
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    """path: a catalog directory (FORMAT.md); None = the embedded synthetic catalog (synth_products,
    synth_seed), generated into the cache on first use. mode: "memory" or "stream" (sharded manifests
    read per rank). max_bad_fraction: stop when more than this fraction of records is bad (checked after
    bad_record_grace records). prefetch: prepare the next batch in a background thread."""

    path: str | None = None
    synth_products: int = 1000
    synth_seed: int = 0
    mode: str = "memory"
    max_text_tokens: int = 48
    max_bad_fraction: float = 0.05
    bad_record_grace: int = 50
    image_cache_mb: int = 512
    prefetch: bool = True


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr; gradient clipping by norm."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """global_batch: triplets per optimizer step over all ranks = micro_batch x grad_accum x world.
    gather: score queries against the keys of all ranks (global-batch negatives).
    dtype: "auto" (bf16 on GPU, fp32 on CPU), "fp32" or "bf16". profile_steps: [first, last] step
    of a torch.profiler trace (empty = none)."""

    max_steps: int = 100
    global_batch: int = 32
    grad_accum: int = 1
    seed: int = 0
    gather: bool = True
    dtype: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    evaluate: bool = True
    eval_batch_size: int = 64
    tensorboard: bool = True
    progress: bool = True
    profile_steps: list = field(default_factory=list)


@dataclass
class DistributedConfig:
    """engine: "deepspeed" (ZeRO), "torch" (plain PyTorch; gradients all-reduced when world > 1) or
    "auto" (deepspeed when it is installed). zero_stage 0..3. backend: "auto" = nccl on GPU, gloo on CPU.
    deepspeed: extra DeepSpeed config entries merged over the generated ones."""

    engine: str = "auto"
    zero_stage: int = 1
    backend: str = "auto"
    offload_optimizer: bool = False
    deepspeed: dict = field(default_factory=dict)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building

def _field_types(dc) -> dict:
    return {f.name: f for f in dataclasses.fields(dc)}


def _coerce(value, current, key: str, type_hint: str):
    """Converts a YAML / command-line value to the type of the field (``current`` is its default)."""
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}={value!r}: cannot parse ({e})") from e
    if value is None:
        if "None" in type_hint or "| None" in type_hint:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {type_hint})")
    if isinstance(current, bool) or type_hint == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value
    if type_hint.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if type_hint.startswith("float"):
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if type_hint.startswith("str"):
        return str(value)
    if type_hint == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return value
    if type_hint == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return value
    return value


def _set(cfg: Config, key: str, value) -> None:
    parts = key.split(".")
    sections = _field_types(cfg)
    if parts[0] not in sections:
        raise ConfigError(f"unknown config key {key!r}; sections: {', '.join(sections)}")
    section = getattr(cfg, parts[0])
    if len(parts) == 1:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its keys")
        for k, v in value.items():
            _set(cfg, f"{key}.{k}", v)
        return
    fields = _field_types(section)
    name = parts[1]
    if name not in fields:
        raise ConfigError(f"unknown config key {key!r}; valid keys of {parts[0]}: "
                          f"{', '.join(parts[0] + '.' + f for f in fields)}")
    f = fields[name]
    hint = str(f.type)
    if len(parts) > 2:  # free-form dicts: model.options.loss.dsf=false, distributed.deepspeed.x=y
        if hint != "dict":
            raise ConfigError(f"unknown config key {key!r}: {parts[0]}.{name} has no sub-keys")
        d = getattr(section, name)
        for p in parts[2:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(value) if isinstance(value, str) else value
        return
    current = getattr(section, name)
    new = _coerce(value, current, key, hint)
    if hint == "dict" and isinstance(current, dict):
        new = _deep_merge(copy.deepcopy(current), new)
    setattr(section, name, new)


def _deep_merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_merge(a[k], v)
        else:
            a[k] = v
    return a


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise ConfigError(f"--config {name_or_path}: no such file")
        return p
    q = CONFIG_DIR / f"{name_or_path}.yaml"
    if not q.is_file():
        raise ConfigError(f"--config {name_or_path}: not a YAML file and not a preset; presets: "
                          f"{', '.join(preset_names())}")
    return q


def load_config(name_or_path: str | None = "tiny", overrides: list[str] | dict | None = None) -> Config:
    """A validated Config from a preset name or YAML file, then ``key=value`` overrides (a list of
    strings, or a dict of dotted keys). A YAML file may say ``base: <preset>`` to start from one."""
    cfg = Config()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections")
        base = data.pop("base", None)
        if base:
            cfg = load_config(base)
        for k, v in data.items():
            _set(cfg, k, v)
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in (overrides or [])]
    for k, v in items:
        _set(cfg, k, v)
    validate(cfg)
    return cfg


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.max_steps=100)")
    k, v = item.split("=", 1)
    return k.strip(), v


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raises ConfigError naming the first bad value. ``world_size`` (when known) checks divisibility."""
    d, t, o, m = cfg.distributed, cfg.train, cfg.optim, cfg.model
    if d.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"distributed.zero_stage={d.zero_stage}: DeepSpeed ZeRO has stages 0, 1, 2 and 3")
    if d.engine not in ("auto", "deepspeed", "torch"):
        raise ConfigError(f"distributed.engine={d.engine!r}: expected auto, deepspeed or torch")
    if d.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"distributed.backend={d.backend!r}: expected auto, gloo or nccl")
    if t.dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.dtype={t.dtype!r}: expected auto, fp32 or bf16")
    for k in ("max_steps", "global_batch", "grad_accum", "log_every", "checkpoint_every", "eval_batch_size"):
        if getattr(t, k) < 1:
            raise ConfigError(f"train.{k}={getattr(t, k)}: must be >= 1")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints={t.keep_checkpoints}: must be >= 1")
    if t.profile_steps and (len(t.profile_steps) != 2 or t.profile_steps[0] > t.profile_steps[1]):
        raise ConfigError(f"train.profile_steps={t.profile_steps}: expected [first, last]")
    if not (math.isfinite(o.lr) and o.lr > 0):  # "not >" so that NaN fails too
        raise ConfigError(f"optim.lr={o.lr}: must be a finite number > 0")
    if not (math.isfinite(o.eps) and o.eps > 0):
        raise ConfigError(f"optim.eps={o.eps}: must be a finite number > 0")
    for k in ("beta1", "beta2"):
        if not 0 <= getattr(o, k) < 1:
            raise ConfigError(f"optim.{k}={getattr(o, k)}: must be in [0, 1)")
    if o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
        raise ConfigError("optim: warmup_steps >= 0, 0 <= min_lr_ratio <= 1 and a finite grad_clip >= 0 are required")
    if cfg.data.mode not in ("memory", "stream"):
        raise ConfigError(f"data.mode={cfg.data.mode!r}: expected memory or stream")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction}: must be in [0, 1]")
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path={cfg.data.path}: directory does not exist")
    for k in ("pretrained", "backbone_checkpoint"):
        v = getattr(m, k)
        if v is not None and not Path(v).is_dir():
            raise ConfigError(f"model.{k}={v}: checkpoint directory does not exist")
    if m.options:
        try:
            from moon_fast.model.config import MoonConfig, apply_overrides
        except ImportError:
            pass
        else:
            try:
                apply_overrides(MoonConfig(), copy.deepcopy(m.options))
            except (ValueError, TypeError) as e:
                raise ConfigError(f"model.options: {e}") from e
    # The batch sizes DeepSpeed is given come from train.*: a different one merged in from distributed.deepspeed
    # would fail DeepSpeed's own consistency assert (or silently change what a step is).
    owned = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.global_batch",
             "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "optim.grad_clip"}
    for key in sorted(set(d.deepspeed) & set(owned)):
        raise ConfigError(f"distributed.deepspeed.{key} is set from {owned[key]}: set that instead")
    if t.global_batch % t.grad_accum:
        raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by train.grad_accum={t.grad_accum}")
    if world_size is not None:
        per = t.global_batch // t.grad_accum
        if per % world_size:
            raise ConfigError(
                f"train.global_batch={t.global_batch} / grad_accum={t.grad_accum} = {per} triplets per micro step "
                f"is not divisible by the world size {world_size}: choose a global batch that is a multiple of "
                f"{world_size * t.grad_accum}")


def micro_batch(cfg: Config, world_size: int) -> int:
    return cfg.train.global_batch // (cfg.train.grad_accum * world_size)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
