"""TRL's data formats from JSONL, JSON, Parquet and CSV: text or conversations, explicit or
implicit prompts, renamed columns, bad rows skipped and counted - and the stages run on them."""

import json
import subprocess
import sys

import pytest
import torch

from rto.data import PREFERENCE_FIELDS, PROMPT_FIELDS, read_rows
from rto.errors import UserError
from tests.test_cli import ENV

ROWS = [{"question": "s1 s2 <sep>", "good": "s3 <eos>", "bad": "s4 <eos>"},
        {"question": "s5 <sep>", "good": "s6 s7 <eos>", "bad": "s8 <eos>"}]
COLUMNS = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def _write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        import csv

        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_format_with_renamed_columns(tmp_path, suffix):
    rows = read_rows(_write(tmp_path / f"prefs{suffix}", ROWS), PREFERENCE_FIELDS, COLUMNS)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [(r["question"], r["good"], r["bad"]) for r in ROWS]


def test_conversational_prompts_and_implicit_prompts(tmp_path):
    msgs = [{"role": "user", "content": "s1 s2"}, {"role": "assistant", "content": "s3"}]
    rows = read_rows(_write(tmp_path / "p.jsonl", [{"messages": msgs}]), PROMPT_FIELDS)
    assert rows[0]["prompt"] == msgs[:1]  # the final assistant turn is what the policy writes
    user = {"role": "user", "content": "s1"}
    conv = [{"chosen": [user, {"role": "assistant", "content": "s2"}],
             "rejected": [user, {"role": "assistant", "content": "s3"}]}]
    row = read_rows(_write(tmp_path / "c.jsonl", conv), PREFERENCE_FIELDS)[0]
    assert row["prompt"] == [user] and row["chosen"][0]["content"] == "s2"
    text = read_rows(_write(tmp_path / "t.jsonl", [{"chosen": "s1 s2 <sep> s3", "rejected": "s1 s2 <sep> s4"}]),
                     PREFERENCE_FIELDS)[0]
    assert (text["prompt"], text["chosen"], text["rejected"]) == ("s1 s2 <sep>", " s3", " s4")


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path, capsys):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "s1 <sep>"}, {"prompt": ""}, {"prompt": [{"role": "user"}]},
                                         {"prompt": "s2 <sep>"}])
    with pytest.raises(UserError, match=f"{path}: row 2: field 'prompt' is empty"):
        read_rows(path, PROMPT_FIELDS)
    rows = read_rows(path, PROMPT_FIELDS, skip_bad_rows=True)
    assert [r["prompt"] for r in rows] == ["s1 <sep>", "s2 <sep>"]
    assert "skipped 2 unusable rows" in capsys.readouterr().err


def test_stages_run_on_conversational_data_from_the_command_line(chat_model, tmp_path):
    """A tiny model with a chat template, saved to disk; conversational JSONL through
    `rto sft`, `rto rm`, `rto dpo --lora-r` and `rto ppo --reward rto --lora-r` as a user runs them."""
    model = chat_model

    def user(text):
        return {"role": "user", "content": text}

    def bot(text):
        return {"role": "assistant", "content": text}

    sft = [{"prompt": [user(f"s{i} s{i + 1}")], "completion": [bot(f"s{i + 1} s{i}")]} for i in range(16)]
    prefs = [{"chosen": [user(f"s{i} s{i + 1}"), bot(f"s{i + 1} s{i}")], "rejected": [user(f"s{i} s{i + 1}"), bot(f"s{i}")]}
             for i in range(16)]
    prompts = [{"messages": [user(f"s{i} s{i + 2}")]} for i in range(16)]
    files = {n: _write(tmp_path / f"{n}.jsonl", rows) for n, rows in (("sft", sft), ("prefs", prefs), ("prompts", prompts))}

    def rto(*args):
        proc = subprocess.run([sys.executable, "-m", "rto.cli", *map(str, args)], capture_output=True, text=True, env=ENV,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]

    common = ["--threads", "1", "--epochs", "1", "--batch-size", "8"]
    rto("sft", "--model", model, "--data", files["sft"], "--out", tmp_path / "sft", *common)
    rto("rm", "--model", tmp_path / "sft", "--data", files["prefs"], "--out", tmp_path / "rm", "--lora-r", "4", *common)
    rto("sft", "--model", model, "--data", files["sft"], "--out", tmp_path / "sft_lora", "--lora-r", "4", *common)
    from rto.lora import is_adapter_dir
    from rto.models import load_causal_lm

    assert is_adapter_dir(tmp_path / "sft_lora")
    # Loaded merged: the base's weights plus the trained adapter's update (not the base alone).
    merged, base = load_causal_lm(tmp_path / "sft_lora").state_dict(), load_causal_lm(model).state_dict()
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # no adapter there
    rto("dpo", "--model", tmp_path / "sft", "--data", files["prefs"], "--out", tmp_path / "dpo", "--lora-r", "4", *common)
    rto("ppo", "--policy", tmp_path / "sft", "--reward-model", tmp_path / "rm", "--dpo-model", tmp_path / "dpo",
        "--prompts", files["prompts"], "--out", tmp_path / "ppo", "--reward", "rto", "--lora-r", "4", "--iterations", "2",
        "--rollout-batch-size", "8", "--mini-batch-size", "4", "--max-new-tokens", "4", "--eval-every", "0",
        "--threads", "1")
    log = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and log[-1]["dpo_term/mean"] != 0.0
    for stage in ("sft", "rm", "dpo", "ppo/policy"):
        assert "## Final metrics" in (tmp_path / stage / "README.md").read_text()
    for stage in ("sft", "rm", "dpo"):  # every stage logs to OUT/metrics.jsonl (TRL's logs, step by step)
        rows = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and "step" in rows[-1] and "train_loss" in rows[-1]


def test_sft_rows_as_whole_conversations_sharegpt_or_plain_text(chat_model, tmp_path):
    """TRL users' SFT files: {messages} (the last assistant turn is trained), ShareGPT's
    {conversations} (roles mapped), {text} (every token trained) - read, then trained on."""
    from rto.data import SFT_FIELDS

    system, user, bot = ({"role": r, "content": c} for r, c in (("system", "s1"), ("user", "s2 s3"), ("assistant", "s4")))
    messages = [{"messages": [system, user, bot]}] * 8
    sharegpt = [{"conversations": [{"from": "system", "value": "s1"}, {"from": "human", "value": "s2 s3"},
                                   {"from": "gpt", "value": "s4"}]}] * 8
    text = [{"text": "s1 s2 s3 s4"}] * 8
    read = {name: read_rows(_write(tmp_path / f"{name}.jsonl", rows), SFT_FIELDS)
            for name, rows in (("messages", messages), ("sharegpt", sharegpt), ("text", text))}
    for name in ("messages", "sharegpt"):
        assert read[name][0]["prompt"] == [system, user] and read[name][0]["completion"] == [bot], name
    assert read["text"][0]["prompt"] == "" and read["text"][0]["completion"] == "s1 s2 s3 s4"
    # Rows that cannot be trained on: a conversation not ending with the assistant, an unknown speaker.
    for bad, message in (({"messages": [system, user]}, "must end with an assistant turn"),
                         ({"conversations": [{"from": "alien", "value": "x"}]}, r"conversations\[0\]: expected from"),
                         ({"question": "x"}, r"expected \{prompt, completion\}, \{messages\}")):
        with pytest.raises(UserError, match=message):
            read_rows(_write(tmp_path / "bad.jsonl", [bad]), SFT_FIELDS)

    import rto

    for name in ("sharegpt", "text"):
        result = rto.sft(model=chat_model, data=str(tmp_path / f"{name}.jsonl"), out=str(tmp_path / f"sft-{name}"),
                         epochs=1, batch_size=4, threads=1)
        assert result["rows"] == 8 and result["train_loss"] > 0, name
