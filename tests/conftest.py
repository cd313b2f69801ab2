"""Shared fixtures: tiny models on the keyed task's word-level tokenizer, saved to a temp dir."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RTO_PROGRESS", "0")
# One thread per test worker (two workers share two cores), in this process and in what it starts.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The modules marked slow first (each stays in one piece, in its own order): under
    `--dist loadfile` the workers take files in this order, and the long ones started early leave
    the short ones to fill in at the end instead of one worker finishing a long file alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64
)


@pytest.fixture(scope="session")
def keyed():
    from rto.tasks import load_task

    return load_task("keyed")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, keyed):
    """{"policy", "rm", "dpo"}: a random tiny causal LM, a score model from it (no pad id in its
    config), a perturbed copy."""
    from rto.lm.models import RM_STATS_FILE, build_causal_lm, load_score_model, save_model

    root = tmp_path_factory.mktemp("models")
    tok = keyed.tokenizer()
    policy = build_causal_lm(tok, TINY, seed=0)
    save_model(policy, tok, root / "policy")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(policy, tok, root / "dpo")
    rm = load_score_model(root / "policy")
    torch.manual_seed(2)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    # Like many hub checkpoints (Llama's family), the RM's config names no pad id: the tokenizer's
    # is the only one, so every PPO test reads scores from such a model (tests/test_any_rm.py).
    rm.config.pad_token_id = None
    save_model(rm, tok, root / "rm", extra_files={RM_STATS_FILE: {"mean": 0.1, "std": 2.0}})
    return {k: str(root / k) for k in ("policy", "rm", "dpo")}


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory, keyed):
    from rto.io.data import write_jsonl

    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    # Prompts of different lengths (2 to 8 symbols), so batches are left-padded.
    prompts = [" ".join(p.split()[: 2 + i % 7]) + " <sep>" for i, p in enumerate(keyed.prompts("train", 32, seed=0))]
    write_jsonl(path, ({"prompt": p} for p in prompts))
    return str(path)


# A chat template for the keyed task's word-level vocabulary: a user turn ends with <sep>, an
# assistant turn with <eos>.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %} <sep>{% else %} <eos>{% endif %}"
    "{% if not loop.last %} {% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}"
)


@pytest.fixture
def chat_model(tiny_dirs, tmp_path):
    """The tiny policy saved with a chat template (a directory like a real instruction model's)."""
    import json
    import shutil

    model = tmp_path / "chat_model"
    shutil.copytree(tiny_dirs["policy"], model)
    cfg_file = model / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg))
    # transformers reads a chat_template.jinja file before tokenizer_config.json's template: the
    # built-in tasks' tokenizers save one, so the template under test goes there too.
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return model


@pytest.fixture
def prefs(tmp_path):
    """16 preference pairs on the keyed vocabulary, for the TRL-backed stages' runs."""
    import json

    path = tmp_path / "prefs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"s{i} s{i + 1} <sep>", "chosen": f"s{i + 1} <eos>", "rejected": f"s{i} <eos>"})
            + "\n"
            for i in range(16)
        )
    )
    return path


@pytest.fixture
def run_rto(capsys):
    """`rto ARGS` through the command line's own entry point, in this process (no interpreter
    start-up per command): its exit code, stdout and stderr, as a subprocess would give them."""
    from types import SimpleNamespace

    def run(*args):
        from rto.cli import main

        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's --help and usage errors leave this way
            code = e.code if isinstance(e.code, int) else 1
        finally:  # a command's --threads must not outlive it in this worker
            torch.set_num_threads(1)
            os.environ["OMP_NUM_THREADS"] = "1"
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run
