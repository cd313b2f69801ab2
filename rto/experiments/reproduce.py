"""`rto reproduce`: the paper's claims on a task with a gold reward, over seeds, with intervals.

Per seed: one SFT model, preference set, RM and DPO model (`Pipeline.offline`), then
every RL method against them with the same data and the same settings:
 1. settings: a preset file from `rto tune` (`--preset FILE`) when it holds tuned settings;
    otherwise `rto tune`'s grids (rto.experiments.tuning.tune_settings) on the first seed (or on each:
    `tune: every-seed`), written to DIR/preset.yaml. Tuning runs only choose: they draw their
    RL randomness from seed + TUNING_SEED_OFFSET and are never reported;
 2. the methods and ablations (PPO, RTO, RS, Semi, DDPO, DPO-term only, REINFORCE++, RTO with
    REINFORCE++; `methods` picks), each one fresh run with the seed's own RL seed, the result
    chosen on the dev split (the selection protocol of `rto pipeline`); with `rm_ensemble` N > 1,
    PPO and RTO again on an ensemble of N RMs (`ppo+ens`, `rto+ens`);
 3. the DPO baseline policy: DPO with the settings its own dev grid chose (`rto tune`'s DPO grid
    on the first seed, at least as many runs as RTO's), its epoch chosen on dev as an RL run's
    iteration is (DPO_POLICY); RTO's reward model stays the preset's DPO model;
 4. the data-limited sweep: PPO and RTO on the first 1/32 ... 1/1 of a pool of `limited_pool`
    RL prompts, each prompt seen once (iterations = prompts / rollout size), so that PPO's score
    grows with its data - the paper's "PPO-level with 1/8 of the data" measured (rto.experiments.data_ratio);
 5. gold references: PPO and RTO with the gold score as the sparse reward, and PPO on the
    dense per-token gold reward (where the task has one);
 6. every policy evaluated on the same test prompts.
Then `DIR/results.json` and the figures (see `rto.experiments.report_reproduce`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rto.experiments.pipeline import Pipeline
from rto.experiments.pipeline_config import RL_METHODS, PipelineConfig
from rto.experiments.pipeline_summary import reference_lines
from rto.experiments.tuning import (
    CRITIC_FREE_METHODS,
    DPO_POLICY,
    DPO_POLICY_SECTION,
    FAMILIES,
    METHOD_SECTION,
    TUNED_KEYS,
    TUNING_SEED_OFFSET,
    TuneGrid,
    dpo_policy_job,
    families_for,
    family_choices,
    is_preset_file,
    tune_dpo,
    tune_families,
    write_preset,
)
from rto.io.config import opt, require
from rto.io.data import write_json, write_jsonl
from rto.tasks import Task

METHODS = list(RL_METHODS)  # every RL method of the pipeline (placements, REINFORCE++, GRPO, RLOO)
# Run unless --methods says otherwise: the paper's methods and ablations. GRPO and RLOO (with and
# without RTO's reward) are run when named, each family tuned with PPO's budget (tuning.FAMILIES).
DEFAULT_METHODS = [m for m in METHODS if RL_METHODS[m].get("estimator") not in ("grpo", "rloo")]
GOLD_REFERENCES = {  # name: (method, extra settings)
    "ppo-gold": ("ppo", {"rm_weight": 0.0, "custom_rewards": ["task:gold-sequence"]}),
    "rto-gold": ("rto", {"rm_weight": 0.0, "custom_rewards": ["task:gold-sequence"]}),
    "ppo-dense-gold": ("ppo", {"rm_weight": 0.0, "custom_rewards": ["task:gold"]}),
}
ENSEMBLE_METHODS = ("ppo", "rto")  # run again on the RM ensemble as METHOD+ens
QUICK = dict(
    preset="smoke",
    ppo_lrs=[1e-4],
    kl_coefs=[0.01, 0.05],
    rto_beta1s=[0.05, 0.3],
    dpo_betas=[0.05, 0.3],
    dpo_lrs=[5e-4],
    fractions=[0.5, 1.0],
    limited_pool=32,
)


@dataclass
class ReproduceConfig(TuneGrid):
    out: str = opt("", "output directory")
    task: str = opt("keyed", "task with a gold reward")
    preset: str = opt(
        "default",
        "the task's preset of stage settings, or a preset file from `rto tune` (its tuned "
        "settings are used and nothing is tuned again)",
    )
    seeds: int = opt(5, "number of seeds", ge=1)
    first_seed: int = opt(0, "seeds are first_seed, first_seed + 1, ...", ge=0)
    quick: bool = opt(
        False, "a few minutes: smoke preset, 2 seeds at most, small grids (for tests; settings given explicitly stay)"
    )
    jobs: int = opt(2, "RL runs at once as processes (1: in this process, one after another)", ge=1)
    threads: int = opt(0, "torch threads per process (0: cores / jobs)", ge=0)
    methods: list[str] = opt(
        DEFAULT_METHODS, f"RL methods run on every seed (PPO and RTO always; known: {', '.join(METHODS)})"
    )
    rm_ensemble: int = opt(
        1, "N > 1: also PPO and RTO on an ensemble of N RMs (bootstrap resamples; ppo+ens, rto+ens)", ge=1
    )
    fractions: list[float] = opt(
        [0.03125, 0.0625, 0.125, 0.25, 0.5, 1.0],
        "data-limited sweep: fractions of the pool (each prompt seen once); below 1/8 so that "
        "the data ratio is bracketed, not only bounded",
    )
    limited_pool: int = opt(6400, "data-limited sweep: prompts in the whole pool (0: no sweep)", ge=0)
    tune: Literal["first-seed", "every-seed"] = opt("first-seed", "tune on the first seed only, or on each")
    gold_references: bool = opt(True, "also run the gold-reward reference points")
    resume: bool = opt(True, "skip runs that finished before with the same settings")
    report_only: bool = opt(
        False,
        "only rebuild results.json, results.md and the figures from OUT/per_seed.json (no run directories needed)",
    )
    ppo: dict = opt({}, "extra `rto ppo` settings for every RL run")

    def validate(self):
        from rto.io.errors import UserError

        require(self, "reproduce", "out")
        if self.quick:
            defaults = {
                f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(self)
            }
            for key, value in QUICK.items():  # only where the user kept the default
                if getattr(self, key) == defaults[key]:
                    setattr(self, key, value)
            self.seeds = min(self.seeds, 2)
            self.jobs = 1
        self.check_budget()
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"reproduce: unknown methods {', '.join(unknown)}; known: {', '.join(METHODS)}")
        self.methods = list(dict.fromkeys(["ppo", "rto", *self.methods]))
        self.families = list(dict.fromkeys(["ppo", *self.families, *families_for(self.methods)]))  # each one run
        for f in self.fractions:
            if not 0 < f <= 1:
                raise UserError(f"reproduce: fractions must be in (0, 1], got {f}")
        self.fractions = sorted({*self.fractions, 1.0})


def _limited_pools(pipe, cfg: ReproduceConfig) -> list[tuple[float, Path, int]]:
    """(fraction, prompt file, iterations) of the data-limited sweep: the first fraction of a pool of
    `limited_pool` train prompts (the data stage's RL stream, extended), each seen once."""
    d = pipe.out / "data"
    pool = pipe.task.prompts("train", cfg.limited_pool, seed=pipe.cfg.seed + 1_000_003)
    rollout = pipe.rl_settings("ppo").get("rollout_batch_size", 64)
    out = []
    for f in cfg.fractions:
        n = max(rollout, round(len(pool) * f / rollout) * rollout)
        path = d / f"limited_prompts_{n}.jsonl"
        if not path.is_file():
            write_jsonl(path, ({"prompt": p} for p in pool[:n]))
        out.append((f, path, n // rollout))
    return out


class Reproduction:
    def __init__(self, cfg: ReproduceConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.tuning: dict = {}  # seed -> rto tune's record
        self.chosen: dict = {}
        self.dpo_chosen: dict = {}  # the DPO baseline's settings (beta, learning rate)
        self.method_chosen: dict = {}  # method -> settings, the critic-free families tuned here

    def pipeline(self, seed: int) -> Pipeline:
        cfg = self.cfg
        pcfg = PipelineConfig(
            out=str(self.out / f"seed{seed}"),
            task=cfg.task,
            preset=cfg.preset,
            methods=["sft", "dpo", *cfg.methods],
            seed=seed,
            jobs=cfg.jobs,
            threads=cfg.threads,
            ppo=dict(cfg.ppo),
            resume=cfg.resume,
            rm_ensemble=cfg.rm_ensemble,
        )
        return Pipeline(pcfg)

    def settings_from_preset(self, pipe: Pipeline) -> bool:
        """A preset file with tuned settings: use them (they are in the pipeline's preset already)."""
        tuned = pipe.preset_record.get("tuned")
        if tuned:
            self.tuning = {str(tuned.get("seed", "?")): {**tuned, "from_preset_file": self.cfg.preset}}
            self.chosen = {}
            self.dpo_chosen = dict(pipe.preset.get(DPO_POLICY_SECTION, {}))
        return bool(tuned)

    def tune(self, pipe: Pipeline, families: list[str]) -> None:
        """rto tune's grids on this seed's models (PPO never less budget than RTO, each family the
        same as PPO's; the DPO policy never less than RTO): the RL `families` not tuned in a preset
        file, and the DPO policy's where no preset file gave it (or on every seed with `tune:
        every-seed`). Sets `self.chosen`, `self.method_chosen`, `self.dpo_chosen`; writes OUT/preset.yaml."""
        seed = str(pipe.cfg.seed)
        grid = dataclasses.replace(self.cfg, families=families or ["ppo"])
        record, others = (
            tune_families(pipe, grid, "gold_reward", {"reward_model_ensemble": []}) if families else (None, {})
        )
        if record:
            self.tuning[seed] = {k: v for k, v in record.items() if k != "chosen"}
            self.chosen = record["chosen"]
        for family, rec in others.items():
            self.method_chosen.update(family_choices(family, rec))
            self.tuning.setdefault(seed, {}).setdefault("families", {})[family] = {
                k: v for k, v in rec.items() if k != "chosen"
            }
        dpo = None
        if not self.dpo_chosen or record:
            dpo = tune_dpo(pipe, self.cfg, "gold_reward")
            self.dpo_chosen = dpo["chosen"]
            self.tuning.setdefault(seed, {})["dpo_policy"] = {k: v for k, v in dpo.items() if k != "chosen"}
        carried = pipe.preset_record if is_preset_file(self.cfg.preset) else None  # a tuned file's choices stay
        write_preset(
            self.out / "preset.yaml", pipe.task.name, pipe.base_preset, pipe.cfg.seed, record, dpo, others, carried
        )

    def settings_for(self, method: str, ppo_choice: dict) -> dict:
        """A method's tuned settings: its family's choice; PPO's for the PPO family and the other
        ablations; nothing (the preset file's method_overrides) for a critic-free family tuned there."""
        if method in self.method_chosen:
            return dict(self.method_chosen[method])
        return {} if method in CRITIC_FREE_METHODS else dict(ppo_choice)

    def run_seed(self, seed: int, tune: bool) -> dict:
        cfg = self.cfg
        pipe = self.pipeline(seed)
        pipe.out.mkdir(parents=True, exist_ok=True)
        pipe.offline(needs_rm=True, needs_dpo=True)
        if tune:
            from_preset = self.settings_from_preset(pipe)
            in_file = set(pipe.preset.get(METHOD_SECTION, {})) if from_preset else set()
            families = [] if from_preset else ["ppo"]
            families += [f for f in cfg.families if f != "ppo" and not set(FAMILIES[f]) <= in_file]
            if families or not self.dpo_chosen:
                self.tune(pipe, families)
        settings = dict(self.chosen)
        no_ensemble = {"reward_model_ensemble": []}
        specs: list[tuple[str, str, dict, Path | None]] = [
            (m, m, {**self.settings_for(m, settings), **no_ensemble}, None) for m in cfg.methods
        ]
        if cfg.rm_ensemble > 1:
            specs += [(f"{m}+ens", m, settings, None) for m in ENSEMBLE_METHODS]
        pools = _limited_pools(pipe, cfg) if cfg.limited_pool else []
        specs += [
            (f"{m}@{f:g}", m, {**settings, **no_ensemble, "iterations": its}, prompts)
            for f, prompts, its in pools
            for m in ("ppo", "rto")
        ]
        has_gold = type(pipe.task).gold_token_rewards is not Task.gold_token_rewards
        if cfg.gold_references:
            specs += [
                (name, method, {**settings, **no_ensemble, **extra}, None)
                for name, (method, extra) in GOLD_REFERENCES.items()
                if name != "ppo-dense-gold" or has_gold
            ]
        t = pipe.threads_for(min(cfg.jobs, len(specs)))
        # Every result is chosen on the dev split, as `rto pipeline` chooses it.
        jobs = [
            pipe.rl_job(name, method, {**extra, **pipe.selection_settings(method)}, prompts=prompts, threads=t)
            for name, method, extra, prompts in specs
        ]
        # The DPO baseline: the tuned settings, its epoch chosen on dev (RTO's reward model stays "dpo").
        jobs.append(dpo_policy_job(pipe, DPO_POLICY, self.dpo_chosen, t, seed))
        pipe.runner.run_group(jobs)
        runs = {name: pipe.out / name for name, _, _ in jobs}
        models = {"sft": pipe.out / "sft", "dpo": pipe.out / "dpo"} | {
            n: p if n == DPO_POLICY else p / "policy" for n, p in runs.items()
        }
        ev = pipe.evaluate(models, pipe.out / "eval.json", with_rm=True)
        refs = reference_lines(pipe, jobs[0][2])
        rm = json.loads((pipe.out / "rm" / "metrics.json").read_text())
        run_metrics = {n: json.loads((p / "metrics.json").read_text()) for n, p in runs.items()}
        rollout = pipe.rl_settings("ppo").get("rollout_batch_size", 64)
        from rto.experiments.report_reproduce import token_alignment

        return {
            "seed": seed,
            "runs": {n: str(p) for n, p in runs.items()},
            "eval": ev,
            "reference_lines": refs,
            "rm_accuracy": rm.get("eval_accuracy"),
            "settings": settings or {k: v for k, v in pipe.preset.get("ppo", {}).items() if k in TUNED_KEYS},
            "method_settings": {
                m: {k: v for k, v in pipe.rl_settings(m, self.settings_for(m, settings)).items() if k in TUNED_KEYS}
                for m in cfg.methods
            },
            "dpo_policy_settings": dict(self.dpo_chosen),
            "limited_pool": [{"fraction": f, "prompts": its * rollout, "iterations": its} for f, _, its in pools],
            "selection": {n: m.get("selection") for n, m in run_metrics.items()},
            "divergence": {n: m.get("divergence") for n, m in run_metrics.items()},
            "token_alignment": token_alignment(pipe.out, pipe.task) if has_gold else {},
        }

    def run(self) -> dict:
        from rto.experiments.report_figures import write_figures
        from rto.experiments.report_reproduce import aggregate

        cfg = self.cfg
        start = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        seeds = [cfg.first_seed + i for i in range(cfg.seeds)]
        previous: dict = {}
        if cfg.report_only:
            # Everything the report needs is in per_seed.json (each method's per-seed means); the
            # run directories only add the training curves, taken from results.json where they
            # are gone. The runs' tuning record, wall time and machine are kept as they were.
            per_seed = json.loads((self.out / "per_seed.json").read_text())
            previous = (
                json.loads((self.out / "results.json").read_text()) if (self.out / "results.json").is_file() else {}
            )
            self.tuning = previous.get("tuning", {}).get("grids", {})
            self.chosen = previous.get("tuning", {}).get("chosen", {})
            self.dpo_chosen = previous.get("tuning", {}).get("dpo_policy", {})
        else:
            per_seed = []
            for i, seed in enumerate(seeds):
                print(f"[rto] reproduce: seed {seed} ({i + 1} of {len(seeds)})", flush=True)
                per_seed.append(self.run_seed(seed, tune=i == 0 or cfg.tune == "every-seed"))
                write_json(self.out / "per_seed.json", per_seed)
        results = aggregate(per_seed, self.out, cfg, previous)
        results["tuning"] = {
            "grids": self.tuning,
            "chosen": self.chosen or per_seed[0].get("settings", {}),
            "dpo_policy": self.dpo_chosen or per_seed[0].get("dpo_policy_settings", {}),
            "protocol": next(
                (
                    f"the preset file of --preset {g['from_preset_file']}"
                    for g in self.tuning.values()
                    if g.get("from_preset_file")
                ),
                cfg.tune,
            ),
        }
        if previous.get("tuning", {}).get("protocol"):
            results["tuning"]["protocol"] = previous["tuning"]["protocol"]
        results["wall_time_s"] = previous.get("wall_time_s", time.time() - start)
        results["machine"] = previous.get("machine") or _machine()
        write_json(self.out / "results.json", results)
        write_figures(results, per_seed, self.out, cfg)
        from rto.experiments.report_pages import results_markdown

        command = (
            f"rto reproduce --task {cfg.task} --preset {cfg.preset} --seeds {cfg.seeds}"
            + (f" --rm-ensemble {cfg.rm_ensemble}" if cfg.rm_ensemble > 1 else "")
            + (" --quick" if cfg.quick else "")
        )
        (self.out / "results.md").write_text(results_markdown(results, command))
        from rto.experiments.report_pages import summary_table

        print(summary_table(results))
        print(f"results: {self.out / 'results.json'}")
        return results


def _machine() -> str:
    import os
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
        f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    )


def run(cfg: ReproduceConfig) -> dict:
    from rto.runtime.distributed import refuse_launcher

    refuse_launcher("reproduce")
    return Reproduction(cfg).run()


__all__ = ["ReproduceConfig", "run", "METHODS", "GOLD_REFERENCES", "RL_METHODS", "TUNING_SEED_OFFSET"]
