"""Loading and saving models and tokenizers, and the reward/value heads.

Every model is a plain Hugging Face checkpoint (`save_pretrained`, safetensors),
so every stage also runs on a user's own model directory:
- policy, reference and DPO model: `AutoModelForCausalLM`;
- reward model and critic: `AutoModelForSequenceClassification` with one label.
  The RM is read at the last response token; the critic reads the same head at
  every position (one value per state).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from rto.io.errors import UserError

RM_STATS_FILE = "reward_stats.json"


# --- adapter directories (peft), read here so that loading any model needs nothing of rto.lm.lora ---

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | Path) -> Path:
    """The base model an adapter directory was trained on (relative paths: from the adapter's parent)."""
    cfg_file = Path(path) / ADAPTER_CONFIG
    try:
        base = json.loads(cfg_file.read_text())["base_model_name_or_path"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_file}: unreadable adapter config ({e})") from None
    base_path = Path(base)
    if not base_path.is_absolute() and not base_path.exists():
        base_path = Path(path).parent / base_path
    return base_path


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@contextlib.contextmanager
def peft_quietly():
    """peft reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model:
    the FutureWarning is about peft's code, with nothing for the user to do, so it is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def _quiet() -> None:
    """Per-file 'Loading weights' / 'Writing model shards' bars drown the stage's own bar."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def is_hub_id(path: str | Path) -> bool:
    """`org/name` that is not a local path: a Hugging Face hub model id (used where a network exists)."""
    import re

    text = str(path)
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not Path(text).exists()


def _check_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if is_hub_id(path):
        return path  # from_pretrained fetches it (safetensors only) or fails with a one-line error
    if not path.is_dir():
        raise UserError(f"{what} {path}: model directory not found")
    if is_adapter_dir(path):
        if not (path / "adapter_model.safetensors").is_file():
            raise UserError(f"{what} {path}: no adapter_model.safetensors (only safetensors files are loaded)")
        return path
    if not (path / "config.json").is_file():
        raise UserError(f"{what} {path}: no config.json (not a Hugging Face model directory)")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            if not bin_weights_allowed():
                raise UserError(
                    f"{what} {path}: only pickle-format .bin weights; convert them to safetensors or pass "
                    "--allow-bin-weights to load them with torch.load(weights_only=True)"
                )
            return path
        raise UserError(f"{what} {path}: no .safetensors weights (only safetensors files are loaded)")
    return path


def bin_weights_allowed() -> bool:
    return os.environ.get("RTO_ALLOW_BIN_WEIGHTS") == "1"


def load_tokenizer(path: str | Path, what: str = "model", chat_template_path: str | Path = ""):
    """The tokenizer of a model directory (or hub id); `chat_template_path` replaces its chat
    template, as TRL's setting of that name does (see set_chat_template)."""
    from transformers import AutoTokenizer

    hub = is_hub_id(path)
    path = Path(path)
    if not path.is_dir() and not hub:
        raise UserError(f"{what} {path}: model directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if hub else path, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a missing/broken tokenizer
        raise UserError(
            f"{what} {path}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if chat_template_path:
        set_chat_template(tok, chat_template_path)
    return check_tokenizer(tok, f"{what} {path}")


def set_chat_template(tok, source: str | Path) -> None:
    """TRL's chat_template_path: the template of a Jinja file, or of the tokenizer in a directory
    (or hub id), becomes `tok`'s and is saved with the model. Unlike TRL, for a tokenizer it copies
    the template only, adding no tokens: the tokens it writes must be in `tok`'s vocabulary."""
    where = f"chat_template_path {source}"
    path = Path(source)
    if path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (byte {e.start})") from None
    elif path.is_dir() or is_hub_id(source):
        from transformers import AutoTokenizer

        try:
            template = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False).chat_template
        except Exception as e:  # as in load_tokenizer
            raise UserError(
                f"{where}: cannot load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        if not template:
            raise UserError(f"{where}: its tokenizer has no chat template")
    else:
        raise UserError(f"{where}: not a Jinja file, nor a tokenizer directory")
    if isinstance(template, dict):  # a tokenizer with named templates: its default one
        template = template.get("default")
    if not isinstance(template, str) or not template.strip():
        raise UserError(f"{where}: the template is empty")
    tok.chat_template = template
    try:  # a broken template stops here, not at the first conversational row
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's errors for a template
        raise UserError(
            f"{where}: the template does not render a user turn ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def check_same_tokenizer(tok, where: str, path: str | Path, what: str) -> None:
    """Models that score the policy's token ids must read them as the policy does: same vocabulary,
    same special tokens. A directory without tokenizer files is taken on trust."""
    path = Path(path)
    if not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        return
    other = load_tokenizer(path, what)
    a, b = tok.get_vocab(), other.get_vocab()
    if a != b:
        differing = sorted(t for t in set(a) | set(b) if a.get(t) != b.get(t))
        shown = ", ".join(f"{t!r}: {a.get(t)} vs {b.get(t)}" for t in differing[:3])
        raise UserError(
            f"{what} {path}: its tokenizer differs from the policy's ({where}): {len(differing)} tokens "
            f"have other ids ({shown}{', ...' if len(differing) > 3 else ''})"
        )
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(tok, name) != getattr(other, name):
            raise UserError(
                f"{what} {path}: its tokenizer's {name} is {getattr(other, name)}, the policy's "
                f"{getattr(tok, name)} ({where})"
            )


def check_tokenizer(tok, where: str):
    """EOS and a pad distinct from EOS: "last non-pad token" must be the response's end for the RM."""
    if tok.eos_token_id is None:
        raise UserError(f"{where}: the tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        raise UserError(f"{where}: the tokenizer needs a pad token distinct from EOS")
    return tok


def _load(cls, path: str | Path, what: str, **kwargs):
    path = _check_dir(path, what)
    _quiet()
    try:
        # .bin only when allowed and there is no safetensors file; transformers then reads it with
        # torch.load(weights_only=True), which refuses anything but tensors.
        safetensors_only = is_hub_id(path) or not (bin_weights_allowed() and not any(path.glob("*.safetensors")))
        model = cls.from_pretrained(
            str(path) if is_hub_id(path) else path,
            trust_remote_code=False,
            use_safetensors=safetensors_only or None,
            **kwargs,
        )
    except Exception as e:
        raise UserError(
            f"{what} {path}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    disable_dropout(model)
    return model


def _load_any(cls, path: str | Path, what: str, **kwargs):
    """A model directory, or a LoRA adapter directory (`--lora-r`) merged into its base."""
    if not is_adapter_dir(_check_dir(path, what)):
        return _load(cls, path, what, **kwargs)
    from peft import PeftModel

    base = _load(cls, adapter_base(path), f"{what}'s base model", **kwargs)
    try:
        with peft_quietly():
            model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except Exception as e:
        raise UserError(
            f"{what} {path}: cannot apply the adapter ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    # peft loads an adapter for inference, its base frozen; merged, the model is a whole model like
    # any other (a PPO policy trained in full from an `rto sft --lora-r` adapter): trainable.
    model.requires_grad_(True)
    disable_dropout(model)
    return model


# Models load in fp32 whatever dtype the checkpoint was saved in (most hub models: bf16, which
# transformers' default dtype "auto" would keep): trained models then hold fp32 master weights, so
# small updates are not rounded away, and frozen ones are cast to bf16 only where a stage's
# precision setting asks for it.
LOAD_DTYPE = torch.float32


def load_causal_lm(path: str | Path, what: str = "policy", dtype: torch.dtype = LOAD_DTYPE):
    from transformers import AutoModelForCausalLM

    return _load_any(AutoModelForCausalLM, path, what, dtype=dtype)


def load_score_model(path: str | Path, what: str = "reward model", dtype: torch.dtype = LOAD_DTYPE):
    """A sequence-classification model with one output (RM, or the critic made from it)."""
    from transformers import AutoModelForSequenceClassification

    return _load_any(AutoModelForSequenceClassification, path, what, num_labels=1, dtype=dtype)


def build_causal_lm(tokenizer, config_overrides: dict, seed: int):
    """A fresh small Llama-style model for a task's vocabulary (SiLU, RMSNorm: fast on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    cfg.update(config_overrides)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **cfg,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: log-probs must not depend on a dropout draw."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.eval()


def score_parts(model) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) of a sequence-classification model, for per-token scores."""
    if hasattr(model, "score_parts"):  # the shared-base critic (rto.lm.lora.CriticView)
        return model.score_parts()
    backbone = getattr(model, model.base_model_prefix)
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return backbone, head
    raise UserError(f"{type(model).__name__}: no score head found (expected .score or .classifier)")


def save_model(
    model, tokenizer, out: str | Path, extra_files: dict[str, dict] | None = None, state_dict: dict | None = None
) -> Path:
    """Save as safetensors into a temporary directory, then rename it into place.

    A crash mid-save leaves the previous checkpoint (if any) untouched. `state_dict`: the weights
    to write instead of the model's own (a sharded model's, gathered by rto.runtime.sharding).
    """
    _quiet()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None:
        # A gathered state dict holds tied weights (embeddings and LM head) twice: keep the first name.
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state_dict.pop(name, None)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    wrapper = type(model).__name__
    if wrapper.startswith("FSDP") and (tmp / "config.json").is_file():
        # FSDP2 subclasses the model as FSDP<Name>, and transformers records that class: record the model's.
        config = json.loads((tmp / "config.json").read_text())
        config["architectures"] = [wrapper.removeprefix("FSDP")]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, content in (extra_files or {}).items():
        (tmp / name).write_text(json.dumps(content, indent=2))
    old = out.with_name(out.name + ".old")
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


@dataclass(frozen=True)
class ScoreStats:
    """An RM's score mean and std over its training pairs (RM_STATS_FILE beside the model), by which
    `rto ppo` standardises its scores; mean 0 and std 1 leave a score as it is."""

    mean: float = 0.0
    std: float = 1.0

    def as_json(self) -> dict[str, float]:
        return asdict(self)


def read_reward_stats(path: str | Path) -> ScoreStats:
    """The RM's score statistics recorded at training time (mean 0, std 1 if absent)."""
    f = Path(path) / RM_STATS_FILE
    if not f.is_file():
        return ScoreStats()
    try:
        stats = json.loads(f.read_text())
        return ScoreStats(mean=float(stats["mean"]), std=float(stats["std"]))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{f}: unreadable reward statistics ({e})") from None
