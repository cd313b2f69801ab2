"""A TRL user's habits: their YAML config's keys, their underscore flags, their training knobs
(bf16, gradient accumulation and checkpointing, max_steps, logging), a hub dataset id."""

import json
import os
import subprocess
import sys

import pytest

import rto
from tests.test_cli import ENV

TRL_DPO_YAML = """# as `trl dpo --config dpo.yaml` reads it
model_name_or_path: {model}
dataset_name: {data}
output_dir: {out}
learning_rate: 5.0e-7
num_train_epochs: 1
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
gradient_checkpointing: true
bf16: true
use_peft: true
lora_r: 8
beta: 0.1
"""


@pytest.fixture
def prefs(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"s{i} s{i + 1} <sep>", "chosen": f"s{i + 1} <eos>",
                                        "rejected": f"s{i} <eos>"}) + "\n" for i in range(16)))
    return path


def test_a_trl_dpo_config_and_flags_run_as_they_are(tiny_dirs, prefs, tmp_path):
    config = tmp_path / "dpo.yaml"
    config.write_text(TRL_DPO_YAML.format(model=tiny_dirs["policy"], data=prefs, out=tmp_path / "dpo"))
    from rto.config import load_yaml

    cfg = rto.make_config("dpo", load_yaml(config))
    assert (cfg.model, cfg.data, cfg.out) == (tiny_dirs["policy"], str(prefs), str(tmp_path / "dpo"))
    assert (cfg.learning_rate, cfg.epochs, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == \
        (5e-7, 1.0, 4, 2)
    assert (cfg.gradient_checkpointing, cfg.precision, cfg.lora_r, cfg.beta) == (True, "bf16", 8, 0.1)
    assert rto.make_config("dpo", load_yaml(config), lora_r=0).lora_r == 0  # our own name wins over use_peft
    from rto.stages.common import trl_common_args

    args = trl_common_args(cfg, cfg.out)
    assert (args["bf16"], args["gradient_accumulation_steps"], args["gradient_checkpointing"]) == (True, 2, True)
    assert args["per_device_train_batch_size"] == 4  # TRL's meaning of its own key
    assert trl_common_args(rto.make_config("dpo", load_yaml(config), precision="auto"), "o")["bf16"] is False  # no GPU

    # The command line, TRL-style flags on top (bf16 off: this CPU run stays fp32).
    proc = subprocess.run([sys.executable, "-m", "rto", "dpo", "--config", str(config), "--no-bf16", "--max_steps", "2",
                           "--logging_steps=1", "--output_dir", str(tmp_path / "dpo2"), "--threads", "1"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "dpo2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]  # max_steps 2, a log at every step
    assert (tmp_path / "dpo2" / "adapter_config.json").is_file()  # use_peft: a LoRA adapter
    assert json.loads((tmp_path / "dpo2" / "adapter_config.json").read_text())["r"] == 8


TRL_SFT_YAML = """model_name_or_path: {model}
dataset_name: {data}
output_dir: {out}
learning_rate: 2.0e-5
num_train_epochs: 1
max_steps: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
gradient_checkpointing: true
logging_steps: 1
eval_strategy: "no"
report_to: none
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: all-linear
"""
TRL_RM_YAML = """model_name_or_path: {model}
dataset_name: {data}
output_dir: {out}
per_device_train_batch_size: 4
num_train_epochs: 1
gradient_checkpointing: true
learning_rate: 1.0e-5
logging_steps: 1
eval_strategy: "no"
max_length: 64
"""


@pytest.mark.parametrize("stage, text", [("sft", TRL_SFT_YAML), ("rm", TRL_RM_YAML)])
def test_trl_sft_and_reward_configs_run_unchanged(tiny_dirs, prefs, tmp_path, stage, text):
    data = prefs
    if stage == "sft":
        data = tmp_path / "sft_text.jsonl"  # the keyed tokenizer has no chat template: TRL's {text} rows
        data.write_text("".join(json.dumps({"text": f"s{i} <sep> s{i + 1} <eos>"}) + "\n" for i in range(8)))
    config = tmp_path / f"{stage}.yaml"
    config.write_text(text.format(model=tiny_dirs["policy"], data=data, out=tmp_path / stage))
    proc = subprocess.run([sys.executable, "-m", "rto", stage, "--config", str(config)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'eval_strategy' (a TRL setting) has no counterpart here; ignored" in proc.stderr
    assert (tmp_path / stage / "metrics.json").is_file() and (tmp_path / stage / "README.md").is_file()


def test_one_meaning_of_batch_size(tiny_dirs):
    """--batch-size is the global batch in every stage (rto ppo's are too); TRL's per-device key keeps its meaning."""
    from rto.stages.common import trl_common_args

    cfg = rto.make_config("dpo", model="m", data="d.jsonl", out="o", batch_size=8, gradient_accumulation_steps=2)
    assert trl_common_args(cfg, "o")["per_device_train_batch_size"] == 4
    with pytest.raises(rto.UserError, match=r"--batch-size \(7\) is the global batch: it must be a multiple"):
        rto.make_config("dpo", model="m", data="d.jsonl", out="o", batch_size=7, gradient_accumulation_steps=2)


def test_ppo_reads_trl_ppo_names_and_unknown_keys_still_stop(tiny_dirs):
    cfg = rto.make_config("ppo", {"sft_model_path": tiny_dirs["policy"], "reward_model_path": tiny_dirs["rm"],
                                  "dataset_name": "p.jsonl", "output_dir": "o", "learning_rate": 3e-6,
                                  "num_ppo_epochs": 2, "cliprange": 0.1, "response_length": 7})
    assert (cfg.policy, cfg.reward_model, cfg.prompts, cfg.out) == (tiny_dirs["policy"], tiny_dirs["rm"], "p.jsonl", "o")
    assert (cfg.actor_lr, cfg.ppo_epochs, cfg.clip_range, cfg.max_new_tokens) == (3e-6, 2, 0.1, 7)
    with pytest.raises(rto.UserError, match="unknown setting 'packing'"):  # not ours: an error, not silence
        rto.make_config("sft", data="d.jsonl", out="o", packing=True)


def test_a_hub_dataset_id_offline_is_one_line(tiny_dirs, tmp_path):
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "rto", "dpo", "--model_name_or_path", tiny_dirs["policy"],
                           "--dataset_name", "trl-lib/ultrafeedback_binarized", "--dataset_train_split", "test",
                           "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rto: error: trl-lib/ultrafeedback_binarized: not a data file here, and not a hub dataset")
    assert "split 'test'" in last and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o")


def test_ppo_prompts_from_a_hub_id_offline_is_one_line(tiny_dirs, tmp_path):
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "rto", "ppo", "--sft_model_path", tiny_dirs["policy"],
                           "--reward_model_path", tiny_dirs["rm"], "--dataset_name", "trl-lib/tldr",
                           "--dataset_train_split", "validation", "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("rto: error: trl-lib/tldr: not a data file here")
    assert "split 'validation'" in proc.stderr


TRL_PPO_YAML = """# as TRL's ppo.py example reads it
sft_model_path: {policy}
reward_model_path: {rm}
dataset_name: {prompts}
output_dir: {out}
learning_rate: 3.0e-6
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
num_mini_batches: 2
total_episodes: 16
num_ppo_epochs: 1
response_length: 6
missing_eos_penalty: 1.0
kl_coef: 0.05
vf_coef: 0.1
local_rollout_forward_batch_size: 4
gradient_checkpointing: true
stop_token: eos
eval_strategy: "no"
"""


def test_a_trl_ppo_config_runs_unchanged(tiny_dirs, prompt_file, tmp_path):
    """TRL's PPO batches mapped onto ours: 4 x 2 prompts per rollout, 2 mini-batches, 16 episodes = 2
    iterations; one learning rate for policy and critic."""
    from rto.config import load_yaml

    config = tmp_path / "ppo.yaml"
    config.write_text(TRL_PPO_YAML.format(policy=tiny_dirs["policy"], rm=tiny_dirs["rm"], prompts=prompt_file,
                                          out=tmp_path / "ppo"))
    cfg = rto.make_config("ppo", load_yaml(config))
    assert (cfg.rollout_batch_size, cfg.mini_batch_size, cfg.iterations) == (8, 4, 2)
    assert (cfg.actor_lr, cfg.critic_lr, cfg.max_new_tokens, cfg.score_batch_size) == (3e-6, 3e-6, 6, 4)
    assert cfg.gradient_checkpointing
    assert rto.make_config("ppo", load_yaml(config), rollout_batch_size=16).iterations == 1  # ours win, the rest follows
    proc = subprocess.run([sys.executable, "-m", "rto", "ppo", "--config", str(config), "--eval_every", "0",
                           "--threads", "1"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'vf_coef' (a TRL setting) has no counterpart here; ignored" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    with pytest.raises(rto.UserError, match="num_mini_batches 3 does not divide the rollout of 8"):
        rto.make_config("ppo", load_yaml(config), num_mini_batches=3)
    with pytest.raises(rto.UserError, match="whiten_rewards: not offered"):
        rto.make_config("ppo", load_yaml(config), whiten_rewards=True)
