"""The `rto` command end to end: the smoke pipeline, and one-line errors with exit code 2."""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # runs whole pipelines or launches processes (see tests/conftest.py)

ENV = dict(os.environ, RTO_PROGRESS="0", OMP_NUM_THREADS="1")


def rto(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "rto.cli", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_smoke_pipeline(tmp_path, run_rto):
    start = time.time()
    proc = run_rto("pipeline", "--task", "keyed", "--preset", "smoke", "--out", str(tmp_path / "run"))
    elapsed = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "keyed"
    assert set(summary["methods"]) == {"sft", "dpo", "ppo", "rto"}
    for m in summary["methods"].values():
        for key in ("gold_reward", "gold_reward_ci", "win_rate_vs_sft", "kl_to_sft", "rm_score"):
            assert key in m
    # Each method's gold reward and interval, recomputed from its saved samples with the task's gold.
    from rto.tasks import load_task

    _check_gold_from_samples(summary, tmp_path / "run" / "eval_samples.jsonl", load_task("keyed"))
    # The RM's held-out accuracy, recomputed with plain forwards of the unpadded texts.
    from rto.lm.models import load_score_model, load_tokenizer

    heldout = [
        json.loads(line) for line in (tmp_path / "run" / "data" / "prefs_heldout.jsonl").read_text().splitlines()
    ]
    rm, tok = load_score_model(tmp_path / "run" / "rm"), load_tokenizer(tmp_path / "run" / "rm")
    assert summary["rm_accuracy"] == pytest.approx(_pair_accuracy_by_hand(rm, tok, heldout), abs=1e-6)  # float32 mean
    # The DPO model's implicit-reward accuracy on the same pairs (RTO's reward model), recomputed
    # the same way: log pi_dpo - log pi_sft over each response's tokens, chosen against rejected.
    from rto.lm.evaluate import wilson_interval
    from rto.lm.models import load_causal_lm

    dpo, sft = load_causal_lm(tmp_path / "run" / "dpo"), load_causal_lm(tmp_path / "run" / "sft")
    by_hand, near_ties = _implicit_accuracy_by_hand(dpo, sft, tok, heldout)
    assert abs(summary["dpo_accuracy"] - by_hand) <= near_ties / len(heldout) + 1e-9
    assert summary["heldout_pairs"] == len(heldout) > 0
    for key in ("rm", "dpo"):  # each with its Wilson interval over the pairs
        assert summary[f"{key}_accuracy_ci"] == pytest.approx(
            list(wilson_interval(summary[f"{key}_accuracy"], len(heldout)))
        )
    assert "DPO implicit-reward accuracy on the same pairs" in proc.stderr
    assert "one training run (seed 0)" in proc.stderr and "rto reproduce --task keyed --seeds 5" in proc.stderr
    # The RL results are chosen on the dev split (the pipeline's default): the selected checkpoint
    # is the best dev evaluation of its curve, and the last checkpoint is evaluated beside it.
    for m in ("ppo", "rto"):
        sel, curve = summary["selection"][m], summary["curves"][m]
        assert sel["metric"] == "gold_reward" and sel["best"] == max(p["gold_reward"] for p in curve)
        assert curve[[p["iteration"] for p in curve].index(sel["best_iteration"])]["gold_reward"] == sel["best"]
        assert f"{m}: the checkpoint of iteration {sel['best_iteration']}" in proc.stderr
        if sel["best_iteration"] != sel["iterations_run"]:  # the last checkpoint is evaluated beside it
            assert set(summary["last_checkpoints"][f"{m}@last"]) >= {"gold_reward", "kl_to_sft"}
        else:
            assert f"{m}@last" not in summary["last_checkpoints"] and "the last one" in proc.stderr
    assert summary["methods"]["sft"]["win_rate_vs_sft"] == 0.5
    assert abs(summary["methods"]["sft"]["kl_to_sft"]) < 1e-6
    assert (tmp_path / "run" / "training_curve.png").stat().st_size > 1000
    assert "gold reward" in proc.stderr and "RM held-out accuracy" in proc.stderr  # the table, for a person
    # stdout is the result alone, for a program: the summary the pipeline wrote.
    assert json.loads(proc.stdout) == summary
    assert elapsed < 120, f"smoke pipeline took {elapsed:.0f} s"
    # Each stage's resolved config reruns the stage on its own.
    assert (tmp_path / "run" / "configs" / "ppo.yaml").is_file()


def _check_gold_from_samples(summary, samples_file, task):
    """Each method's mean gold reward equals its samples' gold recomputed by `task`, and its 95%
    interval is about the normal one, mean +- 1.96 sd / sqrt(n) (a percentile bootstrap of the mean)."""
    import math

    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    for name, m in summary["methods"].items():
        g = [task.gold_reward(r["prompt"], r["response"]) for r in rows if r["model"] == name]
        assert len(g) == summary["n_test_prompts"]
        mean = sum(g) / len(g)
        assert m["gold_reward"] == pytest.approx(mean, abs=1e-9), name
        sd = math.sqrt(sum((x - mean) ** 2 for x in g) / len(g))
        lo, hi = m["gold_reward_ci"]
        if sd == 0:  # every sample scored the same: so does every resample
            assert lo == pytest.approx(mean) and hi == pytest.approx(mean), name
            continue
        width = 2 * 1.96 * sd / math.sqrt(len(g))
        assert 0.7 * width < hi - lo < 1.3 * width, (name, lo, hi, width)
        assert abs((lo + hi) / 2 - mean) < 0.15 * width, (name, lo, hi, mean)


def _score_by_hand(rm, tokenizer, prompt, response):
    """The RM's score of one text: a plain forward of the unpadded prompt + response, last token
    (EOS appended to a response cut off without one, as TRL's reward trainer does)."""
    import torch

    if not response.endswith(tokenizer.eos_token):
        response += tokenizer.eos_token
    ids = tokenizer(prompt)["input_ids"] + tokenizer(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return float(rm(input_ids=torch.tensor([ids])).logits.reshape(-1)[0])


def _pair_accuracy_by_hand(rm, tokenizer, rows):
    return sum(
        _score_by_hand(rm, tokenizer, r["prompt"], r["chosen"])
        > _score_by_hand(rm, tokenizer, r["prompt"], r["rejected"])
        for r in rows
    ) / len(rows)


def _logprob_by_hand(lm, tokenizer, prompt, response):
    """Sum of the response tokens' log-probs: a plain forward of the unpadded prompt + response
    (EOS appended where missing, as DPO trains), the logits at position t predicting token t + 1."""
    import torch

    if not response.endswith(tokenizer.eos_token):
        response += tokenizer.eos_token
    p = tokenizer(prompt)["input_ids"]
    ids = p + tokenizer(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids)))


def _implicit_accuracy_by_hand(dpo, ref, tokenizer, rows):
    """(Share of pairs where DPO's implicit reward - its log-ratio to the reference - puts chosen
    above rejected, ties half; how many margins are within float32 noise of 0, where a padded
    batch and a plain forward may disagree on the sign)."""

    def log_ratio(r, key):
        return _logprob_by_hand(dpo, tokenizer, r["prompt"], r[key]) - _logprob_by_hand(
            ref, tokenizer, r["prompt"], r[key]
        )

    margins = [log_ratio(r, "chosen") - log_ratio(r, "rejected") for r in rows]
    return (
        sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(rows),
        sum(abs(m) < 1e-4 for m in margins),
    )


def test_mean_ci_width_is_the_standard_error():
    """95% bootstrap interval of a mean: about mean +- 1.96 sd / sqrt(n), centred on the mean."""
    import math

    import torch

    from rto.lm.evaluate import mean_ci

    for seed, n in ((0, 400), (1, 100)):
        x = 5.0 + 2.0 * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        lo, hi = mean_ci(x.tolist(), seed=seed)
        width = 2 * 1.959964 * float(x.std(unbiased=False)) / math.sqrt(n)
        assert 0.9 * width < hi - lo < 1.1 * width, (lo, hi, width)
        assert abs((lo + hi) / 2 - float(x.mean())) < 0.05 * width, (lo, hi, float(x.mean()))
    assert mean_ci([3.0] * 10) == (3.0, 3.0)


def test_rm_pair_accuracy_on_constructed_pairs(tiny_dirs, keyed):
    """Pairs built so that the RM (its scores taken by hand) prefers `chosen` in exactly 5 of 8."""
    import random

    from rto.lm.models import load_score_model, load_tokenizer
    from rto.stages.rm import pair_accuracy

    rm, tok = load_score_model(tiny_dirs["rm"]), load_tokenizer(tiny_dirs["rm"])
    rng = random.Random(0)
    pairs = []
    for i, p in enumerate(keyed.prompts("dev", 8, seed=0)):
        p = " ".join(p.split()[: 2 + i % 6]) + " <sep>"  # prompts and responses of different lengths
        a = keyed.demonstration(p, rng)
        b = " ".join(keyed.demonstration(p, rng).split()[: 3 + i]) + " <eos>"
        sa, sb = _score_by_hand(rm, tok, p, a), _score_by_hand(rm, tok, p, b)
        assert abs(sa - sb) > 1e-4
        better, worse = (a, b) if sa > sb else (b, a)
        right = i < 5
        pairs.append({"prompt": p, "chosen": better if right else worse, "rejected": worse if right else better})
    assert pair_accuracy(rm, tok, pairs) == 5 / 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["ppo", "--policy", "nowhere", "--prompts", "p.jsonl", "--out", "o", "--reward-model", "rm"], "not found"),
        (["ppo", "--actor-lr", "-1"], "actor_lr: must be > 0"),
        (["pipeline", "--out", "x", "--preset", "huge"], "no preset 'huge'"),
        (["pipeline", "--out", "x", "--methods", "sft,magic"], "unknown method 'magic'"),
        (["sft", "--data", "missing.jsonl", "--out", "o"], "missing.jsonl: data file not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, run_rto):
    proc = run_rto(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ppo_help_lists_rewards_and_estimators(run_rto):
    proc = run_rto("ppo", "--help")
    assert proc.returncode == 0
    for name in ("sparse", "rto", "dpo-only", "ddpo", "semi", "rs", "gae", "reinforce++", "grpo", "rloo"):
        assert name in proc.stdout


def test_smoke_pipeline_every_variant(tmp_path, run_rto):
    methods = "sft,dpo,ppo,rto,dpo-only,ddpo,semi,rs,reinforce++,rto-reinforce++,grpo,rto-rloo"
    # In this process, one stage after another (--jobs 1): test_smoke_pipeline covers the parallel processes.
    args = ("--methods", methods, "--jobs", "1", "--threads", "1")
    proc = run_rto("pipeline", "--task", "keyed", "--preset", "smoke", "--out", str(tmp_path / "run"), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["methods"]) == methods.split(",")
    ppo_cfgs = {m: (tmp_path / "run" / "configs" / f"{m}.yaml").read_text() for m in methods.split(",")[2:]}
    assert "reward: ddpo" in ppo_cfgs["ddpo"] and "estimator: reinforce++" in ppo_cfgs["rto-reinforce++"]
    assert "estimator: rloo" in ppo_cfgs["rto-rloo"] and "num_generations: 4" in ppo_cfgs["rto-rloo"]
    assert not (tmp_path / "run" / "grpo" / "critic").exists()  # no critic trained or saved


def test_pipeline_runs_a_user_task_from_a_file(tmp_path, run_rto):
    task = os.path.join(os.path.dirname(__file__), "fixtures", "reverse_task.py") + ":ReverseTask"
    # ... chosen by a held-out judge: an RM the pipeline trains on pairs the training RM never saw.
    proc = run_rto(
        "pipeline",
        "--task",
        task,
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "run"),
        "--jobs",
        "1",
        "--threads",
        "1",
        "--judge",
        "heldout-rm",
        "--select-by",
        "judge_score",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["methods"]) == {"sft", "dpo", "ppo", "rto"}
    # The user task's own gold reward (not keyed's), recomputed from the saved samples.
    from rto.tasks import load_task

    _check_gold_from_samples(summary, run / "eval_samples.jsonl", load_task(task))
    pairs = {
        name: [json.loads(line) for line in (run / "data" / f"{name}.jsonl").read_text().splitlines()]
        for name in ("prefs", "prefs_judge")
    }
    assert len(pairs["prefs_judge"]) == len(pairs["prefs"])
    assert not {r["prompt"] for r in pairs["prefs"]} & {r["prompt"] for r in pairs["prefs_judge"]}
    assert "prefs_judge.jsonl" in (run / "configs" / "judge_rm.yaml").read_text()
    assert 0 <= summary["judge_accuracy"] <= 1 and "judge (held-out RM) accuracy" in proc.stderr
    # The judge's test scores, recomputed from the samples with the judge RM by hand.
    from rto.lm.models import load_score_model, load_tokenizer

    judge, tok = load_score_model(run / "judge_rm"), load_tokenizer(run / "judge_rm")
    rows = [json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()][:8]
    for r in rows:
        assert r["judge_score"] == pytest.approx(_score_by_hand(judge, tok, r["prompt"], r["response"]), abs=1e-4)
    for m in ("ppo", "rto"):
        sel, curve = summary["selection"][m], summary["curves"][m]
        assert sel["metric"] == "judge_score" and sel["best"] == max(p["judge_score"] for p in curve)
        assert all("gold_reward" in p for p in curve)  # the gold reward is still logged beside it
        assert summary["methods"][m]["judge_score"] == pytest.approx(
            sum(r["judge_score"] for r in _samples(run, m)) / summary["n_test_prompts"]
        )
    assert "judge [95% CI]" in proc.stderr


def _samples(run, model):
    return [
        r for line in (run / "eval_samples.jsonl").read_text().splitlines() if (r := json.loads(line))["model"] == model
    ]


def test_eval_exports_for_alpaca_eval_and_arena_hard(tiny_dirs, prompt_file, tmp_path, run_rto):
    out = tmp_path / "eval.json"
    proc = run_rto(
        "eval",
        "--models",
        f"sft={tiny_dirs['policy']},rl={tiny_dirs['dpo']}",
        "--prompts",
        prompt_file,
        "--out",
        str(out),
        "--n-prompts",
        "4",
        "--max-new-tokens",
        "4",
        "--export",
        "alpaca_eval,arena_hard",
        "--threads",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    alpaca = json.loads((tmp_path / "eval_alpaca_eval_rl.json").read_text())
    assert (
        len(alpaca) == 4 and set(alpaca[0]) >= {"instruction", "output", "generator"} and alpaca[0]["generator"] == "rl"
    )
    assert "<eos>" not in "".join(r["output"] for r in alpaca)
    arena = [json.loads(line) for line in (tmp_path / "eval_arena_hard_sft.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    sft_first = next(r["response"] for r in samples if r["model"] == "sft")
    assert arena[0]["model_id"] == "sft"
    assert arena[0]["choices"][0]["turns"][0]["content"] == sft_first.replace("<eos>", "").strip()
    assert (
        run_rto(
            "eval",
            "--models",
            "a=x",
            "--prompts",
            prompt_file,
            "--out",
            str(out),
            "--baseline",
            "a",
            "--export",
            "judge",
        ).returncode
        == 2
    )
