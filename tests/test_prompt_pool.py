"""PPO's prompt pool (rto/io/prompt_pool.py): read through datasets' cached Arrow files, lazily; the
same prompts in the same order as the eager reader it replaced, for every seed and process."""

import json
import sys
import types

import pytest
import torch

from rto.io.data import PROMPT_FIELDS, read_rows, render
from rto.io.errors import UserError
from rto.io.prompt_pool import read_prompts


@pytest.fixture(autouse=True)
def own_datasets_cache(tmp_path, monkeypatch):
    """Each test with a cold datasets cache of its own."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def eager_prompts(path, tokenizer, *, max_len, long_prompts="error", columns=None, skip_bad_rows=False):
    """The eager reader this pool replaced (rto.io.data.read_prompts before the pool), as it was."""
    prompts = [
        render(r["prompt"], tokenizer, generation_prompt=True)
        for r in read_rows(path, PROMPT_FIELDS, columns, skip_bad_rows)
    ]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    long_rows = [i for i, n in enumerate(lengths) if n > max_len]
    if long_rows and long_prompts == "error":
        raise UserError("long")
    if long_rows and long_prompts == "skip":
        prompts = [p for i, p in enumerate(prompts) if i not in set(long_rows)]
    return prompts


def eager_next_prompts(self):
    """PPOTrainer._next_prompts before the pool, as it was."""
    out = []
    while len(out) < self.cfg.rollout_batch_size:
        if not self.order:
            self.order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
        out.append(self.prompts[self.order.pop()])
    return out[self.dist.rank * self.local_rollout : (self.dist.rank + 1) * self.local_rollout]


def _sampler(prompts, seed, rank=0, world=1, rollout=8):
    from rto.core.kl_control import FixedKL
    from rto.rl.checkpoint import RunState

    generator = torch.Generator().manual_seed(seed)
    return types.SimpleNamespace(
        cfg=types.SimpleNamespace(rollout_batch_size=rollout, num_generations=1),
        order=[],
        prompts=prompts,
        generator=generator,
        local_rollout=rollout // world,
        state=RunState(kl_ctl=FixedKL(0.0), selection=None, generator=generator),
        dist=types.SimpleNamespace(rank=rank),
    )


def _pool_file(tmp_path, keyed):
    """Text and conversational prompts, a blank line, a bad row and prompts over 6 tokens."""
    rows = []
    for i, p in enumerate(keyed.prompts("train", 40, seed=1)):
        words = p.split()[: 1 + i % 8]
        rows.append(
            json.dumps(
                {"messages": [{"role": "user", "content": " ".join(words)}]}
                if i % 3 == 0
                else {"prompt": " ".join(words) + " <sep>"}
            )
        )
    rows.insert(7, "")
    rows.insert(12, json.dumps({"prompt": ""}))
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("long_prompts", ["skip", "truncate"])
def test_a_seed_draws_what_the_eager_reader_drew_in_every_process(tmp_path, keyed, long_prompts):
    from rto.rl.trainer import PPOTrainer

    tok = keyed.tokenizer()
    path = _pool_file(tmp_path, keyed)
    kwargs = dict(max_len=6, long_prompts=long_prompts, skip_bad_rows=True)
    eager, pool = eager_prompts(path, tok, **kwargs), read_prompts(path, tok, **kwargs)
    assert list(pool) == eager and len(pool) == (25 if long_prompts == "skip" else 40)  # the bad row left out
    for seed in (0, 7):
        old, new = _sampler(eager, seed), _sampler(pool, seed)
        # Several passes over the pool (a rollout of 8 from ~30 prompts): reshuffles included.
        assert [eager_next_prompts(old) for _ in range(12)] == [PPOTrainer._next_prompts(new) for _ in range(12)]
        assert old.order == new.state.order  # what a checkpoint stores: the same, so resuming draws the same
        # Two processes: each takes its block of the same global rollout, reading only its own.
        shares = [_sampler(pool, seed, rank=r, world=2) for r in (0, 1)]
        old = _sampler(eager, seed)
        for _ in range(6):
            assert [p for s in shares for p in PPOTrainer._next_prompts(s)] == eager_next_prompts(old)


def test_the_cache_is_reused_and_a_changed_file_is_read_again(tmp_path, keyed):
    import datasets

    tok = keyed.tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"s{i} <sep>"}) + "\n" for i in range(5)))
    assert list(read_prompts(path, tok, max_len=8)) == [f"s{i} <sep>" for i in range(5)]
    cached = sorted((datasets.config.HF_DATASETS_CACHE / "rto_prompt_pools").glob("*.arrow"))
    assert len(cached) == 1
    assert list(read_prompts(path, tok, max_len=8)) == [f"s{i} <sep>" for i in range(5)]
    assert sorted((datasets.config.HF_DATASETS_CACHE / "rto_prompt_pools").glob("*.arrow")) == cached  # reused
    path.write_text(json.dumps({"prompt": "s9 <sep>"}) + "\n")
    assert list(read_prompts(path, tok, max_len=8)) == ["s9 <sep>"]
    # Another chat template is another prepared pool.
    tok.chat_template = tok.chat_template.replace("<sep>", "<sep> s1")
    messages = tmp_path / "m.jsonl"
    messages.write_text(json.dumps({"messages": [{"role": "user", "content": "s2"}]}) + "\n")
    assert list(read_prompts(messages, tok, max_len=8)) == ["s2 <sep> s1 "]
    tok.chat_template = keyed.tokenizer().chat_template
    assert list(read_prompts(messages, tok, max_len=8)) == ["s2 <sep> "]


def test_a_long_prompt_is_named_by_its_row_in_the_file(tmp_path, keyed):
    tok = keyed.tokenizer()
    path = tmp_path / "p.jsonl"
    # Line 4 is long: after a blank line and a bad row (skipped), as a user counts lines.
    path.write_text('{"prompt": "s1 <sep>"}\n\n{"prompt": " "}\n{"prompt": "s1 s2 s3 s4 s5 s6 <sep>"}\n')
    with pytest.raises(
        UserError,
        match=rf"^{path}: row 4: field 'prompt' is 7 tokens, longer than --max-prompt-len 4 "
        r"\(1 such rows",
    ):
        read_prompts(path, tok, max_len=4, skip_bad_rows=True)
    with pytest.raises(UserError, match=rf"^{path}: row 3: field 'prompt' is empty$"):
        read_prompts(path, tok, max_len=4)
    mixed = tmp_path / "mixed.jsonl"  # one Arrow's JSON reader refuses (text and a number): read row by row
    mixed.write_text('{"prompt": "s1 <sep>"}\n\n{"prompt": 3}\n')
    with pytest.raises(UserError, match=rf"^{mixed}: row 3: field 'prompt' must be a string, got int$"):
        read_prompts(mixed, tok, max_len=4)
    csv = tmp_path / "p.csv"  # read row by row (by csv, as ever): row 1 is the header
    csv.write_text('prompt\n"s1 <sep>"\n"s1 s2 s3 s4 s5 s6 <sep>"\n')
    with pytest.raises(UserError, match=rf"^{csv}: row 3: field 'prompt' is 7 tokens"):
        read_prompts(csv, tok, max_len=4)


def _folders(tmp_path):
    """The same train rows as a folder of data files (and a test split), a saved DatasetDict and
    a saved Dataset."""
    from datasets import Dataset, DatasetDict

    train = [
        {
            "prompt": f"s{i} s{i + 1} <sep>",
            "chosen": f"s{i} <eos>",
            "rejected": f"s{i + 2} <eos>",
            "completion": f"s{i + 1} <eos>",
        }
        for i in range(6)
    ]
    test = [{**r, "prompt": "s9 " + r["prompt"]} for r in train[:2]]
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (files / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(tmp_path / "dict")
    Dataset.from_list(train).save_to_disk(tmp_path / "one")
    return train, test, [files, tmp_path / "dict", tmp_path / "one"]


def test_dataset_folders_are_read_for_sft_dpo_and_ppo(tmp_path, keyed):
    from rto.io.data import PREFERENCE_FIELDS, SFT_FIELDS

    train, test, folders = _folders(tmp_path)
    tok = keyed.tokenizer()
    for folder in folders:
        sft = read_rows(folder, SFT_FIELDS)
        assert [(r["prompt"], r["completion"]) for r in sft] == [(r["prompt"], r["completion"]) for r in train]
        prefs = read_rows(folder, PREFERENCE_FIELDS)
        assert [r["rejected"] for r in prefs] == [r["rejected"] for r in train]
        assert list(read_prompts(folder, tok, max_len=8)) == [r["prompt"] for r in train], folder
    for folder in folders[:2]:  # splits: by file name, or the DatasetDict's
        assert [r["prompt"] for r in read_rows(folder, PROMPT_FIELDS, split="test")] == [r["prompt"] for r in test]
        assert list(read_prompts(folder, tok, max_len=8, split="test")) == [r["prompt"] for r in test]
    with pytest.raises(UserError, match=r"dict: a saved DatasetDict with no split 'dev' \(it has: train, test\)"):
        read_rows(folders[1], PROMPT_FIELDS, split="dev")
    with pytest.raises(UserError, match=r"files \(split train\): row 1: field 'prompt' is 3 tokens"):
        read_prompts(folders[0], tok, max_len=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"empty: a dataset folder that datasets could not load") as e:
        read_rows(empty, PROMPT_FIELDS)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"missing.jsonl: data file not found"):
        read_prompts(tmp_path / "missing.jsonl", tok, max_len=8)


def test_folders_in_an_sft_run_and_a_ppo_run_from_the_command_line(tmp_path, tiny_dirs):
    """As a TRL user runs them: `dataset_name:` naming a folder (a saved DatasetDict, for ppo, from
    the command line) or a folder of data files (for sft)."""
    import subprocess

    import rto
    from tests.test_cli import ENV

    train, _, folders = _folders(tmp_path)
    assert rto.sft(
        model=tiny_dirs["policy"], data=str(folders[0]), out=str(tmp_path / "sft"), epochs=1, batch_size=3, threads=1
    )["rows"] == len(train)
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_dirs['policy']}\nreward_model_path: {tiny_dirs['rm']}\n"
        f"dataset_name: {folders[1]}\noutput_dir: {tmp_path / 'ppo'}\n"
    )
    env = dict(ENV, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rto.cli",
            "ppo",
            "--config",
            str(cfg),
            "--iterations",
            "1",
            "--rollout-batch-size",
            "4",
            "--mini-batch-size",
            "4",
            "--max-new-tokens",
            "3",
            "--eval-every",
            "0",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "ppo" / "metrics.json").read_text())["iterations"] == 1


def test_token_counts_are_the_tokenizers_own(keyed):
    """The pool counts tokens through the fast tokenizer's backend: the counts `tokenizer(texts)`
    gives, special tokens added by a post-processor included, and never cut by a truncation stored
    in the tokenizer's file (which `tokenizer(...)` turns off per call)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from rto.io.prompt_pool import token_counter

    texts = ["s1 s2 <sep>", "s3 <sep>", "", "s1 s1 s1 s1 s1 s1 <sep>"]
    tok = keyed.tokenizer()
    assert token_counter(tok)(texts) == [len(ids) for ids in tok(texts)["input_ids"]]
    vocab = {"<unk>": 0, "<bos>": 1, "<pad>": 2, "a": 3, "b": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    backend.enable_truncation(max_length=2)
    bos = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<bos>", pad_token="<pad>")
    texts = ["a b a b", "b", "a c"]
    counted = token_counter(bos)(texts)  # first: a call of the tokenizer turns its stored truncation off
    assert bos.backend_tokenizer.truncation is not None, "the test needs a truncation stored in the tokenizer"
    expected = [len(ids) for ids in bos(texts)["input_ids"]]
    assert expected == [5, 2, 3] and counted == expected
