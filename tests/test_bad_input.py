"""Every class of bad input ends with one line naming what and where, exit code 2, no traceback,
and nothing already written is lost. Runs the real `rto` entry point in-process."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rto.cli import main
from rto.io.data import PREFERENCE_FIELDS, PROMPT_FIELDS, SFT_FIELDS, read_jsonl
from rto.io.errors import UserError


def _fails(capsys, args, *messages):
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for m in messages:
        assert m in err, err
    return err


@pytest.fixture
def ppo_args(tiny_dirs, prompt_file, tmp_path):
    def make(**over):
        base = {
            "--policy": tiny_dirs["policy"],
            "--reward-model": tiny_dirs["rm"],
            "--dpo-model": tiny_dirs["dpo"],
            "--prompts": prompt_file,
            "--out": str(tmp_path / "out"),
            "--reward": "rto",
            "--iterations": "1",
            "--rollout-batch-size": "4",
            "--mini-batch-size": "4",
            "--max-new-tokens": "4",
            "--eval-every": "0",
            "--threads": "1",
        }
        base.update(over)
        return ["ppo", *[x for kv in base.items() for x in kv]]

    return make


def test_unknown_config_key(capsys, tmp_path, ppo_args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("actor_lrr: 0.1\n")
    _fails(capsys, [*ppo_args(), "--config", cfg], str(cfg), "unknown setting 'actor_lrr'", "actor_lr")


def test_wrong_type(capsys, tmp_path, ppo_args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ppo_epochs: many\n")
    _fails(capsys, [*ppo_args(), "--config", cfg], str(cfg), "ppo_epochs")
    _fails(capsys, ppo_args(**{"--actor-lr": "fast"}), "actor_lr")


@pytest.mark.parametrize(
    "flag, value, field",
    [
        ("--actor-lr", "-1", "actor_lr"),
        ("--clip-range", "0", "clip_range"),
        ("--beta1", "-0.5", "beta1"),
        ("--rollout-batch-size", "0", "rollout_batch_size"),
    ],
)
def test_out_of_range_values(capsys, ppo_args, flag, value, field):
    _fails(capsys, ppo_args(**{flag: value}), field)


def test_missing_and_empty_fields(capsys, tmp_path, ppo_args):
    for row, message in (
        ({"text": "s1 <sep>"}, "missing field 'prompt'"),
        ({"prompt": "  "}, "field 'prompt' is empty"),
        ({"prompt": 3}, "field 'prompt' must be a string"),
    ):
        f = tmp_path / "p.jsonl"
        f.write_text(json.dumps({"prompt": "s1 <sep>"}) + "\n" + json.dumps(row) + "\n")
        _fails(capsys, ppo_args(**{"--prompts": str(f)}), f"{f}: row 2: {message}")


def test_non_utf8_bytes(capsys, tmp_path, ppo_args):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"prompt": "s1 <sep>"}\n{"prompt": "s2 \xff\xfe"}\n')
    _fails(capsys, ppo_args(**{"--prompts": str(f)}), f"{f}: row 2: not UTF-8")


def test_prompt_longer_than_the_limit(capsys, tmp_path, ppo_args):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "s1 <sep>"}) + "\n" + json.dumps({"prompt": "s1 s2 s3 s4 s5 s6 <sep>"}) + "\n")
    _fails(
        capsys,
        ppo_args(**{"--prompts": str(f), "--max-prompt-len": "4"}),
        f"{f}: row 2: field 'prompt' is 7 tokens",
        "--max-prompt-len 4",
    )


def test_empty_data_after_filtering(capsys, tmp_path, ppo_args):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "s1 s2 s3 s4 s5 s6 <sep>"}) + "\n")
    _fails(
        capsys,
        ppo_args(**{"--prompts": str(f), "--max-prompt-len": "4", "--long-prompts": "skip"}),
        f"{f}: no prompts left",
        "all 1 are longer than --max-prompt-len 4",
    )


def test_truncated_safetensors(capsys, tmp_path, tiny_dirs, ppo_args):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["policy"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails(capsys, ppo_args(**{"--policy": str(broken)}), str(broken), "cannot load")


def test_model_directory_without_tokenizer(capsys, tmp_path, tiny_dirs, ppo_args):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dirs["policy"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    _fails(capsys, ppo_args(**{"--policy": str(bare)}), str(bare), "tokenizer")


def test_mismatched_tokenizers_between_policy_and_dpo_model(capsys, tmp_path, tiny_dirs, ppo_args):
    other = tmp_path / "other_dpo"
    shutil.copytree(tiny_dirs["dpo"], other)
    tok_file = other / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(k for k in vocab if k.startswith("s"))[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok_file.write_text(json.dumps(tok))
    _fails(capsys, ppo_args(**{"--dpo-model": str(other)}), str(other), "tokenizer differs from the policy's", repr(a))


def test_bin_weights_are_refused_unless_allowed(capsys, tmp_path, tiny_dirs, ppo_args):
    import torch
    from safetensors.torch import load_file

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_dirs["policy"], legacy)
    torch.save(load_file(str(legacy / "model.safetensors")), legacy / "pytorch_model.bin")
    (legacy / "model.safetensors").unlink()
    _fails(capsys, ppo_args(**{"--policy": str(legacy)}), str(legacy), "--allow-bin-weights")
    import os

    from rto.lm.models import load_causal_lm

    os.environ["RTO_ALLOW_BIN_WEIGHTS"] = "1"
    try:
        loaded = load_causal_lm(legacy).state_dict()
        original = load_file(f"{tiny_dirs['policy']}/model.safetensors")
        assert all(torch.equal(loaded[k], v) for k, v in original.items())  # the .bin's weights, not a random init
    finally:
        del os.environ["RTO_ALLOW_BIN_WEIGHTS"]


def test_a_failed_run_keeps_what_was_written(capsys, tmp_path, ppo_args):
    """A bad input found when a run starts never touches the previous run's outputs."""
    out = tmp_path / "out"
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "model.safetensors").write_bytes(b"previous result")
    (out / "metrics.jsonl").write_text('{"iteration": 1}\n')
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "s1 <sep>"}\n{oops\n')
    _fails(capsys, ppo_args(**{"--prompts": str(bad)}), f"{bad}: row 2: invalid JSON")
    assert (out / "policy" / "model.safetensors").read_bytes() == b"previous result"
    assert (out / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.text(max_size=40).map(str.encode),
            st.dictionaries(
                st.sampled_from(["prompt", "chosen", "rejected", "completion", "x"]),
                st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers())),
                max_size=4,
            ).map(lambda d: json.dumps(d).encode()),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([PROMPT_FIELDS, SFT_FIELDS, PREFERENCE_FIELDS]),
)
def test_random_malformed_rows_get_a_clear_error_or_load(tmp_path_factory, lines, fields):
    """Any bytes at all: the loader returns rows whose fields are non-empty strings, or raises a
    UserError that names the file (and the row, when one is at fault) - never anything else."""
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        rows = read_jsonl(path, fields)
    except UserError as e:
        assert str(e).startswith(str(path))
        assert "\n" not in str(e)
        return
    assert rows and all(isinstance(r[f], str) and r[f].strip() for r in rows for f in fields)


@pytest.mark.parametrize(
    "task, message",
    [
        ("nowhere/task.py:MyTask", "file nowhere/task.py does not exist"),
        ("{broken}:MyTask", "cannot import"),
        ("{good}:Missing", "has no Missing"),
        ("{raises}:MyTask", "cannot import"),
        ("no_such_task", "no_such_task"),
    ],
)
def test_bad_task_plugins(capsys, tmp_path, task, message):
    good = tmp_path / "good.py"
    good.write_text("X = 1\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    raises = tmp_path / "raises.py"
    raises.write_text("raise RuntimeError('plug-in failed on import')\n")
    task = task.format(good=good, broken=broken, raises=raises)
    _fails(capsys, ["pipeline", "--task", task, "--out", tmp_path / "out"], message)


def test_a_hub_id_without_a_network_is_one_line(capsys, ppo_args, monkeypatch):
    """`org/name` goes to the hub; here (offline) that fails in one line naming it, not a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when first imported (often before this test): set its
    # constant too, or a machine whose DNS answers slowly spends ~45 s in retries first.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _fails(capsys, ppo_args(**{"--policy": "someone/some-model"}), "someone/some-model")


def test_rows_over_max_length_are_named_or_skipped_and_counted(capsys, tmp_path, tiny_dirs):
    from rto.io.config import build
    from rto.lm.models import load_tokenizer
    from rto.stages.common import drop_long_rows
    from rto.stages.dpo import DPOStageConfig

    f = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "s1 <sep>", "chosen": " s2 <eos>", "rejected": " s3 <eos>"},
        {"prompt": "s1 s2 s3 s4 <sep>", "chosen": " s1 s2 s3 s4 s5 s6 <eos>", "rejected": " s2 <eos>"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(
        capsys,
        [
            "dpo",
            "--model",
            tiny_dirs["policy"],
            "--data",
            f,
            "--out",
            tmp_path / "o",
            "--max-length",
            "8",
            "--long-rows",
            "error",
            "--threads",
            "1",
        ],
        f"{f}: row 2: prompt + response is",
        "longer than --max-length 8",
    )
    cfg = build(
        DPOStageConfig,
        {"model": tiny_dirs["policy"], "data": str(f), "out": str(tmp_path / "o"), "max_length": 8},
        "test",
    )
    kept = drop_long_rows(rows, load_tokenizer(tiny_dirs["policy"]), cfg, str(f), "dpo")
    assert kept == rows[:1]
    assert "skipped 1 of 2 rows longer than --max-length 8" in capsys.readouterr().err
