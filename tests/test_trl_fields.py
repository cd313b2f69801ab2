"""Every field of TRL's configs has one decision (rto/io/trl_tables.py); YAML files written by TRL's own
dataclasses run unchanged; the doc is the tables'."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import rto
from rto.io.trl_fields import Hook, Ignore, Map, Refuse, normalised, same
from rto.io.trl_stage_tables import LEGACY, PPO_LEGACY, STAGE_TABLES, TRL112_PPO_DEFAULTS, markdown

ROOT = Path(__file__).resolve().parents[1]
# Decided to differ from TRL's default without an error, with a notice even at that default.
NOTICED_AT_DEFAULT = {"lora_dropout"}


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
    cls = {"sft": SFTConfig, "rm": RewardConfig, "dpo": DPOConfig}[stage]
    out.update({f.name: _default(f) for f in dataclasses.fields(cls)})
    return out


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_every_trl_field_has_exactly_one_decision(stage):
    fields, table = trl_fields(stage), STAGE_TABLES[stage]
    undecided = sorted(set(fields) - set(table))
    assert not undecided, f"TRL fields without a decision in rto/io/trl_tables.py ({stage}): {undecided}"
    extra = set(table) - set(fields) - set(LEGACY) - set(PPO_LEGACY)
    assert not extra, f"decisions for fields TRL does not have ({stage}): {sorted(extra)}"
    for name, decision in table.items():
        assert isinstance(decision, (Map, Ignore, Refuse, Hook)), name


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_trl_defaults_are_never_refused(stage):
    """The `ok` values hold TRL's default (the dataclass's, and its to_dict() spelling), so a TRL
    YAML at its defaults is accepted, and an ignored field at a default that matches ours is quiet."""
    table = STAGE_TABLES[stage]
    dumped = dump(stage)
    for name, default in trl_fields(stage).items():
        decision = table[name]
        if isinstance(decision, Refuse) or (isinstance(decision, Ignore) and name not in NOTICED_AT_DEFAULT):
            assert same(default, decision.ok), (name, default, decision.ok)
            if name in dumped:
                assert same(dumped[name], decision.ok), (name, dumped[name], decision.ok)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_mapped_fields_name_our_settings(stage):
    from rto.api import command_parts

    ours = {f.name for f in dataclasses.fields(command_parts(stage)[0])}
    for name, decision in STAGE_TABLES[stage].items():
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
    for table in STAGE_TABLES.values():
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
