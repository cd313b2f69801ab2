"""`rto tune` / `rto pipeline --tune`: grids scored at the dev-selected checkpoint, the choice
written as a preset file and used by the runs that follow; budgets and preset files checked."""

import json

import pytest
import yaml

pytestmark = pytest.mark.slow  # runs whole pipelines or launches processes (see tests/conftest.py)


def test_pipeline_tunes_then_runs_with_the_choice(tmp_path, run_rto):
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
        "sft,dpo,ppo,rto",
        "--jobs",
        "1",
        "--tune",
        "--set",
        "tune_grid.ppo_lrs=[1e-4, 1e-3]",
        "--set",
        "tune_grid.kl_coefs=[0.05]",
        "--set",
        "tune_grid.rto_beta1s=[0.05, 0.5]",
        "--set",
        "tune_grid.extend_edges=1",
        "--set",
        "tune_grid.dpo_betas=[0.1, 0.5]",
        "--set",
        "tune_grid.dpo_lrs=[5e-4]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    preset = yaml.safe_load((run / "preset.yaml").read_text())
    # Each grid point's score is its run's best dev evaluation; the choice is the best score.
    for row in preset["tuned"]["ppo_grid"]:
        curve = json.loads((run / "tune" / f"ppo_lr{row['actor_lr']:g}_kl0.05" / "metrics.json").read_text())["curve"]
        assert row["dev_score"] == max(p["gold_reward"] for p in curve)
    # Two learning rates: the better one is on an edge, so one more is run past it.
    edge = [r for r in preset["tuned"]["ppo_grid"] if r.get("edge_step")]
    assert len(edge) == 1 and edge[0]["actor_lr"] in (1e-2, 1e-5) and preset["tuned"]["budget"]["ppo_runs"] == 3
    best = max(preset["tuned"]["ppo_grid"], key=lambda r: r["dev_score"])
    assert preset["ppo"]["actor_lr"] == best["actor_lr"]
    best_rto = max(preset["tuned"]["rto_grid"], key=lambda r: r["dev_score"])
    assert preset["ppo"]["beta1"] == best_rto["beta1"] and preset["ppo"]["dpo_clip"] == best_rto["beta1"]
    for name in ("ppo", "rto"):  # the reported runs use the choice
        cfg = yaml.safe_load((run / "configs" / f"{name}.yaml").read_text())
        assert {k: cfg[k] for k in preset["ppo"]} == preset["ppo"] and cfg["seed"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["settings"]["source"].startswith("tuned on the dev split") and "RL settings: tuned" in proc.stderr
    # The DPO baseline is tuned too (its grid scored at each run's dev-selected epoch) and shown
    # beside the preset's DPO, RTO's reward model, each row saying which it is.
    dpo_grid = preset["tuned"]["dpo_policy"]["dpo_grid"]
    for row in dpo_grid:
        sel = json.loads((run / "tune" / f"dpo_b{row['beta']:g}_lr0.0005" / "metrics.json").read_text())["selection"]
        assert row["dev_score"] == sel["best"] == max(p["gold_reward"] for p in sel["curve"])
    best_dpo = max(dpo_grid, key=lambda r: r["dev_score"])
    assert preset["dpo_policy"] == {"beta": best_dpo["beta"], "learning_rate": 5e-4}
    assert yaml.safe_load((run / "configs" / "dpo-tuned.yaml").read_text())["beta"] == best_dpo["beta"]
    assert yaml.safe_load((run / "configs" / "dpo.yaml").read_text())["beta"] == 0.1  # the preset's, for RTO
    assert set(summary["methods"]) == {"sft", "dpo", "ppo", "rto", "dpo-tuned"}
    assert "dpo: the preset's DPO settings" in proc.stderr and "dpo-tuned: DPO with beta" in proc.stderr
    # ... and the file runs a pipeline of its own.
    again = run_rto(
        "pipeline",
        "--task",
        "keyed",
        "--preset",
        str(run / "preset.yaml"),
        "--out",
        str(tmp_path / "again"),
        "--methods",
        "sft,dpo,ppo",
        "--jobs",
        "1",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "again" / "configs" / "dpo-tuned.yaml").read_text())["beta"] == best_dpo["beta"]
    cfg = yaml.safe_load((tmp_path / "again" / "configs" / "ppo.yaml").read_text())
    assert cfg["actor_lr"] == preset["ppo"]["actor_lr"] and cfg["iterations"] == 2  # the smoke base


def test_tune_refuses_more_budget_for_rto_and_foreign_presets(tmp_path, run_rto):
    proc = run_rto(
        "tune",
        "--task",
        "keyed",
        "--out",
        str(tmp_path / "t"),
        "--ppo-lrs",
        "1e-4",
        "--kl-coefs",
        "0.05",
        "--rto-beta1s",
        "0.05,0.3",
    )
    assert proc.returncode == 2 and "never given less tuning budget than RTO" in proc.stderr
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"task": "count", "base": "smoke", "ppo": {"actor_lr": 1e-4}}))
    proc = run_rto("pipeline", "--task", "keyed", "--preset", str(preset), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "tuned for task 'count', not 'keyed'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_edge_steps_go_one_step_past_a_best_point_on_the_edge():
    from rto.experiments.tuning import edge_steps

    def rows(scores):  # lr x kl grid {1, 2, 4} x {0.01, 0.1}
        return [
            {"actor_lr": lr, "kl_coef": kl, "dev_score": scores[(lr, kl)]} for lr in (1, 2, 4) for kl in (0.01, 0.1)
        ]

    inside = {(lr, kl): 0.0 for lr in (1, 2, 4) for kl in (0.01, 0.1)}
    inside[(2, 0.01)] = 1.0  # lr inside; kl on the low edge
    assert edge_steps(rows(inside)) == [{"actor_lr": 2, "kl_coef": 0.001}]
    corner = {**inside, (4, 0.1): 2.0}  # both on the high edge
    steps = edge_steps(rows(corner))
    assert steps[0] == {"actor_lr": 8, "kl_coef": 0.1} and steps[1]["actor_lr"] == 4
    assert abs(steps[1]["kl_coef"] - 1.0) < 1e-12
    tried = rows(corner) + [{"actor_lr": 8, "kl_coef": 0.1, "dev_score": 0.5}]
    assert [s["actor_lr"] for s in edge_steps(tried)] == [4]  # already tried points are not run again


class _GridPipe:
    """The pipeline as the tuning grids see it, with runs whose dev score is a known function of
    their settings (the selection logic under test is ours; the runs themselves are tested above)."""

    def __init__(self, out, score):
        from rto.experiments.pipeline_config import RL_METHODS

        self.out, self.score, self.runs = out, score, []
        self.cfg = type("Cfg", (), {"jobs": 2, "seed": 0})()
        self.runner = self
        self.methods = RL_METHODS

    def threads_for(self, n):
        return 1

    def rl_settings(self, method, extra=None):
        return {**self.methods[method], **(extra or {})}

    def selection_settings(self, method):
        return {}

    def rl_job(self, name, method, extra, threads=1):
        from rto.rl.config import PPOStageConfig

        return name, "ppo", PPOStageConfig(**{k: v for k, v in self.rl_settings(method, extra).items()})

    def run_group(self, jobs):
        for name, _, cfg in jobs:
            self.runs.append((name, cfg))
            (self.out / name).mkdir(parents=True, exist_ok=True)
            score = self.score(cfg)
            (self.out / name / "metrics.json").write_text(json.dumps({"selection": {"best": score}}))


def test_every_family_gets_ppos_budget_and_its_own_choice(tmp_path):
    from rto.experiments.tuning import TuneGrid, family_choices, tune_families

    # The best learning rate differs by estimator, so a family that reused PPO's choice would be caught.
    best_lr = {"gae": 1e-4, "grpo": 2e-4, "rloo": 5e-5}

    def score(cfg):
        return -abs(cfg.actor_lr - best_lr[cfg.estimator]) * 1e4 - abs(cfg.kl_coef - 0.05) - abs(cfg.beta1 - 0.3) / 10

    pipe = _GridPipe(tmp_path, score)
    grid = TuneGrid(families=["ppo", "grpo", "rloo"])
    ppo, others = tune_families(pipe, grid, "gold_reward")
    assert ppo["chosen"] == {"actor_lr": 1e-4, "critic_lr": 1e-4, "kl_coef": 0.05, "beta1": 0.3, "dpo_clip": 0.3}
    assert ppo["budget"] == {"ppo_runs": 9, "rto_runs": 4, "iterations_per_run": 100}
    for family, base in (("grpo", 2e-4), ("rloo", 5e-5)):
        rec = others[family]
        assert list(rec["budget"].values())[:2] == [9, 4]  # the same budget as PPO's
        chosen = family_choices(family, rec)
        assert chosen[family] == {"actor_lr": base, "kl_coef": 0.05}  # no critic: no critic_lr
        assert chosen[f"rto-{family}"] == {"actor_lr": base, "kl_coef": 0.05, "beta1": 0.3, "dpo_clip": 0.3}
    critic_free = [cfg for name, cfg in pipe.runs if "grpo" in name or "rloo" in name]
    assert len(critic_free) == 26 and all(not cfg.needs_critic and cfg.num_generations == 4 for cfg in critic_free)
    assert all(cfg.reward == "rto" for name, cfg in pipe.runs if name.startswith("tune/rto-"))


def test_a_tuned_presets_method_choices_reach_their_runs_and_no_other(tmp_path):
    from rto.experiments.pipeline import Pipeline
    from rto.experiments.pipeline_config import PipelineConfig

    preset = tmp_path / "p.yaml"
    overrides = {"grpo": {"actor_lr": 3e-4, "kl_coef": 0.2}, "rto-grpo": {"actor_lr": 3e-4, "beta1": 0.1}}
    doc = {"task": "keyed", "base": "smoke", "ppo": {"actor_lr": 1e-4}, "method_overrides": overrides, "tuned": {}}
    preset.write_text(yaml.safe_dump(doc))
    pipe = Pipeline(PipelineConfig(out=str(tmp_path / "o"), preset=str(preset), methods=["sft", "ppo", "grpo"]))
    assert pipe.rl_settings("grpo")["actor_lr"] == 3e-4 and pipe.rl_settings("grpo")["kl_coef"] == 0.2
    assert pipe.rl_settings("rto-grpo")["beta1"] == 0.1 and pipe.rl_settings("ppo")["actor_lr"] == 1e-4
    # the user's own per-method settings still win over the preset's
    mine = PipelineConfig(
        out=str(tmp_path / "o"),
        preset=str(preset),
        methods=["sft", "grpo"],
        method_overrides={"grpo": {"actor_lr": 1e-5}},
    )
    assert Pipeline(mine).rl_settings("grpo")["actor_lr"] == 1e-5


def test_a_pipeline_tuned_for_grpo_alone_says_what_was_tuned():
    """`rto pipeline --tune --methods sft,grpo,...` tunes only the GRPO family (its record has no PPO
    budget): the summary names the GRPO and RTO-GRPO runs (it once read the PPO budget and crashed)."""
    from types import SimpleNamespace

    from rto.experiments.pipeline_summary import settings_record

    family = {"criterion": "dev gold_reward", "budget": {"grpo_runs": 9, "rto-grpo_runs": 4, "iterations_per_run": 100}}
    pipe = SimpleNamespace(preset_record={"tuned": {"seed": 0, "families": {"grpo": family}}})
    source = settings_record(pipe, [])["source"]
    assert source.startswith("tuned on the dev split") and "9 GRPO and 4 RTO-GRPO runs of 100 iterations" in source
