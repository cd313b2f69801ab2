"""A TRL user's habits: their YAML config's keys, their underscore flags, their training knobs
(bf16, gradient accumulation and checkpointing, max_steps, logging), a hub dataset id."""

import argparse
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


def test_a_trl_dpo_config_and_flags_run_as_they_are(tiny_dirs, prefs, tmp_path, run_rto):
    config = tmp_path / "dpo.yaml"
    config.write_text(TRL_DPO_YAML.format(model=tiny_dirs["policy"], data=prefs, out=tmp_path / "dpo"))
    from rto.io.config import load_yaml

    cfg = rto.make_config("dpo", load_yaml(config))
    assert (cfg.model, cfg.data, cfg.out) == (tiny_dirs["policy"], str(prefs), str(tmp_path / "dpo"))
    assert (cfg.learning_rate, cfg.epochs, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (
        5e-7,
        1.0,
        4,
        2,
    )
    assert (cfg.gradient_checkpointing, cfg.precision, cfg.lora_r, cfg.beta) == (True, "bf16", 8, 0.1)
    assert rto.make_config("dpo", load_yaml(config), lora_r=0).lora_r == 0  # our own name wins over use_peft
    from rto.stages.common import trl_common_args

    args = trl_common_args(cfg, cfg.out)
    assert (args["bf16"], args["gradient_accumulation_steps"], args["gradient_checkpointing"]) == (True, 2, True)
    assert args["per_device_train_batch_size"] == 4  # TRL's meaning of its own key
    assert trl_common_args(rto.make_config("dpo", load_yaml(config), precision="auto"), "o")["bf16"] is False  # no GPU

    # The command line, TRL-style flags on top (bf16 off: this CPU run stays fp32).
    proc = run_rto(
        "dpo",
        "--config",
        str(config),
        "--no-bf16",
        "--max_steps",
        "2",
        "--logging_steps=1",
        "--output_dir",
        str(tmp_path / "dpo2"),
        "--threads",
        "1",
    )
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
hub_model_id: me/sft
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
def test_trl_sft_and_reward_configs_run_unchanged(tiny_dirs, prefs, tmp_path, stage, text, run_rto):
    data = prefs
    if stage == "sft":
        data = tmp_path / "sft_text.jsonl"  # the keyed tokenizer has no chat template: TRL's {text} rows
        data.write_text("".join(json.dumps({"text": f"s{i} <sep> s{i + 1} <eos>"}) + "\n" for i in range(8)))
    config = tmp_path / f"{stage}.yaml"
    config.write_text(text.format(model=tiny_dirs["policy"], data=data, out=tmp_path / stage))
    proc = run_rto(stage, "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    if stage == "sft":  # at TRL's default ("no"), eval_strategy needs no notice; a hub id does
        assert "TRL settings with no counterpart here, ignored: hub_model_id" in proc.stderr
    assert "eval_strategy" not in proc.stderr
    assert (tmp_path / stage / "metrics.json").is_file() and (tmp_path / stage / "README.md").is_file()


def test_one_meaning_of_batch_size(tiny_dirs):
    """--batch-size is the global batch in every stage (rto ppo's are too); TRL's per-device key keeps its meaning."""
    from rto.stages.common import trl_common_args

    cfg = rto.make_config("dpo", model="m", data="d.jsonl", out="o", batch_size=8, gradient_accumulation_steps=2)
    assert trl_common_args(cfg, "o")["per_device_train_batch_size"] == 4
    with pytest.raises(rto.UserError, match=r"--batch-size \(7\) is the global batch: it must be a multiple"):
        rto.make_config("dpo", model="m", data="d.jsonl", out="o", batch_size=7, gradient_accumulation_steps=2)


def test_ppo_reads_trl_ppo_names_and_unknown_keys_still_stop(tiny_dirs):
    cfg = rto.make_config(
        "ppo",
        {
            "sft_model_path": tiny_dirs["policy"],
            "reward_model_path": tiny_dirs["rm"],
            "dataset_name": "p.jsonl",
            "output_dir": "o",
            "learning_rate": 3e-6,
            "num_ppo_epochs": 2,
            "cliprange": 0.1,
            "response_length": 7,
        },
    )
    assert (cfg.policy, cfg.reward_model, cfg.prompts, cfg.out) == (
        tiny_dirs["policy"],
        tiny_dirs["rm"],
        "p.jsonl",
        "o",
    )
    assert (cfg.actor_lr, cfg.ppo_epochs, cfg.clip_range, cfg.max_new_tokens) == (3e-6, 2, 0.1, 7)
    with pytest.raises(rto.UserError, match="packing: packing is not offered for sft"):  # an error, not silence
        rto.make_config("sft", data="d.jsonl", out="o", packing=True)
    with pytest.raises(rto.UserError, match="unknown setting 'packing_mode'"):
        rto.make_config("sft", data="d.jsonl", out="o", packing_mode=True)


def test_a_hub_dataset_id_offline_is_one_line(tiny_dirs, tmp_path):
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rto",
            "dpo",
            "--model_name_or_path",
            tiny_dirs["policy"],
            "--dataset_name",
            "trl-lib/ultrafeedback_binarized",
            "--dataset_train_split",
            "test",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rto: error: trl-lib/ultrafeedback_binarized: not a data file here, and not a hub dataset")
    assert "split 'test'" in last and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o")


def test_ppo_prompts_from_a_hub_id_offline_is_one_line(tiny_dirs, tmp_path):
    env = {**ENV, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rto",
            "ppo",
            "--sft_model_path",
            tiny_dirs["policy"],
            "--reward_model_path",
            tiny_dirs["rm"],
            "--dataset_name",
            "trl-lib/tldr",
            "--dataset_train_split",
            "validation",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
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
vf_coef: 0.5
local_rollout_forward_batch_size: 4
gradient_checkpointing: true
stop_token: eos
eval_strategy: "no"
"""


def test_a_trl_ppo_config_runs_unchanged(tiny_dirs, prompt_file, tmp_path, run_rto):
    """TRL's PPO batches mapped onto ours: 4 x 2 prompts per rollout, 2 mini-batches, 16 episodes = 2
    iterations; one learning rate for policy and critic."""
    from rto.io.config import load_yaml

    config = tmp_path / "ppo.yaml"
    config.write_text(
        TRL_PPO_YAML.format(policy=tiny_dirs["policy"], rm=tiny_dirs["rm"], prompts=prompt_file, out=tmp_path / "ppo")
    )
    cfg = rto.make_config("ppo", load_yaml(config))
    assert (cfg.rollout_batch_size, cfg.mini_batch_size, cfg.iterations) == (8, 4, 2)
    assert (cfg.actor_lr, cfg.critic_lr, cfg.max_new_tokens, cfg.score_batch_size) == (3e-6, 3e-6, 6, 4)
    assert cfg.gradient_checkpointing
    assert (
        rto.make_config("ppo", load_yaml(config), rollout_batch_size=16).iterations == 1
    )  # ours win, the rest follows
    proc = run_rto("ppo", "--config", str(config), "--eval_every", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TRL settings with no counterpart here, ignored: vf_coef" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    with pytest.raises(rto.UserError, match="num_mini_batches 3 does not divide the rollout of 8"):
        rto.make_config("ppo", load_yaml(config), num_mini_batches=3)
    with pytest.raises(rto.UserError, match="whiten_rewards: not offered"):
        rto.make_config("ppo", load_yaml(config), whiten_rewards=True)


# --- the reviewer's findings (issue 20, item 3) ---------------------------------------------
PPO_REQUIRED = {"policy": "p", "prompts": "x.jsonl", "out": "o", "reward_model": "r"}


def test_harmless_and_default_trl_settings_are_read(capsys):
    """logging_steps in ppo; TRL's defaults (packing false, assistant_only_loss false, ...) are
    never errors; a harmless setting away from our behaviour is named in one notice line."""
    cfg = rto.make_config(
        "ppo",
        {
            **PPO_REQUIRED,
            "logging_steps": 10,
            "ds3_gather_for_generation": True,
            "dataset_test_split": "test",
            "num_train_epochs": 3.0,
        },
    )
    assert cfg.iterations == 100 and capsys.readouterr().err == ""  # TRL's defaults: not a word
    rto.make_config("ppo", {**PPO_REQUIRED, "logging_steps": 1, "ds3_gather_for_generation": False})
    assert "ignored: logging_steps, ds3_gather_for_generation" in capsys.readouterr().err
    # num_train_epochs counts only without total_episodes (as in TRL); alone, it is passes over the prompts.
    assert rto.make_config("ppo", {**PPO_REQUIRED, "num_train_epochs": 1, "total_episodes": 128}).iterations == 2
    assert rto.make_config("ppo", {**PPO_REQUIRED, "num_train_epochs": 2}).prompt_epochs == 2
    sft = rto.make_config(
        "sft",
        data="d.jsonl",
        out="o",
        packing=False,
        assistant_only_loss=False,
        lr_scheduler_type="linear",
        dataset_test_split="test",
        completion_only_loss=None,
    )
    assert sft.lr_schedule == "linear"
    common = {"model": "m", "data": "d.jsonl", "out": "o", "disable_dropout": True}
    assert rto.make_config("rm", common, center_rewards_coefficient=None).center_rewards_coefficient is None
    assert rto.make_config("rm", common, center_rewards_coefficient=0.01).center_rewards_coefficient == 0.01
    assert rto.make_config("dpo", common, loss_type=["sigmoid"]).beta == 0.1
    assert capsys.readouterr().err == ""


def test_unknown_keys_get_suggestions_by_meaning_not_spelling():
    with pytest.raises(rto.UserError) as e:
        rto.make_config("ppo", {**PPO_REQUIRED, "value_model_path": "v"})
    assert str(e.value) == "rto.ppo: unknown setting 'value_model_path' (did you mean critic?)"
    with pytest.raises(rto.UserError) as e:
        rto.make_config("ppo", {**PPO_REQUIRED, "valley": 1})
    assert str(e.value) == "rto.ppo: unknown setting 'valley'"  # no value_clip from its first letters
    with pytest.raises(rto.UserError, match=r"'kl_coeff' \(did you mean kl_coef\?\)"):
        rto.make_config("ppo", {**PPO_REQUIRED, "kl_coeff": 0.1})


def test_every_refusal_of_a_file_is_reported_in_one_run(tmp_path, run_rto):
    config = tmp_path / "sft.yaml"
    config.write_text(
        "dataset_name: d.jsonl\noutput_dir: o\npacking: true\nfp16: true\nassistant_only_loss: true\n"
        "lr_scheduler_type: polynomial\nnum_epochs: 2\nlogging_steps: 1\ntorch_compile: false\n"
    )
    proc = run_rto("sft", "--config", str(config))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr
    assert f"rto: error: 5 settings cannot be used:\n{config}: packing: packing is not offered" in err
    for line in (
        f"{config}: fp16: fp16 is not offered",
        f"{config}: assistant_only_loss: the loss covers",
        f"{config}: lr_scheduler_type 'polynomial': not offered",
        f"{config}: unknown setting 'num_epochs' (did you mean epochs?)",
    ):
        assert line in err, line
    assert "logging_steps" not in err and "torch_compile" not in err


@pytest.mark.parametrize(
    "trl_name, at_step_2", [("linear", 0.8), ("cosine", 0.9045), ("constant", 1.0), (None, 0.9140)]
)
def test_the_learning_rate_schedule_is_honoured(trl_name, at_step_2):
    """TRL's lr_scheduler_type, as TRL means it (cosine: to 0), in rto ppo's schedule and in the
    TRL stages' arguments; without it ppo decays by cosine to 10% (the stated default)."""
    import torch
    from transformers import get_scheduler

    from rto.rl.models import make_optimizer
    from rto.stages.common import trl_common_args

    trl = {"lr_scheduler_type": trl_name} if trl_name else {}
    cfg = rto.make_config("ppo", {**PPO_REQUIRED, **trl, "warmup_steps": 0})
    opt, sched = make_optimizer(torch.nn.Linear(2, 2), 1.0, cfg, total_steps=10)
    rates = []
    for _ in range(10):
        opt.step()
        sched.step()
        rates.append(opt.param_groups[0]["lr"])
    assert rates[1] == pytest.approx(at_step_2, abs=1e-3)
    assert rates[-1] == pytest.approx({"linear": 0.0, "cosine": 0.0, "constant": 1.0, None: 0.1}[trl_name], abs=1e-6)
    # sft/rm/dpo: the same name reaches TRL's trainer, whose scheduler gives the same rates.
    sft = rto.make_config("sft", {"data": "d.jsonl", "out": "o", **trl, "warmup_steps": 0, "learning_rate": 1.0})
    args = trl_common_args(sft, "o")
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    sched = get_scheduler(args["lr_scheduler_type"], opt, num_warmup_steps=0, num_training_steps=10)
    sched.step()
    sched.step()
    tail = {None: 0.9045}.get(trl_name, at_step_2)  # the TRL stages' own default: cosine to 0
    assert opt.param_groups[0]["lr"] == pytest.approx(tail, abs=1e-3)


def test_help_groups_flags_where_users_look():
    from rto.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for stage in ("sft", "rm", "dpo", "ppo"):
        text = sub.choices[stage].format_help()
        assert "(default: )" not in text and "(default: [])" not in text
        groups = {g.title: [a.dest for a in g._group_actions] for g in sub.choices[stage]._action_groups}
        where = {dest: title for title, dests in groups.items() for dest in dests}
        assert where["seed"] == "optimization" and where["threads"] in ("speed", "memory and speed"), stage
        assert "--fp16" not in text and "--push-to-hub" not in text  # TRL's own flags parse, hidden
    args = sub.choices["sft"].parse_args(["--push-to-hub", "--no-bf16", "--lr-scheduler-type", "linear"])
    assert (args.push_to_hub, args.bf16, args.lr_scheduler_type) == (True, False, "linear")
