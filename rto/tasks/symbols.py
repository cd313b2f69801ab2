"""What the built-in testbeds share: a word-level vocabulary of symbols `s0 ... s{n-1}` plus
`<pad> <eos> <sep> <unk>`, prompts of distinct symbols ending in `<sep>`, and a small Llama."""

from __future__ import annotations

import random
import re

from rto.tasks.base import Task

PAD, EOS, SEP, UNK = "<pad>", "<eos>", "<sep>", "<unk>"
# The chat template of every built-in task's tokenizer, so {messages} data works on the tool's own
# models: a turn is its text, then <sep> (a user's or system's turn, as a task's prompt ends) or
# <eos> (an assistant's, as a response ends); the assistant's turn starts after one space, as a
# response follows a prompt. Prompt-only rendering is thus a prefix of the whole conversation's.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %} <eos>{% else %} <sep>"
    "{% endif %}{% if not loop.last %} {% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}"
)
_TOKEN = re.compile(r"<eos>|<sep>|<pad>|<unk>|s\d+")


def split_tokens(text: str) -> list[str]:
    """Token strings of a symbol text (special tokens may touch their neighbours)."""
    return _TOKEN.findall(text)


def response_symbols(response: str) -> list[str]:
    """The symbols of a response up to its EOS (or all of them, if it was cut off)."""
    out = []
    for tok in split_tokens(response):
        if tok == EOS:
            break
        if tok.startswith("s"):
            out.append(tok)
    return out


class SymbolTask(Task):
    """A task over `n_symbols` symbols with prompts of `prompt_len` distinct ones."""

    def __init__(self, seed: int = 0, n_symbols: int = 32, prompt_len: int = 8):
        super().__init__(seed)
        if not 2 <= prompt_len <= n_symbols:
            raise ValueError("need 2 <= prompt_len <= n_symbols")
        self.n_symbols, self.prompt_len = n_symbols, prompt_len
        self.symbols = [f"s{i}" for i in range(n_symbols)]

    def tokenizer(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {tok: i for i, tok in enumerate([PAD, EOS, SEP, UNK, *self.symbols])}
        core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # <sep> and <eos> are special, so "...<sep>" + "s3" still splits in two.
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core,
            pad_token=PAD,
            eos_token=EOS,
            unk_token=UNK,
            additional_special_tokens=[SEP],
            model_max_length=128,
        )
        tok.chat_template = CHAT_TEMPLATE
        return tok

    def model_config(self):
        return dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
        )

    def random_prompt(self, rng: random.Random) -> str:
        return " ".join(rng.sample(self.symbols, self.prompt_len)) + " " + SEP

    def prompt_symbols(self, prompt: str) -> list[str]:
        return [t for t in split_tokens(prompt) if t.startswith("s")]


def symbol_presets(max_new_tokens: int, smoke_ppo: dict | None = None, default_ppo: dict | None = None) -> dict:
    """The `smoke` and `default` presets every built-in symbol task shares (the same data sizes and
    RL schedule), with the task's response length and its own extra `ppo` settings."""
    gen = {"max_new_tokens": max_new_tokens}
    return {
        # CI-sized: proves the plumbing end to end in well under 2 minutes.
        "smoke": {
            "data": {"n_sft": 512, "n_rl_prompts": 64, "n_dev": 32, "n_test": 64},
            "sft": {"epochs": 1},
            "pairs": {"n_pairs": 256, "n_heldout": 64, **gen},
            "rm": {"epochs": 1},
            "dpo": {"epochs": 1},
            "ppo": {
                "iterations": 2,
                "rollout_batch_size": 16,
                "mini_batch_size": 8,
                "eval_every": 1,
                "n_eval": 32,
                **gen,
                "actor_lr": 1e-4,
                "critic_lr": 1e-4,
                **(smoke_ppo or {}),
            },
            "eval": dict(gen),
        },
        "default": {
            "data": {"n_sft": 4000, "n_rl_prompts": 2048, "n_dev": 128, "n_test": 512},
            "sft": {"epochs": 8, "learning_rate": 3e-3},
            "pairs": {"n_pairs": 2000, "n_heldout": 500, **gen},
            "rm": {"epochs": 4, "learning_rate": 1e-3},
            "dpo": {"epochs": 3, "learning_rate": 5e-4},
            "ppo": {
                "iterations": 100,
                "rollout_batch_size": 64,
                "mini_batch_size": 16,
                "ppo_epochs": 2,
                "eval_every": 10,
                "n_eval": 128,
                **gen,
                "actor_lr": 1e-4,
                "critic_lr": 1e-4,
                **(default_ppo or {}),
            },
            "eval": dict(gen),
        },
    }
