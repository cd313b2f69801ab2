"""The keyed task: splits, gold reward by hand, teacher quality, loading user tasks."""

import random

import pytest

from rto.io.errors import UserError
from rto.tasks import KeyedTask, load_task
from rto.tasks.keyed import split_tokens


def test_splits_are_disjoint_and_seeded(keyed):
    train = keyed.prompts("train", 300, seed=0)
    dev = keyed.prompts("dev", 100, seed=0)
    test = keyed.prompts("test", 100, seed=0)
    assert not (set(train) & set(dev)) and not (set(train) & set(test)) and not (set(dev) & set(test))
    assert keyed.prompts("test", 100, seed=0) == test
    assert keyed.prompts("test", 100, seed=1) != test
    assert len(set(train)) == 300


def test_gold_reward_by_hand():
    task = KeyedTask(prompt_len=4, response_len=6, score_every=3, n_bonus=8, bonus_target=4, bonus_weight=1.0)
    prompt = "s1 s2 s3 s4 <sep>"
    k1, k2 = task.key["s1"], task.key["s2"]
    bonus = sorted(task.bonus)
    plain = next(s for s in task.symbols if s not in task.bonus and s not in (k1, k2))
    wrong = next(s for s in task.symbols if s not in task.bonus and s != k1)
    # Positions 0 and 3 are scored, against key[s1] and key[s2].
    right = f"{k1} {plain} {plain} {k2} {plain} {plain} <eos>"
    n_bonus = (k1 in task.bonus) + (k2 in task.bonus)
    assert task.gold_reward(prompt, right) == pytest.approx(1.0 + n_bonus / 4)
    half = f"{wrong} {bonus[0]} {bonus[1]} {k2} {plain} {plain} <eos>"
    assert task.gold_reward(prompt, half) == pytest.approx(0.5 + (2 + (k2 in task.bonus)) / 4)
    # The count saturates at the target: six bonus symbols are worth no more than four.
    capped = " ".join(bonus[:6]) + " <eos>"
    hits = (bonus[0] == k1) + (bonus[3] == k2)
    assert task.gold_reward(prompt, capped) == pytest.approx(hits / 2 + 1.0)
    per_token = task.gold_token_rewards(prompt, split_tokens(right))
    assert sum(per_token) == pytest.approx(task.gold_reward(prompt, right))
    assert per_token == pytest.approx([0.5 + (k1 in task.bonus) / 4, 0, 0, 0.5 + (k2 in task.bonus) / 4, 0, 0, 0])
    # Bonus symbols past the target earn nothing: the count's credit is marginal.
    per_token = task.gold_token_rewards(prompt, split_tokens(capped))
    assert per_token[4] == pytest.approx(0.0) and per_token[5] == pytest.approx(0.0)
    assert sum(per_token) == pytest.approx(task.gold_reward(prompt, capped))


def _teacher_expected_gold(task, prompt):
    """The teacher's expected gold reward on one prompt, exactly, from the task's description
    (not by running the teacher). The local part is teacher_accuracy: every scored position lies
    within the shortest length. The count part is an expectation over a Markov chain on
    (last symbol, bonus symbols so far): a scored position is right with probability
    teacher_accuracy, otherwise uniform over the other symbols; elsewhere, with probability
    teacher_habit, one of the last symbol's 3 successors, otherwise any symbol; the length is
    uniform on response_len - 2 .. response_len."""
    import torch

    ps = [t for t in split_tokens(prompt) if t.startswith("s")]
    S, n_max = len(task.symbols), task.response_len
    index = {s: i for i, s in enumerate(task.symbols)}
    bonus = torch.tensor([s in task.bonus for s in task.symbols])
    habit = torch.full((S, S), (1 - task.teacher_habit) / S, dtype=torch.float64)
    for s, nexts in task.successors.items():
        for x in nexts:
            habit[index[s], index[x]] += task.teacher_habit / 3
    dist = torch.zeros(S, n_max + 1, dtype=torch.float64)  # P(last symbol, bonus count)
    count_at_len = {}
    for t in range(n_max):
        if t % task.score_every == 0:
            q = torch.full((S,), (1 - task.teacher_accuracy) / (S - 1), dtype=torch.float64)
            q[index[task.key[ps[(t // task.score_every) % len(ps)]]]] = task.teacher_accuracy
            new = q[:, None] * (dist.sum(0) if t else torch.eye(1, n_max + 1, dtype=torch.float64)[0])[None]
        else:
            new = habit.T @ dist
        new[bonus] = torch.roll(new[bonus], 1, dims=1)  # a bonus symbol adds one to the count
        dist = new
        credit = torch.clamp(torch.arange(n_max + 1), max=task.bonus_target) / task.bonus_target
        count_at_len[t + 1] = float((dist.sum(0) * credit).sum())
    assert all(t % task.score_every or t < n_max - 2 for t in range(n_max))  # scored positions always present
    lengths = range(n_max - 2, n_max + 1)
    return task.teacher_accuracy + task.bonus_weight * sum(count_at_len[n] for n in lengths) / len(lengths)


def test_teacher_mean_gold_reward(keyed):
    """The teacher scores what its description says it should: imperfect (about 0.9 of 2.0), and
    its sample mean within 4 standard errors of the exact expectation."""
    rng = random.Random(0)
    prompts = keyed.prompts("train", 400, seed=3)
    golds = [keyed.gold_reward(p, keyed.demonstration(p, rng)) for p in prompts]
    mean = sum(golds) / len(golds)
    se = (sum((g - mean) ** 2 for g in golds) / (len(golds) - 1) / len(golds)) ** 0.5
    expected = sum(_teacher_expected_gold(keyed, p) for p in prompts) / len(prompts)
    assert abs(mean - expected) < 4 * se, (mean, expected, se)
    assert 0.85 < expected < 0.95 and se < 0.02


def test_load_user_task_from_file(tmp_path):
    f = tmp_path / "mytask.py"
    f.write_text(
        "from rto.tasks import KeyedTask\nclass Short(KeyedTask):\n"
        "    def __init__(self, seed=0):\n        super().__init__(seed, response_len=6)\n"
    )
    task = load_task(f"{f}:Short")
    assert task.response_len == 6
    with pytest.raises(UserError, match="has no KeyedTaskX"):
        load_task(f"{f}:KeyedTaskX")
    with pytest.raises(UserError, match="not a subclass"):
        load_task(f"{f}:__name__")
    with pytest.raises(UserError, match="not a built-in"):
        load_task("nonsense")
    with pytest.raises(UserError, match="cannot import"):
        load_task("no_such_module_xyz:Task")


def test_gold_parts_sum_to_gold(keyed):
    rng = random.Random(1)
    for p in keyed.prompts("dev", 50, seed=0):
        r = keyed.demonstration(p, rng)
        parts = keyed.gold_parts(p, r)
        assert set(parts) == {"local", "count"}
        assert sum(parts.values()) == pytest.approx(keyed.gold_reward(p, r))
