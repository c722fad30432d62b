"""Throughput you can read: FLOPs per token, tokens/s, TFLOP/s, MFU and peak memory.

    python -m pytest -q tests/test_throughput.py
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from pipenag.config import load_config
from pipenag.metrics import Progress
from pipenag.plan import PEAK_TFLOPS, flops_per_token, peak_tflops
from pipenag.train import train_sim


def test_flops_per_token_by_hand():
    cfg = load_config("configs/tiny.toml", ["--model.vocab_size=256"])
    L, C, T, V = 4, 40, 32, 256
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (L, C, T)
    per_block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = L * per_block + 2 * C + C * V  # blocks, ln_f, lm_head (no bias); wte and wpe left out
    assert flops_per_token(cfg.model) == 6 * n + 12 * L * C * T == 596_640


def test_peak_lookup(monkeypatch):
    cfg = load_config("configs/tiny.toml")
    assert peak_tflops(cfg, torch.device("cpu")) is None
    assert peak_tflops(load_config("configs/tiny.toml", ["--run.peak_tflops=50"]), torch.device("cpu")) == 50
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops(cfg, torch.device("cuda")) == PEAK_TFLOPS["H200"] == 989.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_tflops(cfg, torch.device("cuda")) == 312.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(cfg, torch.device("cuda")) is None


def test_progress_line_shows_tflops_and_mfu(capsys):
    Progress(10, 5, flops_per_token=1_000_000, peak_tflops=2.0).update(5, 1.0, 1e-3, 1000)
    line = capsys.readouterr().err
    assert "tok/s" in line and "TFLOP/s MFU" in line
    Progress(10, 5, flops_per_token=1_000_000).update(5, 1.0, 1e-3, 1000)
    line = capsys.readouterr().err
    assert "TFLOP/s" in line and "MFU" not in line


@pytest.mark.parametrize("peak", [0.0, 0.5])
def test_summary_has_throughput_and_memory(tiny_config, peak):
    cfg = tiny_config("--train.steps=3", "--train.eval_every=0", "--train.eval_batches=1",
                      f"--run.peak_tflops={peak}")
    summary = train_sim(cfg)
    saved = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
    t = saved["throughput"]
    assert t == summary["throughput"]
    assert t["tokens_per_s"] > 0 and t["flops_per_token"] == flops_per_token(
        dataclasses.replace(cfg.model, vocab_size=summary["vocab_size"]))
    assert t["achieved_tflops"] == pytest.approx(t["tokens_per_s"] * t["flops_per_token"] / 1e12)
    if peak:
        assert t["peak_tflops"] == peak and t["mfu"] == pytest.approx(t["achieved_tflops"] / peak)
    else:
        assert t["peak_tflops"] is None and t["mfu"] is None  # a CPU: no known peak
    mem = saved["peak_memory"]
    assert mem["bytes"] > 0 and mem["source"] == "process peak RSS" and mem["stages"] == [0, 1, 2, 3]
    # the machine the numbers came from: "AMD EPYC" alone does not tell a Zen 3 from a Zen 4
    m = saved["machine"]
    assert m["cpu"] and m["cores"] == os.cpu_count() and m["torch"] == torch.__version__
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and m["cuda_device"] is None
    if Path("/proc/cpuinfo").is_file():
        assert " family " in m["cpu_id"]
