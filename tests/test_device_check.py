"""The device check's paper-scale step (experiments/device_check.py, check 4) on the CPU: the
script that a lent GPU runs must not first fail there.

    python -m pytest tests/test_device_check.py -q
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_device_check():
    spec = importlib.util.spec_from_file_location("device_check", ROOT / "experiments" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_paper_scale_reports_measured_next_to_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    dc = load_device_check()
    r = dc.paper_scale(tmp_path / "run", "cpu", config="configs/tiny.toml", stages=2, updates=3)
    assert r["updates"] == 3 and r["dtype"] == "bfloat16" and r["device"] == "cpu"
    assert r["tokens_per_s"] > 0 and r["achieved_tflops"] > 0 and r["s_per_update"] > 0
    assert r["mfu"] is None and r["plan_s_per_update_at_peak"] is None  # a CPU has no known peak
    # the plan's memory: every stage's total without the runtime's receive buffers
    plan = json.loads(subprocess.run(
        [sys.executable, "-m", "pipenag", "plan", "--config", "configs/tiny.toml", "--stages", "2",
         "--run.dtype=bfloat16", "--data.tokenizer=bytes", "--json"],
        capture_output=True, text=True, check=True).stdout)
    assert r["plan_memory_bytes"] == sum(st["total_bytes"] - st["recv_bytes"] for st in plan["stages"]) > 0
    assert r["memory_measured_over_plan"] == r["peak_memory_bytes"] / r["plan_memory_bytes"]
    assert "K=2 bf16, 3 updates on cpu" in dc.format_paper_scale(r)


def test_paper_scale_failure_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    dc = load_device_check()
    with pytest.raises(RuntimeError, match="pipenag train .*failed"):
        dc.paper_scale(tmp_path / "run", "cpu", config="configs/no-such.toml", stages=2, updates=1)
