"""`rto tune` / `rto pipeline --tune`: grids scored at the dev-selected checkpoint, the choice
written as a preset file and used by the runs that follow; budgets and preset files checked."""

import json

import yaml

from tests.test_cli import rto


def test_pipeline_tunes_then_runs_with_the_choice(tmp_path):
    run = tmp_path / "run"
    proc = rto(
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
    again = rto(
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


def test_tune_refuses_more_budget_for_rto_and_foreign_presets(tmp_path):
    proc = rto(
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
    proc = rto("pipeline", "--task", "keyed", "--preset", str(preset), "--out", str(tmp_path / "o"))
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
