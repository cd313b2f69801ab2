"""The real-model example (examples/smollm2) end to end with tiny settings on a tiny chat model:
its data builder, its judge and every `rto` stage it runs. The measured run is in its README."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "smollm2"


def test_smollm2_example_smoke(chat_model, tmp_path, monkeypatch):
    pytest.importorskip("vaderSentiment")
    model = chat_model
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("RTO_PROGRESS", "0")
    import run

    result = run.main(["--out", str(tmp_path / "run"), "--smoke", "--model", str(model), "--threads", "1"])
    assert result["data"]["pairs"] + result["data"]["ties"] == 8
    methods = result["eval"]["methods"]
    assert set(methods) == {"sft", "dpo", "ppo", "rto"}
    assert all("gold_reward" in m and "sentiment" in m["gold_parts"] for m in methods.values())
    for stage in ("dpo", "rm", "ppo", "rto"):
        assert (tmp_path / "run" / stage / "metrics.jsonl").is_file(), stage
    sys.modules.pop("run", None)
    sys.modules.pop("judge", None)
