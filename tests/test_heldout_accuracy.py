"""How the pipeline's table judges a held-out accuracy: the Wilson interval, the near-chance rule
fixed in advance, ties counted half, and what one run's table says it can show."""

import pytest

from rto.experiments.report import results_table
from rto.lm.evaluate import chance_verdict, margin_accuracy, wilson_interval


@pytest.mark.parametrize(
    "successes, n, lo, hi",
    [
        # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity
        # correction), to the 4 decimals printed there.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        (29, 29, 0.8830, 1.0),
    ],
)
def test_wilson_interval_known_values(successes, n, lo, hi):
    got = wilson_interval(successes / n, n)
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_interval_properties():
    # Symmetric about 1/2 (p and 1 - p mirror), inside [0, 1], narrower with more pairs.
    lo, hi = wilson_interval(0.3, 50)
    lo2, hi2 = wilson_interval(0.7, 50)
    assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)
    widths = [hi - lo for lo, hi in (wilson_interval(0.5, n) for n in (10, 100, 1000))]
    assert widths == sorted(widths, reverse=True)
    # The case: an RM at 0.534 over 250 keyed pairs cannot be told from a coin.
    lo, hi = wilson_interval(0.534, 250)
    assert lo == pytest.approx(0.4721, abs=1e-4) and hi == pytest.approx(0.5949, abs=1e-4)


def test_chance_verdict_boundaries():
    assert chance_verdict((0.472, 0.595)) == "near chance"
    assert chance_verdict((0.5, 0.6)) == "near chance"  # an end at 0.5 is included
    assert chance_verdict((0.4, 0.5)) == "near chance"
    assert chance_verdict((0.5000001, 0.6)) is None
    assert chance_verdict((0.3, 0.4999999)) == "below chance"
    assert chance_verdict((0.80, 0.90)) is None


def test_near_chance_over_pair_counts():
    """The rule on constructed accuracies: with 250 pairs 0.56 is near chance, 0.57 is not (the
    lower end crosses 0.5 between them); with 2,000 pairs 0.53 already is not."""
    assert chance_verdict(wilson_interval(0.56, 250)) == "near chance"
    assert chance_verdict(wilson_interval(0.57, 250)) is None
    assert chance_verdict(wilson_interval(0.53, 2000)) is None
    assert chance_verdict(wilson_interval(0.42, 250)) == "below chance"


def test_margin_accuracy_counts_ties_half():
    assert margin_accuracy([1.0, -1.0, 0.0, 2.0]) == 0.625
    assert margin_accuracy([0.0, 0.0]) == 0.5  # a model that cannot tell the two apart: chance


def _summary(rm, dpo, n):
    return {
        "task": "keyed",
        "seed": 3,
        "baseline": "sft",
        "n_test_prompts": 512,
        "heldout_pairs": n,
        "methods": {"sft": {"gold_reward": 0.1, "gold_reward_ci": [0.0, 0.2]}},
        "rm_accuracy": rm,
        "rm_accuracy_ci": list(wilson_interval(rm, n)),
        "dpo_accuracy": dpo,
        "dpo_accuracy_ci": list(wilson_interval(dpo, n)),
        "dpo_accuracy_ties": 2,
    }


def test_table_warns_for_each_model_near_chance():
    table = results_table(_summary(0.534, 0.80, 250))
    assert "RM held-out accuracy against the gold order: 0.534 [0.472, 0.595] over 250 pairs" in table
    assert "DPO implicit-reward accuracy on the same pairs (RTO's reward model): 0.800" in table
    assert "(2 exact ties, counted half)" in table
    warnings = [line for line in table.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING: the RM orders the held-out pairs near chance: the 95% interval of its accuracy "
        "over 250 pairs includes 0.5"
    ]
    table = results_table(_summary(0.80, 0.55, 250))
    assert [w.split(" orders")[0] for w in table.splitlines() if w.startswith("WARNING")] == ["WARNING: the DPO model"]
    assert "WARNING" not in results_table(_summary(0.80, 0.90, 250))
    assert "lies below 0.5" in results_table(_summary(0.80, 0.40, 250))


def test_table_says_what_one_run_shows():
    table = results_table(_summary(0.8, 0.8, 250))
    assert (
        "one training run (seed 3): the [95% CI]s cover the sampling of the 512 test prompts, not the training "
        "run's randomness"
    ) in table
    assert "rto reproduce --task keyed --seeds 5 --out DIR" in table
    user = results_table({**_summary(0.8, 0.8, 250), "task": "my tasks/t.py:Mirror"})
    assert "rto reproduce --task 'my tasks/t.py:Mirror' --seeds 5" in user  # quoted for the shell
