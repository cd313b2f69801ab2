"""Model cards: the README.md written beside every saved model (how it was trained, its metrics,
how to load it), through huggingface_hub's ModelCard."""

from __future__ import annotations

import os
from pathlib import Path


def _hub_id(name: str) -> bool:
    """`org/name` that is not a directory here: a hub model id."""
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/", "~"))


def _loading_snippet(model_dir: str | Path, stage: str) -> list[str]:
    """How to load the saved model, in the card (an RM is a one-label sequence classifier)."""
    path = str(model_dir)
    if (Path(model_dir) / "adapter_config.json").is_file():
        cls = "AutoPeftModelForSequenceClassification" if stage == "rm" else "AutoPeftModelForCausalLM"
        return [
            f"from peft import {cls}",
            "from transformers import AutoTokenizer",
            "",
            f"model = {cls}.from_pretrained({path!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
        ]
    cls = "AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM"
    lines = [
        f"from transformers import {cls}, AutoTokenizer",
        "",
        f"model = {cls}.from_pretrained({path!r})",
        f"tokenizer = AutoTokenizer.from_pretrained({path!r})",
    ]
    if stage == "rm":
        lines.append(
            "score = model(**tokenizer(prompt + response, return_tensors='pt')).logits[0, 0]  # higher: preferred"
        )
    return lines


def write_model_card(model_dir: str | Path, stage: str, cfg, metrics: dict) -> Path:
    """README.md beside a saved model: what it was trained from, on what, how, and how it ended."""
    import yaml

    from rto import __version__
    from rto.io.config import to_dict

    settings = to_dict(cfg)
    base = settings.get("model") or settings.get("policy") or "(a new model for the task)"
    data = settings.get("data") or settings.get("prompts") or ""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    final = metrics.get("final") or {}
    scalars.update({f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))})
    from huggingface_hub import ModelCard, ModelCardData

    # Hub metadata through huggingface_hub's own card classes; `base_model` names hub models only
    # (a local directory is no base_model there).
    meta = ModelCardData(
        library_name="peft" if (Path(model_dir) / "adapter_config.json").is_file() else "transformers",
        tags=["rto-rlhf", f"rto-{stage}"],
        base_model=base if _hub_id(base) else None,
    )
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {Path(model_dir).name}: `rto {stage}` (rto-rlhf {__version__})",
        "",
        f"- base model: `{base}`",
        f"- data: `{data}`",
        "",
        "## Use",
        "",
        "```python",
        *_loading_snippet(model_dir, stage),
        "```",
        "",
        "## Final metrics",
        "",
        *[f"- {k}: {v:.6g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in sorted(scalars.items())],
        "",
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=False).strip(),
        "```",
        "",
    ]
    path = Path(model_dir) / "README.md"
    tmp = path.with_name("README.md.tmp")
    ModelCard("\n".join(lines)).save(tmp)
    os.replace(tmp, path)
    return path
