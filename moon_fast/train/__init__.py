"""Training: config (dataclasses + YAML presets + key=value overrides), the loop on DeepSpeed ZeRO or
plain torch, atomic resumable checkpoints, throughput logging. See README.md in this folder."""

from moon_fast.train.config import Config, ConfigError, load_config, preset_names


def train(cfg, output, resume: bool = False) -> dict:
    """Runs a training job (see :func:`moon_fast.train.trainer.train`); imported lazily (DeepSpeed)."""
    from moon_fast.train.trainer import train as _train

    return _train(cfg, output, resume=resume)


__all__ = ["Config", "ConfigError", "load_config", "preset_names", "train"]
