"""The `rto` command end to end: the smoke pipeline, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
import time

import pytest

ENV = dict(os.environ, RTO_PROGRESS="0", OMP_NUM_THREADS="1")


def rto(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "rto.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_smoke_pipeline(tmp_path):
    start = time.time()
    proc = rto("pipeline", "--task", "keyed", "--preset", "smoke", "--out", str(tmp_path / "run"))
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "keyed"
    assert set(summary["methods"]) == {"sft", "dpo", "ppo", "rto"}
    for m in summary["methods"].values():
        for key in ("gold_reward", "gold_reward_ci", "win_rate_vs_sft", "kl_to_sft", "rm_score"):
            assert key in m
        lo, hi = m["gold_reward_ci"]
        assert lo <= m["gold_reward"] <= hi
    assert 0.0 <= summary["rm_accuracy"] <= 1.0
    assert summary["methods"]["sft"]["win_rate_vs_sft"] == 0.5
    assert abs(summary["methods"]["sft"]["kl_to_sft"]) < 1e-6
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 1000
    assert "gold reward" in proc.stdout and "RM held-out accuracy" in proc.stdout
    assert elapsed < 120, f"smoke pipeline took {elapsed:.0f} s"
    # Each stage's resolved config reruns the stage on its own.
    assert (tmp_path / "run" / "configs" / "ppo.yaml").is_file()


@pytest.mark.parametrize("args, message", [
    (["ppo", "--policy", "nowhere", "--prompts", "p.jsonl", "--out", "o", "--reward-model", "rm"], "not found"),
    (["ppo", "--actor-lr", "-1"], "actor_lr: must be > 0"),
    (["pipeline", "--out", "x", "--preset", "huge"], "no preset 'huge'"),
    (["pipeline", "--out", "x", "--methods", "sft,magic"], "unknown method 'magic'"),
    (["sft", "--data", "missing.jsonl", "--out", "o"], "missing.jsonl: data file not found"),
])
def test_bad_input_is_one_line_exit_2(args, message):
    proc = rto(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ppo_help_lists_rewards_and_estimators():
    proc = rto("ppo", "--help")
    assert proc.returncode == 0
    for name in ("sparse", "rto", "dpo-only", "ddpo", "semi", "rs", "gae", "reinforce++"):
        assert name in proc.stdout


def test_smoke_pipeline_every_variant(tmp_path):
    methods = "sft,dpo,ppo,rto,dpo-only,ddpo,semi,rs,reinforce++,rto-reinforce++"
    proc = rto("pipeline", "--task", "keyed", "--preset", "smoke", "--out", str(tmp_path / "run"),
               "--methods", methods)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["methods"]) == methods.split(",")
    ppo_cfgs = {m: (tmp_path / "run" / "configs" / f"{m}.yaml").read_text() for m in methods.split(",")[2:]}
    assert "reward: ddpo" in ppo_cfgs["ddpo"] and "estimator: reinforce++" in ppo_cfgs["rto-reinforce++"]


def test_pipeline_runs_a_user_task_from_a_file(tmp_path):
    task = os.path.join(os.path.dirname(__file__), "fixtures", "reverse_task.py") + ":ReverseTask"
    proc = rto("pipeline", "--task", task, "--preset", "tiny", "--out", str(tmp_path / "run"), "--jobs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["methods"]) == {"sft", "dpo", "ppo", "rto"}
    assert all(0.0 <= m["gold_reward"] <= 1.0 for m in summary["methods"].values())


def test_eval_exports_for_alpaca_eval_and_arena_hard(tiny_dirs, prompt_file, tmp_path):
    out = tmp_path / "eval.json"
    proc = rto("eval", "--models", f"sft={tiny_dirs['policy']},rl={tiny_dirs['dpo']}", "--prompts", prompt_file,
               "--out", str(out), "--n-prompts", "4", "--max-new-tokens", "4", "--export", "alpaca_eval,arena_hard",
               "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    alpaca = json.loads((tmp_path / "eval_alpaca_eval_rl.json").read_text())
    assert len(alpaca) == 4 and set(alpaca[0]) >= {"instruction", "output", "generator"} and alpaca[0]["generator"] == "rl"
    assert "<eos>" not in "".join(r["output"] for r in alpaca)
    arena = [json.loads(line) for line in (tmp_path / "eval_arena_hard_sft.jsonl").read_text().splitlines()]
    assert arena[0]["model_id"] == "sft" and arena[0]["choices"][0]["turns"][0]["content"] is not None
    assert rto("eval", "--models", "a=x", "--prompts", prompt_file, "--out", str(out), "--baseline", "a",
               "--export", "judge").returncode == 2
