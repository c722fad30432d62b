"""gpipe, 1f1b and zb-h1 on torch.distributed.pipelining (--dist.sync_executor=torch) against the
simulator, bit for bit, and the combinations it refuses.

    python -m pytest tests/test_dist_torch.py -q

Real runs: one forked process per stage, gloo on 127.0.0.1, one torch thread per process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import (assert_same_records, assert_same_state_dicts, children_of, complete_updates, dist_weights,
                     make_dist_cfg, run_dist_against_sim, sim_reference)

from pipenag.config import load_config
from pipenag.metrics import read_metrics
from pipenag.runtime.launch import train_dist
from pipenag.train import load_run_config

TORCH = ("--dist.sync_executor=torch", "--train.steps=4", "--train.eval_every=2")


# M=3 is not a power of two: there torch's default gradient rescaling (scale_grads=True) would
# differ from the simulator in the last bits (docs/dist.md); M=4 is the gpipe default.
@pytest.mark.slow
# zb-h1 runs on torch's ScheduleInterleavedZeroBubble with one stage per rank: M = 6 at K = 3 is
# two of torch's rounds (max(1, M // K)), M = 5 at K = 4 one.
@pytest.mark.parametrize("method,K,M", [("gpipe", 2, 4), ("1f1b", 3, 3), ("zb-h1", 3, 6), ("zb-h1", 4, 5)])
def test_torch_schedules_equal_the_simulator(tmp_path, method, K, M):
    """Per-update losses, validation losses (after updates 2 and 4) and final weights."""
    extra = (*TORCH, f"--pipeline.num_microbatches={M}")
    out, summary, before = run_dist_against_sim(tmp_path, method, K, extra, val_steps=[2, 4])
    assert summary["sync_executor"] == "torch"
    assert [s["executor"] for s in summary["stage_stats"]] == ["torch"] * K
    assert children_of(os.getpid()) <= before


@pytest.mark.slow
@pytest.mark.parametrize("resume_with", ["torch", "own"])
def test_torch_schedule_resumes_from_its_checkpoints(tmp_path, monkeypatch, resume_with):
    """Stage 0 exits after update 3 (checkpoints every 2): --resume continues from update 2, on
    torch's schedule or on the own executor (the files are the same), and ends with the
    simulator's records and weights."""
    extra = (*TORCH, "--train.checkpoint_every=2")
    records, weights = sim_reference(make_dist_cfg(tmp_path / "sim", "1f1b", 2, *extra))
    cfg = make_dist_cfg(tmp_path / "dist", "1f1b", 2, "--train.engine=dist", *extra)
    monkeypatch.setenv("PIPENAG_FAIL", "0:3")
    assert train_dist(cfg, start_method="fork") == 1
    monkeypatch.delenv("PIPENAG_FAIL")
    out = Path(cfg.run.out_dir)
    assert complete_updates(out, 2) == [2]
    resumed = load_run_config(out)
    assert resumed.dist.sync_executor == "torch"
    resumed.dist.sync_executor = resume_with
    assert train_dist(resumed, resume=True, start_method="fork") == 0
    assert_same_records(read_metrics(out), records)
    assert_same_state_dicts(dist_weights(out, 4, 2), weights)


@pytest.mark.slow
def test_non_finite_loss_blames_the_last_stage(tmp_path, capfd):
    """lr 1e30 makes update 2's loss NaN: the last stage exits with a "diverged" summary, and
    stage 0, whose torch schedule loses its neighbour, is reported as the follow-on failure."""
    cfg = make_dist_cfg(tmp_path / "dist", "gpipe", 2, "--train.engine=dist", "--dist.sync_executor=torch",
                   "--optim.lr=1e30")
    assert train_dist(cfg, start_method="fork") == 1
    last_line = capfd.readouterr().err.strip().splitlines()[-1]
    assert "error: stage 1: non-finite training loss nan at update 2" in last_line
    assert "then stage 0 failed" in last_line
    assert [r["step"] for r in read_metrics(cfg.run.out_dir)] == [1, 2]
    assert json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("method,extra,match", [
    ("pipedream", (), "schedule 'pipedream' .* asynchronous"),
    ("nesterov", ("--pipeline.schedule=2bw",), "schedule '2bw' .* asynchronous"),
    ("gpipe", ("--link.latency_ms=20",), "link.latency_ms=20.0"),
    ("1f1b", ("--link.bandwidth_mbps=100",), "link emulation cannot delay"),
    ("zb-h1", ("--pipeline.num_microbatches=7",), "num_microbatches=7 is not a multiple of torch's number of rounds"),
])
def test_unsupported_combinations_fail_before_any_work(tmp_path, method, extra, match):
    cfg = make_dist_cfg(tmp_path / "d", method, 2, "--train.engine=dist", "--dist.sync_executor=torch", *extra)
    with pytest.raises(ValueError, match=match):
        train_dist(cfg, start_method="fork")
    assert not (tmp_path / "d").exists()


def test_sync_executor_value_is_checked():
    with pytest.raises(ValueError, match="dist.sync_executor='pytorch'"):
        load_config(None, ["--dist.sync_executor=pytorch"])
