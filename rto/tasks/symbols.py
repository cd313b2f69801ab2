"""What the built-in testbeds share: a word-level vocabulary of symbols `s0 ... s{n-1}` plus
`<pad> <eos> <sep> <unk>`, prompts of distinct symbols ending in `<sep>`, and a small Llama."""

from __future__ import annotations

import random
import re

from rto.tasks.base import Task

PAD, EOS, SEP, UNK = "<pad>", "<eos>", "<sep>", "<unk>"
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
        return PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
            additional_special_tokens=[SEP], model_max_length=128,
        )

    def model_config(self):
        return dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=256, max_position_embeddings=64)

    def random_prompt(self, rng: random.Random) -> str:
        return " ".join(rng.sample(self.symbols, self.prompt_len)) + " " + SEP

    def prompt_symbols(self, prompt: str) -> list[str]:
        return [t for t in split_tokens(prompt) if t.startswith("s")]
