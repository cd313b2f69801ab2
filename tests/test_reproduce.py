"""`rto reproduce --quick`: methods, an RM ensemble, the data-limited pool and the gold references,
over two seeds, each result chosen on the dev split; and a second reproduction from the preset
file the first one tuned."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from rto.experiments.report_reproduce import claims
from rto.experiments.reproduce import TUNING_SEED_OFFSET
from rto.experiments.seed_stats import t_interval

pytestmark = pytest.mark.slow  # runs whole pipelines or launches processes (see tests/conftest.py)


def test_quick_reproduce(tmp_path, run_rto):
    out = tmp_path / "repro"

    # The same reproduction each time: run, rebuilt from per_seed.json, resumed. One method besides
    # PPO and RTO (every method runs in a pipeline in test_cli's test_smoke_pipeline_every_variant).
    def quick(into, *extra):
        args = ("--task", "keyed", "--quick", "--out", str(into), "--rm-ensemble", "2", "--methods", "rs")
        return run_rto("reproduce", *args, *extra)

    proc = quick(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    expected = {
        "sft",
        "dpo",
        "ppo",
        "rto",
        "rs",
        "ppo-gold",
        "rto-gold",
        "ppo-dense-gold",
        "ppo+ens",
        "rto+ens",
        "ppo@0.5",
        "rto@0.5",
        "ppo@1",
        "rto@1",
        "dpo-tuned",
    }
    assert set(results["methods"]) == expected
    for m in results["methods"].values():
        lo, hi = m["gold_reward_ci"]
        assert lo <= m["gold_reward"] <= hi
        assert {"win_rate_vs_sft", "win_rate_vs_sft_ci", "kl_to_sft", "rm_score"} <= set(m)
    # The data-limited sweep: a pool of 32 prompts, rollouts of 16, every prompt seen once.
    eff = results["data_efficiency"]
    assert eff["fractions"] == [0.5, 1.0] and eff["prompts"] == [16, 32] and eff["iterations"] == [1, 2]
    assert eff["ppo"][-1]["gold_reward"] == results["methods"]["ppo@1"]["gold_reward"] and "ratio" in eff
    per_seed = json.loads((out / "per_seed.json").read_text())
    seed0 = out / "seed0"
    for n, prompts in (("ppo@0.5", 16), ("rto@1", 32)):
        cfg = yaml.safe_load((seed0 / "configs" / f"{n}.yaml").read_text())
        pool = (Path(cfg["prompts"])).read_text().splitlines()
        assert len(pool) == prompts and cfg["iterations"] * cfg["rollout_batch_size"] == prompts
    # Every result is chosen on the dev split; the ensemble runs (only they) combine two RMs.
    for name in ("ppo", "rto", "rs", "ppo@1", "ppo+ens"):
        cfg = yaml.safe_load((seed0 / "configs" / f"{name}.yaml").read_text())
        assert cfg["select_by"] == "gold_reward" and per_seed[0]["selection"][name]["metric"] == "gold_reward"
        assert cfg["reward_model_ensemble"] == ([str(seed0 / "rm_2")] if name.endswith("+ens") else [])
    assert results["tuning"]["chosen"]["beta1"] in (0.05, 0.3)
    assert len(results["tuning"]["grids"]["0"]["ppo_grid"]) == 2
    # The RM accuracy is the seeds' own held-out accuracies averaged; the DPO reference is the DPO row.
    rm_acc = [json.loads((out / f"seed{s}" / "rm" / "metrics.json").read_text())["eval_accuracy"] for s in (0, 1)]
    assert results["rm_accuracy_per_seed"] == rm_acc and abs(results["rm_accuracy"] - sum(rm_acc) / 2) < 1e-12
    assert results["dpo_gold_reward"] == results["methods"]["dpo"]["gold_reward"]
    for fig in ("curves.png", "data_efficiency.png", "gold_vs_kl.png", "win_rates.png", "token_heatmap.png"):
        assert (out / fig).stat().st_size > 1000, fig
    assert "pearson_all_tokens" in results["token_alignment"]["0"]

    # The tuning runs only choose: on the tuned seed, the reported PPO and RTO are fresh runs of
    # their own (the seed's RL seed, like every other method), not the grid's winners.
    for name in ("ppo", "rto"):
        assert per_seed[0]["runs"][name] == str(seed0 / name), per_seed[0]["runs"][name]
        assert (seed0 / name / "metrics.json").is_file() and (seed0 / name / "policy").is_dir()
        assert yaml.safe_load((seed0 / "configs" / f"{name}.yaml").read_text())["seed"] == 0
    assert not any("tune" in Path(p).parts for ps in per_seed for p in ps["runs"].values())
    tuning_configs = sorted((seed0 / "configs" / "tune").glob("*.yaml"))
    assert len(tuning_configs) == 6  # 2 PPO grid points + 2 beta1 values + 2 DPO policy grid points
    assert {yaml.safe_load(f.read_text())["seed"] for f in tuning_configs} == {TUNING_SEED_OFFSET}
    assert results["tuning"]["grids"]["0"]["rl_seed"] == TUNING_SEED_OFFSET

    # The DPO baseline is tuned as hard as RTO (its grid never smaller) and its epoch chosen on dev;
    # it is a fresh run on the seed's own seed, and RTO's reward model stays the preset's DPO.
    dpo_grid = results["tuning"]["grids"]["0"]["dpo_policy"]["dpo_grid"]
    assert len(dpo_grid) >= len(results["tuning"]["grids"]["0"]["rto_grid"])
    best = max(dpo_grid, key=lambda r: r["dev_score"])
    assert results["tuning"]["dpo_policy"] == {"beta": best["beta"], "learning_rate": best["learning_rate"]}
    dpo_cfg = yaml.safe_load((seed0 / "configs" / "dpo-tuned.yaml").read_text())
    assert dpo_cfg["select_by"] == "gold_reward" and dpo_cfg["seed"] == 0 and dpo_cfg["beta"] == best["beta"]
    assert per_seed[0]["selection"]["dpo-tuned"]["metric"] == "gold_reward"
    assert yaml.safe_load((seed0 / "configs" / "rto.yaml").read_text())["dpo_model"] == str(seed0 / "dpo")
    report = (out / "results.md").read_text()
    assert "| RTO beats PPO |" in report and "| an RM ensemble helps PPO |" in report
    assert "| RTO beats the tuned DPO policy | inconclusive (too few seeds) | rto - dpo-tuned:" in report
    # Intervals are t intervals over the seeds' paired differences; with 2 seeds no claim is decided.
    for c in results["comparisons"].values():
        assert c["ci"] == list(t_interval(c["per_seed"])) and len(c["per_seed"]) == 2
    assert results["verdict_rules"]["margin"] == 0.04 and "Margin on this task: 0.04" in report
    assert {c["verdict"] for c in claims(results)} == {"inconclusive (too few seeds)"}

    # --report-only rebuilds the same results from per_seed.json alone, with no run directory.
    alone = tmp_path / "report_only"
    alone.mkdir()
    for name in ("per_seed.json", "results.json"):
        shutil.copy(out / name, alone / name)
    rebuilt = quick(alone, "--report-only")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    again_results = json.loads((alone / "results.json").read_text())
    for key in ("methods", "comparisons", "data_efficiency", "curves", "tuning", "wall_time_s"):
        assert again_results[key] == results[key], key
    assert (alone / "results.md").read_text() == report
    # The choice is written as a preset file that a second reproduction reads instead of tuning.
    preset = yaml.safe_load((out / "preset.yaml").read_text())
    assert preset["base"] == "smoke" and preset["ppo"] == results["tuning"]["chosen"]
    assert preset["dpo_policy"] == results["tuning"]["dpo_policy"]
    assert preset["tuned"]["budget"]["ppo_runs"] >= preset["tuned"]["budget"]["rto_runs"]

    # Resume: a second call finds every run done and gives the same numbers.
    again = quick(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished before with the same settings" in again.stderr
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_reproduce_from_a_preset_file_tunes_only_what_it_lacks(tmp_path, run_rto):
    """A preset file as `rto tune` writes it (PPO's and RTO's choice, the DPO policy's): nothing it
    holds is tuned again and every run uses its settings; the GRPO family, which it lacks, is tuned
    with PPO's budget. (Its own test, so that it runs beside test_quick_reproduce.)"""
    preset = {
        "task": "keyed",
        "base": "smoke",
        "ppo": {"actor_lr": 1e-4, "critic_lr": 1e-4, "kl_coef": 0.05, "beta1": 0.3, "dpo_clip": 0.3},
        "dpo_policy": {"beta": 0.3, "learning_rate": 5e-4},
        "tuned": {"seed": 0, "budget": {"ppo_runs": 2, "rto_runs": 2, "iterations_per_run": 2}},
    }
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(preset))
    out2 = tmp_path / "from_preset"
    third = run_rto(
        "reproduce",
        "--task",
        "keyed",
        "--quick",
        "--out",
        str(out2),
        "--preset",
        str(tmp_path / "preset.yaml"),
        "--seeds",
        "1",
        "--methods",
        "ppo,rto,grpo,rto-grpo",
        "--limited-pool",
        "0",
        "--no-gold-references",
    )
    assert third.returncode == 0, third.stderr[-3000:]
    # PPO's and RTO's settings and the DPO policy's come from the file; the GRPO family, which the
    # file does not hold, is tuned here with PPO's budget, and only it.
    tuned_here = sorted(p.name for p in (out2 / "seed0" / "configs" / "tune").glob("*.yaml"))
    assert tuned_here == sorted(
        [f"grpo_lr0.0001_kl{kl}.yaml" for kl in (0.01, 0.05)] + [f"rto-grpo_b{b}.yaml" for b in (0.05, 0.3)]
    )
    assert set(json.loads((out2 / "results.json").read_text())["methods"]) == {
        "sft",
        "dpo",
        "ppo",
        "rto",
        "grpo",
        "rto-grpo",
        "dpo-tuned",
    }
    preset2 = yaml.safe_load((out2 / "preset.yaml").read_text())
    budget = preset2["tuned"]["families"]["grpo"]["budget"]
    assert (budget["grpo_runs"], budget["rto-grpo_runs"]) == (preset["tuned"]["budget"]["ppo_runs"], 2)
    assert preset2["ppo"] == preset["ppo"] and preset2["dpo_policy"] == preset["dpo_policy"]  # kept
    for name in ("grpo", "rto-grpo"):
        cfg = yaml.safe_load((out2 / "seed0" / "configs" / f"{name}.yaml").read_text())
        chosen = preset2["method_overrides"][name]
        assert {k: cfg[k] for k in chosen} == chosen and cfg["estimator"] == "grpo"
        assert not (out2 / "seed0" / name / "critic").exists()
    assert (
        yaml.safe_load((out2 / "seed0" / "configs" / "dpo-tuned.yaml").read_text())["beta"]
        == preset["dpo_policy"]["beta"]
    )
    for name in ("ppo", "rto"):
        cfg = yaml.safe_load((out2 / "seed0" / "configs" / f"{name}.yaml").read_text())
        assert {k: cfg[k] for k in preset["ppo"]} == preset["ppo"]
