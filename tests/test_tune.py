"""`rto tune` / `rto pipeline --tune`: grids scored at the dev-selected checkpoint, the choice
written as a preset file and used by the runs that follow; budgets and preset files checked."""

import json

import yaml

from tests.test_cli import rto


def test_pipeline_tunes_then_runs_with_the_choice(tmp_path):
    run = tmp_path / "run"
    proc = rto("pipeline", "--task", "keyed", "--preset", "smoke", "--out", str(run), "--methods", "sft,ppo,rto",
               "--jobs", "1", "--tune", "--set", "tune_grid.ppo_lrs=[1e-4, 1e-3]", "--set", "tune_grid.kl_coefs=[0.05]",
               "--set", "tune_grid.rto_beta1s=[0.05, 0.5]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preset = yaml.safe_load((run / "preset.yaml").read_text())
    # Each grid point's score is its run's best dev evaluation; the choice is the best score.
    for row in preset["tuned"]["ppo_grid"]:
        curve = json.loads((run / "tune" / f"ppo_lr{row['actor_lr']:g}_kl0.05" / "metrics.json").read_text())["curve"]
        assert row["dev_score"] == max(p["gold_reward"] for p in curve)
    best = max(preset["tuned"]["ppo_grid"], key=lambda r: r["dev_score"])
    assert preset["ppo"]["actor_lr"] == best["actor_lr"]
    best_rto = max(preset["tuned"]["rto_grid"], key=lambda r: r["dev_score"])
    assert preset["ppo"]["beta1"] == best_rto["beta1"] and preset["ppo"]["dpo_clip"] == best_rto["beta1"]
    for name in ("ppo", "rto"):  # the reported runs use the choice
        cfg = yaml.safe_load((run / "configs" / f"{name}.yaml").read_text())
        assert {k: cfg[k] for k in preset["ppo"]} == preset["ppo"] and cfg["seed"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["settings"]["source"].startswith("tuned on the dev split") and "RL settings: tuned" in proc.stdout
    # ... and the file runs a pipeline of its own.
    again = rto("pipeline", "--task", "keyed", "--preset", str(run / "preset.yaml"), "--out", str(tmp_path / "again"),
                "--methods", "sft,ppo", "--jobs", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "again" / "configs" / "ppo.yaml").read_text())
    assert cfg["actor_lr"] == preset["ppo"]["actor_lr"] and cfg["iterations"] == 2  # the smoke base


def test_tune_refuses_more_budget_for_rto_and_foreign_presets(tmp_path):
    proc = rto("tune", "--task", "keyed", "--out", str(tmp_path / "t"), "--ppo-lrs", "1e-4", "--kl-coefs", "0.05",
               "--rto-beta1s", "0.05,0.3")
    assert proc.returncode == 2 and "never given less tuning budget than RTO" in proc.stderr
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"task": "count", "base": "smoke", "ppo": {"actor_lr": 1e-4}}))
    proc = rto("pipeline", "--task", "keyed", "--preset", str(preset), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "tuned for task 'count', not 'keyed'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
