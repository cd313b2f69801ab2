"""`rto eval`: sample every model on held-out prompts and compare them.

Per model: mean gold reward with a 95% bootstrap interval (where the task has a
gold reward), win rate against the baseline on the gold reward (same prompt,
ties count half), KL to the baseline (Monte-Carlo, nats per response), the
proxy RM score, a held-out judge's score (rto.lm.judges) and the response length. Every model is sampled with the same
seed, one response per prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rto.io.config import judge_field, opt, require, source_field, split_field
from rto.io.data import PROMPT_FIELDS, read_rows, render, write_json, write_jsonl
from rto.io.errors import UserError
from rto.runtime.process import seed_field, setup, threads_field


@dataclass
class EvalStageConfig:
    models: list[str] = opt([], "models as name=path, comma-separated (e.g. sft=runs/sft,ppo=runs/ppo/policy)")
    prompts: str = source_field("held-out test prompts, {prompt}, {messages} or {conversations} rows")
    prompts_split: str = split_field("test", "prompts")
    out: str = opt("", "output JSON file (samples go beside it)")
    task: str = opt("", "task with a gold reward (empty: none)")
    baseline: str = opt("sft", "model name to compute win rates and KL against")
    reward_model: str = opt("", "reward model for the proxy score (empty: none)")
    judge: str = judge_field("held-out judge scored beside the gold reward")
    n_prompts: int = opt(0, "use only the first N prompts (0: all)", ge=0)
    max_new_tokens: int = opt(64, "response length limit", ge=1)
    temperature: float = opt(1.0, "sampling temperature", gt=0)
    export: list[str] = opt(
        [],
        "also write the responses for external judges: alpaca_eval, arena_hard (files beside --out, one per model)",
        choices=["alpaca_eval", "arena_hard"],
    )
    seed: int = seed_field()
    threads: int = threads_field()

    def parsed_models(self) -> dict[str, str]:
        out = {}
        for item in self.models:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UserError(f"eval: --models item {item!r} is not name=path")
            out[name] = path
        return out

    def validate(self):
        require(self, "eval", "prompts", "out")
        models = self.parsed_models()
        if not models:
            raise UserError("eval: --models is required")
        if self.baseline not in models:
            raise UserError(f"eval: baseline {self.baseline!r} is not among --models ({', '.join(models)})")


def run(cfg: EvalStageConfig) -> dict:
    setup(cfg.seed, cfg.threads)
    from rto.lm.evaluate import gold_rewards, kl_to, mean_ci, rm_scores, sample, win_rate
    from rto.lm.models import load_causal_lm, load_score_model, load_tokenizer
    from rto.lm.rollout import Sampling

    raw_prompts = [r["prompt"] for r in read_rows(cfg.prompts, PROMPT_FIELDS, split=cfg.prompts_split)]
    if cfg.n_prompts:
        raw_prompts = raw_prompts[: cfg.n_prompts]
    models = cfg.parsed_models()
    task = None
    if cfg.task:
        from rto.tasks import load_task

        task = load_task(cfg.task)
    rm = load_score_model(cfg.reward_model) if cfg.reward_model else None
    judge = None
    if cfg.judge:
        from rto.lm.judges import load_judge

        judge = load_judge(cfg.judge, load_tokenizer(models[cfg.baseline]))
    baseline_path = models[cfg.baseline]
    tokenizer = load_tokenizer(baseline_path)
    prompts = [render(p, tokenizer, generation_prompt=True) for p in raw_prompts]
    baseline = load_causal_lm(baseline_path, f"model {cfg.baseline}")

    results, samples, golds = {}, [], {}
    order = [cfg.baseline] + [n for n in models if n != cfg.baseline]
    for name in order:
        model = baseline if name == cfg.baseline else load_causal_lm(models[name], f"model {name}")
        texts, batches = sample(model, tokenizer, prompts, Sampling(cfg.max_new_tokens, cfg.temperature), seed=cfg.seed)
        m: dict = {
            "path": models[name],
            "response_length": sum(float(b.response_mask.sum()) for b in batches) / len(prompts),
        }
        m[f"kl_to_{cfg.baseline}"] = kl_to(model, baseline, batches, cfg.temperature)
        if task is not None:
            g = gold_rewards(task, prompts, texts)
            golds[name] = g
            m["gold_reward"] = sum(g) / len(g)
            m["gold_reward_ci"] = list(mean_ci(g, seed=cfg.seed))
            m[f"win_rate_vs_{cfg.baseline}"] = win_rate(g, golds[cfg.baseline])
            parts = [task.gold_parts(p, t) for p, t in zip(prompts, texts)]
            if parts and parts[0]:
                m["gold_parts"] = {k: sum(x[k] for x in parts) / len(parts) for k in parts[0]}
        judged = judge(prompts, texts) if judge is not None else None
        if judged is not None:
            m["judge_score"], m["judge_score_ci"] = sum(judged) / len(judged), list(mean_ci(judged, seed=cfg.seed))
        scores = rm_scores(rm, batches) if rm is not None else None
        if scores is not None:
            m["rm_score"] = sum(scores) / len(scores)
        results[name] = m
        for i, (p, t) in enumerate(zip(prompts, texts)):
            row = {"model": name, "prompt": p, "response": t}
            if task is not None:
                row["gold_reward"] = golds[name][i]
            if scores is not None:
                row["rm_score"] = scores[i]
            if judged is not None:
                row["judge_score"] = judged[i]
            samples.append(row)
    out = Path(cfg.out)
    write_jsonl(out.with_name(out.stem + "_samples.jsonl"), samples)
    if cfg.export:
        export_for_judges(cfg.export, out, raw_prompts, samples, tokenizer)
    report = {"baseline": cfg.baseline, "n_prompts": len(prompts), "methods": results}
    write_json(out, report)
    return report


def _instruction(prompt) -> str:
    """What a judge reads as the instruction: the text, or a conversation's last user turn."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def export_for_judges(formats: list[str], out: Path, raw_prompts: list, samples: list[dict], tokenizer) -> list[Path]:
    """Responses in the files AlpacaEval (`alpaca_eval --model_outputs FILE`) and Arena-Hard-Auto
    (data/<bench>/model_answer/<model>.jsonl) read, special tokens removed."""
    import time as _time

    specials = [t for t in tokenizer.all_special_tokens if t]
    by_model: dict[str, list[dict]] = {}
    for row in samples:
        by_model.setdefault(row["model"], []).append(row)
    written = []
    for name, rows in by_model.items():
        outputs = []
        for row in rows:
            text = row["response"]
            for t in specials:
                text = text.replace(t, "")
            outputs.append(text.strip())
        instructions = [_instruction(p) for p in raw_prompts]
        if "alpaca_eval" in formats:
            path = out.with_name(f"{out.stem}_alpaca_eval_{name}.json")
            write_json(
                path,
                [
                    {"instruction": i, "output": o, "generator": name, "dataset": "rto-eval"}
                    for i, o in zip(instructions, outputs)
                ],
            )
            written.append(path)
        if "arena_hard" in formats:
            path = out.with_name(f"{out.stem}_arena_hard_{name}.jsonl")
            write_jsonl(
                path,
                (
                    {
                        "question_id": str(k),
                        "answer_id": f"{name}-{k}",
                        "model_id": name,
                        "choices": [
                            {"index": 0, "turns": [{"content": o, "token_len": len(tokenizer(o)["input_ids"])}]}
                        ],
                        "tstamp": _time.time(),
                    }
                    for k, o in enumerate(outputs)
                ),
            )
            written.append(path)
    return written
