"""TRL's data formats from JSONL, JSON, Parquet and CSV: text or conversations, explicit or
implicit prompts, renamed columns, bad rows skipped and counted - and the stages run on them."""

import json

import pytest
import torch

from rto.io.data import PREFERENCE_FIELDS, PROMPT_FIELDS, read_rows
from rto.io.errors import UserError

ROWS = [
    {"question": "s1 s2 <sep>", "good": "s3 <eos>", "bad": "s4 <eos>"},
    {"question": "s5 <sep>", "good": "s6 s7 <eos>", "bad": "s8 <eos>"},
]
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
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        (r["question"], r["good"], r["bad"]) for r in ROWS
    ]


def test_conversational_prompts_and_implicit_prompts(tmp_path):
    msgs = [{"role": "user", "content": "s1 s2"}, {"role": "assistant", "content": "s3"}]
    rows = read_rows(_write(tmp_path / "p.jsonl", [{"messages": msgs}]), PROMPT_FIELDS)
    assert rows[0]["prompt"] == msgs[:1]  # the final assistant turn is what the policy writes
    user = {"role": "user", "content": "s1"}
    conv = [
        {
            "chosen": [user, {"role": "assistant", "content": "s2"}],
            "rejected": [user, {"role": "assistant", "content": "s3"}],
        }
    ]
    row = read_rows(_write(tmp_path / "c.jsonl", conv), PREFERENCE_FIELDS)[0]
    assert row["prompt"] == [user] and row["chosen"][0]["content"] == "s2"
    text = read_rows(
        _write(tmp_path / "t.jsonl", [{"chosen": "s1 s2 <sep> s3", "rejected": "s1 s2 <sep> s4"}]), PREFERENCE_FIELDS
    )[0]
    assert (text["prompt"], text["chosen"], text["rejected"]) == ("s1 s2 <sep>", " s3", " s4")


def test_bad_rows_are_named_or_skipped_and_counted(tmp_path, capsys):
    path = _write(
        tmp_path / "p.jsonl",
        [{"prompt": "s1 <sep>"}, {"prompt": ""}, {"prompt": [{"role": "user"}]}, {"prompt": "s2 <sep>"}],
    )
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
    prefs = [
        {"chosen": [user(f"s{i} s{i + 1}"), bot(f"s{i + 1} s{i}")], "rejected": [user(f"s{i} s{i + 1}"), bot(f"s{i}")]}
        for i in range(16)
    ]
    prompts = [{"messages": [user(f"s{i} s{i + 2}")]} for i in range(16)]
    files = {
        n: _write(tmp_path / f"{n}.jsonl", rows) for n, rows in (("sft", sft), ("prefs", prefs), ("prompts", prompts))
    }

    def rto(*args):
        # The command line's own entry point, in this process (no interpreter start-up per command).
        from rto.cli import main

        assert main([str(a) for a in args]) == 0

    common = ["--threads", "1", "--epochs", "1", "--batch-size", "8"]
    rto("sft", "--model", model, "--data", files["sft"], "--out", tmp_path / "sft", *common)
    rto("rm", "--model", tmp_path / "sft", "--data", files["prefs"], "--out", tmp_path / "rm", "--lora-r", "4", *common)
    rto("sft", "--model", model, "--data", files["sft"], "--out", tmp_path / "sft_lora", "--lora-r", "4", *common)
    from rto.lm.models import is_adapter_dir, load_causal_lm

    assert is_adapter_dir(tmp_path / "sft_lora")
    # Loaded merged: the base's weights plus the trained adapter's update (not the base alone).
    merged, base = load_causal_lm(tmp_path / "sft_lora").state_dict(), load_causal_lm(model).state_dict()
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # no adapter there
    rto(
        "dpo",
        "--model",
        tmp_path / "sft",
        "--data",
        files["prefs"],
        "--out",
        tmp_path / "dpo",
        "--lora-r",
        "4",
        *common,
    )
    rto(
        "ppo",
        "--policy",
        tmp_path / "sft",
        "--reward-model",
        tmp_path / "rm",
        "--dpo-model",
        tmp_path / "dpo",
        "--prompts",
        files["prompts"],
        "--out",
        tmp_path / "ppo",
        "--reward",
        "rto",
        "--lora-r",
        "4",
        "--iterations",
        "2",
        "--rollout-batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--max-new-tokens",
        "4",
        "--eval-every",
        "0",
        "--threads",
        "1",
    )
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
    from rto.io.data import SFT_FIELDS

    system, user, bot = (
        {"role": r, "content": c} for r, c in (("system", "s1"), ("user", "s2 s3"), ("assistant", "s4"))
    )
    messages = [{"messages": [system, user, bot]}] * 8
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": "s1"},
                {"from": "human", "value": "s2 s3"},
                {"from": "gpt", "value": "s4"},
            ]
        }
    ] * 8
    text = [{"text": "s1 s2 s3 s4"}] * 8
    read = {
        name: read_rows(_write(tmp_path / f"{name}.jsonl", rows), SFT_FIELDS)
        for name, rows in (("messages", messages), ("sharegpt", sharegpt), ("text", text))
    }
    for name in ("messages", "sharegpt"):
        assert read[name][0]["prompt"] == [system, user] and read[name][0]["completion"] == [bot], name
    assert read["text"][0]["prompt"] == "" and read["text"][0]["completion"] == "s1 s2 s3 s4"
    # Rows that cannot be trained on: a conversation not ending with the assistant, an unknown speaker.
    for bad, message in (
        ({"messages": [system, user]}, "must end with an assistant turn"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, r"conversations\[0\]: expected from"),
        ({"question": "x"}, r"expected \{prompt, completion\}, \{messages\}"),
    ):
        with pytest.raises(UserError, match=message):
            read_rows(_write(tmp_path / "bad.jsonl", [bad]), SFT_FIELDS)

    import rto

    for name in ("sharegpt", "text"):
        result = rto.sft(
            model=chat_model,
            data=str(tmp_path / f"{name}.jsonl"),
            out=str(tmp_path / f"sft-{name}"),
            epochs=1,
            batch_size=4,
            threads=1,
        )
        assert result["rows"] == 8 and result["train_loss"] > 0, name


MESSAGES = [
    {"messages": [{"role": "user", "content": f"s{i} s{i + 1}"}, {"role": "assistant", "content": f"s{i + 1}"}]}
    for i in range(8)
]


def test_messages_rows_train_on_a_built_in_tasks_own_model(tmp_path):
    """The built-in tasks' tokenizers have a chat template: {messages} rows train a new task model,
    whose saved tokenizer then renders conversational prompts for rto ppo."""
    import rto
    from rto.io.prompt_pool import read_prompts
    from rto.lm.models import load_tokenizer
    from rto.tasks import load_task

    result = rto.sft(
        task="keyed",
        data=str(_write(tmp_path / "m.jsonl", MESSAGES)),
        out=str(tmp_path / "sft"),
        epochs=1,
        batch_size=4,
        threads=1,
    )
    assert result["rows"] == 8 and result["train_loss"] > 0
    tok = load_tokenizer(tmp_path / "sft")
    assert tok.chat_template == load_task("keyed").tokenizer().chat_template
    prompts = _write(tmp_path / "p.jsonl", [{"messages": MESSAGES[0]["messages"][:1]}])
    assert list(read_prompts(prompts, tok, max_len=8)) == ["s0 s1 <sep> "]
    # The prompt renders as the start of the whole conversation: the response follows it.
    whole = tok.apply_chat_template(MESSAGES[0]["messages"], tokenize=False)
    assert whole.startswith("s0 s1 <sep> ") and whole.endswith("s1 <eos>")


def test_chat_template_path_from_a_jinja_file_or_a_tokenizer_directory(tiny_dirs, tmp_path):
    """TRL's chat_template_path: a Jinja file's template, or a tokenizer directory's, replaces the
    tokenizer's in sft/rm/dpo (and is saved with the model) and in ppo; bad ones are one line."""
    import rto
    from rto.lm.models import load_tokenizer
    from rto.rl.config import PPOStageConfig
    from rto.rl.trainer import PPOTrainer
    from rto.tasks import load_task

    jinja = tmp_path / "template.jinja"
    jinja.write_text(
        "{% for m in messages %}s31 {{ m['content'] }}{% if m['role'] == 'assistant' %} <eos>"
        "{% else %} <sep>{% endif %} {% endfor %}"
    )
    assert load_tokenizer(tiny_dirs["policy"], chat_template_path=jinja).chat_template == jinja.read_text()
    other = load_task("keyed").tokenizer()
    other.chat_template = jinja.read_text().replace("s31", "s30")
    other.save_pretrained(tmp_path / "other_tokenizer")
    assert (
        load_tokenizer(tiny_dirs["policy"], chat_template_path=tmp_path / "other_tokenizer").chat_template
        == other.chat_template
    )
    # sft: the rows rendered with it, the model saved with it.
    rto.sft(
        model=tiny_dirs["policy"],
        data=str(_write(tmp_path / "m.jsonl", MESSAGES)),
        out=str(tmp_path / "sft"),
        chat_template_path=str(jinja),
        epochs=1,
        batch_size=4,
        threads=1,
    )
    assert load_tokenizer(tmp_path / "sft").chat_template == jinja.read_text()
    # ppo: the policy's tokenizer, which renders the prompts.
    prompts = _write(tmp_path / "p.jsonl", [{"messages": m["messages"][:1]} for m in MESSAGES])
    trainer = PPOTrainer(
        PPOStageConfig(
            policy=tiny_dirs["policy"],
            reward_model=tiny_dirs["rm"],
            prompts=str(prompts),
            out=str(tmp_path / "ppo"),
            chat_template_path=str(tmp_path / "other_tokenizer"),
            rollout_batch_size=4,
            mini_batch_size=4,
            threads=1,
        )
    )
    assert trainer.prompts[0] == "s30 s0 s1 <sep> "
    # Bad ones: one line naming the setting.
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    none = load_task("keyed").tokenizer()
    none.chat_template = None
    none.save_pretrained(tmp_path / "no_template")
    for source, message in (
        (tmp_path / "missing.jinja", "not a Jinja file, nor a tokenizer directory"),
        (broken, "the template does not render a user turn"),
        (tmp_path / "no_template", "its tokenizer has no chat template"),
    ):
        with pytest.raises(UserError, match=f"chat_template_path {source}: {message}") as e:
            load_tokenizer(tiny_dirs["policy"], chat_template_path=source)
        assert "\n" not in str(e.value)
