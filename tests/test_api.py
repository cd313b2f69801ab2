"""The Python API: `import rto` is light, each command runs as a function of the same settings as
its flags, checked the same way, and returns the summary the command prints."""

import json
import subprocess
import sys

import pytest


def test_import_rto_is_light():
    code = (
        "import sys, rto; heavy = [m for m in ('torch', 'transformers', 'trl', 'accelerate') if m in sys.modules]; "
        "print(heavy, sorted(rto.__all__)[:3])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[]")


def test_stages_as_functions(tiny_dirs, prompt_file, tmp_path):
    import rto

    settings = dict(
        policy=tiny_dirs["policy"],
        reward_model=tiny_dirs["rm"],
        dpo_model=tiny_dirs["dpo"],
        prompts=prompt_file,
        out=str(tmp_path / "rto"),
        reward="rto",
        iterations=1,
        rollout_batch_size=4,
        mini_batch_size=4,
        max_new_tokens=4,
        eval_every=0,
        threads=1,
    )
    summary = rto.ppo(**settings)
    assert summary["iterations"] == 1 and summary["reward"] == "rto"
    assert (tmp_path / "rto" / "policy" / "model.safetensors").is_file()
    # A config object, with settings on top; YAML-style strings are read as the command line reads them.
    cfg = rto.make_config("ppo", settings, out=str(tmp_path / "again"), iterations="2")
    assert isinstance(cfg, rto.PPOConfig) and cfg.iterations == 2
    assert rto.ppo(cfg, iterations=1)["iterations"] == 1
    # Any command by name: the task data stage.
    out = rto.run("data", task="keyed", out=str(tmp_path / "data"), n_sft=4, n_rl_prompts=4, n_dev=2, n_test=2)
    assert isinstance(out, dict)
    first = json.loads((tmp_path / "data" / "sft.jsonl").read_text().splitlines()[0])
    assert set(first) >= {"prompt", "completion"}


def test_bad_settings_raise_the_command_lines_one_line_error(tiny_dirs, tmp_path):
    import rto

    with pytest.raises(rto.UserError, match=r"rto.ppo: unknown setting 'actor_learning_rate' \(did you mean actor_lr"):
        rto.ppo(policy=tiny_dirs["policy"], prompts="p.jsonl", out=str(tmp_path), actor_learning_rate=1e-5)
    with pytest.raises(rto.UserError, match="rto.ppo: ppo: --reward rto needs --dpo-model"):
        rto.ppo(
            policy=tiny_dirs["policy"], prompts="p.jsonl", out=str(tmp_path), reward_model=tiny_dirs["rm"], reward="rto"
        )
    with pytest.raises(TypeError, match="not a PPOStageConfig"):
        rto.ppo(rto.make_config("eval", models="sft=b", prompts="p.jsonl", out=str(tmp_path / "e.json")))
    with pytest.raises(ValueError, match="unknown command 'sftt'"):
        rto.run("sftt")


def test_the_usage_pages_python_example_runs(tmp_path, monkeypatch, capsys):
    """docs/usage.md's Python example ("From Python"), as printed there, run as a script of its own
    (a namespace of its own, cwd: a temp dir) in this process."""
    from pathlib import Path

    import torch

    page = (Path(__file__).parent.parent / "docs" / "usage.md").read_text()
    code = page.split("\n## From Python\n")[1].split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, "docs/usage.md", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(1)  # what the example's runs set must not outlive it in this worker
    assert "RTO gold reward (last rollout):" in capsys.readouterr().out
    assert (tmp_path / "runs/api/rto/policy/model.safetensors").is_file()
    assert (tmp_path / "runs/api/dpo_from_objects/metrics.json").is_file()


def test_a_run_leaves_the_callers_global_state_as_it_was(tiny_dirs, prompt_file, tmp_path):
    import random

    import numpy as np
    import torch

    import rto

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    torch.set_num_threads(1)
    before = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    rto.ppo(
        policy=tiny_dirs["policy"],
        reward_model=tiny_dirs["rm"],
        prompts=prompt_file,
        out=str(tmp_path / "o"),
        iterations=1,
        rollout_batch_size=4,
        mini_batch_size=4,
        max_new_tokens=4,
        eval_every=0,
        threads=2,
        seed=7,
    )
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == before
    assert torch.get_num_threads() == 1


def test_one_table_of_commands_feeds_the_cli_the_api_and_the_package():
    """rto.COMMANDS is the single source: each command is a subcommand of `rto`, a function of the
    API and of the package, and its config class is the package's (rto.PPOConfig, ...)."""
    import rto
    from rto import COMMANDS
    from rto.cli import _parser

    subcommands = next(a for a in _parser()._actions if a.dest == "command").choices
    assert list(subcommands) == list(COMMANDS)
    for name, command in COMMANDS.items():
        assert getattr(rto, name).__name__ == name and name in rto.__all__
        assert getattr(rto, command.api_config) is command.config_class()
        assert rto.make_config.__module__ == "rto.api"
        assert command.load()[1].__name__  # the run function imports
