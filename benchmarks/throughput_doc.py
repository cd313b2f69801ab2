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
    """Replace the table block of docs/performance.md with the one these results give."""
    text = doc.read_text()
    before, _, rest = text.partition(DOC_BEGIN)
    _, _, after = rest.partition(DOC_END)
    doc.write_text(f"{before}{DOC_BEGIN}\n{markdown_tables(results, configs)}\n{DOC_END}{after}")


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
