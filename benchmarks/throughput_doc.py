"""docs/performance.md's throughput tables, written from benchmarks/step_throughput.py's JSON (the page
cites no figure that the committed JSON does not hold; tests/test_benchmarks.py checks the page)."""

from __future__ import annotations

from pathlib import Path

TARGETS = {"small_speedup_vs_trl": ">= 3", "large_ours_rto_vs_floor": "<= 1.5", "rto_overhead": "<= 1.10"}


DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
DOC_BEGIN, DOC_END = "<!-- step_throughput table: written by benchmarks/step_throughput.py -->", "<!-- end of table -->"


def markdown_tables(results: dict, configs: dict) -> str:
    """docs/performance.md's tables, from the benchmark's JSON: one row per model, then the targets."""
    head = ["model", "params", "ours PPO s", "ours RTO s", "TRL PPO s", "speedup vs TRL (PPO)", "RTO overhead",
            "floor PPO s", "floor RTO s", "ours PPO / floor", "ours RTO / floor", "TRL PPO / its floor",
            "ours RTO LoRA s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["configs"].items():
        arch = configs.get(name, {})
        model = f"{name}: hidden {arch.get('hidden_size')} x {arch.get('num_hidden_layers')} layers" if arch else name
        trl = [f"{row['trl_ppo_s']:.3f}", f"{row['speedup_vs_trl']:.2f}"] if "trl_ppo_s" in row else ["-", "-"]
        cells = [model, f"{row['params'] / 1e6:.2f} M", f"{row['ours_ppo_s']:.3f}", f"{row['ours_rto_s']:.3f}", *trl,
                 f"{row['rto_overhead']:.2f}", f"{row['floor_ppo_s']:.3f}", f"{row['floor_rto_s']:.3f}",
                 f"{row['ours_ppo_vs_floor']:.2f}", f"{row['ours_vs_floor']:.2f}",
                 f"{row['trl_ppo_vs_floor']:.2f}" if "trl_ppo_vs_floor" in row else "-", f"{row['ours_lora_rto_s']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    floors = "; ".join(f"{name} {row['floor_flops_ppo'] / 1e9:.1f} / {row['floor_flops_rto'] / 1e9:.1f}"
                       for name, row in results["configs"].items())
    rates = "; ".join(f"{name} {min(row['matmul_gflops'].values()):.0f}-{max(row['matmul_gflops'].values()):.0f}"
                      for name, row in results["configs"].items())
    lines += ["", f"Floors per iteration (PPO / RTO, GFLOP): {floors}. fp32 matrix-multiply rates measured per side "
              f"(GFLOP/s): {rates}."]
    lines += ["", f"Medians of {results['reps']} timed iterations per child x {results['rounds']} rounds "
              f"({results['machine']}); raw output: [results/step_throughput.json](results/step_throughput.json).", "",
              "| target | value | met |", "|---|---|---|"]
    for key, t in results["targets"].items():
        lines.append(f"| {key.replace(':', ', ')} {t['target']} | {t['value']:.2f} | {'met' if t['met'] else 'missed'} |")
    return "\n".join(lines)


def write_doc(results: dict, configs: dict, doc: Path = DOC) -> None:
    """Replace the throughput and memory tables of docs/performance.md with the ones these results give."""
    write_blocks(doc, {DOC_BEGIN: markdown_tables(results, configs), MEMORY_BEGIN: memory_table(results)})


def targets(configs: dict[str, dict]) -> dict:
    """Each target against the corrected figures: the value, the target, whether it is met."""
    out = {}

    def check(key, value, ok):
        out[key] = {"value": value, "target": TARGETS[key.split(":")[0]], "met": bool(ok)}

    if "small" in configs and "speedup_vs_trl" in configs["small"]:
        check("small_speedup_vs_trl", configs["small"]["speedup_vs_trl"], configs["small"]["speedup_vs_trl"] >= 3)
    if "large" in configs:
        check("large_ours_rto_vs_floor", configs["large"]["ours_vs_floor"], configs["large"]["ours_vs_floor"] <= 1.5)
    for name, row in configs.items():
        check(f"rto_overhead:{name}", row["rto_overhead"], row["rto_overhead"] <= 1.10)
    return out


PROFILE_BEGIN = "<!-- profile table: written by benchmarks/step_throughput.py from docs/results/profile_*.json -->"
PHASES = (("generate", "generation (24 steps, KV cache)"),
          ("scoring: log-prob passes (ref, DPO)", "reference + DPO log-prob passes"),
          ("scoring: RM + critic passes", "RM + critic passes"), ("rewards, advantages, rest", "rewards, advantages, the rest"),
          ("train: forward", "update: forward"), ("train: backward", "update: backward"),
          ("train: optimizer", "update: optimizer"), ("train: rest", "update: the rest"), ("total", "total"))


def profile_table(profiles: dict[str, dict], params: dict[str, float]) -> str:
    """The phase-by-phase profile (benchmarks/profile_step.py --out), one column per model."""
    names = list(profiles)
    lines = ["| phase | " + " | ".join(f"{n} ({params[n] / 1e6:.2f} M params)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for key, label in PHASES:
        cells = []
        for n in names:
            m = profiles[n]["median_s"]
            cells.append(f"{m[key]:.3f} s" if key == "total" else f"{m[key]:.3f} s ({100 * m[key] / m['total']:.0f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_profile_doc(profiles: dict[str, dict], params: dict[str, float], doc: Path = DOC) -> None:
    write_blocks(doc, {PROFILE_BEGIN: profile_table(profiles, params)})


MEMORY_BEGIN = "<!-- memory table: written by benchmarks/step_throughput.py -->"


def memory_table(results: dict) -> str:
    """Peak resident memory per side (the same benchmark): full models, the LoRA shared base, TRL."""
    lines = ["| model | full models: ours (larger of PPO, RTO) | LoRA shared base (r = 16): ours RTO | "
             "TRL PPO (no DPO model) | RTO step, full / LoRA |", "|---|---|---|---|---|"]
    for name, row in results["configs"].items():
        trl = f"{row['trl_peak_rss_mb']:.0f} MB" if "trl_peak_rss_mb" in row else "-"
        lines.append(f"| {name} | {row['ours_peak_rss_mb']:.0f} MB | {row['ours_lora_peak_rss_mb']:.0f} MB | {trl} | "
                     f"{row['ours_rto_s']:.3f} s / {row['ours_lora_rto_s']:.3f} s |")
    return "\n".join(lines)


def write_blocks(doc: Path, blocks: dict[str, str]) -> None:
    """Replace each marked block of the page (its begin marker up to the next end marker)."""
    text = doc.read_text()
    for begin, body in blocks.items():
        before, found, rest = text.partition(begin)
        if not found:
            continue
        _, _, after = rest.partition(DOC_END)
        text = f"{before}{begin}\n{body}\n{DOC_END}{after}"
    doc.write_text(text)
