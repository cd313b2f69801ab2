"""Every field of TRL's configs has one decision (rto/io/trl_tables.py); YAML files written by TRL's own
dataclasses run unchanged; the doc is the tables'."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import rto
from rto.io.trl_fields import Hook, Ignore, Map, Refuse, normalised, same
from rto.io.trl_stage_tables import LEGACY, PPO_DIALECTS, PPO_LEGACY, STAGE_TABLES, TRL112_PPO_DEFAULTS, markdown

ROOT = Path(__file__).resolve().parents[1]
# Decided to differ from TRL's default without an error, with a notice even at that default.
NOTICED_AT_DEFAULT = {"lora_dropout", "disable_dropout"}
TABLES = {**STAGE_TABLES, "grpo": PPO_DIALECTS["grpo"], "rloo": PPO_DIALECTS["rloo"]}  # rto ppo reads all three
COMMAND = {"grpo": "ppo", "rloo": "ppo"}


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def trl_fields(stage: str) -> dict:
    """{field: TRL's default} for everything a TRL script reads for `stage`."""
    from trl import DPOConfig, ModelConfig, RewardConfig, ScriptArguments, SFTConfig

    out = {f.name: _default(f) for cls in (ScriptArguments, ModelConfig) for f in dataclasses.fields(cls)}
    if stage == "ppo":
        try:  # TRL 1.12's; gone from TRL 1.16, whose TrainingArguments base it then shares
            from trl.experimental.ppo import PPOConfig

            out.update({f.name: _default(f) for f in dataclasses.fields(PPOConfig)})
        except ImportError:
            from trl.trainer.base_config import _BaseConfig

            out.update({f.name: _default(f) for f in dataclasses.fields(_BaseConfig)})
            out.update(TRL112_PPO_DEFAULTS)
        return out
    if stage in ("grpo", "rloo"):
        from trl import GRPOConfig, RLOOConfig
        from trl.scripts.grpo import GRPOScriptArguments

        out.update({f.name: _default(f) for f in dataclasses.fields(GRPOScriptArguments)})
        cls = {"grpo": GRPOConfig, "rloo": RLOOConfig}[stage]
    else:
        cls = {"sft": SFTConfig, "rm": RewardConfig, "dpo": DPOConfig}[stage]
    out.update({f.name: _default(f) for f in dataclasses.fields(cls)})
    return out


@pytest.mark.parametrize("stage", list(TABLES))
def test_every_trl_field_has_exactly_one_decision(stage):
    fields, table = trl_fields(stage), TABLES[stage]
    undecided = sorted(set(fields) - set(table))
    assert not undecided, f"TRL fields without a decision in rto/io/trl_tables.py ({stage}): {undecided}"
    extra = set(table) - set(fields) - set(LEGACY) - set(PPO_LEGACY)
    assert not extra, f"decisions for fields TRL does not have ({stage}): {sorted(extra)}"
    for name, decision in table.items():
        assert isinstance(decision, (Map, Ignore, Refuse, Hook)), name


@pytest.mark.parametrize("stage", list(TABLES))
def test_trl_defaults_are_never_refused(stage):
    """The `ok` values hold TRL's default (the dataclass's, and its to_dict() spelling), so a TRL
    YAML at its defaults is accepted, and an ignored field at a default that matches ours is quiet."""
    table = TABLES[stage]
    dumped = dump(stage)
    for name, default in trl_fields(stage).items():
        decision = table[name]
        if isinstance(decision, Refuse) or (isinstance(decision, Ignore) and name not in NOTICED_AT_DEFAULT):
            assert same(default, decision.ok), (name, default, decision.ok)
            if name in dumped:
                assert same(dumped[name], decision.ok), (name, dumped[name], decision.ok)


@pytest.mark.parametrize("stage", list(TABLES))
def test_mapped_fields_name_our_settings(stage):
    from rto.api import command_parts

    ours = {f.name for f in dataclasses.fields(command_parts(COMMAND.get(stage, stage))[0])}
    for name, decision in TABLES[stage].items():
        if isinstance(decision, Map) and decision.target:
            assert decision.target in ours, (stage, name, decision.target)
        if name in ours:  # a setting of ours with TRL's name must mean what TRL's does (build reads it as ours)
            assert isinstance(decision, Map) and decision.target in (name, ""), (stage, name)


def test_the_doc_is_the_tables():
    doc = (ROOT / "docs" / "trl-compatibility.md").read_text()
    assert doc == markdown(), (
        "regenerate: python -c 'from rto.io.trl_stage_tables import markdown; print(markdown())' "
        "> docs/trl-compatibility.md"
    )
    for table in TABLES.values():
        for name in table:
            assert f"| `{name}` |" in doc


def dump(stage: str, **user) -> dict:
    """A YAML as a TRL user writes it from TRL's own dataclasses: every field, a few set."""
    from trl import DPOConfig, ModelConfig, RewardConfig, ScriptArguments, SFTConfig

    script = dataclasses.asdict(ScriptArguments(dataset_name=user.pop("dataset_name", None)))
    model = dataclasses.asdict(ModelConfig(model_name_or_path=user.pop("model_name_or_path", None)))
    if stage == "ppo":
        from trl.trainer.base_config import _BaseConfig

        ppo_own = {k: user.pop(k) if k in user else v for k, v in TRL112_PPO_DEFAULTS.items()}
        args = _BaseConfig(bf16=False, learning_rate=ppo_own["learning_rate"], **user).to_dict()
        # PPOConfig.to_dict() masks every *_token field, as TrainingArguments.to_dict() does
        args.update({k: f"<{k.upper()}>" if k.endswith("_token") else v for k, v in ppo_own.items()})
    elif stage in ("grpo", "rloo"):
        from trl import GRPOConfig, RLOOConfig

        script["reward_model_name_or_path"] = user.pop("reward_model_name_or_path", None)
        script["reward_funcs"] = None
        args = {"grpo": GRPOConfig, "rloo": RLOOConfig}[stage](bf16=False, **user).to_dict()
    else:
        cls = {"sft": SFTConfig, "rm": RewardConfig, "dpo": DPOConfig}[stage]
        args = cls(bf16=False, **user).to_dict()  # bf16 off: a CPU machine
    return yaml.safe_load(yaml.safe_dump({**script, **model, **args}))


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_a_yaml_written_by_trls_dataclasses_runs_unchanged(tiny_dirs, prefs, tmp_path, stage, run_rto):
    data = prefs
    if stage == "sft":  # the keyed tokenizer has no chat template: TRL's {text} rows
        data = tmp_path / "text.jsonl"
        data.write_text("".join(json.dumps({"text": f"s{i} <sep> s{i + 1} <eos>"}) + "\n" for i in range(8)))
    values = dump(
        stage,
        output_dir=str(tmp_path / stage),
        model_name_or_path=tiny_dirs["policy"],
        dataset_name=str(data),
        learning_rate=1e-4,
        num_train_epochs=1,
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
    )
    assert set(values) == set(trl_fields(stage))  # every field
    config = tmp_path / f"{stage}.yaml"
    config.write_text(yaml.safe_dump(values))
    proc = run_rto(stage, "--config", str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora_dropout" not in proc.stderr  # use_peft false: TRL's lora_* settings are not read
    logs = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2]
    rates = [r["learning_rate"] for r in logs if "learning_rate" in r]
    assert rates[0] > rates[1] and rates[0] <= 1e-4  # TRL's linear schedule from 1e-4, no warm-up


def test_a_trl_ppo_yaml_runs_unchanged(tiny_dirs, prompt_file, tmp_path, run_rto):
    values = dump(
        "ppo",
        output_dir=str(tmp_path / "ppo"),
        sft_model_path=tiny_dirs["policy"],
        reward_model_path=tiny_dirs["rm"],
        dataset_name=prompt_file,
        total_episodes=8,
        per_device_train_batch_size=4,
        response_length=4,
        num_ppo_epochs=1,
    )
    assert set(values) == set(trl_fields("ppo")) and values["logging_steps"] == 10
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump(values))
    cfg = rto.make_config("ppo", values)
    assert (cfg.iterations, cfg.rollout_batch_size, cfg.mini_batch_size, cfg.lr_schedule) == (2, 4, 4, "linear")
    assert (cfg.actor_lr, cfg.critic_lr, cfg.temperature, cfg.adam_beta2, cfg.warmup_ratio) == (
        3e-6,
        3e-6,
        0.7,
        0.999,
        0.0,
    )
    proc = run_rto("ppo", "--config", str(config), "--eval-every", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]


def test_norm_reads_yaml_flag_and_to_dict_spellings_alike():
    assert same("1e-8", (1e-8,)) and same("false", (False,)) and same("<EOS_TOKEN>", (None,))
    assert same([], (None,)) and same("none", (None,)) and not same(True, (1,)) and not same(0.1, (0.0,))
    assert normalised(["sigmoid"]) == ["sigmoid"]


def test_a_trl_grpo_yaml_runs_unchanged_without_a_critic(tiny_dirs, prompt_file, tmp_path, run_rto):
    """GRPOConfig's own dump, every field: read as GRPO (no critic), TRL's batch arithmetic in
    completions, its KL in the loss, clip-higher, its loss_type, num_train_epochs over the prompts."""
    values = dump(
        "grpo",
        output_dir=str(tmp_path / "grpo"),
        model_name_or_path=tiny_dirs["policy"],
        reward_model_name_or_path=tiny_dirs["rm"],
        dataset_name=prompt_file,
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        num_train_epochs=0.25,
        max_completion_length=4,
        beta=0.04,
        epsilon_high=0.28,
        loss_type="dr_grpo",
        gradient_checkpointing=False,
    )
    assert set(values) == set(trl_fields("grpo"))
    cfg = rto.make_config("ppo", values)
    assert (cfg.estimator, cfg.needs_critic, cfg.num_generations) == ("grpo", False, 4)
    assert (cfg.rollout_batch_size, cfg.mini_batch_size, cfg.micro_batch_size, cfg.prompt_epochs) == (16, 8, 4, 0.25)
    assert (cfg.kl_coef, cfg.kl_loss_coef, cfg.clip_range, cfg.clip_range_high) == (0.0, 0.04, 0.2, 0.28)
    assert (cfg.loss_agg, cfg.scale_rewards, cfg.actor_lr, cfg.max_new_tokens) == (
        "seq-mean-token-sum",
        "group",
        1e-6,
        4,
    )
    config = tmp_path / "grpo.yaml"
    config.write_text(yaml.safe_dump(values))
    proc = run_rto("ppo", "--config", str(config), "--eval-every", "0", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read as TRL's GRPOConfig" in proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]  # 0.25 x 32 prompts x 4 responses / 16 per rollout
    assert not (tmp_path / "grpo" / "critic").exists()


def test_an_rloo_yaml_is_read_as_rloo_and_max_steps_counts_optimizer_steps():
    values = dump("rloo", num_generations=4, per_device_train_batch_size=4, steps_per_generation=4, max_steps=6)
    cfg = rto.make_config("ppo", {**values, "policy": "p", "reward_model": "r", "prompts": "x.jsonl", "out": "o"})
    assert (cfg.estimator, cfg.kl_coef, cfg.kl_loss_coef, cfg.loss_agg) == ("rloo", 0.05, 0.0, "seq-mean-token-sum")
    # a rollout of 16, optimizer steps of 4: 4 steps per iteration, 6 steps -> 2 iterations
    assert (cfg.rollout_batch_size, cfg.mini_batch_size, cfg.iterations) == (16, 4, 2)
    grpo_looking = {
        "num_generations": 4,
        "beta": 0.1,
        "estimator": "rloo",
        "policy": "p",
        "prompts": "x.jsonl",
        "out": "o",
    }
    assert rto.make_config("ppo", {**grpo_looking, "reward_model": "r"}).kl_coef == 0.1  # RLOO's place for beta
    minimal = rto.make_config("ppo", {"beta": 0.04, "policy": "p", "reward_model": "r", "prompts": "x", "out": "o"})
    assert (minimal.estimator, minimal.num_generations) == ("grpo", 8)  # TRL's default group of a GRPOConfig
    plain = rto.make_config(
        "ppo", {"num_generations": 4, "policy": "p", "reward_model": "r", "prompts": "x.jsonl", "out": "o"}
    )
    assert (plain.estimator, plain.kl_coef) == ("gae", 0.01)  # our own settings alone: not a GRPO file


def test_grpo_refusals_come_together_in_one_error():
    values = {"beta": 0.0, "loss_type": "cispo", "importance_sampling_level": "sequence", "reward_funcs": ["x.y"]}
    with pytest.raises(rto.UserError) as e:
        rto.make_config("ppo", {**values, "policy": "p", "reward_model": "r", "prompts": "x.jsonl", "out": "o"})
    lines = str(e.value).splitlines()
    assert lines[0] == "3 settings cannot be used:"
    assert any("loss_type 'cispo'" in line for line in lines) and any("reward_funcs" in line for line in lines)
