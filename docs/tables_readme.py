"""The measured figures of the README and of docs/usage.md (see docs/tables.py).

README.md holds one table, the paper's claims (`readme.paper-claims`), written by docs/tables_results.py's
`paper_claims` from the committed docs/results/*/results.json. docs/usage.md's "What `make demo` shows"
(once the README's) holds the per-seed study of `make demo`, written from the committed
docs/results/demo_seeds.json; its blocks keep their `readme.` names.

The other tables of these pages are not measurements: the commands, the reward placements, the built-in
tasks (their teacher figures are checked by tests/test_task.py) and the 8-GPU memory layout
(arithmetic from parameter counts).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import tables_results
from tables import read_json

README = "README.md"
PAGE = "docs/usage.md"
DEMO = "docs/results/demo_seeds.json"
METHODS = ("sft", "dpo", "ppo", "rto")


def _gold(run: dict, method: str) -> float:
    return run[method]["gold_reward"]


def _row(label: str, run: dict) -> str:
    g = {m: _gold(run, m) for m in METHODS}
    return (
        f"| {label} | "
        + " | ".join(f"{g[m]:.3f}" for m in METHODS)
        + f" | {g['rto'] - g['ppo']:+.3f} | {g['rto'] - g['dpo']:+.3f} | {run['rm_accuracy']:.3f} |"
    )


def demo_seeds(root: Path) -> str:
    """The per-seed table, the command that made it, and where it ran."""
    d = read_json(root, DEMO)
    over = d["over_seeds"]
    lines = [
        "| seed | SFT | DPO | PPO | RTO | RTO - PPO | RTO - DPO | RM held-out acc. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(str(run["seed"]), run) for run in d["per_seed"]]
    keys = [*(m for m in METHODS), "rto - ppo", "rto - dpo", "rm_accuracy"]
    signed = {"rto - ppo", "rto - dpo"}
    cells = [f"{over[k]['mean']:{'+' if k in signed else ''}.3f} +- {over[k]['sd']:.3f}" for k in keys]
    lines.append("| mean +- sd | " + " | ".join(cells) + " |")
    lines.append(_row("seed 0, AVX2 kernels", d["seed0_variants"]["avx2_kernels"]))
    seeds = [run["seed"] for run in d["per_seed"]]
    minutes = [run["seconds"] / 60 for run in d["per_seed"]]
    lines += [
        "",
        "```bash",
        f"for S in {' '.join(map(str, seeds))}; do",
        "  rto pipeline --task keyed --preset default --seed $S --jobs 1 --threads 1 --out runs/demo_s$S",
        "done",
        "```",
        "",
        textwrap.fill(
            f"(code `{d['code'].split()[0]}`; {d['machine']}; {min(minutes):.0f}-{max(minutes):.0f} min a seed; "
            "the raw per-seed numbers, with the two seed-0 variants, are in "
            "[docs/results/demo_seeds.json](results/demo_seeds.json).)",
            100,
        ),
    ]
    return "\n".join(lines)


def demo_kernels(root: Path) -> str:
    """Why one run is one draw: seed 0 under two process layouts and under AVX2 kernels."""
    d = read_json(root, DEMO)
    seed0, avx2 = d["per_seed"][0], d["seed0_variants"]["avx2_kernels"]
    layout = d["seed0_variants"]["make_demo_layout_code_d16a5ca"]
    same_layout = all(_gold(layout, m) == _gold(seed0, m) for m in METHODS) and "bit-identical" in layout["note"]
    moved = max(abs(_gold(avx2, m) - _gold(seed0, m)) for m in METHODS)
    half = [(seed0[m]["gold_reward_ci"][1] - seed0[m]["gold_reward_ci"][0]) / 2 for m in METHODS]
    text = (
        "**One run is one draw, and which draw depends on the CPU.** On one machine the same seed and settings "
        "give the same run bit for bit"
        + (
            f" - here even `make demo`'s own process layout (code `{layout['code']}`) and one thread for every "
            f"stage (code `{d['code'].split()[0]}`) gave identical weights for every model"
            if same_layout
            else ""
        )
        + ". But torch picks its CPU kernels at run time from the instruction set (ATen's and MKL's AVX2 or "
        "AVX-512 code), and they round sums differently; the differences grow through training, and once one "
        "sampled token differs, the run takes another path. Measured on this 2-core AVX-512 machine, seed 0: "
        f"the default kernels give the seed-0 row below; forced to AVX2 (`{avx2['command'].split(' rto ')[0]}`) "
        "the same command gives "
        + " / ".join(f"{m.upper()} {_gold(avx2, m):.3f}" for m in METHODS)
        + f". Those differences (up to {moved:.3f}) are larger than the intervals' half-widths "
        f"({min(half):.3f}-{max(half):.3f}), which cover only the test prompts, and they move RTO - DPO from "
        f"{_gold(seed0, 'rto') - _gold(seed0, 'dpo'):+.3f} to {_gold(avx2, 'rto') - _gold(avx2, 'dpo'):+.3f}. "
        "So read the spread over seeds, not one run:"
    )
    return textwrap.fill(text, 100)


def _seeds_where(d: dict, test) -> list[int]:
    return [run["seed"] for run in d["per_seed"] if test(run)]


def _listed(seeds: list[int]) -> str:
    return " and ".join([", ".join(map(str, seeds[:-1])), str(seeds[-1])] if len(seeds) > 1 else [str(seeds[0])])


def _sd(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def demo_spread(root: Path) -> str:
    """What the per-seed table says: the methods' order on each seed, the low seed, and where
    RTO's gap over PPO comes from (the gold reward's two parts), every figure from the JSON."""
    d = read_json(root, DEMO)
    over, runs, n = d["over_seeds"], d["per_seed"], len(d["per_seed"])

    def every(test) -> str:
        k = len(_seeds_where(d, test))
        return "on every seed" if k == n else f"on {k} of {n} seeds"

    rto_ppo = every(lambda r: _gold(r, "rto") > _gold(r, "ppo"))
    ppo_sft = every(lambda r: _gold(r, "ppo") > _gold(r, "sft"))
    ppo_dpo = every(lambda r: _gold(r, "ppo") < _gold(r, "dpo"))
    below_dpo = _seeds_where(d, lambda r: _gold(r, "rto") < _gold(r, "dpo"))
    gap = over["ppo - sft"]
    text = (
        f"RTO ends above PPO {rto_ppo} and PPO above SFT {ppo_sft} ({gap['min']:+.2f} to {gap['max']:+.2f}); "
        f"RTO against the DPO policy it draws its token reward from is a near tie "
        f"({over['rto - dpo']['mean']:+.3f} on average"
        + (f", below it on seed{'s' if len(below_dpo) > 1 else ''} {_listed(below_dpo)}" if below_dpo else "")
        + f"), and PPO stays below DPO {ppo_dpo}."
    )
    low = min(runs, key=lambda r: _gold(r, "sft"))
    rest = [r for r in runs if r is not low]
    mostly = all(_sd([_gold(r, m) for r in rest]) < over[m]["sd"] / 2 for m in METHODS)
    text += (
        f" Seed {low['seed']}'s SFT model underfits the teacher ({_gold(low, 'sft'):.3f}) and everything built "
        "on it starts lower"
        + ("; most of the four methods' standard deviations above is that seed." if mostly else ".")
    )
    local_lower = every(lambda r: r["ppo"]["gold_parts"]["local"] < r["sft"]["gold_parts"]["local"])
    text += (
        " Where the gap comes from, on the test samples (means over the seeds above): PPO maximises what its RM "
        f"learned well (the count: {over['ppo gold:count']['mean']:.3f} of 1.0) but gives up part of the "
        f"positional key the RM hardly learned (local part {over['sft gold:local']['mean']:.3f} at SFT -> "
        f"{over['ppo gold:local']['mean']:.3f}, lower {local_lower}); RTO's per-token DPO reward keeps more of it "
        f"({over['rto gold:local']['mean']:.3f}; DPO {over['dpo gold:local']['mean']:.3f}) while also reaching "
        f"the count ({over['rto gold:count']['mean']:.3f})."
    )
    return textwrap.fill(text, 100)


TABLES = {
    "readme.paper-claims": (README, lambda root: tables_results.paper_claims(root)),
    "readme.demo-kernels": (PAGE, demo_kernels),
    "readme.demo-seeds": (PAGE, demo_seeds),
    "readme.demo-spread": (PAGE, demo_spread),
}
