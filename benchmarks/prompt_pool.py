#!/usr/bin/env python
"""What a large prompt pool adds to an `rto ppo` run: a 1,000,000-row JSONL of prompts against a
64-row one, the same tiny two-iteration run on each, wall time and peak memory of the process.

    python benchmarks/prompt_pool.py --out docs/results/prompt_pool.json      # 2 CPU cores: ~6 minutes

The pool is read through datasets' cached Arrow files (rto/io/prompt_pool.py): `cold` runs with an
empty datasets cache (HF_DATASETS_CACHE, a fresh folder: the file is converted to Arrow and every
prompt checked and measured in tokens once), `warm` runs again on that cache, as every later run
on the same file does. Each round runs 64 cold, 64 warm, 1M cold, 1M warm (the order of the two
pools alternating between rounds); medians over --rounds. Time: the whole command, start to exit
(Python, imports, models, two iterations). Memory: the process's peak resident set (ru_maxrss of
os.wait4). Models: a random 2-layer Llama on the keyed task's vocabulary, as tests/conftest.py builds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"64": 64, "1M": 1_000_000}


def build(root: Path) -> dict:
    """Tiny policy and RM (tests/conftest.py's shapes), and the two prompt files."""
    import torch

    from rto.lm.models import RM_STATS_FILE, build_causal_lm, load_score_model, save_model
    from rto.tasks import load_task

    task = load_task("keyed")
    tok = task.tokenizer()
    policy = build_causal_lm(
        tok,
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
        ),
        seed=0,
    )
    save_model(policy, tok, root / "policy")
    torch.manual_seed(1)
    save_model(
        load_score_model(root / "policy"), tok, root / "rm", extra_files={RM_STATS_FILE: {"mean": 0.0, "std": 1.0}}
    )
    # Prompts as the keyed task writes them (2 to 8 distinct symbols, then <sep>), drawn at random:
    # the 1M file is ~40 MB, ~40 bytes a row.
    rng = random.Random(0)
    for name, n in SIZES.items():
        with open(root / f"prompts_{name}.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"prompt": " ".join(rng.sample(task.symbols, 2 + i % 7)) + " <sep>"}) + "\n")
    return {"policy": str(root / "policy"), "rm": str(root / "rm")}


def run_once(models: dict, prompts: Path, out: Path, cache: Path) -> dict:
    """One `rto ppo` run in a child process: wall seconds and peak RSS (MB)."""
    env = dict(
        os.environ,
        RTO_PROGRESS="0",
        OMP_NUM_THREADS="1",
        HF_DATASETS_CACHE=str(cache),
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    cmd = [
        sys.executable,
        "-m",
        "rto.cli",
        "ppo",
        "--policy",
        models["policy"],
        "--reward-model",
        models["rm"],
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--iterations",
        "2",
        "--rollout-batch-size",
        "8",
        "--mini-batch-size",
        "8",
        "--max-new-tokens",
        "4",
        "--eval-every",
        "0",
        "--threads",
        "1",
        "--seed",
        "0",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"rto ppo failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": round(seconds, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {f"{size}/{cache}": [] for size in SIZES for cache in ("cold", "warm")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = build(root)
        for r in range(args.rounds):
            for size in list(SIZES) if r % 2 == 0 else list(reversed(SIZES)):
                cache = root / f"hf_cache_{size}"
                shutil.rmtree(cache, ignore_errors=True)  # cold: nothing converted or prepared yet
                for state in ("cold", "warm"):
                    result = run_once(models, root / f"prompts_{size}.jsonl", root / "out", cache)
                    runs[f"{size}/{state}"].append(result)
                    print(f"round {r + 1}: {size} {state}: {result}", file=sys.stderr, flush=True)
        cache_mb = {
            size: round(sum(f.stat().st_size for f in (root / f"hf_cache_{size}").rglob("*") if f.is_file()) / 2**20, 1)
            for size in SIZES
        }
        file_mb = {size: round((root / f"prompts_{size}.jsonl").stat().st_size / 2**20, 1) for size in SIZES}

    median = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "peak_rss_mb")} for k, v in runs.items()}
    added = {
        state: {
            "wall_s": round(median[f"1M/{state}"]["wall_s"] - median[f"64/{state}"]["wall_s"], 3),
            "peak_rss_mb": round(median[f"1M/{state}"]["peak_rss_mb"] - median[f"64/{state}"]["peak_rss_mb"], 1),
        }
        for state in ("cold", "warm")
    }
    result = {
        "what": "rto ppo, 2 iterations, tiny models, prompts from a 64-row vs a 1,000,000-row JSONL; "
        "cold: empty datasets cache, warm: its second run",
        "rounds": args.rounds,
        "median": median,
        "added_by_1M_pool": added,
        "runs": runs,
        "prompt_file_mb": file_mb,
        "datasets_cache_mb": cache_mb,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"median": median, "added_by_1M_pool": added}, indent=2))


if __name__ == "__main__":
    main()
