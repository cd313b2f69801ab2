"""Any Hugging Face reward model: scores are read the same whether or not the model's config names
a pad id (many hub checkpoints keep it only in the tokenizer), in training, evaluation and judging."""

import json
import shutil
from pathlib import Path

import torch

from rto.io.config import build
from rto.lm.models import load_score_model, load_tokenizer
from rto.lm.rollout import encode_responses
from rto.lm.scoring import score_texts, sequence_scores
from rto.rl.trainer import PPOStageConfig, PPOTrainer


def _with_pad_id(rm_dir, tmp_path):
    """A copy of the RM whose config names the tokenizer's pad id."""
    copy = tmp_path / "rm_with_pad"
    shutil.copytree(rm_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["pad_token_id"] = load_tokenizer(rm_dir).pad_token_id
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


def test_scores_of_an_rm_without_a_pad_id_in_its_config(tiny_dirs, tmp_path):
    config = json.loads((Path(tiny_dirs["rm"]) / "config.json").read_text())
    assert config.get("pad_token_id") is None, "the fixture's RM must lack a pad id for this test to mean anything"
    tok = load_tokenizer(tiny_dirs["rm"])
    no_pad, with_pad = load_score_model(tiny_dirs["rm"]), load_score_model(_with_pad_id(tiny_dirs["rm"], tmp_path))
    # Prompts and responses of different lengths: padding on both sides of the batch.
    prompts = ["a b <sep>", "c <sep>", "d e f g <sep>"]
    responses = ["x y", "z", "x y z w v"]
    batch = encode_responses(tok, prompts, responses)
    assert (batch.prompt_mask == 0).any() and (batch.response_mask == 0).any()
    with torch.no_grad():
        expected = sequence_scores(with_pad, batch)
        got = sequence_scores(no_pad, batch)
    torch.testing.assert_close(got, expected)
    assert no_pad.config.pad_token_id is None, "the model's config is left as it was"
    # Each row alone (no padding at all) gives the same score: the batched read is the right slot.
    for i in range(3):
        alone = score_texts(no_pad, tok, prompts[i : i + 1], responses[i : i + 1])
        torch.testing.assert_close(alone, got[i : i + 1], atol=1e-5, rtol=1e-5)


def test_ppo_runs_with_such_an_rm_full_and_lora(tiny_dirs, prompt_file, tmp_path):
    for lora_r in (0, 4):
        cfg = build(
            PPOStageConfig,
            dict(
                policy=tiny_dirs["policy"],
                reward_model=tiny_dirs["rm"],
                dpo_model=tiny_dirs["dpo"],
                prompts=prompt_file,
                out=str(tmp_path / f"o{lora_r}"),
                iterations=1,
                rollout_batch_size=4,
                mini_batch_size=4,
                max_new_tokens=6,
                eval_every=0,
                threads=1,
                reward="rto",
                lora_r=lora_r,
            ),
            "test",
        )
        trainer = PPOTrainer(cfg)
        exp = trainer.make_experience(trainer._next_prompts())
        assert torch.isfinite(exp.rewards).all() and torch.isfinite(exp.values).all()
        trainer.train_on(exp)


def test_rto_ppo_command_with_such_an_rm(tiny_dirs, prompt_file, tmp_path, run_rto):
    out = tmp_path / "run"
    proc = run_rto(
        "ppo",
        "--policy",
        tiny_dirs["policy"],
        "--reward-model",
        tiny_dirs["rm"],
        "--dpo-model",
        tiny_dirs["dpo"],
        "--prompts",
        prompt_file,
        "--out",
        str(out),
        "--iterations",
        "1",
        "--rollout-batch-size",
        "4",
        "--mini-batch-size",
        "4",
        "--max-new-tokens",
        "6",
        "--threads",
        "1",
        "--eval-prompts",
        prompt_file,
        "--n-eval",
        "4",
        "--eval-every",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
