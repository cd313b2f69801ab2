"""Stage-level resume: a finished stage is skipped only while its settings and its inputs are unchanged."""

import os
from dataclasses import dataclass

from rto.experiments.pipeline import Pipeline
from rto.experiments.pipeline_config import PipelineConfig


@dataclass
class _StageCfg:
    policy: str
    out: str
    lr: float = 1e-3


def test_resume_reruns_a_stage_whose_input_was_rewritten(tmp_path):
    pipe = Pipeline(PipelineConfig(out=str(tmp_path / "run"), resume=True))
    (tmp_path / "run" / "configs").mkdir(parents=True)
    model = tmp_path / "sft"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights v1")
    cfg = _StageCfg(policy=str(model), out=str(tmp_path / "rm"))
    assert not pipe.runner.already_done("rm", cfg)
    pipe.runner.mark_done("rm", cfg)
    assert pipe.runner.already_done("rm", cfg)
    assert not pipe.runner.already_done("rm", _StageCfg(policy=str(model), out=str(tmp_path / "rm"), lr=2e-3))
    pipe.runner.mark_done("rm", cfg)
    # The upstream stage ran again: same path, same settings, new weights.
    (model / "model.safetensors").write_bytes(b"weights v2, longer")
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert not pipe.runner.already_done("rm", cfg)


@dataclass
class _NewerCfg:  # _StageCfg as a later version declares it: one setting more
    policy: str = ""
    out: str = ""
    lr: float = 1e-3
    clip_high: float | None = None


def test_a_setting_added_later_at_its_default_keeps_a_finished_stage(tmp_path):
    """Upgrading rto does not rerun finished stages because a new setting appeared at its default
    (the run did what the default does); a new setting away from its default, or any changed one,
    still reruns."""
    pipe = Pipeline(PipelineConfig(out=str(tmp_path / "run"), resume=True))
    (tmp_path / "run" / "configs").mkdir(parents=True)
    pipe.runner.mark_done("ppo", _StageCfg(policy="p", out="o"))
    assert pipe.runner.already_done("ppo", _NewerCfg(policy="p", out="o"))
    pipe.runner.mark_done("ppo", _StageCfg(policy="p", out="o"))
    assert not pipe.runner.already_done("ppo", _NewerCfg(policy="p", out="o", clip_high=0.3))
    pipe.runner.mark_done("ppo", _StageCfg(policy="p", out="o"))
    assert not pipe.runner.already_done("ppo", _NewerCfg(policy="p", out="o", lr=2e-3))


@dataclass
class _EvalCfg:
    models: list
    out: str


def test_an_evaluation_reruns_only_when_a_model_it_names_changed(tmp_path):
    """`rto eval`'s models come as NAME=PATH entries: a rerun of the pipeline skips a finished
    evaluation while every model is as it was, and evaluates again when one was rewritten."""
    pipe = Pipeline(PipelineConfig(out=str(tmp_path / "run"), resume=True))
    (tmp_path / "run" / "configs").mkdir(parents=True)
    for name in ("sft", "ppo"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights v1")
    cfg = _EvalCfg(models=[f"sft={tmp_path / 'sft'}", f"ppo={tmp_path / 'ppo'}"], out=str(tmp_path / "eval.json"))
    pipe.runner.mark_done("eval", cfg)
    assert pipe.runner.already_done("eval", cfg)
    (tmp_path / "ppo" / "model.safetensors").write_bytes(b"weights v2, longer")
    assert not pipe.runner.already_done("eval", cfg)
