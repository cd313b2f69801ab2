"""The benchmarks: the GPU script runs everywhere, and the CPU side-by-side computes what it claims."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import ENV

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import step_throughput as st  # noqa: E402

pytestmark = pytest.mark.slow  # runs whole pipelines or launches processes (see tests/conftest.py)


def test_gpu_step_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_step.py"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--model",
            "tiny",
            "--skip-trl",
            "--prompts",
            "4",
            "--response-len",
            "4",
            "--reps",
            "1",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["sides"]) == {"ours_ppo", "ours_rto", "ours_rto-lora"}
    for side in result["sides"].values():
        # 4 prompts x 4 response tokens per step (the child checks every response runs full length),
        # and a process that loaded torch and three models holds well over 100 MB.
        assert side["step_s"] > 0 and side["tokens_per_s"] == pytest.approx(16 / side["step_s"])
        assert 100 < side["peak_rss_mb"] < 100_000
    sides = result["sides"]
    assert result["rto_overhead"] == pytest.approx(sides["ours_rto"]["step_s"] / sides["ours_ppo"]["step_s"])


# A tiny shape counted by hand: hidden 4, 1 layer, MLP 8, 2 heads (no GQA), vocabulary 10;
# 2 sequences, prompt 3, response 2. Per token, linear weights 2*4*4 (q, o) + 2*4*4 (k, v) +
# 3*4*8 (MLP) = 160 multiply-adds. Per sequence:
#   generation: 4 tokens fed (P + R - 1), contexts 1+2+3+4 = 10, LM head at 2 positions:
#               2*160*4 + 4*1*4*10 + 2*4*10*2 = 1280 + 160 + 160 = 1600
#   a full pass: 5 tokens, contexts 1+...+5 = 15: 2*160*5 + 4*4*15 = 1840, plus its head:
#     reference / DPO model (LM head at R + 1 = 3 positions): 1840 + 2*4*10*3 = 2080
#     RM (score at 1 position): 1848; critic (values at R = 2 positions): 1856
#   training, forward + backward = 3x: policy 3*2080 = 6240, critic 3*1856 = 5568
#   PPO: 1600 + 2080 + 1848 + 1856 + 6240 + 5568 = 19192 -> 38384 for 2 sequences
#   RTO: + the DPO model's 2080 -> 21272 -> 42544
TINY = dict(hidden_size=4, num_hidden_layers=1, intermediate_size=8, num_attention_heads=2)


def test_floor_flops_match_a_hand_count():
    ppo = st.iteration_flops(TINY, vocab=10, batch=2, prompt_len=3, response_len=2, dense=False)
    rto = st.iteration_flops(TINY, vocab=10, batch=2, prompt_len=3, response_len=2, dense=True)
    assert ppo["generation"] == 2 * 1600
    assert ppo["reference"] == 2 * 2080 and ppo["reward_model"] == 2 * 1848 and ppo["critic"] == 2 * 1856
    assert ppo["total"] == 38384
    assert rto["total"] == 42544 and rto["dpo_model"] == 2 * 2080
    # grouped-query attention shrinks only k and v: 1 KV head of width 2 -> 2*4*2 instead of 2*4*4
    gqa = st.iteration_flops(
        {**TINY, "num_key_value_heads": 1}, vocab=10, batch=1, prompt_len=3, response_len=2, dense=False
    )
    assert gqa["generation"] == 1600 - 2 * 16 * 4
    assert st.floor_seconds(38384, 1e3) == pytest.approx(38.384)


def _side(times, rate, steps=4.0, rss=100.0):
    return st.pool([{"times": times, "peak_rss_mb": rss, "matmul_flops": rate, "steps_per_iteration": steps}])


def test_summary_uses_each_sides_own_rate_and_reports_the_targets():
    ours = {
        "sparse": _side([1.0, 5.0, 2.0], 1e9),
        "rto": _side([2.2, 2.1, 2.9], 2e9),
        "rto-lora": _side([5.0], 1e9, rss=50.0),
    }
    trl = _side([6.0, 7.0, 11.0], 4e9, rss=300.0)  # medians 2.0, 2.2, 7.0 (means differ)
    row = st.summarise(123, flops_ppo=3e9, flops_rto=4e9, ours=ours, trl=trl)
    assert row["ours_ppo_s"] == 2.0 and row["ours_rto_s"] == 2.2 and row["trl_ppo_s"] == 7.0
    assert row["rto_overhead"] == pytest.approx(2.2 / 2.0)
    assert row["speedup_vs_trl"] == pytest.approx(7.0 / 2.0)
    assert row["floor_ppo_s"] == pytest.approx(3.0) and row["floor_rto_s"] == pytest.approx(2.0)
    assert row["trl_floor_ppo_s"] == pytest.approx(0.75) and row["trl_ppo_vs_floor"] == pytest.approx(7.0 / 0.75)
    assert row["ours_vs_floor"] == pytest.approx(2.2 / 2.0)
    assert row["optimiser_steps_per_iteration"] == 4 and "whole iterations" in row["timed_region"]
    assert row["iterations_timed"] == {"ours_ppo": 3, "ours_rto": 3, "ours_rto-lora": 1, "trl_ppo": 3}
    got = st.targets({"small": row, "large": {**row, "ours_vs_floor": 1.6, "rto_overhead": 1.05}})
    assert got["small_speedup_vs_trl"] == {"value": 3.5, "target": ">= 3", "met": True}
    assert got["large_ours_rto_vs_floor"]["met"] is False
    assert got["rto_overhead:small"]["met"] is True and got["rto_overhead:large"]["met"] is True
    assert st.targets({"small": {**row, "rto_overhead": 1.11}})["rto_overhead:small"]["met"] is False


def test_summary_refuses_a_side_with_another_optimiser_step_count():
    ours = {r: _side([1.0], 1e9) for r in st.OURS}
    # TRL's old set-up: gradient accumulation over the 4 mini-batches, one step per rollout
    with pytest.raises(RuntimeError, match="trl_ppo.*1.0.*expected 4"):
        st.summarise(1, 1.0, 1.0, ours, _side([1.0], 1e9, steps=1.0))
    assert st.pool(
        [
            {"times": [1.0], "peak_rss_mb": 1.0, "matmul_flops": 1.0, "steps_per_iteration": 4.0},
            {"times": [2.0], "peak_rss_mb": 2.0, "matmul_flops": 3.0, "steps_per_iteration": 4.0},
        ]
    ) == {
        "times": [1.0, 2.0],
        "peak_rss_mb": 2.0,
        "matmul_flops": 3.0,
        "steps_per_iteration": [4.0],
        "experience_update_times": [],
    }


def test_rounds_alternate_which_side_runs_first():
    assert st.round_order(0, True)[0] == "sparse" and st.round_order(0, True)[-1] == "trl"
    assert st.round_order(1, True) == st.round_order(0, True)[::-1]
    assert st.round_order(2, True) == st.round_order(0, True)
    assert "trl" not in st.round_order(1, False)


def test_benchmark_models_cannot_sample_pad_or_eos_and_our_generation_runs(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rto.lm.rollout import Sampling, encode_prompts, generate

    st.build_models(tmp_path, dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    tok = AutoTokenizer.from_pretrained(tmp_path / "policy")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    vocab = policy.config.vocab_size
    assert vocab == st.MODEL_VOCAB and tok.pad_token_id >= vocab and tok.eos_token_id >= vocab
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "prompts.jsonl").read_text().splitlines()][:16]
    ids, mask = encode_prompts(tok, prompts)
    assert ids.shape[1] == st.PROMPT_LEN and bool(mask.all())  # no padding is ever fed
    torch.manual_seed(0)
    batch = generate(policy, tok, ids, mask, Sampling(st.WORK["response_len"]), record_logprobs=True)
    assert batch.response_ids.shape == (16, st.WORK["response_len"]) and bool(batch.response_mask.all())
    assert int(batch.response_ids.max()) < vocab


def test_our_benchmark_side_runs_at_the_head(tmp_path):
    """The throughput benchmark's own child, on its own models (whose configs name no pad id, as
    many hub checkpoints), runs our trainer through whole iterations: docs/performance.md can be
    rebuilt at the head."""
    st.build_models(tmp_path, dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    assert json.loads((tmp_path / "rm" / "config.json").read_text()).get("pad_token_id") is None
    got = st.run_child(
        [
            str(ROOT / "benchmarks" / "step_throughput.py"),
            "--child",
            "ours",
            "--root",
            str(tmp_path),
            "--reward",
            "rto",
            "--reps",
            "1",
            "--warmup",
            "0",
        ]
    )
    assert len(got["times"]) == 1 and got["steps_per_iteration"] == 4.0


def test_performance_page_shows_the_committed_throughput_json():
    """docs/performance.md's throughput tables are the committed JSON's, as the benchmark writes them."""
    import throughput_doc

    results = json.loads((ROOT / "docs" / "results" / "step_throughput.json").read_text())
    page = (ROOT / "docs" / "performance.md").read_text()
    block = throughput_doc.page_block(page, throughput_doc.THROUGHPUT)
    assert block == throughput_doc.markdown_tables(results, st.CONFIGS)
    assert throughput_doc.page_block(page, throughput_doc.MEMORY) == throughput_doc.memory_table(results)
    profiles = {c: json.loads((ROOT / "docs" / "results" / f"profile_{c}.json").read_text()) for c in st.CONFIGS}
    block = throughput_doc.page_block(page, throughput_doc.PROFILE)
    assert block == throughput_doc.profile_table(profiles, {c: results["configs"][c]["params"] for c in st.CONFIGS})
