"""docs/performance.md's measured figures, each written from the committed JSON under docs/results/.

The throughput, memory and profile tables are formatted by benchmarks/throughput_doc.py (the benchmark
and this page share one formatter); the prose blocks here carry every figure the page states about
them, so that no number on the page outlives the JSON it came from. See docs/tables.py.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from tables import read_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import throughput_doc  # noqa: E402
from step_throughput import CONFIGS  # noqa: E402  (the models' shapes label the table's rows)

PAGE = "docs/performance.md"
THROUGHPUT, PROFILES = "docs/results/step_throughput.json", "docs/results/profile_{}.json"


def _bullet(text: str) -> str:
    return textwrap.fill(text, 100, initial_indent="- ", subsequent_indent="  ")


def _para(text: str) -> str:
    return textwrap.fill(text, 100)


def _profiles(root: Path) -> dict[str, dict]:
    return {c: read_json(root, PROFILES.format(c)) for c in CONFIGS}


def throughput(root: Path) -> str:
    return throughput_doc.markdown_tables(read_json(root, THROUGHPUT), CONFIGS)


def memory(root: Path) -> str:
    return throughput_doc.memory_table(read_json(root, THROUGHPUT))


def profile(root: Path) -> str:
    results = read_json(root, THROUGHPUT)
    return throughput_doc.profile_table(_profiles(root), {c: results["configs"][c]["params"] for c in CONFIGS})


def profile_notes(root: Path) -> str:
    """The three targets, read against the profile and the floor's passes."""
    results, prof = read_json(root, THROUGHPUT), _profiles(root)
    small, large = results["configs"]["small"], results["configs"]["large"]
    ps, pl = prof["small"]["median_s"], prof["large"]["median_s"]
    t = results["targets"]
    need = small["trl_ppo_s"] / 3  # the iteration that would give a 3x speedup over TRL's
    scoring_pass = (ps["scoring: log-prob passes (ref, DPO)"] + ps["scoring: RM + critic passes"]) / 4
    # Each phase of the large model against its own floor, at the rate the table's RTO floor used.
    rate = large["floor_rto_s"] / large["floor_flops_rto"]
    f = large["floor_passes_rto"]
    gen_floor = f["generation"] * rate
    score_floor = (f["reference"] + f["dpo_model"] + f["reward_model"] + f["critic"]) * rate
    train_floor = (f["policy_train"] + f["critic_train"]) * rate
    score = pl["scoring: log-prob passes (ref, DPO)"] + pl["scoring: RM + critic passes"]
    train = pl["train: forward"] + pl["train: backward"]
    met = {True: "met", False: "missed"}
    bullets = [
        f"**Small-model speedup ({t['small_speedup_vs_trl']['value']:.2f}, target 3): "
        f"{met[t['small_speedup_vs_trl']['met']]}.** Our iteration is {small['ours_ppo_vs_floor']:.1f}x its "
        "arithmetic floor and made of passes that each sit at the per-operator floor of a 2-layer, 128-wide "
        "model: a linear layer on 64 x 128 inputs costs about the same whatever its FLOPs, most of it "
        f"dispatch. Generation is 24 sequential steps of a few dozen such operators; each scoring pass takes "
        f"about {1000 * scoring_pass:.0f} ms, the update's backward passes {1000 * ps['train: backward']:.0f} ms "
        "in all. Nothing in the profile is work that could be dropped: no pass runs twice, rewards/advantages "
        f"and the loop's bookkeeping are {100 * ps['rewards, advantages, rest'] / ps['total']:.0f}% and "
        f"{100 * ps['train: rest'] / ps['total']:.0f}%. Reaching 3x would mean an iteration of {need:.3f} s, "
        f"{100 * (1 - need / small['ours_ppo_s']):.0f}% below ours - fewer operator launches, not less "
        "arithmetic: fusing operators (`torch.compile`, tried and not kept: its compile time and its "
        "recompiles as response lengths changed cost the 100-iteration demo more than it saved) or CUDA "
        f"graphs on a GPU. On this CPU we stop at {small['speedup_vs_trl']:.1f}x. TRL's iteration is "
        f"{small['trl_ppo_vs_floor']:.1f}x its own floor.",
        f"**Large model against the floor ({t['large_ours_rto_vs_floor']['value']:.2f}, target 1.5): "
        f"{met[t['large_ours_rto_vs_floor']['met']]}.** Split by phase against each phase's own floor (the "
        "floor's passes in the JSON's `floor_passes_rto`, at the table's rate; the profile is a separate run, "
        f"{pl['total']:.2f} s an iteration against the table's {large['ours_rto_s']:.2f} s, so these ratios "
        f"are lower than the table's): generation {pl['generate']:.3f} s against {gen_floor:.3f} s "
        f"({pl['generate'] / gen_floor:.1f}x), the four scoring passes {score:.2f} s against {score_floor:.2f} s "
        f"({score / score_floor:.2f}x), the update's forward and backward {train:.2f} s against "
        f"{train_floor:.2f} s ({train / train_floor:.2f}x). Generation is the largest excess: each of its 24 "
        "decode steps multiplies 64 tokens by every weight matrix, products too thin (64 x 512 by 512 x 1,376) "
        "to reach the square-product rate the floor assumes, so they are bound by reading the weights, not by "
        "arithmetic. The other phases are closer (RMSNorm, rotary embeddings, SiLU and the optimizer are not "
        "counted, and the backward pass runs below the forward's rate). Both sides sit at the same place "
        f"(ours PPO {large['ours_ppo_vs_floor']:.2f}, TRL's PPO {large['trl_ppo_vs_floor']:.2f} of its own "
        "floor): at this size the iteration is arithmetic plus decode, and the gap is kernel efficiency on "
        "thin products that neither side controls on this CPU.",
        f"**RTO overhead ({small['rto_overhead']:.2f} small, {large['rto_overhead']:.2f} large, target 1.10): "
        f"{'met' if t['rto_overhead:small']['met'] and t['rto_overhead:large']['met'] else 'missed'}.** RTO's "
        "only extra work is one forward pass of the DPO model (the profile's reference + DPO row); RTO's "
        f"FLOPs are {small['floor_flops_rto'] / small['floor_flops_ppo']:.2f}x PPO's on the small model and "
        f"{large['floor_flops_rto'] / large['floor_flops_ppo']:.2f}x on the large one, so RTO costs no more "
        "than that pass's arithmetic.",
    ]
    return "\n".join(_bullet(b) for b in bullets)


def memory_notes(root: Path) -> str:
    large = read_json(root, THROUGHPUT)["configs"]["large"]
    full, lora = large["ours_peak_rss_mb"], large["ours_lora_peak_rss_mb"]
    return _para(
        "On the small model the process's fixed cost is all there is: Python, torch and transformers, "
        "`datasets` with pyarrow (the prompt pool reads through it, as TRL's stages do) and matplotlib for the "
        f"run's plot. On the large one the shared base saves {full - lora:.0f} MB ({100 * (1 - lora / full):.0f}%) "
        f"with a {large['params'] / 1e6:.1f} M-parameter model: three full copies (reference, DPO model, critic "
        "backbone) and the policy's and critic's Adam states are gone; the saving grows with model size, since "
        f"the fixed cost does not. Its step takes {large['ours_lora_rto_s']:.2f} s against "
        f"{large['ours_rto_s']:.2f} s with full models on CPU in this run: the adapters add small matrix "
        "products to every linear layer and the base still runs in full for every pass. With full models our "
        f"peak is above TRL's PPO ({full:.0f} vs {large['trl_peak_rss_mb']:.0f} MB on the large model): RTO "
        f"holds one more model than TRL's PPO (the DPO model, {4 * large['params'] / 1e6:.0f} MB of fp32 "
        "weights); the rest of the difference was not investigated."
    )


SHARDED = "docs/results/sharded_cpu.json"
LAYOUT_NAMES = {"one": "one process", "replicated": "two, replicated", "sharded": "two, sharded"}


def sharded(root: Path) -> str:
    layouts = read_json(root, SHARDED)["layouts"]
    lines = [
        "| layout | trained weights + Adam, per process | frozen models, per process | iteration s | "
        "experience s | update s | rollout s (ours: gathered once) | rollout s (gathered per token) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in layouts.items():
        one = key == "one"
        trained = f"{row['bytes_trained_per_process'] / 1e6:.1f} MB" + (
            "" if one else f" ({row['trained_vs_one']:.3f} x)"
        )
        frozen = f"{row['bytes_frozen_per_process'] / 1e6:.1f} MB" + ("" if one else f" ({row['frozen_vs_one']:.3f} x)")
        per_token = f"{row['rollout_per_token_gather_s']:.3f}" + (
            " (the same generation: nothing to gather)" if one else ""
        )
        lines.append(
            f"| {LAYOUT_NAMES.get(key, key)} | {trained} | {frozen} | {row['iteration_s']:.3f} | "
            f"{row['experience_s']:.3f} | {row['update_s']:.3f} | {row['rollout_gathered_s']:.3f} | {per_token} |"
        )
    return "\n".join(lines)


def sharded_notes(root: Path) -> str:
    one, rep, sh = (read_json(root, SHARDED)["layouts"][k] for k in ("one", "replicated", "sharded"))
    rss = " / ".join(f"{r['peak_rss_mb_per_process']:.0f}" for r in (one, rep, sh))
    bullets = [
        "**Memory falls as 1/processes.** Each of two processes holds half of the trained weights and their "
        "Adam states and half of every frozen model (counted from each process's own tensors; "
        "`tests/test_distributed.py` checks 0.45-0.55 x the one-process figure on every run it makes). For an "
        "8B model that is the difference between not fitting and fitting "
        '(usage.md, "RTO on many GPUs and many machines"). Peak '
        f"resident memory does not fall on this CPU run ({rss} MB): the fixed cost of Python, torch and "
        "transformers dominates at 3.7 M parameters, every process reads each model whole before keeping its "
        "shard (one model at a time), and freed CPU memory is not always handed back to the system; a GPU's "
        "allocator peak is the figure that counts there (benchmarks/gpu_step.py reports it).",
        "**Rollout cost of sharding.** Generating with the policy left sharded gathers every layer at every "
        f"decoding step: {sh['rollout_per_token_gather_s']:.3f} s, "
        f"{sh['rollout_per_token_gather_s'] / sh['rollout_gathered_s']:.1f} x ours, which gathers the policy once "
        f"for the whole rollout ({sh['rollout_gathered_s']:.3f} s; replicated, {rep['rollout_gathered_s']:.3f} s). "
        "What bounds the gathered rollout is then the generation itself, plus one all-gather of the policy per "
        "iteration (the policy's bytes over the interconnect: 16 GB in bf16 for an 8B policy, about 0.1 s at "
        "NVLink's few hundred GB/s) and the memory of one whole policy while it lasts. Left sharded, the "
        "per-token gathers also hang when processes finish their responses after different numbers of steps, "
        "which is why the trainer never generates that way. Replicated, FSDP2's per-forward bookkeeping alone "
        f"costs {rep['rollout_per_token_gather_s']:.3f} against {rep['rollout_gathered_s']:.3f} s, so the "
        'rollout is "gathered" there too.',
        "**Time on 2 CPU cores is not a speed-up**: two processes with one core each take "
        f"{rep['iteration_s']:.2f} s (replicated) and {sh['iteration_s']:.2f} s (sharded) for what one process "
        f"with two cores does in {one['iteration_s']:.2f} s. On this machine the gradients' all-reduce "
        "(replicated) or reduce-scatter plus per-layer all-gathers (sharded) go over loopback TCP and the two "
        "processes compete for the same two cores' memory bandwidth; at this size the compute they split is "
        f"small next to that. The sharded layout costs {sh['iteration_s'] - rep['iteration_s']:.1f} s more per "
        "iteration than the replicated one: the gathers of every layer in every scoring and training pass. On "
        "GPUs with NVLink those collectives overlap with compute (FSDP2 prefetches the next layer); that has to "
        "be measured there (below).",
    ]
    return "What it shows:\n" + "\n".join(_bullet(b) for b in bullets)


def checkpointing(root: Path) -> str:
    r = read_json(root, "docs/results/checkpointing_cpu.json")
    plain, ckpt = r["settings"]["plain"], r["settings"]["checkpointed"]
    return "\n".join(
        [
            "| update | held for backward (peak) | update s |",
            "|---|---|---|",
            f"| plain | {plain['held_for_backward_mb']:.1f} MB | {plain['update_s']:.3f} |",
            f"| `--gradient-checkpointing` | {ckpt['held_for_backward_mb']:.1f} MB ({r['held_ratio']:.2f} x) | "
            f"{ckpt['update_s']:.3f} ({r['time_ratio']:.2f} x) |",
        ]
    )


def prompt_pool(root: Path) -> str:
    r = read_json(root, "docs/results/prompt_pool.json")
    m, added = r["median"], r["added_by_1M_pool"]
    lines = ["| pool | cold: s | cold: peak RSS | warm: s | warm: peak RSS |", "|---|---|---|---|---|"]
    for key, label in (("64", "64 prompts"), ("1M", "1,000,000 prompts")):
        cold, warm = m[f"{key}/cold"], m[f"{key}/warm"]
        lines.append(
            f"| {label} | {cold['wall_s']:.2f} | {cold['peak_rss_mb']:.0f} MB | {warm['wall_s']:.2f} | "
            f"{warm['peak_rss_mb']:.0f} MB |"
        )
    cold, warm = added["cold"], added["warm"]
    lines.append(
        f"| added by the 1M pool | +{cold['wall_s']:.2f} | +{cold['peak_rss_mb']:.0f} MB | "
        f"**+{warm['wall_s']:.2f}** | **+{warm['peak_rss_mb']:.0f} MB** |"
    )
    ok = {k: added[k]["wall_s"] < 5 and added[k]["peak_rss_mb"] < 300 for k in ("cold", "warm")}
    verdict = {True: "met", False: "missed"}
    lines += [
        "",
        _para(
            f"The goal (a 1M pool adds under 5 s and 300 MB per process) is {verdict[ok['warm']]} from the second run "
            f"on a file (warm: +{warm['wall_s']:.2f} s, +{warm['peak_rss_mb']:.0f} MB) and {verdict[ok['cold']]} by "
            f"the first (cold: +{cold['wall_s']:.2f} s), which reads, checks, renders and counts every prompt once. "
            f"The 1M-row file is {r['prompt_file_mb']['1M']:.0f} MB; its datasets cache (both Arrow files below) "
            f"{r['datasets_cache_mb']['1M']:.0f} MB."
        ),
    ]
    return "\n".join(lines)


TABLES = {
    throughput_doc.THROUGHPUT: (PAGE, throughput),
    throughput_doc.PROFILE: (PAGE, profile),
    throughput_doc.MEMORY: (PAGE, memory),
    "performance.profile-notes": (PAGE, profile_notes),
    "performance.memory-notes": (PAGE, memory_notes),
    "performance.sharded": (PAGE, sharded),
    "performance.sharded-notes": (PAGE, sharded_notes),
    "performance.checkpointing": (PAGE, checkpointing),
    "performance.prompt-pool": (PAGE, prompt_pool),
}
