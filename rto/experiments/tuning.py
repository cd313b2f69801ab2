"""The tuning grids of `rto tune`, `rto pipeline --tune` and `rto reproduce`, and preset files.

On a pipeline's own SFT model, RM and DPO model (`Pipeline.offline`, the preset's settings):
 1. PPO: a grid of learning rate (policy and critic) x KL coefficient;
 2. RTO: PPO's choice, then a grid of beta1 (dpo_clip = beta1 x `dpo_clip_ratio`) - RTO tunes
    only what PPO does not have, and never more runs than PPO (the budget is checked up front);
 3. the DPO policy, the baseline RTO is compared with: a grid of beta x learning rate, each run's
    epoch (or the SFT model) chosen on dev like an RL run's iteration, never fewer runs than RTO.
    Its choice is the preset file's `dpo_policy` section; RTO's reward model keeps the `dpo` one.
Every run is scored by the dev criterion at the checkpoint the dev selection would keep (the
best evaluation; the task's gold reward, or a held-out judge's score), never by the test split.
Tuning runs draw their RL randomness from seed + TUNING_SEED_OFFSET, so results rerun afresh
(`rto pipeline`, `rto reproduce`) are not the picked runs themselves.

The functions take the pipeline they run in (rto.experiments.pipeline.Pipeline) as an argument and import
nothing of it, so the pipeline can use them; the `rto tune` command is rto.experiments.tune.

The preset file (YAML) holds the stage settings the pipeline reads over the task's base preset,
and the grids with their scores: `rto pipeline --preset FILE`, `rto reproduce --preset FILE`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from rto.core.advantages import ESTIMATORS
from rto.experiments.pipeline_config import RL_METHODS
from rto.io.config import opt
from rto.io.errors import UserError

TUNING_SEED_OFFSET = 10_000_019  # tuning runs' `rto ppo` seed: seed + this (the models stay the seed's own)
TUNED_KEYS = ("actor_lr", "critic_lr", "kl_coef", "beta1", "dpo_clip")
# RL families: (the method on the RM's reward, RTO's method on its choice). Each gets the same grids.
FAMILIES = {"ppo": ("ppo", "rto"), "grpo": ("grpo", "rto-grpo"), "rloo": ("rloo", "rto-rloo")}
METHOD_SECTION = "method_overrides"  # a preset file's per-method settings (the critic-free families' choices)
CRITIC_FREE_METHODS = {m for f, methods in FAMILIES.items() if f != "ppo" for m in methods}


def families_for(methods: list[str]) -> list[str]:
    """The families whose grids choose the settings of these RL methods: PPO's for every method
    outside the critic-free families (the placements and REINFORCE++ take PPO's choice)."""
    rl = [m for m in methods if m in RL_METHODS]
    ppo = ["ppo"] if any(m not in CRITIC_FREE_METHODS for m in rl) or not rl else []
    return ppo + [f for f, family in FAMILIES.items() if f != "ppo" and set(family) & set(rl)]


@dataclass
class TuneGrid:
    ppo_lrs: list[float] = opt([5e-5, 1e-4, 2e-4], "PPO grid: learning rates (policy and critic)")
    kl_coefs: list[float] = opt([0.01, 0.05, 0.2], "PPO grid: KL coefficients")
    rto_beta1s: list[float] = opt([0.05, 0.1, 0.3, 1.0], "RTO grid, on PPO's choice: beta1 values")
    dpo_clip_ratio: float = opt(1.0, "RTO's dpo_clip = beta1 x this (1: the log-ratio is clipped at +-1)", gt=0)
    tune_iterations: int = opt(0, "iterations of each tuning run (0: the preset's; PPO's and RTO's alike)", ge=0)
    dpo_betas: list[float] = opt([0.05, 0.1, 0.3], "DPO policy grid: betas (the baseline is tuned as hard as RTO)")
    dpo_lrs: list[float] = opt(
        [2.5e-4, 5e-4, 1e-3],
        "DPO policy grid: learning rates; every run's epoch (or the "
        "SFT model) is chosen on dev, as an RL run's iteration is",
    )
    families: list[str] = opt(
        ["ppo"],
        "RL families tuned, each with the same budget: ppo (PPO's grid, then RTO's beta1 on its choice), "
        "grpo (GRPO, then RTO-GRPO), rloo (RLOO, then RTO-RLOO)",
    )
    extend_edges: int = opt(
        0,
        "rounds of PPO runs one step past the grid's edge where its best point lies on it "
        "(each round: at most one more learning rate and one more KL coefficient)",
        ge=0,
    )

    def check_budget(self) -> None:
        ppo, rto = len(self.ppo_lrs) * len(self.kl_coefs), len(self.rto_beta1s)
        if not ppo or not rto:
            raise UserError("tune: every grid needs at least one value")
        if rto > ppo:
            raise UserError(
                f"tune: the RTO grid ({rto} runs) is larger than the PPO grid ({ppo} runs): PPO is never "
                "given less tuning budget than RTO"
            )
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise UserError(f"tune: families must be some of {', '.join(FAMILIES)}, got {', '.join(unknown) or 'none'}")
        dpo = len(self.dpo_betas) * len(self.dpo_lrs)
        if dpo < rto:
            raise UserError(
                f"tune: the DPO policy grid ({dpo} runs) is smaller than the RTO grid ({rto} runs): the "
                "DPO baseline is never given less tuning budget than RTO"
            )


def _dev_score(run_dir: Path, metric: str) -> float:
    """The dev criterion at the checkpoint the selection keeps (else the last evaluation)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if metrics.get("selection"):
        return float(metrics["selection"]["best"])
    curve = metrics.get("curve") or [{}]
    return float(curve[-1].get(metric, float("nan")))


def edge_steps(rows: list[dict], keys: tuple[str, ...] = ("actor_lr", "kl_coef")) -> list[dict]:
    """Settings one step past the edge of what was tried, along each key where the best row sits on
    that edge (the others held at the best row's values); the step is the ratio of the two values
    nearest the edge. A best point on the edge says the optimum may lie outside the grid."""
    best = max(rows, key=lambda r: r["dev_score"])
    tried = {tuple(r[k] for k in keys) for r in rows}
    out = []
    for key in keys:
        line = sorted({r[key] for r in rows if all(r[k] == best[k] for k in keys if k != key)})
        if len(line) < 2:
            continue
        if best[key] == line[-1]:
            value = line[-1] * line[-1] / line[-2]
        elif best[key] == line[0]:
            value = line[0] * line[0] / line[1]
        else:
            continue
        value = float(f"{value:.6g}")  # 1e-3 * 1e-3 / 1e-4 is 0.009999999999999998 in floats
        step = {k: (value if k == key else best[k]) for k in keys}
        if tuple(step[k] for k in keys) not in tried:
            out.append(step)
    return out


def tune_settings(pipe, grid: TuneGrid, metric: str, fixed: dict | None = None, family: str = "ppo") -> dict:
    """Run a family's grids on `pipe`'s offline models (with `fixed` settings in every run): its
    first method over learning rate x KL coefficient (the critic's rate is the policy's), then its
    RTO method over beta1 at that choice; {"chosen": {...}, "<method>_grid": [...], ...}."""
    grid.check_budget()
    start = time.time()
    base, dense = FAMILIES[family]
    critic = ESTIMATORS[pipe.rl_settings(base).get("estimator", "gae")].needs_critic
    rates = ("actor_lr", "critic_lr") if critic else ("actor_lr",)
    extra_its = {"iterations": grid.tune_iterations} if grid.tune_iterations else {}

    def jobs(method: str, settings: list[dict], names: list[str]):
        threads = pipe.threads_for(min(pipe.cfg.jobs, len(settings)))
        out = []
        for name, s in zip(names, settings):
            extra = {**(fixed or {}), **s, **extra_its, **pipe.selection_settings(method)}
            name, stage, cfg = pipe.rl_job(name, method, extra, threads=threads)
            out.append((name, stage, dataclasses.replace(cfg, seed=pipe.cfg.seed + TUNING_SEED_OFFSET)))
        pipe.runner.run_group(out)
        return [_dev_score(pipe.out / name, metric) for name, _, _ in out]

    def run_base(points: list[tuple[float, float]], **mark) -> list[dict]:
        settings = [{**{r: lr for r in rates}, "kl_coef": kl} for lr, kl in points]
        scores = jobs(base, settings, [f"tune/{base}_lr{lr:g}_kl{kl:g}" for lr, kl in points])
        return [{**s, "dev_score": v, **mark} for s, v in zip(settings, scores)]

    base_rows = run_base([(lr, kl) for lr in grid.ppo_lrs for kl in grid.kl_coefs])
    for _ in range(grid.extend_edges):  # only the first method's budget grows: it stays >= RTO's
        steps = [(e["actor_lr"], e["kl_coef"]) for e in edge_steps(base_rows)]
        if not steps:
            break
        base_rows += run_base(steps, edge_step=True)
    choice = {k: v for k, v in max(base_rows, key=lambda r: r["dev_score"]).items() if k in TUNED_KEYS}
    dense_settings = [{**choice, "beta1": b, "dpo_clip": b * grid.dpo_clip_ratio} for b in grid.rto_beta1s]
    scores = jobs(dense, dense_settings, [f"tune/{dense}_b{b:g}" for b in grid.rto_beta1s])
    dense_rows = [
        {"beta1": s["beta1"], "dpo_clip": s["dpo_clip"], "dev_score": v} for s, v in zip(dense_settings, scores)
    ]
    best = max(dense_rows, key=lambda r: r["dev_score"])
    iterations = grid.tune_iterations or pipe.rl_settings(base).get("iterations", 100)
    return {
        "chosen": {**choice, "beta1": best["beta1"], "dpo_clip": best["dpo_clip"]},
        "criterion": f"dev {metric} at the selected checkpoint",
        f"{base}_grid": base_rows,
        f"{dense}_grid": dense_rows,
        "budget": {f"{base}_runs": len(base_rows), f"{dense}_runs": len(dense_rows), "iterations_per_run": iterations},
        "rl_seed": pipe.cfg.seed + TUNING_SEED_OFFSET,
        "seconds": time.time() - start,
    }


def family_choices(family: str, record: dict) -> dict:
    """{method: settings} of a critic-free family's record: the first method's learning rate and KL
    coefficient, and RTO's beta1 and clip on top for its RTO method."""
    base, dense = FAMILIES[family]
    first = {k: v for k, v in record["chosen"].items() if k in ("actor_lr", "critic_lr", "kl_coef")}
    return {base: first, dense: {**first, **{k: record["chosen"][k] for k in ("beta1", "dpo_clip")}}}


def tune_families(pipe, grid: TuneGrid, metric: str, fixed: dict | None = None) -> tuple[dict | None, dict]:
    """(the ppo family's record or None, {family: record} of the others) for `grid.families`."""
    records = {f: tune_settings(pipe, grid, metric, fixed, family=f) for f in grid.families}
    return records.pop("ppo", None), records


DPO_POLICY = "dpo-tuned"  # the DPO baseline policy: tuned on dev and dev-selected (RTO's reward model is "dpo")
DPO_POLICY_SECTION = "dpo_policy"  # its settings in a preset file


def dpo_policy_job(pipe, name: str, settings: dict, threads: int, seed: int):
    """An `rto dpo` run as a baseline policy, OUT/name: the preset's DPO settings with `settings`
    over them, its epoch (or the SFT model) chosen on the dev prompts by the pipeline's criterion,
    sampled as the RL runs' dev points are (their response length, temperature and prompt count)."""
    d, rl = pipe.out / "data", pipe.rl_settings("ppo")
    wiring = {
        "model": str(pipe.out / "sft"),
        "data": str(d / "prefs.jsonl"),
        "out": str(pipe.out / name),
        "seed": seed,
        "threads": threads,
        "select_by": pipe.cfg.select_by,
        "eval_prompts": str(d / "dev_prompts.jsonl"),
        "n_eval": rl.get("n_eval", 128),
        "task": pipe.cfg.task,
        "judge": pipe.judge_spec,
        "eval_max_new_tokens": rl.get("max_new_tokens", 64),
        "eval_temperature": rl.get("temperature", 1.0),
    }
    return name, "dpo", pipe.stage_config("dpo", "dpo", wiring, settings)


def tune_dpo(pipe, grid: TuneGrid, metric: str) -> dict:
    """The DPO policy's grid (beta x learning rate, each run's epoch chosen on dev) on `pipe`'s SFT
    model and pairs; {"chosen": {"beta", "learning_rate"}, "dpo_grid": [...], ...}."""
    start = time.time()
    settings = [{"beta": b, "learning_rate": lr} for b in grid.dpo_betas for lr in grid.dpo_lrs]
    threads = pipe.threads_for(min(pipe.cfg.jobs, len(settings)))
    jobs = [
        dpo_policy_job(
            pipe, f"tune/dpo_b{s['beta']:g}_lr{s['learning_rate']:g}", s, threads, pipe.cfg.seed + TUNING_SEED_OFFSET
        )
        for s in settings
    ]
    pipe.runner.run_group(jobs)
    rows = []
    for s, (name, _, _) in zip(settings, jobs):
        selection = json.loads((pipe.out / name / "metrics.json").read_text())["selection"]
        rows.append({**s, "dev_score": float(selection["best"]), "best_epoch": selection["best_epoch"]})
    best = max(rows, key=lambda r: r["dev_score"])
    return {
        "chosen": {"beta": best["beta"], "learning_rate": best["learning_rate"]},
        "dpo_grid": rows,
        "criterion": f"dev {metric} at the selected epoch",
        "runs": len(rows),
        "seconds": time.time() - start,
    }


def tune_pipeline(pipe) -> None:
    """`rto pipeline --tune`: the grids of the families of its RL methods on the pipeline's own models;
    the choices go over its preset (PPO's and RTO's under `ppo`, the critic-free families' under
    `method_overrides`, the DPO policy's under `dpo_policy`), written to OUT/preset.yaml."""
    from rto.io.config import build

    grid = build(TuneGrid, {"families": families_for(pipe.cfg.methods), **pipe.cfg.tune_grid}, "pipeline tune_grid")
    record, others = tune_families(pipe, grid, pipe.cfg.select_by)
    dpo = tune_dpo(pipe, grid, pipe.cfg.select_by) if "dpo" in pipe.cfg.methods else None
    path = write_preset(pipe.out / "preset.yaml", pipe.task.name, pipe.base_preset, pipe.cfg.seed, record, dpo, others)
    doc = yaml.safe_load(path.read_text())
    for section in ("ppo", DPO_POLICY_SECTION, METHOD_SECTION):
        if section in doc:
            pipe.preset[section] = {**pipe.preset.get(section, {}), **doc[section]}
    pipe.preset_record = {"base": doc["base"], "tuned": doc["tuned"]}


def write_preset(
    path: Path,
    task_name: str,
    base: str,
    seed: int,
    record: dict | None,
    dpo_record: dict | None = None,
    families: dict | None = None,
    carried: dict | None = None,
) -> Path:
    """The preset file: the tuned `ppo` settings (PPO's family) over the base preset, the critic-free
    families' choices per method (`method_overrides`), the DPO baseline's settings (`dpo_policy`,
    over the `dpo` section; RTO's reward model keeps the `dpo` section's), and how they were chosen.
    `carried`: a preset file tuned before, whose sections and record stay unless tuned again."""
    carried = carried or {}
    doc = {"task": task_name, "base": base, **{k: v for k, v in carried.items() if k not in ("task", "base", "tuned")}}
    tuned = {"seed": seed, **carried.get("tuned", {})}
    if record:
        doc["ppo"] = {**doc.get("ppo", {}), **record["chosen"]}
        tuned.update({"seed": seed, **{k: v for k, v in record.items() if k != "chosen"}})
    if dpo_record:
        doc[DPO_POLICY_SECTION] = dict(dpo_record["chosen"])
        tuned["dpo_policy"] = {k: v for k, v in dpo_record.items() if k != "chosen"}
    for family, rec in (families or {}).items():
        doc[METHOD_SECTION] = {**doc.get(METHOD_SECTION, {}), **family_choices(family, rec)}
        tuned["families"] = {
            **tuned.get("families", {}),
            family: {"seed": seed, **{k: v for k, v in rec.items() if k != "chosen"}},
        }
    doc["tuned"] = tuned
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        f"# rto tune: RL settings chosen on the dev split of {task_name} (seed {seed}).\n"
        f"# Read by: rto pipeline --preset {path} ; rto reproduce --preset {path}\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )
    tmp.replace(path)
    return path


def is_preset_file(preset: str) -> bool:
    return preset.endswith((".yaml", ".yml"))


def read_preset(path: str, task) -> tuple[dict, dict]:
    """(stage settings: the task's base preset with the file's sections over it, the file's record)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--preset {path}: file not found")
    try:
        doc = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--preset {path}: not YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or "base" not in doc:
        raise UserError(f"--preset {path}: expected a mapping with 'base' (a preset of the task) and stage sections")
    if doc.get("task") not in (None, task.name):
        raise UserError(f"--preset {path}: tuned for task {doc['task']!r}, not {task.name!r}")
    presets = getattr(task, "presets", {}) or {}
    if doc["base"] not in presets:
        raise UserError(
            f"--preset {path}: base {doc['base']!r} is not a preset of {task.name} "
            f"(has: {', '.join(presets) or 'none'})"
        )
    settings = {section: dict(values) for section, values in presets[doc["base"]].items()}
    for section, values in doc.items():
        if section in ("task", "base", "tuned"):
            continue
        if not isinstance(values, dict):
            raise UserError(f"--preset {path}: section {section!r} is not a mapping")
        if section == METHOD_SECTION and not all(isinstance(v, dict) for v in values.values()):
            raise UserError(f"--preset {path}: {METHOD_SECTION}: each method's settings are a mapping")
        settings[section] = {**settings.get(section, {}), **values}
    return settings, doc
