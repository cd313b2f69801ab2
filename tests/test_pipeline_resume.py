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
