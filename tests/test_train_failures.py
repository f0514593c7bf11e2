"""How a training run fails and resumes (one process, in this process, tiny model, CPU): an interrupted
first save, resumes that cannot continue exactly, a damaged checkpoint, divergence, a failing held-out
evaluation, and a rank leaving on an error. The 2-process case: tests/test_train_distributed.py."""

from __future__ import annotations

import json

import pytest
from utils import OneCpuProcess

from moon_fast.train import distributed, trainer
from moon_fast.train.checkpoint import CheckpointError
from moon_fast.train.config import ConfigError, load_config


@pytest.fixture
def catalog(small_catalog):
    return small_catalog


@pytest.fixture
def run(catalog, in_process, tmp_path):
    """run(*overrides, resume=False) trains the ci preset for 1 step into tmp_path / "run" by default."""

    def go(*overrides: str, resume: bool = False):
        cfg = load_config("ci", [f"data.path={catalog}", "train.max_steps=1", "train.evaluate=false",
                                 "train.progress=false", "distributed.engine=torch", *overrides])
        return trainer.train(cfg, tmp_path / "run", resume=resume)

    return go


def test_an_interrupted_first_save_does_not_block_the_run(run, tmp_path):
    """A crash in the first save leaves only checkpoints/.tmp-step_000001. --resume says so; a plain start
    trains the run from the beginning (it used to be refused: 'already holds checkpoints')."""
    (tmp_path / "run" / "checkpoints" / ".tmp-step_000001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="only the interrupted save .tmp-step_000001.*start without --resume"):
        run(resume=True)
    assert run()["steps"] == 1
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000001"]
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        run()


def test_resumes_that_cannot_continue_exactly_are_refused(run, tmp_path):
    run()
    with pytest.raises(ConfigError, match="is at step 1, and train.max_steps=1 leaves nothing to train"):
        run(resume=True)
    with pytest.raises(ConfigError, match="trained with train.global_batch=8, this run asks for 4"):
        run("train.max_steps=2", "train.global_batch=4", resume=True)
    assert not (tmp_path / "run" / "config.resume.yaml").exists()  # written only by a resume that runs
    assert run("train.max_steps=2", resume=True)["steps"] == 2


def test_a_damaged_checkpoint_names_the_one_to_fall_back_on(run, tmp_path):
    run("train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    newest = tmp_path / "run" / "checkpoints" / "step_000002"
    (newest / "meta.json").write_text("{")
    with pytest.raises(CheckpointError, match=f"{newest} cannot be loaded, it is damaged.*remove it .*step_000001"):
        run("train.max_steps=3", resume=True)
    (newest / "meta.json").write_text(json.dumps({"step": 2, "engine": "torch", "world_size": 1}))
    (newest / "torch_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be loaded, it is damaged"):
        run("train.max_steps=3", resume=True)


def test_divergence_is_reported_as_such(run):
    """An absurd learning rate without clipping: the step-2 embeddings are not finite. The error says the
    run diverged and what to change (it used to be the contrastive loss's input check, as a traceback)."""
    with pytest.raises(trainer.Diverged, match=r"diverged at step 2.*Lower optim.lr \(now 1e\+30\)"):
        run("train.max_steps=3", "optim.lr=1e30", "optim.grad_clip=0", "optim.warmup_steps=0")


def test_a_failing_held_out_evaluation_keeps_the_run(run, tmp_path, monkeypatch):
    import moon_fast.eval

    def broken(*a, **k):
        raise ValueError("heldout.jsonl:3: malformed JSON")

    monkeypatch.setattr(moon_fast.eval, "evaluate_checkpoint", broken)
    summary = run("train.evaluate=true")
    assert summary["eval_error"] == "ValueError: heldout.jsonl:3: malformed JSON" and "eval" not in summary
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_data_errors_are_reported_not_raised_raw(run, tmp_path):
    """The data layer's errors (here: a catalog directory with nothing in it) reach `moon-fast train` as
    ConfigError, which it prints as one line (they used to be tracebacks)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data: no products manifest in .*empty"):
        run(f"data.path={tmp_path / 'empty'}")
    assert not (tmp_path / "run").exists()  # a refused start leaves no run directory holding only config.yaml
    cfg = load_config("ci", ["data.synth_products=3", "train.max_steps=1", "distributed.engine=torch"])
    with pytest.raises(ConfigError, match="data: products=3: need at least 10 products"):  # generated at start
        trainer.train(cfg, tmp_path / "synth")


def test_base_config_needs_a_checkpoint(run, catalog, tmp_path):
    """`--config base` without model.backbone_checkpoint used to train the tiny random-init model for 10,000
    steps, silently; its preset is now null, and a run needs a model source."""
    cfg = load_config("base", [f"data.path={catalog}", "train.max_steps=1", "distributed.engine=torch"])
    assert cfg.model.preset is None
    with pytest.raises(ConfigError, match="^model: set model.backbone_checkpoint"):
        trainer.train(cfg, tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_a_failing_rank_leaves_without_the_barrier(monkeypatch):
    """teardown(failed=True) must not wait in a barrier the other ranks may never reach; train() passes it
    when _train raises."""
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    info = OneCpuProcess()
    info.initialized_here = True
    distributed.teardown(info, failed=True)
    assert calls == []
    distributed.teardown(info)
    assert calls == ["barrier", "destroy"]

    seen = []
    monkeypatch.setattr(trainer, "setup", lambda *a, **k: info)
    monkeypatch.setattr(trainer, "teardown", lambda i, failed=False: seen.append(failed))

    def failing(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "_train", failing)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(load_config("ci"), "unused")
    assert seen == [True]


def test_resume_refuses_another_seed_or_stream_world(tmp_path):
    """The seed orders the data, and in data.mode=stream each process has its own shard position: a resume
    that changes either cannot continue exactly (a stream resume on another world size silently skipped 16
    of 39 rows of the epoch)."""
    meta = {"step": 1, "global_batch": 8, "seed": 0, "world_size": 2}
    trainer.check_resume(tmp_path, meta, load_config("ci", ["data.mode=stream"]), world=2)
    trainer.check_resume(tmp_path, meta, load_config("ci"), world=1)  # memory mode: the position is global
    with pytest.raises(ConfigError, match="written by 2 processes and this run has 1; in data.mode=stream"):
        trainer.check_resume(tmp_path, meta, load_config("ci", ["data.mode=stream"]), world=1)
    with pytest.raises(ConfigError, match="trained with train.seed=0, this run asks for 5"):
        trainer.check_resume(tmp_path, meta, load_config("ci", ["train.seed=5"]), world=2)


def test_pretrained_options_shape_the_model_or_fail(run, tmp_path):
    """model.pretrained with model.options: applied before the model is built. An option that reshapes it
    (more experts) fails at the start; it used to be ignored in training and written into final/, which
    then did not load. One that does not (a loss coefficient) is the trained model's."""
    run()
    final = tmp_path / "run" / "final"
    with pytest.raises(ConfigError, match=r"^model: model.options \{'moe': \{'num_experts': 8\}\} do not fit"):
        trainer.build_model(load_config("ci", [f"model.pretrained={final}", "model.options.moe.num_experts=8"]))
    model = trainer.build_model(load_config("ci", [f"model.pretrained={final}", "model.options.loss.aux_coef=0.5"]))
    assert model.moon_config.loss.aux_coef == 0.5
