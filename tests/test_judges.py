"""Held-out judges (rto.lm.judges): logged at every dev evaluation, usable as the selection
criterion, read as the training RM reads a rollout, and refused in one line when broken."""

import shutil

import pytest
import torch

from rto.io.errors import UserError
from rto.lm.judges import load_judge
from rto.rl.trainer import PPOTrainer
from tests.test_ppo import _cfg

JUDGES = """
from rto.tasks import load_task

TASK = load_task("keyed")


def gold(prompts, responses):
    return TASK.gold_rewards(prompts, responses)


def short(prompts, responses):
    return [1.0] * (len(responses) - 1)


def broken(prompts, responses):
    raise RuntimeError("no judge today")
"""


@pytest.fixture
def judges_file(tmp_path):
    path = tmp_path / "judges.py"
    path.write_text(JUDGES)
    return path


def test_a_function_judge_is_logged_and_selects(tiny_dirs, prompt_file, tmp_path, judges_file):
    # The judge is the task's gold reward under another name: every dev point must carry the same value twice.
    trainer = PPOTrainer(
        _cfg(
            tiny_dirs,
            prompt_file,
            tmp_path,
            iterations=3,
            eval_every=1,
            eval_prompts=prompt_file,
            task="keyed",
            judge=f"{judges_file}:gold",
            select_by="judge_score",
        )
    )
    summary = trainer.train()
    curve = summary["curve"]
    assert len(curve) == 4 and all(p["judge_score"] == p["gold_reward"] for p in curve)
    assert all(p["judge_score_se"] == p["gold_reward_se"] for p in curve)
    best = max(curve, key=lambda p: p["judge_score"])
    assert summary["selection"]["metric"] == "judge_score" and summary["selection"]["best"] == best["judge_score"]
    assert summary["selection"]["best_iteration"] == min(
        p["iteration"] for p in curve if p["judge_score"] == best["judge_score"]
    )


def test_a_model_judge_reads_text_as_the_rm_reads_a_rollout(tiny_dirs, keyed, tmp_path):
    from rto.lm.models import load_causal_lm, load_score_model, load_tokenizer
    from rto.lm.rollout import Sampling, decode_responses, encode_prompts, generate
    from rto.lm.scoring import sequence_scores

    shutil.copytree(tiny_dirs["rm"], tmp_path / "judge")
    tok = load_tokenizer(tiny_dirs["policy"])
    prompts = keyed.prompts("dev", 16, seed=0)
    ids, mask = encode_prompts(tok, prompts)
    torch.manual_seed(0)
    batch = generate(load_causal_lm(tiny_dirs["policy"]), tok, ids, mask, Sampling(12, 1.0))
    texts = decode_responses(tok, batch)
    ended = [t.endswith(tok.eos_token) for t in texts]
    assert 0 < sum(ended) < len(texts)  # both kinds present
    judged = load_judge(str(tmp_path / "judge"), tok)(prompts, texts)
    with torch.no_grad():
        direct = sequence_scores(load_score_model(tiny_dirs["rm"]), batch).tolist()
    for j, d, e in zip(judged, direct, ended):
        if e:  # a response that ended: the very tokens the RM scored in the rollout
            assert j == pytest.approx(d, abs=1e-5)
        else:  # cut at the limit: the judge scores it with its EOS appended, as its training pairs had
            assert j != pytest.approx(d, abs=1e-5)


@pytest.mark.parametrize(
    "name, message",
    [
        ("short", "returned 15 scores for 16 responses"),
        ("broken", "RuntimeError: no judge today"),
        ("missing", "has no missing"),
    ],
)
def test_a_broken_judge_is_one_line(judges_file, keyed, name, message):
    tok = keyed.tokenizer()
    with pytest.raises(UserError, match=message):
        load_judge(f"{judges_file}:{name}", tok)(["s1 <sep>"] * 16, ["s2 <eos>"] * 16)


def test_judge_settings_are_checked(tiny_dirs, prompt_file, tmp_path):
    with pytest.raises(UserError, match="needs a --judge"):
        _cfg(tiny_dirs, prompt_file, tmp_path, eval_prompts=prompt_file, eval_every=1, select_by="judge_score")
    with pytest.raises(UserError, match="not the --reward-model"):
        _cfg(tiny_dirs, prompt_file, tmp_path, judge=tiny_dirs["rm"])
    with pytest.raises(UserError, match="neither a reward-model directory"):
        load_judge(str(tmp_path / "nowhere"), None)
