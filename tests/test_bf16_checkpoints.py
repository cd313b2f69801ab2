"""A checkpoint saved in bf16 (as most hub models are) trains with fp32 master weights: PPO's
policy and critic, and the TRL stages (SFT here), load it in fp32; frozen models follow the
precision setting."""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from rto.io.config import build
from rto.lm.models import load_causal_lm, load_score_model
from rto.rl.trainer import PPOTrainer
from tests.test_ppo import _cfg


def _bf16_copy(src: str, dst) -> str:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rto.lm.models import save_model

    is_rm = "ForSequenceClassification" in json.loads((Path(src) / "config.json").read_text())["architectures"][0]
    cls = AutoModelForSequenceClassification if is_rm else AutoModelForCausalLM
    model = cls.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16)
    save_model(model, AutoTokenizer.from_pretrained(src), dst)
    if (Path(src) / "reward_stats.json").is_file():
        shutil.copy(Path(src) / "reward_stats.json", dst / "reward_stats.json")
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16  # really a bf16 checkpoint
    return str(dst)


def test_bf16_checkpoints_load_and_train_in_fp32(tiny_dirs, prompt_file, tmp_path):
    policy = _bf16_copy(tiny_dirs["policy"], tmp_path / "policy_bf16")
    rm = _bf16_copy(tiny_dirs["rm"], tmp_path / "rm_bf16")
    assert all(p.dtype == torch.float32 for p in load_causal_lm(policy).parameters())
    assert all(p.dtype == torch.float32 for p in load_score_model(rm).parameters())

    trainer = PPOTrainer(
        _cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", policy=policy, reward_model=rm, precision="fp32")
    )
    for model in (trainer.models.policy, trainer.models.critic, trainer.models.ref, trainer.models.rm):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    # --precision bf16: frozen models in bf16, trained ones still fp32.
    trainer = PPOTrainer(
        _cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", policy=policy, reward_model=rm, precision="bf16")
    )
    assert {p.dtype for p in trainer.models.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.models.critic.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.models.ref.parameters()} == {torch.bfloat16}


def test_sft_from_a_bf16_checkpoint_trains_fp32_weights(tiny_dirs, tmp_path):
    from rto.io.data import write_jsonl
    from rto.stages.sft import SFTStageConfig, run

    policy = _bf16_copy(tiny_dirs["policy"], tmp_path / "policy_bf16")
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, ({"prompt": f"s{i} s{i + 1} <sep>", "completion": f" s{i} <eos>"} for i in range(16)))
    # A learning rate small enough that bf16 weights (8 bits of mantissa) would round most updates away.
    run(
        build(
            SFTStageConfig,
            dict(
                model=policy,
                data=str(data),
                out=str(tmp_path / "sft"),
                epochs=1,
                batch_size=8,
                learning_rate=1e-5,
                threads=1,
            ),
            "test",
        )
    )
    start = load_causal_lm(policy).state_dict()
    with safe_open(str(tmp_path / "sft" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        changed = sum(int((f.get_tensor(k).float() != start[k].float()).sum()) for k in f.keys() if k in start)
        total = sum(f.get_tensor(k).numel() for k in f.keys() if k in start)
    assert dtypes == {torch.float32}
    # fp32 master weights take nearly every small update; bf16 weights round most of them away.
    assert changed > 0.5 * total, (changed, total)
