"""`rto ppo` sharded with FSDP2, launched with the FSDP accelerate config a user already has
(examples/accelerate/fsdp.yaml), on two CPU processes: it says it shards, trains, evaluates and
selects on dev prompts, writes an ordinary safetensors policy, and after a kill -9 of one process
resumes to the very weights and metrics of the uninterrupted run. The runs share two launches
(the `runs` fixture): the killed run's, and one for the rest, one after another in the same two
processes (each process start costs seconds of imports)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_distributed import _free_port

pytestmark = pytest.mark.slow  # runs whole pipelines or launches processes (see tests/conftest.py)

ROOT = Path(__file__).parent.parent
ITERATIONS = 4


def _launch(args: list[str], env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` with the FSDP config a user already has, two CPU processes: ARGS is what
    follows (`-m rto ppo ...` or a script)."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [
        accelerate,
        "launch",
        "--config_file",
        str(ROOT / "examples/accelerate/fsdp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        *args,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "RTO_PROGRESS": "0", **(env_extra or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def _args(tiny_dirs, prompt_file, out: Path, *extra: str) -> list[str]:
    return [
        "--reward",
        "rto",
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
        "--iterations",
        str(ITERATIONS),
        "--rollout-batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--actor-lr",
        "1e-3",
        "--critic-lr",
        "1e-3",
        "--beta1",
        "0.1",
        "--save-every",
        "1",
        "--threads",
        "1",
        "--dist-timeout",
        "60",
        "--eval-prompts",
        prompt_file,
        "--n-eval",
        "4",
        "--eval-every",
        "2",
        "--task",
        "keyed",
        "--select-by",
        "gold_reward",
        *extra,
    ]


def _log(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "tokens_per_s"} for r in rows]


@dataclass
class Runs:
    """What the module's launches left: `root`, the killed run's launch and its checkpoints as the
    kill left them, and each job of the shared launch (`code`, `log` per process)."""

    root: Path
    killed: subprocess.CompletedProcess
    killed_seconds: float
    killed_checkpoints: list[str]
    launch: subprocess.CompletedProcess

    def code(self, name: str, rank: int = 0) -> int | None:
        path = self.root / "jobs" / f"{name}.rank{rank}.code"
        return int(path.read_text()) if path.is_file() else None

    def log(self, name: str, rank: int = 0) -> str:
        path = self.root / "jobs" / f"{name}.rank{rank}.log"
        return path.read_text() if path.is_file() else ""

    def job(self, name: str) -> dict:
        return next(j for j in self.plan() if j["name"] == name)

    def plan(self) -> list[dict]:
        return json.loads((self.root / "jobs" / "plan.json").read_text())

    def ran(self, name: str) -> str:
        """Process 0's output of job `name`, once both processes finished it with exit code 0."""
        if self.code(name) is None:
            failed = [j["name"] for j in self.plan() if self.code(j["name"])]
            raise AssertionError(
                f"{name} did not run: {failed or 'the launch'} failed first\n{self.launch.stderr[-2000:]}"
            )
        for rank in (0, 1):
            assert self.code(name, rank) == 0, self.log(name, rank)[-3000:]
        return self.log(name)


def _one_process_checkpoint(tiny_dirs, prompt_file, root: Path, lora_r: int) -> tuple[Path, Path]:
    """A run of one iteration in this process; (its config file, its checkpoint)."""
    from rto.io.config import to_dict
    from rto.rl.trainer import PPOTrainer
    from rto.runtime.checkpoint import list_checkpoints
    from tests.test_ppo import _cfg

    here = root / f"one_r{lora_r}"
    cfg = _cfg(
        tiny_dirs,
        prompt_file,
        here,
        reward="rto",
        beta1=0.1,
        rollout_batch_size=4,
        mini_batch_size=2,
        save_every=1,
        lora_r=lora_r,
        iterations=1,
    )
    PPOTrainer(cfg).train()
    config = here / "config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    return config, list_checkpoints(here / "out" / "checkpoints")[-1]


@pytest.fixture(scope="session")  # once per worker; make test keeps a file's tests on one (--dist loadfile)
def runs(tiny_dirs, prompt_file, tmp_path_factory) -> Runs:
    """Every two-process run of this module: a run whose process 1 is killed (SIGKILL) at iteration
    3, in a launch of its own; then one launch (tests/fixtures/two_process_jobs.py) for the rest,
    one after another in the same two processes: the bf16 LoRA run, the uninterrupted run, a
    replicated one, the one-process checkpoints resumed sharded and continued, the killed run
    resumed."""
    root = tmp_path_factory.mktemp("sharded")
    start = time.time()
    killed = _launch(["-m", "rto", "ppo", *_args(tiny_dirs, prompt_file, root / "killed")], {"RTO_FAULT_KILL": "1:3"})
    killed_seconds = time.time() - start
    checkpoints = root / "killed" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) if checkpoints.is_dir() else []

    def without_eval(out: Path, iterations: int, *extra: str) -> list[str]:
        args = _args(tiny_dirs, prompt_file, out)
        args[args.index("--iterations") + 1] = str(iterations)
        return ["ppo", *args[: args.index("--eval-prompts")], "--eval-every", "0", *extra]

    bf16 = without_eval(root / "bf16", 1, "--precision", "bf16", "--lora-r", "4", "--gradient-checkpointing")
    jobs = [  # the bf16 run first: a warning it shows is not one already shown by an earlier job
        {"name": "bf16", "kind": "cli", "argv": bf16},
        {"name": "uninterrupted", "kind": "cli", "argv": ["ppo", *_args(tiny_dirs, prompt_file, root / "run")]},
        {"name": "replicated", "kind": "cli", "argv": without_eval(root / "replicated", 2, "--shard", "none")},
    ]
    for lora_r in (0, 4):
        config, checkpoint = _one_process_checkpoint(tiny_dirs, prompt_file, root, lora_r)
        jobs += [
            {
                "name": f"resume_r{lora_r}",
                "kind": "resume",
                "config": str(config),
                "checkpoint": str(checkpoint),
                "out": str(root / f"resumed_r{lora_r}.safetensors"),
            },
            {
                "name": f"continue_r{lora_r}",
                "kind": "cli",
                "argv": ["ppo", "--config", str(config), "--resume", "auto", "--iterations", "2"],
            },
        ]
    jobs += [
        {
            "name": "killed_resumed",
            "kind": "cli",
            "argv": ["ppo", *_args(tiny_dirs, prompt_file, root / "killed", "--resume", "auto")],
        },
    ]
    plan = root / "jobs" / "plan.json"
    plan.parent.mkdir()
    plan.write_text(json.dumps(jobs))
    launch = _launch([str(ROOT / "tests" / "fixtures" / "two_process_jobs.py"), str(plan)], timeout=600)
    return Runs(root, killed, killed_seconds, kept, launch)


def test_fsdp_config_shards_trains_and_writes_a_plain_policy(runs, tiny_dirs):
    from transformers import AutoModelForCausalLM

    stderr = runs.ran("uninterrupted")
    out = runs.root / "run"
    assert "accelerate config: FSDP FULL_SHARD): policy and critic sharded over 2 processes" in stderr
    assert [r["iteration"] for r in _log(out)] == list(range(1, ITERATIONS + 1))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == 2 and len(summary["curve"]) == ITERATIONS // 2 + 1
    # The result (dev-selected) and the last policy: ordinary transformers checkpoints, tied
    # embeddings written once, as the starting model was.
    start = load_file(str(Path(tiny_dirs["policy"]) / "model.safetensors"))
    for name in ("policy", "policy_last"):
        saved = load_file(str(out / name / "model.safetensors"))
        assert saved.keys() == start.keys()
        config = json.loads((out / name / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        model = AutoModelForCausalLM.from_pretrained(out / name)
        assert all(torch.equal(p, saved[k]) for k, p in model.state_dict().items() if k in saved)
    last = load_file(str(out / "policy_last" / "model.safetensors"))
    assert sum(float((last[k] - start[k]).norm()) for k in start) > 1e-3, "training did not move the policy"
    assert (out / "critic" / "model.safetensors").is_file()
    assert (out / "checkpoints" / f"step_{ITERATIONS:08d}" / "shards" / ".metadata").is_file()


def test_kill_9_of_one_process_then_resume_is_exact(runs):
    reference, out, killed = runs.root / "run", runs.root / "killed", runs.killed
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert "process 1 is killed (SIGKILL) at iteration 3" in killed.stderr, killed.stderr[-3000:]
    assert runs.killed_seconds < 120
    assert runs.killed_checkpoints == ["step_00000001", "step_00000002"]
    stderr = runs.ran("killed_resumed")
    assert "resumed from" in stderr and "step_00000002" in stderr
    runs.ran("uninterrupted")
    assert _log(out) == _log(reference)
    assert (
        json.loads((out / "metrics.json").read_text())["curve"]
        == json.loads((reference / "metrics.json").read_text())["curve"]
    )
    for name in ("policy", "policy_last", "critic"):
        a, b = load_file(str(out / name / "model.safetensors")), load_file(str(reference / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_one_process_resumes_the_sharded_checkpoint(runs, tiny_dirs, prompt_file, tmp_path):
    """DCP reshards on load: one process reads the two processes' shards back whole (a copy of the
    uninterrupted run, whose outputs it rewrites from its last checkpoint)."""
    runs.ran("uninterrupted")
    out = tmp_path / "run"
    shutil.copytree(runs.root / "run", out)
    before = load_file(str(out / "policy_last" / "model.safetensors"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RTO_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "rto", "ppo", *_args(tiny_dirs, prompt_file, out, "--resume", "auto")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"step_{ITERATIONS:08d} after iteration {ITERATIONS}" in proc.stderr
    after = load_file(str(out / "policy_last" / "model.safetensors"))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize(
    "env, flag, frozen_flag, trained, frozen",
    [
        ({}, "auto", "auto", "replicate", "replicate"),  # plain DDP launch
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, "auto", "auto", "shard", "shard"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"},
            "auto",
            "auto",
            "replicate",
            "replicate",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "auto", "replicate", "shard", "replicate"),
        ({"ACCELERATE_USE_FSDP": "true"}, "none", "auto", "replicate", "replicate"),  # the flag wins
        ({}, "full", "auto", "shard", "shard"),
    ],
)
def test_the_layout_follows_the_accelerate_config_or_the_flag(monkeypatch, env, flag, frozen_flag, trained, frozen):
    from types import SimpleNamespace

    from rto.runtime.sharding import plan_layout

    for key in ("ACCELERATE_USE_FSDP", "FSDP_SHARDING_STRATEGY", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dist = SimpleNamespace(active=True, world=4)
    layout = plan_layout(flag, frozen_flag, dist, bf16=True)
    assert (layout.trained, layout.frozen, layout.mixed_precision) == (trained, frozen, True)
    assert plan_layout(flag, frozen_flag, SimpleNamespace(active=False, world=1), bf16=True).trained == "single"
    assert ("sharded over 4" in layout.describe()) == (trained == "shard")


def test_lora_merge_from_a_gathered_state_equals_peft_merge(tiny_dirs):
    """A sharded LoRA policy is exported from its gathered state dict (B @ A * scaling computed by
    hand): the same weights as peft's own delta on the live modules."""
    from rto.lm.lora import SharedBase, merged_state_dict
    from rto.lm.models import load_causal_lm

    shared = SharedBase(load_causal_lm(tiny_dirs["policy"], "policy"), 4, 8.0, "all-linear")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in shared.adapter_parameters("policy"):
            p.normal_(0, 0.1)  # lora_B starts at zero: make the update non-trivial
    live = merged_state_dict(shared.model, "policy")
    gathered = merged_state_dict(shared.model, "policy", shared.model.get_base_model().state_dict())
    base = load_causal_lm(tiny_dirs["policy"], "policy").state_dict()
    assert gathered.keys() == live.keys()
    assert sum(float((live[k] - base[k]).abs().max()) for k in live if k in base) > 0.01
    for k in live:
        torch.testing.assert_close(gathered[k], live[k], atol=1e-6, rtol=1e-6)


def test_bf16_lora_sharded_run_exports_a_merged_policy(runs, tiny_dirs):
    """bf16 compute with FSDP2's mixed precision over the LoRA shared base (a bf16 base under fp32
    adapters), sharded on CPU, layers recomputed in backward: it trains, says so at start-up, and
    exports the merged policy whole."""
    from transformers import AutoModelForCausalLM

    out = runs.root / "bf16"
    stderr = runs.ran("bf16")
    assert "bf16 compute on fp32 weights" in stderr
    for rank in (0, 1):  # nothing for the user to act on is shown (peft's deprecations)
        assert "Warning" not in runs.log("bf16", rank), runs.log("bf16", rank)
    saved = load_file(str(out / "policy" / "model.safetensors"))
    start = load_file(str(Path(tiny_dirs["policy"]) / "model.safetensors"))
    assert saved.keys() == start.keys() and not any("lora_" in k for k in saved)
    AutoModelForCausalLM.from_pretrained(out / "policy")


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_a_one_process_checkpoint_resumes_sharded_over_two(runs, lora_r):
    """A run started in one process continues over several: every trained weight and Adam state of
    its checkpoint arrives exactly, each process holding its shard of it (DCP covers the other way)."""
    from rto.runtime.checkpoint import load_checkpoint

    runs.ran(f"resume_r{lora_r}")
    here = runs.root / f"one_r{lora_r}"
    saved, _ = load_checkpoint(Path(runs.job(f"resume_r{lora_r}")["checkpoint"]))
    resumed = load_file(str(runs.root / f"resumed_r{lora_r}.safetensors"))
    moments = [k for k in resumed if ".adam." in k and not k.startswith("layout.") and not k.endswith(".step")]
    weights = [k for k in resumed if ".weights." in k]
    assert len(moments) == 2 * len(weights) > 0 and any(k.startswith("critic.") for k in weights)
    for key in weights + moments:
        assert torch.equal(resumed[key], saved[key]), key
    assert all(resumed[f"layout.{k}"] == 1.0 for k in moments)  # held as shards, not whole
    steps = [k for k in resumed if k.endswith(".step") and not k.startswith("layout.")]
    assert steps and all(float(resumed[k]) == float(saved[k]) for k in steps)
    # And the run goes on from it, sharded, under the FSDP config (its Adam steps on the shards).
    stderr = runs.ran(f"continue_r{lora_r}")
    assert "after iteration 1" in stderr and "sharded over 2 processes" in stderr
    rows = [json.loads(line) for line in (here / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert json.loads((here / "out" / "metrics.json").read_text())["processes"] == 2


def test_a_replicated_two_process_run_writes_once(runs):
    """--shard none under the same launch (the flag wins over the accelerate config): each process
    holds the whole models, and process 0 alone writes the log, the checkpoints and the models."""
    out = runs.root / "replicated"
    stderr = runs.ran("replicated")
    assert "sharded over" not in stderr
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    assert (out / "policy" / "model.safetensors").is_file() and (out / "checkpoints").is_dir()
