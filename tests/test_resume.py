"""Exact resume: a PPO run killed with SIGKILL (at random points, and in the middle of a save)
and resumed ends with the same weights and the same per-iteration metrics, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_cli import ENV

pytestmark = pytest.mark.slow  # runs whole pipelines or launches processes (see tests/conftest.py)

ITERATIONS = 6


def _ppo_args(tiny_dirs, prompt_file, out, *extra):
    return [
        sys.executable,
        "-m",
        "rto.cli",
        "ppo",
        "--policy",
        tiny_dirs["policy"],
        "--reward-model",
        tiny_dirs["rm"],
        "--dpo-model",
        tiny_dirs["dpo"],
        "--prompts",
        prompt_file,
        "--out",
        str(out),
        "--reward",
        "rto",
        "--beta1",
        "0.1",
        "--iterations",
        str(ITERATIONS),
        "--rollout-batch-size",
        "8",
        "--mini-batch-size",
        "4",
        "--max-new-tokens",
        "6",
        "--actor-lr",
        "1e-3",
        "--critic-lr",
        "1e-3",
        "--eval-every",
        "0",
        "--threads",
        "1",
        "--save-every",
        "1",
        "--keep-last",
        "2",
        "--seed",
        "3",
        *extra,
    ]


def _log(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


def _same_run(a: Path, b: Path) -> None:
    assert _log(a) == _log(b)
    wa, wb = load_file(str(a / "policy" / "model.safetensors")), load_file(str(b / "policy" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    ca, cb = load_file(str(a / "critic" / "model.safetensors")), load_file(str(b / "critic" / "model.safetensors"))
    assert all((ca[k] == cb[k]).all() for k in ca)


def _in_process(args: list[str]) -> int:
    """The command of a subprocess argument list (python -m rto.cli ...) run in this process."""
    from rto.cli import main

    return main(args[args.index("rto.cli") + 1 :])


@pytest.fixture(scope="session")  # once per worker; make test keeps a file's tests on one (--dist loadfile)
def reference(tiny_dirs, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _in_process(_ppo_args(tiny_dirs, prompt_file, out)) == 0  # only the killed runs need processes of their own
    return out


def _resume(tiny_dirs, prompt_file, out):
    proc = subprocess.run(
        _ppo_args(tiny_dirs, prompt_file, out, "--resume", "auto"), capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_killed_at_a_random_point_resumes_exactly(reference, tiny_dirs, prompt_file, tmp_path):
    rng = random.Random(os.getpid())
    out = tmp_path / "run"
    wanted = rng.randint(1, ITERATIONS - 3)  # let this many checkpoints land, then kill at a random moment
    proc = subprocess.Popen(
        _ppo_args(tiny_dirs, prompt_file, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoints" / f"step_{wanted:08d}").is_dir():
            time.sleep(rng.uniform(0.0, 0.15))
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert "resumed from" in _resume(tiny_dirs, prompt_file, out).stderr
    _same_run(reference, out)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [f"step_{ITERATIONS - 1:08d}", f"step_{ITERATIONS:08d}"]  # --keep-last 2


def test_killed_in_the_middle_of_a_save_resumes_exactly(reference, tiny_dirs, prompt_file, tmp_path):
    out = tmp_path / "run"
    env = dict(ENV, RTO_FAULT_KILL_IN_SAVE="3")
    proc = subprocess.run(_ppo_args(tiny_dirs, prompt_file, out), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".step_00000003.tmp", "step_00000001", "step_00000002"]  # the half-written one never counts
    proc = _resume(tiny_dirs, prompt_file, out)
    assert "after iteration 2" in proc.stderr
    _same_run(reference, out)


def test_resume_refuses_a_checkpoint_from_other_settings(reference, tiny_dirs, prompt_file, tmp_path, run_rto):
    args = _ppo_args(tiny_dirs, prompt_file, reference, "--resume", "auto", "--actor-lr", "5e-4")
    proc = run_rto(*args[args.index("rto.cli") + 1 :])
    assert proc.returncode == 2
    assert "other settings (actor_lr)" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_killed_and_resumed_matches_the_uninterrupted_run(prompt_file, tmp_path):
    """The TRL-backed stages resume from their own checkpoints: the same final weights, bit for bit."""
    from rto.io.data import read_jsonl, write_jsonl

    data = tmp_path / "sft.jsonl"
    prompts = [r["prompt"] for r in read_jsonl(prompt_file, ("prompt",))]
    write_jsonl(data, ({"prompt": p, "completion": " " + " ".join(reversed(p.split()[:-1]))} for p in prompts * 2))

    def args(out):
        return [
            sys.executable,
            "-m",
            "rto.cli",
            "sft",
            "--data",
            str(data),
            "--out",
            str(out),
            "--task",
            "keyed",
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--save-every",
            "2",
            "--keep-last",
            "2",
        ]

    ref = tmp_path / "ref"
    assert _in_process(args(ref)) == 0  # the killed run and its resumption in processes of their own
    out = tmp_path / "run"
    proc = subprocess.Popen(args(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if any((out.parent / "run.trl").glob("checkpoint-4/trainer_state.json")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = subprocess.run([*args(out), "--resume", "auto"], capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[rto] resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
