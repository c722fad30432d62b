"""The command line: help, the schedule printer, the installed console script.

    python -m pytest tests/test_cli.py -q
"""

import importlib
import json
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

from pipenag.cli import BENCHES, main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pipenag")
    for command in ("train", "schedule", "bench", "compare"):
        assert command in out


def test_train_help_shows_shortcuts(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--method", "--stages", "--steps", "--out", "--resume"):
        assert flag in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: pipenag" in capsys.readouterr().err


@pytest.mark.slow
def test_schedule_gpipe_two_stages():
    res = subprocess.run([sys.executable, "-m", "pipenag", "schedule", "--name", "gpipe", "--stages", "2"],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("gpipe: 2 stages, 4 microbatch(es) per update, 3 updates")
    # Grid: stage 0 runs four forwards, idles while stage 1 finishes the last one and starts
    # the backwards, then runs four backwards; stage 1 starts one slot late.
    assert lines[1].split()[:10] == ["stage", "0:", "F0", "F1", "F2", "F3", ".", ".", "B0", "B1"]
    assert lines[2].split()[:7] == ["stage", "1:", ".", "F0", "F1", "F2", "F3"]
    # Bubble (K-1)/(M+K-1) = 1/5: 80% utilization on both stages.
    assert "utilization: 80%, 80%" in lines
    assert "stage 0: 0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3 0S0 0F4" in res.stdout
    # Synchronous: every microbatch of update u sees version u, forward and backward.
    assert "stage 1 (keeps 1): 0:0/0/0 1:0/0/0 2:0/0/0 3:0/0/0 4:1/1/1" in res.stdout


def test_schedule_errors_are_one_line(capsys):
    assert main(["schedule", "--name", "pipedream", "--stages", "4", "--microbatches", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipenag schedule: error: num_microbatches=2")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["optimizer", "simulator", "pipeline"])
def test_bench_names_are_dispatched(name, capsys):
    """Every bench exists, and `pipenag bench NAME --help` reaches its own parser, which takes
    the config arguments like `pipenag train`."""
    assert callable(importlib.import_module(BENCHES[name]).main)
    with pytest.raises(SystemExit) as info:
        main(["bench", name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pipenag bench {name}")
    assert "--config" in out and "--stages" in out


def test_bench_config_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "optimizer", "--model.n_layr=2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pipenag bench optimizer: error: unknown config key 'model.n_layr'")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_console_script():
    exe = shutil.which("pipenag")
    if exe is None:
        pytest.skip("no `pipenag` console script on PATH (install the package: pip install -e .)")
    res = subprocess.run([exe, "--help"], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: pipenag")


TINY_MODEL = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=8",
              "--data.microbatch_size=2", "--stages", "2"]


def test_bench_simulator_smoke(capsys):
    # One tiny timed update per contender, no child processes: the bench runs end to end, and
    # its check line shows the K=2 pipeline's first loss equal to the unsplit model's.
    args = ["bench", "simulator", "--no-rss", "--methods", "nesterov", *TINY_MODEL, "--warmup", "0",
            "--updates", "1", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sim/plain" in out
    check = [line for line in out.splitlines() if line.startswith("check nesterov:")][0]
    sim, plain = float(check.split()[5]), float(check.split()[7])
    assert sim == plain
    assert main(["bench", "simulator", "--methods", "nope"]) == 2


def test_bench_optimizer_reports_every_optimizer_against_the_baseline(capsys, tmp_path):
    path = tmp_path / "opt.json"
    assert main(["bench", "optimizer", *TINY_MODEL, "--repeats", "1", "--warmup", "0",
                 "--optimizers", "adamw,muon,basis-rotation,sgd-nesterov", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("adamw", "muon", "basis-rotation", "sgd-nesterov")}
    assert rows["adamw"][3] == "1.00x"  # the baseline against itself
    res = json.loads(path.read_text())["results"]
    # State: SGD keeps one buffer per parameter, AdamW two moments and a 4-byte step count per
    # tensor; basis rotation adds the covariances and bases of every hidden matrix.
    sgd = res["state_bytes"]["sgd-nesterov"]
    assert 2 * sgd < res["state_bytes"]["adamw"] <= 2 * sgd + 4 * 100
    assert res["state_bytes"]["basis-rotation"] > res["state_bytes"]["adamw"]
    assert res["stage"] == 1 and res["num_params"] > 0
