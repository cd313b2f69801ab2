"""A conservative reward from an ensemble of reward models (Coste et al., ICLR 2024): the pure
combination, what the trainer pays at the last token, and the pipeline's bootstrap members."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rto.core.rewards import ensemble_score, normalise_score
from rto.lm.models import RM_STATS_FILE, load_score_model, load_tokenizer, save_model
from rto.lm.scoring import sequence_scores
from rto.rl.trainer import PPOTrainer
from tests.test_ppo import _cfg


def test_ensemble_reductions():
    scores = torch.tensor([[1.0, 2.0, -1.0], [3.0, 6.0, -1.0]])  # 2 members x 3 responses
    mean, spread = ensemble_score(scores, "mean")
    assert mean.tolist() == [2.0, 4.0, -1.0] and spread.tolist() == [1.0, 2.0, 0.0]
    assert ensemble_score(scores, "mean_minus_std", 0.5)[0].tolist() == [1.5, 3.0, -1.0]
    assert ensemble_score(scores, "min")[0].tolist() == [1.0, 2.0, -1.0]
    with pytest.raises(ValueError):
        ensemble_score(scores, "max")


@pytest.mark.parametrize("reduce", ["mean_minus_std", "min"])
def test_the_trainer_pays_the_ensembles_score(tiny_dirs, prompt_file, tmp_path, reduce):
    # A second RM: another head and other score statistics, so both members and both stats matter.
    rm2 = load_score_model(tiny_dirs["rm"])
    torch.manual_seed(5)
    with torch.no_grad():
        rm2.score.weight.normal_(0, 1.0)
    save_model(
        rm2, load_tokenizer(tiny_dirs["rm"]), tmp_path / "rm2", extra_files={RM_STATS_FILE: {"mean": -0.3, "std": 0.5}}
    )
    trainer = PPOTrainer(
        _cfg(
            tiny_dirs,
            prompt_file,
            tmp_path,
            reward="sparse",
            kl_coef=0.0,
            score_clip=2.0,
            reward_model_ensemble=[str(tmp_path / "rm2")],
            ensemble_reduce=reduce,
            ensemble_std_coef=2.0,
        )
    )
    exp = trainer.make_experience(trainer._next_prompts())
    with torch.no_grad():
        s1 = (sequence_scores(load_score_model(tiny_dirs["rm"]), exp.batch) - 0.1) / 2.0  # the fixture's stats
        s2 = (sequence_scores(rm2, exp.batch) + 0.3) / 0.5
    members = torch.stack([s1, s2])
    expected = members.min(0).values if reduce == "min" else members.mean(0) - 2.0 * members.std(0, correction=0)
    assert torch.allclose(exp.score, expected.clamp(-2, 2), atol=1e-5)
    assert not torch.allclose(exp.score, normalise_score(exp.raw_score, 0.1, 2.0, 2.0))  # not the first RM alone
    # Paid at the last response token (kl_coef 0: the score is the whole reward).
    assert torch.allclose(exp.rewards.sum(-1), exp.score, atol=1e-5)
    assert exp.metrics(0.0)["reward/ensemble_disagreement"] == pytest.approx(
        float(members.std(0, correction=0).mean()), abs=1e-5
    )


def test_pipeline_trains_bootstrap_members(tmp_path, run_rto):
    run = tmp_path / "run"
    proc = run_rto(
        "pipeline",
        "--task",
        "keyed",
        "--preset",
        "smoke",
        "--out",
        str(run),
        "--methods",
        "sft,ppo",
        "--rm-ensemble",
        "3",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--set",
        "ppo.iterations=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefs = (run / "data" / "prefs.jsonl").read_text().splitlines()
    boots = [(run / "data" / f"prefs_boot{i}.jsonl").read_text().splitlines() for i in (2, 3)]
    for boot in boots:  # a resample with replacement: same size, same rows, some repeated
        assert len(boot) == len(prefs) and set(boot) <= set(prefs) and len(set(boot)) < len(boot)
    assert boots[0] != boots[1]
    ppo_cfg = (run / "configs" / "ppo.yaml").read_text()
    assert str(run / "rm_2") in ppo_cfg and str(run / "rm_3") in ppo_cfg
    # Three different RMs (not one path wired three times, which would give a disagreement of exactly 0).
    heads = [load_file(str(run / name / "model.safetensors"))["score.weight"] for name in ("rm", "rm_2", "rm_3")]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    metrics = [json.loads(line) for line in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["reward/ensemble_disagreement"] > 0
