"""Training configuration: presets, overrides, and clear errors before any work starts."""

from __future__ import annotations

import pytest

from moon_fast.cli import main
from moon_fast.train.config import ConfigError, load_config, preset_names, validate
from moon_fast.train.engine import lr_lambda


def test_presets_load_and_overrides_apply():
    assert {"tiny", "ci", "base"} <= set(preset_names())
    for name in preset_names():
        load_config(name)
    cfg = load_config("tiny", ["train.max_steps=7", "optim.lr=3e-4", "distributed.zero_stage=2",
                               "model.options.loss.dsf=false", "train.profile_steps=[2, 3]"])
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.distributed.zero_stage == 2
    assert cfg.model.options == {"loss": {"dsf": False}}
    assert cfg.train.profile_steps == [2, 3]
    ci = load_config("ci")  # `base: tiny` inheritance
    assert ci.model.preset == "tiny" and ci.train.max_steps == 4


@pytest.mark.parametrize("override, message", [
    ("train.nonsense=1", "unknown config key 'train.nonsense'.*train.max_steps"),
    ("bogus.x=1", "unknown config key 'bogus.x'"),
    ("distributed.zero_stage=4", "zero_stage=4"),
    ("train.max_steps=abc", "expected an integer"),
    ("train.gather=maybe", "expected true or false"),
    ("model.options.loss.nonsense=1", "model.options.*nonsense"),
    ("model.pretrained=/no/such/dir", "checkpoint directory does not exist"),
    ("data.path=/no/such/dir", "does not exist"),
    ("train.global_batch=9", None),  # fine alone; divisibility is checked against the world size below
    ("optim.lr=nan", r"optim.lr=nan: must be a finite number > 0"),
    ("optim.lr=.inf", r"optim.lr=inf: must be a finite number > 0"),
    ("optim.eps=-1", r"optim.eps=-1.0: must be a finite number > 0"),
    ("optim.beta1=5", r"optim.beta1=5.0: must be in \[0, 1\)"),
    ("optim.grad_clip=nan", "a finite grad_clip >= 0"),
    ("distributed.deepspeed.train_batch_size=999", "distributed.deepspeed.train_batch_size is set from "
                                                   "train.global_batch: set that instead"),
])
def test_bad_values_raise_naming_the_key(override, message):
    if message is None:
        cfg = load_config("tiny", [override])
        with pytest.raises(ConfigError, match="not divisible by the world size 2"):
            validate(cfg, world_size=2)
        return
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match=f"{bad} is not valid YAML"):
        load_config(str(bad))


def test_cli_errors_before_work(tmp_path, capsys):
    assert main(["train", "--config", "tiny", "--output", str(tmp_path / "r"), "distributed.zero_stage=4"]) == 2
    assert "zero_stage=4" in capsys.readouterr().err
    assert main(["train", "--config", "tiny", "--output", str(tmp_path / "r"), "--nproc-per-node", "3"]) == 2
    assert "world size 3" in capsys.readouterr().err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert "presets:" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path, monkeypatch, in_process):
    trainer = in_process
    monkeypatch.setattr(trainer, "teardown", lambda info, failed=False: None)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        trainer.train(load_config("ci"), tmp_path / "empty", resume=True)


def test_warmup_cosine_schedule():
    f = lr_lambda(warmup=4, total=20, min_ratio=0.1)
    assert [round(f(s), 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    vals = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_weight_decay_groups():
    """Decay on the weight matrices (router included), none on 1-D and 0-dim parameters or on the MoE
    layers' W* (the method regularises it by L_sparsity alone)."""
    from moon_fast.model import MoonModel
    from moon_fast.train.engine import param_groups

    model = MoonModel.from_preset("tiny")
    decay, no_decay = (set(map(id, g["params"])) for g in param_groups(model, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    alignment = [n for n in names.values() if n.endswith(".alignment")]
    assert len(alignment) == len(model.moe_layers()) > 0
    assert not {names[i] for i in decay} & set(alignment)
    assert all(model.get_parameter(n).ndim >= 2 for n in (names[i] for i in decay))
    assert any(n.endswith("router.weight") for n in (names[i] for i in decay))
    assert {"logit_scale_inter", "logit_scale_intra", *alignment} <= {names[i] for i in no_decay}
    assert len(decay) + len(no_decay) == sum(1 for p in model.parameters() if p.requires_grad)
