"""The DPO policy's epoch chosen on dev (rto dpo --select-by), as an RL run's iteration is, and
the data ratio measured from the data-limited sweep (rto.experiments.data_ratio), checked by hand."""

import json
import math

import pytest
import torch

from rto.experiments.data_ratio import NEVER, REACHES_AT_SMALLEST, claim_fraction, crossing, measured_ratio, ratio_text
from rto.experiments.seed_stats import t_interval
from rto.experiments.tuning import TuneGrid
from rto.io.errors import UserError


def test_dpo_keeps_the_dev_best_epoch_not_the_last(tmp_path, tiny_dirs, prompt_file, prefs, monkeypatch):
    """The real TRL run with the dev scores scripted (0.5 at the start, 0.9 after epoch 1, 0.2
    after epoch 2): the saved model is the weights after epoch 1, and metrics.json says so."""
    import rto.stages.dev_selection as dev_selection
    from rto.io.config import build
    from rto.lm.models import load_causal_lm
    from rto.stages.dpo import DPOStageConfig, run

    scores, snapshots = iter([0.5, 0.9, 0.2]), []

    def scripted_dev_point(model, tokenizer, prompts, sampling, **kwargs):
        assert len(prompts) == 5 and sampling.max_new_tokens == 3 and kwargs["task"] is not None
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return {"gold_reward": next(scores), "kl_to_ref": 0.0}

    monkeypatch.setattr(dev_selection, "dev_point", scripted_dev_point)
    cfg = build(
        DPOStageConfig,
        {
            "model": tiny_dirs["policy"],
            "data": str(prefs),
            "out": str(tmp_path / "dpo"),
            "epochs": 2,
            "learning_rate": 0.05,
            "select_by": "gold_reward",
            "eval_prompts": prompt_file,
            "n_eval": 5,
            "task": "keyed",
            "eval_max_new_tokens": 3,
            "threads": 1,
            "warmup_ratio": 0.0,
        },
        "test",
    )
    run(cfg)
    selection = json.loads((tmp_path / "dpo" / "metrics.json").read_text())["selection"]
    assert [p["gold_reward"] for p in selection["curve"]] == [0.5, 0.9, 0.2]
    assert selection["best"] == 0.9 and selection["best_epoch"] == 1.0
    assert selection["best_iteration"] < selection["last_iteration"]
    saved = dict(load_causal_lm(tmp_path / "dpo").named_parameters())
    after_epoch_1, last = snapshots[1], snapshots[2]
    differs = [n for n in saved if not torch.equal(after_epoch_1[n], last[n])]
    assert differs  # training moved the weights after epoch 1, so the check below can tell them apart
    for name, value in saved.items():
        assert torch.equal(value, after_epoch_1[name]), name


def test_dpo_select_by_needs_its_dev_prompts(tiny_dirs, prefs, tmp_path):
    from rto.io.config import build
    from rto.stages.dpo import DPOStageConfig

    base = {"model": tiny_dirs["policy"], "data": str(prefs), "out": str(tmp_path / "o"), "select_by": "gold_reward"}
    with pytest.raises(UserError, match="--select-by needs --eval-prompts"):
        build(DPOStageConfig, base, "test")
    with pytest.raises(UserError, match="needs a --task"):
        build(DPOStageConfig, {**base, "eval_prompts": "dev.jsonl"}, "test")
    with pytest.raises(UserError, match="cannot --resume yet"):
        build(DPOStageConfig, {**base, "eval_prompts": "dev.jsonl", "task": "keyed", "resume": "auto"}, "test")


def test_the_dpo_grid_is_never_smaller_than_rtos():
    with pytest.raises(UserError, match="DPO policy grid \\(2 runs\\) is smaller than the RTO grid \\(4 runs\\)"):
        TuneGrid(dpo_betas=[0.1, 0.3], dpo_lrs=[5e-4]).check_budget()
    TuneGrid(dpo_betas=[0.1, 0.3], dpo_lrs=[5e-4, 1e-3]).check_budget()


# --- the data ratio --------------------------------------------------------------------------

PROMPTS = [100, 200, 400, 800]


def test_crossing_is_interpolated_on_log_pool_size():
    # target 0.4 between 0.3 (200 prompts) and 0.5 (400): halfway on log size -> 200 * sqrt(2)
    n, how = crossing(PROMPTS, [0.1, 0.3, 0.5, 0.6], 0.4)
    assert how == "" and n == pytest.approx(200 * math.sqrt(2))
    # a quarter of the way: 0.35 between 0.3 and 0.5 -> 200 * 2 ** 0.25
    assert crossing(PROMPTS, [0.1, 0.3, 0.5, 0.6], 0.35)[0] == pytest.approx(200 * 2**0.25)
    # exactly on a point: that pool size
    assert crossing(PROMPTS, [0.1, 0.3, 0.5, 0.6], 0.5)[0] == pytest.approx(400)


def test_crossing_counts_only_a_curve_that_stays_above():
    # 0.5 at 100 prompts is above the target, but the curve falls back below at 200: the crossing
    # is the one between 200 and 400, not the noisy first point.
    n, how = crossing(PROMPTS, [0.5, 0.3, 0.5, 0.6], 0.4)
    assert how == "" and n == pytest.approx(200 * math.sqrt(2))
    assert crossing(PROMPTS, [0.5, 0.6, 0.7, 0.8], 0.4) == (100.0, REACHES_AT_SMALLEST)
    assert crossing(PROMPTS, [0.5, 0.6, 0.7, 0.3], 0.4) == (None, NEVER)


def test_measured_ratio_over_seeds_by_hand():
    curves = [[0.1, 0.3, 0.5, 0.6], [0.1, 0.2, 0.3, 0.5], [0.1, 0.5, 0.6, 0.7]]
    targets = [0.4, 0.4, 0.3]
    # seed 0: 800 / (200 sqrt 2) = 2 sqrt 2; seed 1: 0.4 halfway between 400 and 800 -> 800 / (400 sqrt 2)
    # = sqrt 2; seed 2: 0.3 between 0.1 (100) and 0.5 (200), half way -> 800 / (100 sqrt 2) = 4 sqrt 2
    r = measured_ratio(PROMPTS, curves, targets)
    expected = [2 * math.sqrt(2), math.sqrt(2), 4 * math.sqrt(2)]
    assert r["ratio_per_seed"] == pytest.approx(expected) and r["censored_per_seed"] == ["", "", ""]
    logs = [math.log(x) for x in expected]
    assert r["geometric_mean"] == pytest.approx(math.exp(sum(logs) / 3))  # = 2 sqrt 2
    assert r["ci"] == pytest.approx([math.exp(x) for x in t_interval(logs)])
    assert not r["is_lower_bound"] and ratio_text(r).startswith("2.83 [")


def test_a_ratio_at_the_sweeps_ceiling_is_a_bound_and_one_never_reached_is_none():
    at_ceiling = measured_ratio(PROMPTS, [[0.5, 0.6, 0.7, 0.8], [0.1, 0.3, 0.5, 0.6]], [0.4, 0.4])
    assert at_ceiling["ratio_per_seed"][0] == 8.0 and at_ceiling["seeds_at_ceiling"] == 1
    assert at_ceiling["is_lower_bound"] and ratio_text(at_ceiling).startswith(">= 4.76 (1 of 2 seeds")
    never = measured_ratio(PROMPTS, [[0.1, 0.2, 0.3, 0.3], [0.1, 0.3, 0.5, 0.6]], [0.4, 0.4])
    assert never["geometric_mean"] is None and ratio_text(never).startswith("not measured")


def test_the_one_eighth_claim_is_judged_at_one_eighth():
    assert claim_fraction({"fractions": [0.03125, 0.0625, 0.125, 0.25, 1.0]}) == 0.125
    assert claim_fraction({"fractions": [0.5, 1.0]}) == 0.5
