"""What a run shows and leaves: plain progress lines in a log file, model cards with valid hub
metadata and a loading snippet, a distinct style for every method in the figures."""

import json
import os
import subprocess
import sys

import yaml

from tests.test_cli import ENV


def test_progress_in_a_log_file_is_plain_lines(tiny_dirs, prompt_file, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "RTO_PROGRESS"}  # as a user runs it: stderr to a file
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "rto",
                "ppo",
                "--policy",
                tiny_dirs["policy"],
                "--reward-model",
                tiny_dirs["rm"],
                "--prompts",
                prompt_file,
                "--out",
                str(tmp_path / "ppo"),
                "--iterations",
                "2",
                "--rollout-batch-size",
                "4",
                "--mini-batch-size",
                "4",
                "--max-new-tokens",
                "4",
                "--eval-every",
                "0",
                "--threads",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            timeout=300,
            text=True,
        )
    text = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "\r" not in text and "\x1b[" not in text  # no bar redraws, no cursor codes
    assert "[rto] ppo[sparse]: iteration 1/2" in text and "[rto] ppo[sparse]: iteration 2/2" in text
    # stdout is the run's result alone (JSON a program can read); rto ppo draws its own curves.
    result = json.loads(proc.stdout)
    assert result["iterations"] == 2 and result["reward"] == "sparse"
    assert (tmp_path / "ppo" / "training_curve.png").stat().st_size > 1000


def test_stdout_is_the_result_alone_while_trl_logs(tiny_dirs, tmp_path, keyed):
    """TRL prints its log dicts ({'loss': ...}) to stdout when there are no bars; they belong with
    the logs on stderr."""
    from rto.io.data import write_jsonl

    rows = [{"prompt": p, "completion": " a <eos>"} for p in keyed.prompts("train", 8, seed=0)]
    write_jsonl(tmp_path / "sft.jsonl", rows)
    env = {k: v for k, v in ENV.items() if k != "RTO_PROGRESS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rto",
            "sft",
            "--model",
            tiny_dirs["policy"],
            "--data",
            str(tmp_path / "sft.jsonl"),
            "--out",
            str(tmp_path / "sft"),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--logging-steps",
            "1",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'loss'" in proc.stderr or '"loss"' in proc.stderr, "TRL logged nothing: the test proves nothing"
    result = json.loads(proc.stdout)
    assert isinstance(result, dict) and "'loss'" not in proc.stdout


def _card(model_dir):
    text = (model_dir / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    code = text.split("```python\n")[1].split("```")[0]
    return front, code


def test_model_cards_have_valid_metadata_and_a_snippet_that_loads(tiny_dirs, tmp_path):
    import rto
    from rto.lm.model_cards import write_model_card
    from rto.lm.models import load_causal_lm, load_tokenizer, save_model

    out = tmp_path / "model"
    save_model(load_causal_lm(tiny_dirs["policy"]), load_tokenizer(tiny_dirs["policy"]), out)
    cfg = rto.make_config("sft", model=tiny_dirs["policy"], data="d.jsonl", out=str(out))
    write_model_card(out, "sft", cfg, {"train_loss": 1.0})
    front, code = _card(out)
    assert "base_model" not in front and front["library_name"] == "transformers"  # a local path is no hub id
    scope: dict = {}
    exec(code, scope)  # the card's own snippet loads the model
    assert scope["model"].config.vocab_size == load_causal_lm(tiny_dirs["policy"]).config.vocab_size
    write_model_card(
        out, "sft", rto.make_config("sft", model="HuggingFaceTB/SmolLM2-135M", data="d.jsonl", out=str(out)), {}
    )
    assert _card(out)[0]["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert os.path.exists(out / "README.md")


def test_every_method_gets_its_own_style():
    from rto.experiments.report import method_styles

    names = [
        "ppo",
        "rto",
        "dpo-only",
        "ddpo",
        "semi",
        "rs",
        "reinforce++",
        "rto-reinforce++",
        "ppo-dense-gold",
        "ppo+ens",
        "rto+ens",
    ]
    styles = method_styles(names)
    looks = {(s["color"], s["marker"]) for s in styles.values()}
    colours = {s["color"] for s in styles.values()}
    assert len(looks) == len(colours) == len(names)  # no two methods share a colour
    assert styles["ppo"]["color"] != styles["ppo-dense-gold"]["color"]
    assert styles["ppo-dense-gold"]["linestyle"] == "--" and styles["ppo"]["linestyle"] == "-"


def test_help_groups_the_flags_by_purpose_with_their_defaults():
    from rto.cli import _parser

    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    ppo = sub.choices["ppo"].format_help()
    headings = [line[:-1] for line in ppo.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    for group in (
        "models and data",
        "the reward",
        "advantages",
        "optimization",
        "generation",
        "memory",
        "speed",
        "many processes (accelerate launch / torchrun)",
        "logging",
        "checkpoints",
    ):
        assert group in headings, (group, headings)
    flags = [
        a
        for g in sub.choices["ppo"]._action_groups
        for a in g._group_actions
        if a.help and a.help != "==SUPPRESS==" and a.dest not in ("help", "config", "debug", "allow_bin_weights")
    ]
    assert len(flags) > 60
    # A flag with a default says it; an empty default is left unsaid, not printed as "(default: )".
    import dataclasses

    from rto.rl.config import PPOStageConfig

    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(PPOStageConfig)
    }
    for a in flags:
        shown = defaults.get(a.dest) not in ("", None, [], {})
        assert ("(default:" in a.help) == shown or a.dest not in defaults, (a.dest, a.help)
        assert "(default: )" not in a.help
    dpo = sub.choices["dpo"].format_help()
    assert "dpo settings:" in dpo and "memory and speed:" in dpo
