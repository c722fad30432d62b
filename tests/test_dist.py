"""The multi-process runtime against the simulator, bit for bit, and its failure handling.

    python -m pytest tests/test_dist.py -q -x

Every run here is real (and marked slow): one process per stage, gloo on 127.0.0.1 with a free
port, one torch thread per process. Most runs fork their workers from the test process (the launcher's fork
start method, which skips re-importing torch); one test starts them as fresh interpreters
(spawn) and one runs them under torchrun, as users do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (DIST_BASE, ROOT, TINY, assert_same_records, assert_same_state_dicts, children_of, complete_updates,
                     dist_weights, make_dist_cfg, run_dist_against_sim, sim_reference, subprocess_env)

from pipenag.checkpoint import CheckpointStore, stage_part
from pipenag.metrics import read_metrics
from pipenag.runtime.executor import Eval, build_program, outgoing_keys
from pipenag.runtime.launch import free_port, train_dist
from pipenag.schedules import Action, Schedule
from pipenag.train import load_run_config

# -- programs: the message order both ends derive ----------------------------------------------


def test_program_inserts_validation_after_the_step_and_drains_segments():
    s = Schedule("pipedream", 3, 1)
    prog = build_program(s, 1, 4, eval_updates={2, 4})
    assert [str(i) for i in prog] == ["1F0", "1F1", "1B0", "1S0", "1F2", "1B1", "1S1", "1E2",
                                      "1F3", "1B2", "1S2", "1B3", "1S3", "1E4"]
    # Draining at update 2 == the action lists of [0, 2) then [2, 4) (a resumed run's order).
    drained = build_program(s, 0, 4, drain_updates={2})
    assert drained == s.actions(0, 2) + s.actions(0, 4, start_update=2)
    keys = list(outgoing_keys(prog, "next", num_eval=2))
    assert keys == [("F", 0), ("F", 1), ("F", 2), ("E", 2, 0), ("E", 2, 1), ("F", 3), ("E", 4, 0), ("E", 4, 1)]
    assert list(outgoing_keys(prog, "prev", num_eval=2)) == [("B", 0), ("B", 1), ("B", 2), ("B", 3)]
    assert isinstance(prog[7], Eval) and isinstance(prog[0], Action)


# -- dist == sim ---------------------------------------------------------------------------------

# Each method once, each K in 2..4 at least once; checkpoints on for a stash-off method (the
# pipeline drains there) and validation after updates 3 and 6 everywhere.
CASES = [
    ("pipedream", 2, ()),
    ("nesterov", 3, ("--train.checkpoint_every=2",)),
    ("pipemare", 4, ("--train.checkpoint_every=2",)),
    ("2bw", 2, ("--run.tensorboard=true",)),
    ("gpipe", 3, ()),
    ("1f1b", 4, ()),
    # Forward weight prediction reads two stored versions; checkpoints with forwards in flight.
    ("pipedream-wp", 3, ("--train.checkpoint_every=2",)),
    ("muon-wp", 2, ()),
    ("muon-wp-ef", 3, ("--train.checkpoint_every=2",)),
    ("basis-rotation", 3, ()),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,K,extra", CASES, ids=[f"{m}-K{K}" for m, K, _ in CASES])
def test_dist_equals_simulator(tmp_path, method, K, extra):
    out, summary, before = run_dist_against_sim(tmp_path, method, K, extra, val_steps=[3, 6])
    assert summary["engine"] == "dist"
    assert len(summary["stage_stats"]) == K
    assert (out / "config.json").is_file()
    # The last stage's Recorder writes the TensorBoard events, as the simulator's does.
    assert (out / "tensorboard").is_dir() == ("--run.tensorboard=true" in extra)
    # Older sets are pruned: the newest two complete ones are kept.
    updates = complete_updates(out, K)
    assert updates[-1] == 6 and len(updates) <= 2
    assert children_of(os.getpid()) <= before  # every worker reaped


@pytest.mark.slow
def test_link_emulation_delays_but_changes_no_number(tmp_path):
    """20 ms latency per message: the same losses, and each stage waited at least for the
    messages the first update cannot overlap (activation forward, gradient back)."""
    records, _ = sim_reference(make_dist_cfg(tmp_path / "sim", "pipedream", 2))
    cfg = make_dist_cfg(tmp_path / "dist", "pipedream", 2, "--train.engine=dist", "--link.latency_ms=20",
                   "--link.bandwidth_mbps=100")
    assert train_dist(cfg, start_method="fork") == 0
    assert_same_records(read_metrics(cfg.run.out_dir), records)
    stats = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())["stage_stats"]
    # Stage 0 waits for 6 gradients and stage 1 for 6 activations + 2x2 validation ones, each
    # >= 20 ms after it left; the first of each cannot overlap anything.
    assert stats[0]["recv_wait_s"] >= 0.04 and stats[1]["recv_wait_s"] >= 0.02


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_worker_ends_the_run_quickly(tmp_path, monkeypatch, capfd):
    """Stage 1 exits after update 3 (a fresh interpreter per stage: the spawn start method):
    the launcher names it, stops the others long before dist.timeout_s (300 s here), and reaps
    everyone."""
    monkeypatch.setenv("PIPENAG_FAIL", "1:3")
    cfg = make_dist_cfg(tmp_path / "dist", "pipedream", 3, "--train.engine=dist", "--train.steps=8",
                   "--dist.timeout_s=300")
    before = children_of(os.getpid())
    assert train_dist(cfg, start_method="spawn") == 1
    err = capfd.readouterr().err
    last_line = err.strip().splitlines()[-1]
    # Stage 1 is blamed first; its neighbours saw the connection close (they did not wait for
    # dist.timeout_s: no "stopped answering").
    assert last_line.startswith("pipenag train: error: stage 1 exited with status 17")
    assert "stopped answering" not in err
    assert children_of(os.getpid()) <= before  # no worker left, not even a zombie
    # The records stop at update 3 (the last stage is at most one update ahead of stage 1).
    assert [r["step"] for r in read_metrics(cfg.run.out_dir)][-1] <= 4


@pytest.mark.slow
def test_hung_worker_times_out_and_is_named(tmp_path, monkeypatch, capfd):
    """Stage 1 stops answering after update 2: its neighbours give up after dist.timeout_s=3,
    the launcher blames stage 1 (the one still running) and kills it."""
    monkeypatch.setenv("PIPENAG_FAIL", "1:2:hang")
    cfg = make_dist_cfg(tmp_path / "dist", "pipedream", 3, "--train.engine=dist", "--dist.timeout_s=3")
    before = children_of(os.getpid())
    assert train_dist(cfg, start_method="fork") == 1
    last_line = capfd.readouterr().err.strip().splitlines()[-1]
    # The timeout path: a neighbour waited dist.timeout_s for stage 1, and stage 1 (still
    # running) is the one stopped.
    assert "stage 1 stopped answering" in last_line and "within 3 s" in last_line
    assert last_line.endswith("stopping stage 1")
    assert children_of(os.getpid()) <= before


@pytest.mark.slow
@pytest.mark.parametrize("method,K", [("pipedream", 3), ("pipemare", 2)])
def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, method, K):
    """Stage 0 killed after update 6, before its checkpoint 6 (checkpoints every 2 updates);
    `--resume` continues from update 4, the newest that every stage saved, drops the records the
    later stages wrote after it, and gives the records and weights of an uninterrupted run."""
    extra = ("--train.engine=dist", "--train.steps=8", "--train.checkpoint_every=2")
    full = make_dist_cfg(tmp_path / "full", method, K, *extra)
    assert train_dist(full, start_method="fork") == 0

    cfg = make_dist_cfg(tmp_path / "cut", method, K, *extra)
    monkeypatch.setenv("PIPENAG_FAIL", "0:6")
    assert train_dist(cfg, start_method="fork") == 1
    monkeypatch.delenv("PIPENAG_FAIL")
    out = Path(cfg.run.out_dir)
    assert complete_updates(out, K)[-1] == 4
    # The last stage wrote update 5's record before its gradient let stage 0 reach update 6.
    assert [r["step"] for r in read_metrics(out)][:5] == [1, 2, 3, 4, 5]
    resumed = load_run_config(out)
    assert resumed.train.engine == "dist"
    assert train_dist(resumed, resume=True, start_method="fork") == 0
    assert_same_records(read_metrics(out), read_metrics(full.run.out_dir))
    assert_same_state_dicts(dist_weights(out, 8, K), dist_weights(Path(full.run.out_dir), 8, K))


# -- torchrun ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_runs_the_same_workers(tmp_path):
    """`torchrun --nproc-per-node 2 -m pipenag train --engine dist` == the simulator."""
    records, weights = sim_reference(make_dist_cfg(tmp_path / "sim", "gpipe", 2))
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "pipenag", "train", "--config", TINY, "--method", "gpipe", "--stages", "2",
           "--engine", "dist", "--out", str(out), "--data.max_chars=100000", "--run.threads=1",
           "--run.progress=false", *DIST_BASE]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_records(read_metrics(out), records)
    assert_same_state_dicts(dist_weights(out, 6, 2), weights)


def test_world_size_must_match_the_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = make_dist_cfg(tmp_path / "d", "pipedream", 2, "--train.engine=dist")
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        train_dist(cfg)


def test_resume_without_complete_checkpoint_is_a_clear_error(tmp_path):
    cfg = make_dist_cfg(tmp_path / "d", "pipedream", 2, "--train.engine=dist")
    with pytest.raises(ValueError, match="no complete checkpoint in .*before its first checkpoint"):
        train_dist(cfg, resume=True)


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_like_the_simulator(tmp_path, capfd):
    """lr 1e30 makes update 2's loss NaN: the last stage records it, writes a "diverged"
    summary, and the launcher stops the run with status 1, as train_sim does."""
    cfg = make_dist_cfg(tmp_path / "dist", "pipedream", 2, "--train.engine=dist", "--optim.lr=1e30")
    assert train_dist(cfg, start_method="fork") == 1
    assert "non-finite training loss nan at update 2" in capfd.readouterr().err
    records = read_metrics(cfg.run.out_dir)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["train_loss"] is None  # strict JSON
    summary = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["engine"] == "dist"


def test_backend_and_device_choices(monkeypatch):
    from pipenag.config import load_config
    from pipenag.runtime.worker import backend_and_device

    assert backend_and_device(load_config(None, ["--dist.backend=gloo"]), 1) == ("gloo", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="run.device='cuda' with dist.backend='gloo'"):
        backend_and_device(load_config(None, ["--dist.backend=gloo", "--run.device=cuda"]), 0)
    with pytest.raises(ValueError, match="dist.backend='nccl' needs CUDA"):
        backend_and_device(load_config(None, ["--dist.backend=nccl"]), 0)
    # K processes share the GPUs there are: local rank modulo their number
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = load_config(None, ["--dist.backend=gloo", "--run.device=cuda"])
    assert [backend_and_device(cfg, r) for r in range(3)] == [("gloo", torch.device("cuda", r % 2)) for r in range(3)]
    with pytest.raises(ValueError, match="sync_executor='torch' with dist.backend='gloo' and run.device='cuda'"):
        backend_and_device(load_config(None, ["--dist.backend=gloo", "--run.device=cuda",
                                              "--dist.sync_executor=torch"]), 0)
