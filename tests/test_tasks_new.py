"""The `ordered` and `count` testbeds: gold rewards by hand, their teachers' level (about half of
the achievable gold reward, as their docstrings say), splits, and presets every stage accepts."""

import random

import pytest

from rto import STAGES
from rto.io.config import build
from rto.tasks import BUILTIN, CountTask, OrderedTask, load_task
from rto.tasks.ordered import longest_increasing


def test_longest_increasing_subsequence():
    assert longest_increasing([]) == 0
    assert longest_increasing([3, 1, 2]) == 2
    assert longest_increasing([5, 4, 3]) == 1
    assert longest_increasing([0, 8, 4, 12, 2, 10, 6, 14, 1, 9]) == 4
    assert longest_increasing([1, 1, 2]) == 2  # strictly increasing


def test_ordered_gold_by_hand():
    task = OrderedTask(seed=0, n_symbols=8, prompt_len=4)
    prompt = "s0 s1 s2 s3 <sep>"
    by_rank = sorted(["s0", "s1", "s2", "s3"], key=task.rank.__getitem__)
    assert task.best_response(prompt) == " ".join(by_rank) + " <eos>"
    assert task.gold_reward(prompt, task.best_response(prompt)) == 1.0
    # Reversed: only one symbol can count; one stray symbol and one repeat cost 0.5 / 4 each.
    assert task.gold_reward(prompt, " ".join(reversed(by_rank)) + " <eos>") == pytest.approx(0.25)
    stray = next(s for s in task.symbols if s not in by_rank)
    response = f"{by_rank[0]} {stray} {by_rank[1]} {by_rank[1]} {by_rank[3]} <eos> {by_rank[2]}"
    parts = task.gold_parts(prompt, response)
    assert parts == {"order": 0.75, "extra": -0.25}  # after EOS nothing counts
    assert task.gold_reward(prompt, response) == pytest.approx(0.5)
    # Not a sum over tokens: the same token earns or loses credit with its neighbours' order.
    a, b = f"{by_rank[1]} {by_rank[0]} <eos>", f"{by_rank[0]} {by_rank[1]} <eos>"
    assert task.gold_reward(prompt, a) == 0.25 and task.gold_reward(prompt, b) == 0.5


def test_count_gold_by_hand():
    task = CountTask(seed=0, n_symbols=8, n_wanted=3, target=4, prompt_len=2)
    w = sorted(task.wanted)[0]
    other = task.others[0]
    for n, gold in ((0, 0.0), (2, 0.5), (4, 1.0), (6, 0.5), (8, 0.0), (9, 0.0)):
        assert task.gold_reward("s0 s1 <sep>", " ".join([w] * n + [other] * 3) + " <eos>") == gold
    assert task.gold_reward("s0 s1 <sep>", f"{w} {w} <eos> {w} {w}") == 0.5  # after EOS nothing counts


@pytest.mark.parametrize("name, low, high", [("ordered", 0.40, 0.47), ("count", 0.53, 0.60)])
def test_teachers_reach_about_half(name, low, high):
    task = load_task(name)
    rng = random.Random(1)
    prompts = task.prompts("train", 3000, seed=5)
    golds = [task.gold_reward(p, task.demonstration(p, rng)) for p in prompts]
    assert low < sum(golds) / len(golds) < high
    assert max(golds) <= 1.0


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_presets_build_every_stage(name):
    task = load_task(name)
    assert {"smoke", "default"} <= set(task.presets)
    for preset in task.presets.values():
        for section, values in preset.items():
            stage = "ppo" if section == "ppo" else section
            wiring = {
                "out": "o",
                "model": "m",
                "data": "d",
                "policy": "p",
                "prompts": "q",
                "reward_model": "r",
                "dpo_model": "x",
                "models": ["sft=s"],
            }
            cls = STAGES[stage].config_class()
            fields = set(cls.__dataclass_fields__)
            build(cls, {**{k: v for k, v in wiring.items() if k in fields}, **values}, f"{name} {section}")
    tok = task.tokenizer()
    for split in ("train", "dev", "test"):
        for p in task.prompts(split, 20, seed=0):
            assert (
                tok.convert_ids_to_tokens(tok(p)["input_ids"])[-1] == "<sep>"
                and tok.unk_token_id not in tok(p)["input_ids"]
            )


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_packaged_tuned_presets_are_rto_tunes_choice(name):
    """--preset tuned: the committed file holds what its grids chose (nothing edited by hand)."""
    from rto.experiments.tuning import TUNED_KEYS, read_preset
    from rto.tasks import tuned_preset_file

    task = load_task(name)
    path = tuned_preset_file(task)
    if not path:
        pytest.skip(f"{name} has no tuned preset yet")
    settings, doc = read_preset(path, task)
    tuned = doc["tuned"]
    best = max(tuned["ppo_grid"], key=lambda r: r["dev_score"])
    best_rto = max(tuned["rto_grid"], key=lambda r: r["dev_score"])
    assert {k: settings["ppo"][k] for k in TUNED_KEYS} == {
        "actor_lr": best["actor_lr"],
        "critic_lr": best["critic_lr"],
        "kl_coef": best["kl_coef"],
        "beta1": best_rto["beta1"],
        "dpo_clip": best_rto["dpo_clip"],
    }
    assert (
        tuned["budget"]["ppo_runs"] == len(tuned["ppo_grid"]) >= tuned["budget"]["rto_runs"] == len(tuned["rto_grid"])
    )
    assert settings["data"] == task.presets[doc["base"]]["data"]  # the base preset underneath
