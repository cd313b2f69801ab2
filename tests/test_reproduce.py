"""`rto reproduce --quick`: every method, ablation, data fraction and reference, over two seeds."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from rto.reproduce import TUNING_SEED_OFFSET
from tests.test_cli import ENV


def test_quick_reproduce(tmp_path):
    out = tmp_path / "repro"
    proc = subprocess.run([sys.executable, "-m", "rto.cli", "reproduce", "--task", "keyed", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    expected = {"sft", "dpo", "ppo", "rto", "rs", "semi", "ddpo", "dpo-only", "reinforce++", "rto-reinforce++",
                "ppo-gold", "rto-gold", "ppo-dense-gold", "ppo@0.25", "rto@0.25", "ppo@0.5", "rto@0.5"}
    assert set(results["methods"]) == expected
    for m in results["methods"].values():
        lo, hi = m["gold_reward_ci"]
        assert lo <= m["gold_reward"] <= hi
        assert {"win_rate_vs_sft", "win_rate_vs_sft_ci", "kl_to_sft", "rm_score"} <= set(m)
    eff = results["data_efficiency"]
    assert eff["fractions"] == [0.25, 0.5, 1.0] and len(eff["ppo"]) == len(eff["rto"]) == 3
    assert "ratio" in eff
    assert results["tuning"]["chosen"]["beta1"] in (0.05, 0.3)
    assert len(results["tuning"]["grids"]["0"]["ppo_grid"]) == 2
    assert 0 <= results["rm_accuracy"] <= 1 and results["dpo_gold_reward"] is not None
    for fig in ("curves.png", "data_efficiency.png", "gold_vs_kl.png", "win_rates.png", "token_heatmap.png"):
        assert (out / fig).stat().st_size > 1000, fig
    assert "pearson_all_tokens" in results["token_alignment"]["0"]

    # The tuning runs only choose: on the tuned seed, the reported PPO and RTO are fresh runs of
    # their own (the seed's RL seed, like every other method), not the grid's winners.
    per_seed = json.loads((out / "per_seed.json").read_text())
    seed0 = out / "seed0"
    for name in ("ppo", "rto"):
        assert per_seed[0]["runs"][name] == str(seed0 / name), per_seed[0]["runs"][name]
        assert (seed0 / name / "metrics.json").is_file() and (seed0 / name / "policy").is_dir()
        assert yaml.safe_load((seed0 / "configs" / f"{name}.yaml").read_text())["seed"] == 0
    assert not any("tune" in Path(p).parts for ps in per_seed for p in ps["runs"].values())
    tuning_configs = sorted((seed0 / "configs" / "tune").glob("*.yaml"))
    assert len(tuning_configs) == 4  # 2 PPO grid points + 2 beta1 values
    assert {yaml.safe_load(f.read_text())["seed"] for f in tuning_configs} == {TUNING_SEED_OFFSET}
    assert results["tuning"]["grids"]["0"]["rl_seed"] == TUNING_SEED_OFFSET

    # Resume: a second call finds every run done and gives the same numbers.
    again = subprocess.run([sys.executable, "-m", "rto.cli", "reproduce", "--task", "keyed", "--quick", "--out",
                            str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "finished before with the same settings" in again.stderr
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
