"""The command line: help, the schedule printer, the installed console script.

    python -m pytest tests/test_cli.py -q
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipenag.cli import BENCHES, main

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


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


def test_schedule_gpipe_two_stages():
    res = subprocess.run([sys.executable, "-m", "pipenag", "schedule", "--name", "gpipe", "--stages", "2"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
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


def test_bench_names_are_dispatched():
    assert "simulator" in BENCHES
    import importlib

    for module in BENCHES.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            continue  # a bench another engineer has not written yet
        assert callable(mod.main)


def test_console_script():
    exe = shutil.which("pipenag")
    if exe is None:
        pytest.skip("no `pipenag` console script on PATH (install the package: pip install -e .)")
    res = subprocess.run([exe, "--help"], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: pipenag")


def test_bench_simulator_smoke(capsys):
    # One tiny timed update per contender, no child processes: the bench runs end to end, and
    # its check line shows the K=2 pipeline's first loss equal to the unsplit model's.
    torch.set_num_threads(1)
    args = ["bench", "simulator", "--no-rss", "--methods", "nesterov", "--n-layer", "2", "--n-head", "2",
            "--n-embd", "16", "--block-size", "8", "--microbatch", "2", "--stages", "2", "--warmup", "0",
            "--updates", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sim/plain" in out
    check = [line for line in out.splitlines() if line.startswith("check nesterov:")][0]
    sim, plain = float(check.split()[5]), float(check.split()[7])
    assert sim == plain
    assert main(["bench", "simulator", "--methods", "nope"]) == 2
