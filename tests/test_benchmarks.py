"""The GPU benchmark runs everywhere: on CPU with a tiny model of the same architecture."""

import json
import subprocess
import sys
from pathlib import Path

from tests.test_cli import ENV

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_step_runs_on_cpu_with_a_tiny_model(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--out", str(out), "--device", "cpu",
                           "--model", "tiny", "--skip-trl", "--prompts", "4", "--response-len", "4", "--reps", "1",
                           "--warmup", "0"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["sides"]) == {"ours_ppo", "ours_rto", "ours_rto-lora"}
    for side in result["sides"].values():
        assert side["step_s"] > 0 and side["tokens_per_s"] > 0 and side["peak_rss_mb"] > 0
    assert result["rto_overhead"] > 0
