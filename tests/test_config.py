"""Config loading: YAML + flags, and one-line errors for bad values."""

import pytest

from rto.io.config import build, load_yaml
from rto.io.errors import UserError
from rto.rl.trainer import PPOStageConfig

REQUIRED = {"policy": "p", "prompts": "x.jsonl", "out": "o", "reward_model": "rm"}


def test_build_coerces_strings_from_the_command_line():
    cfg = build(
        PPOStageConfig,
        {
            **REQUIRED,
            "actor_lr": "1e-5",
            "iterations": "7",
            "whiten_advantages": "false",
            "dpo_clip": "none",
            "reward": "sparse",
        },
        "cli",
    )
    assert cfg.actor_lr == 1e-5 and cfg.iterations == 7 and cfg.whiten_advantages is False and cfg.dpo_clip is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"actor_lr": -1.0}, "actor_lr: must be > 0"),
        ({"clip_range": 0}, "clip_range: must be > 0"),
        ({"beta1": -0.1}, "beta1: must be >= 0"),
        ({"iterations": "ten"}, "iterations: expected int"),
        ({"reward": "dense"}, "reward: must be one of"),
        ({"actor_lrr": 1e-5}, "unknown setting 'actor_lrr'"),
        ({"reward": "rto"}, "needs --dpo-model"),
        ({"rollout_batch_size": 10, "mini_batch_size": 4}, "multiple of --mini-batch-size"),
    ],
)
def test_bad_values_raise_one_line(values, message):
    with pytest.raises(UserError, match=message) as e:
        build(PPOStageConfig, {**REQUIRED, **values}, "my.yaml")
    assert "\n" not in str(e.value) and str(e.value).startswith("my.yaml")


def test_load_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_yaml(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_yaml(binary)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_yaml(lst)
    with pytest.raises(UserError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_pipeline_set_overrides_and_bad_section_keys(tmp_path):
    from rto.cli import _pipeline_sets
    from rto.experiments.pipeline import Pipeline
    from rto.experiments.pipeline_config import PipelineConfig

    sets = _pipeline_sets(["ppo.actor_lr=1e-5", "ppo.whiten_advantages=false", "method_overrides.rto.beta1=0.2"])
    # YAML reads 1e-5 as a string; the config build coerces it like any command-line value.
    assert float(sets["ppo"]["actor_lr"]) == 1e-5 and sets["ppo"]["whiten_advantages"] is False
    assert sets["method_overrides"] == {"rto": {"beta1": 0.2}}
    with pytest.raises(UserError, match="expected SECTION.KEY=VALUE"):
        _pipeline_sets(["actor_lr=1"])
    # A typo in a stage section stops the config itself, before any stage runs in a child process.
    with pytest.raises(UserError, match=r"pipeline: ppo: unknown setting 'actor_lrr' \(did you mean actor_lr"):
        build(PipelineConfig, {"out": str(tmp_path), "ppo": {"actor_lrr": 1.0}}, "x.yaml")
    with pytest.raises(UserError, match="pipeline: sft: epochs: expected"):
        build(PipelineConfig, {"out": str(tmp_path), "sft": {"epochs": "many"}}, "x.yaml")
    with pytest.raises(UserError, match="pipeline: method_overrides.rto: beta1: must be >= 0"):
        build(PipelineConfig, {"out": str(tmp_path), "method_overrides": {"rto": {"beta1": -1}}}, "x.yaml")
    good = Pipeline(
        build(
            PipelineConfig,
            {"out": str(tmp_path), "ppo": sets["ppo"], "method_overrides": sets["method_overrides"]},
            "x.yaml",
        )
    )
    (tmp_path / "dpo").mkdir()  # the pipeline wires OUT/dpo in once DPO has run
    _, _, rto_cfg = good.rl_job("rto", "rto")
    assert rto_cfg.actor_lr == 1e-5 and rto_cfg.beta1 == 0.2 and rto_cfg.whiten_advantages is False
    with pytest.raises(UserError, match="method_overrides names 'magic'"):
        build(PipelineConfig, {"out": "o", "method_overrides": {"magic": {}}}, "x.yaml")


def test_the_old_names_of_score_settings_are_refused():
    """`reward_clip` / `normalize_reward` were renamed `score_clip` / `normalize_score` (they act on
    the RM's score); the shim that still read the old names is gone, so a config that uses them
    stops with one line naming the setting instead of running with the default."""
    for old in ("reward_clip", "normalize_reward"):
        with pytest.raises(UserError, match=f"old.yaml: unknown setting '{old}'"):
            build(PPOStageConfig, {**REQUIRED, old: 3.0 if old == "reward_clip" else False}, "old.yaml")


def test_choices_come_from_the_reward_registry():
    from rto.core.rewards import PLACEMENTS
    from rto.experiments.pipeline_config import RL_METHODS

    for name, placement in PLACEMENTS.items():
        assert build(PPOStageConfig, {**REQUIRED, "reward": name, "dpo_model": "d"}, "x").reward == name
        assert RL_METHODS[placement.method]["reward"] == name


@pytest.mark.parametrize(
    "field, registry",
    [("estimator", "ESTIMATORS"), ("kl_estimator", "KL_ESTIMATORS"), ("ensemble_reduce", "ENSEMBLE_REDUCTIONS")],
)
def test_the_other_choices_come_from_their_registries(field, registry):
    """A name added to a core registry is a valid setting (and a --help choice) at once; a name
    not in it is refused in one line."""
    import dataclasses

    import rto.core.advantages
    import rto.core.rewards

    module = rto.core.advantages if registry == "ESTIMATORS" else rto.core.rewards
    names = tuple(getattr(module, registry))
    choices = next(f for f in dataclasses.fields(PPOStageConfig) if f.name == field).metadata["choices"]
    assert tuple(choices) == names
    for name in names:
        groups = {"num_generations": 2} if field == "estimator" and module.ESTIMATORS[name].needs_groups else {}
        assert getattr(build(PPOStageConfig, {**REQUIRED, field: name, **groups}, "x"), field) == name
    with pytest.raises(UserError, match=f"x: {field}: must be one of"):
        build(PPOStageConfig, {**REQUIRED, field: "nope"}, "x")


def test_a_mapping_on_the_command_line():
    """`--columns '{prompt: question}'` (as the README shows it), JSON, or key=value pairs; through
    the real parser, then build."""
    from rto.cli import _parser
    from rto.io.config import from_sources

    for text in ("{prompt: question}", '{"prompt": "question"}', "prompt=question", "prompt = question ,"):
        args = _parser().parse_args(
            ["ppo", "--policy", "p", "--prompts", "x.jsonl", "--out", "o", "--reward-model", "r", "--columns", text]
        )
        values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "debug", "allow_bin_weights")}
        cfg = from_sources(PPOStageConfig, {}, "", values)
        assert cfg.columns == {"prompt": "question"}, text
    with pytest.raises(UserError, match="columns: expected dict, got 'question'"):
        build(PPOStageConfig, {"columns": "question"}, "ppo")
