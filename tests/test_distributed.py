"""Two CPU processes (gloo) under `accelerate launch`: PPO and RTO, replicated or sharded (FSDP2),
stay in step across processes, equal a one-process run of the same global batch, and a dead
process stops the run quickly."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # runs whole pipelines or launches processes (see tests/conftest.py)

FIXTURE = Path(__file__).parent / "fixtures" / "dist_step.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    args: list[str], env_extra: dict | None = None, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, float]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *args,
    ]
    # CPU processes, one thread each (two processes share two cores).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "RTO_PROGRESS": "0", **(env_extra or {})}
    start = time.time()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=Path(__file__).parent.parent
    )
    return proc, time.time() - start


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _concat(parts: list[dict[str, torch.Tensor]], pad_id: int):
    """One global Batch from the processes' batches: prompts left-padded, responses right-padded."""
    from rto.lm.rollout import Batch

    p_len = max(t["batch.prompt_ids"].shape[1] for t in parts)
    r_len = max(t["batch.response_ids"].shape[1] for t in parts)

    def left(x, fill):
        return torch.nn.functional.pad(x, (p_len - x.shape[1], 0), value=fill)

    def right(x, fill):
        return torch.nn.functional.pad(x, (0, r_len - x.shape[1]), value=fill)

    return Batch(
        torch.cat([left(t["batch.prompt_ids"], pad_id) for t in parts]),
        torch.cat([left(t["batch.prompt_mask"], 0) for t in parts]),
        torch.cat([right(t["batch.response_ids"], pad_id) for t in parts]),
        torch.cat([right(t["batch.response_mask"], 0) for t in parts]),
        torch.cat([right(t["batch.sampled_logprobs"], 0.0) for t in parts]),
    )


@pytest.fixture(scope="session")  # once per worker; make test keeps a file's tests on one (--dist loadfile)
def two_process_runs(tiny_dirs, prompt_file, tmp_path_factory) -> Path:
    """One launch, two processes: a PPO and an RTO iteration with full models, then with the LoRA
    shared base; replicated, then sharded."""
    out = tmp_path_factory.mktemp("two")
    proc, _ = launch(
        [
            str(FIXTURE),
            str(out),
            tiny_dirs["policy"],
            tiny_dirs["rm"],
            tiny_dirs["dpo"],
            prompt_file,
            "none,full",
            "0",
            "4",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("shard", ["none", "full"], ids=["replicated", "sharded"])
@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_two_processes_match_one_process_on_the_same_global_batch(
    two_process_runs, tiny_dirs, prompt_file, tmp_path, lora_r, shard
):
    sys.path.insert(0, str(FIXTURE.parent))
    from dist_step import config, memory

    from rto.rl.trainer import PPOTrainer

    out = two_process_runs
    for reward in ("sparse", "rto"):
        run = f"{reward}-r{lora_r}-{shard}"
        (r0, meta0), (r1, meta1) = _load(out / f"{run}.rank0.safetensors"), _load(out / f"{run}.rank1.safetensors")
        assert meta0["world"] == "2" and meta0["layout"] == {"none": "replicate", "full": "shard"}[shard]
        if shard == "full":  # its layers recomputed in backward: the replicated run's MLP calls, twice
            replicated = _load(out / f"{reward}-r{lora_r}-none.rank0.safetensors")[1]
            assert int(meta0["mlp_calls"]) == 2 * int(replicated["mlp_calls"]) > 0
        # The processes sampled different responses (their own prompts, their own seeds) ...
        assert meta0["prompts"] != meta1["prompts"]
        weights = [k for k in r0 if k.startswith(("policy.weight.", "critic.weight."))]
        grads = [k for k in r0 if ".grad." in k]
        assert any(k.startswith("critic.") for k in weights) and len(grads) > 10
        if lora_r:  # the trained weights are the adapters (and the value head)
            assert all("lora_" in k or "value_head" in k for k in weights)
            assert any(k.startswith("policy.grad.") for k in grads)
        # ... and hold identical weights after the update.
        for k in weights:
            assert torch.equal(r0[k], r1[k]), f"{run}: {k} differs between the processes"
        # vLLM would get the whole updated policy (full models: its own weights; LoRA: merged
        # into the base's names), the same in both processes.
        streamed = {k[len("vllm.") :]: v for k, v in r0.items() if k.startswith("vllm.")}
        assert all(torch.equal(r1[f"vllm.{k}"], v) for k, v in streamed.items())
        if not lora_r:
            mine = {k[len("policy.weight.") :]: v for k, v in r0.items() if k.startswith("policy.weight.")}
            assert all(torch.equal(streamed[k], mine[k]) for k in mine)
            # (the tied LM head comes as its own name too: vLLM's loader skips it for tied models)
            assert set(streamed) - set(mine) == {"lm_head.weight"}
            assert torch.equal(streamed["lm_head.weight"], mine["model.embed_tokens.weight"])
        else:
            assert not any("lora_" in k or "base_layer" in k for k in streamed)
            base = load_file(str(Path(tiny_dirs["policy"]) / "model.safetensors"))
            q = "model.layers.0.self_attn.q_proj.weight"
            assert streamed[q].shape == base[q].shape and not torch.equal(streamed[q], base[q])  # the update merged in

        # One process, the same global batch (both processes' responses), the same settings and
        # the same starting weights.
        trainer = PPOTrainer(
            config(
                tmp_path / "one", reward, tiny_dirs["policy"], tiny_dirs["rm"], tiny_dirs["dpo"], prompt_file, lora_r
            )
        )
        assert trainer.dist.world == 1
        with torch.no_grad():
            for model, params in trainer.models.trained().items():
                for name, p in params.items():
                    p.copy_(r0[f"{model}.init.{name}"])
        prompts = meta0["prompts"].split("\x1f") + meta1["prompts"].split("\x1f")
        batch = _concat([r0, r1], trainer.tokenizer.pad_token_id)
        trainer.train_on(trainer.experience.score_rollout(prompts, batch, trainer.state.kl_ctl.value))
        for model, params in trainer.models.trained().items():
            for name, p in params.items():
                # Float tolerance, in norms: the gradient (of the second optimiser step) within 1e-3
                # of its size, the weights within 1e-3 of how far the update moved them.
                if f"{model}.grad.{name}" in r0:
                    g2, g1 = r0[f"{model}.grad.{name}"], p.grad
                    assert float((g2 - g1).norm()) <= 1e-3 * float(g1.norm()) + 1e-9, f"{run}: {model} grad {name}"
                w2, w1 = r0[f"{model}.weight.{name}"], p.detach()
                moved = (w1 - r0[f"{model}.init.{name}"]).norm()
                assert float((w2 - w1).norm()) <= 1e-3 * float(moved) + 1e-9, f"{run}: {model} weight {name}"
        for model in trainer.models.trained():
            moved = sum(
                float((p.detach() - r0[f"{model}.init.{n}"]).norm()) for n, p in trainer.models.trained()[model].items()
            )
            assert moved > 1e-3, f"{run}: the update did not move the {model}: the comparison would prove nothing"

        # Memory: each process's weights (with their Adam states) and frozen models, against the one
        # process's: about half each when sharded over two, all of it when replicated.
        one = memory(trainer)
        for key in ("bytes_trained", "bytes_frozen"):
            ratios = [int(meta[key]) / int(one[key]) for meta in (meta0, meta1)]
            if shard == "full":
                assert all(0.45 <= r <= 0.55 for r in ratios), (run, key, ratios)
            else:
                assert ratios == [1.0, 1.0], (run, key, ratios)


def test_grpo_groups_split_over_two_processes_equal_one_process(two_process_runs, tiny_dirs, prompt_file, tmp_path):
    """RTO's reward with GRPO over two processes, each holding whole groups of 2: the same update as
    one process on both processes' responses (the group statistics need nothing from the other
    process); no critic anywhere."""
    sys.path.insert(0, str(FIXTURE.parent))
    from dist_step import config

    from rto.rl.trainer import PPOTrainer

    (r0, meta0), (r1, meta1) = (_load(two_process_runs / f"rto-grpo-r0-none.rank{r}.safetensors") for r in (0, 1))
    for meta in (meta0, meta1):  # each process: two prompts, each twice in a row
        p = meta["prompts"].split("\x1f")
        assert len(p) == 4 and p[0] == p[1] and p[2] == p[3] and p[0] != p[2]
    assert not any(k.startswith("critic.") for k in r0)
    trainer = PPOTrainer(
        config(tmp_path / "one", "rto-grpo", tiny_dirs["policy"], tiny_dirs["rm"], tiny_dirs["dpo"], prompt_file)
    )
    assert trainer.models.critic is None
    with torch.no_grad():
        for name, p in trainer.models.trained()["policy"].items():
            p.copy_(r0[f"policy.init.{name}"])
    prompts = meta0["prompts"].split("\x1f") + meta1["prompts"].split("\x1f")
    batch = _concat([r0, r1], trainer.tokenizer.pad_token_id)
    trainer.train_on(trainer.experience.score_rollout(prompts, batch, trainer.state.kl_ctl.value))
    moved = 0.0
    for name, p in trainer.models.trained()["policy"].items():
        assert torch.equal(r0[f"policy.weight.{name}"], r1[f"policy.weight.{name}"])
        w2, w1 = r0[f"policy.weight.{name}"], p.detach()
        step = float((w1 - r0[f"policy.init.{name}"]).norm())
        assert float((w2 - w1).norm()) <= 1e-3 * step + 1e-9, name
        moved += step
    assert moved > 1e-3  # the update moved the policy: the comparison proves something


def _ppo_args(tiny_dirs, prompt_file, out: Path, iterations: int) -> list[str]:
    return [
        "-m",
        "rto",
        "ppo",
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
        str(iterations),
        "--rollout-batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--save-every",
        "1",
        "--threads",
        "1",
        "--eval-every",
        "0",
        "--dist-timeout",
        "60",
    ]


def test_a_dead_or_silent_process_stops_the_run(tiny_dirs, prompt_file, tmp_path):
    # (A whole two-process run, process 0 writing the outputs: tests/test_sharded.py.)
    # Process 1 dies as it starts iteration 2: process 0 must stop with a clear error, not hang.
    out = tmp_path / "dead"
    proc, seconds = launch(_ppo_args(tiny_dirs, prompt_file, out, 6), {"RTO_FAULT_DIE": "1:2"}, timeout=180)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "process 1 dies at iteration 2" in text
    # Process 0 notices the broken collective itself (or is stopped by the launcher): one line each.
    assert "another process died or stopped responding" in text or "stopped by the launcher" in text, text[-3000:]
    assert "[rank0]:" not in text  # no traceback from process 0 (the launcher prints its own)
    assert seconds < 60, f"took {seconds:.0f} s to stop"
    assert (out / "checkpoints").is_dir()  # iteration 1's checkpoint, to resume from

    # Process 1 stops responding (alive, silent): process 0 gives up after --dist-timeout.
    args = _ppo_args(tiny_dirs, prompt_file, tmp_path / "hung", 6)
    args[args.index("--dist-timeout") + 1] = "10"
    proc, seconds = launch(args, {"RTO_FAULT_HANG": "1:2"}, timeout=180)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "process 0 of 2: another process died or stopped responding" in text, text[-3000:]
    assert "[rank0]:" not in text  # no traceback from process 0 (the launcher prints its own)
    assert seconds < 75, f"took {seconds:.0f} s to stop"


def test_a_launched_process_exits_at_once_with_its_code_and_its_output(tmp_path):
    """After a multi-process command the process runs its exit handlers (libraries register theirs),
    flushes its output and leaves with its code, skipping the interpreter's teardown (where gloo's
    threads sometimes abort a finished run): a finaliser of the main module's never runs."""
    script = (
        "import atexit, sys, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "class Finalised:\n"
        "    def __del__(self): print(' teardown', end='', flush=True)\n"
        "kept = Finalised()\n"
        "atexit.register(lambda: print(' exit handlers', end=''))\n"
        "print('summary', end='')\n"
        "from rto.runtime.distributed import exit_if_launched\n"
        "exit_if_launched(3)\n"
        "print('not reached')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output buffered, as usual
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 3 and proc.stdout == "summary exit handlers", (
        proc.returncode,
        proc.stdout,
        proc.stderr[-2000:],
    )
