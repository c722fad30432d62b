"""The multi-process runtime against the simulator, bit for bit, and its failure handling.

    python -m pytest tests/test_dist.py -q -x

Every run here is real: one process per stage, gloo on 127.0.0.1 with a free port, one torch
thread per process. Most runs fork their workers from the test process (the launcher's fork
start method, which skips re-importing torch); one test starts them as fresh interpreters
(spawn) and one runs them under torchrun, as users do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipenag.config import load_config
from pipenag.runtime import checkpoints as ckpts
from pipenag.runtime.executor import Eval, build_program, outgoing_keys
from pipenag.runtime.launch import train_dist
from pipenag.metrics import read_metrics
from pipenag.schedules import Action, Schedule
from pipenag.train import load_run_config, train_sim

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
BASE = ["--data.max_chars=60000", "--train.steps=6", "--train.eval_every=3", "--train.eval_batches=2",
        "--run.threads=1", "--run.progress=false", "--dist.timeout_s=60"]


def make_cfg(out: Path, method: str, K: int, *extra: str):
    return load_config(TINY, BASE + [f"--pipeline.method={method}", f"--pipeline.num_stages={K}",
                                     f"--run.out_dir={out}", *extra])


def children_of(pid: int) -> set[int]:
    """Pids of the processes whose parent is `pid`, zombies included (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return set(found)


def sim_reference(tmp_path: Path, method: str, K: int, *extra: str):
    """metrics records and final stage weights of the simulator engine."""
    cfg = make_cfg(tmp_path / f"sim-{method}-{K}", method, K, *extra)
    summary = train_sim(cfg)
    assert summary["status"] == "ok"
    state = torch.load(Path(cfg.run.out_dir) / "checkpoint.pt", weights_only=False)
    weights = [s["module"] for s in state["sim"]["stages"]]
    return read_metrics(cfg.run.out_dir), weights


def dist_weights(out: Path, update: int, K: int) -> list[dict]:
    return [torch.load(ckpts.stage_checkpoint(out, update, k), weights_only=False)["runner"]["module"]
            for k in range(K)]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    keys = ("step", "tokens", "train_loss", "lr", "val_loss")
    assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]


def assert_same_weights(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for k, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (k, name)


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
    ("2bw", 2, ()),
    ("gpipe", 3, ()),
    ("1f1b", 4, ()),
]


def run_dist_against_sim(tmp_path, method, K, extra, val_steps):
    """Train with the simulator and with the dist engine; assert every record (losses, lrs,
    validation losses at `val_steps`) and the final weights of every stage are equal.
    Returns (run folder, summary, child pids before the run)."""
    records, weights = sim_reference(tmp_path, method, K, *extra)
    cfg = make_cfg(tmp_path / "dist", method, K, "--train.engine=dist", *extra)
    before = children_of(os.getpid())
    assert train_dist(cfg, start_method="fork") == 0
    out = Path(cfg.run.out_dir)
    got = read_metrics(out)
    assert_same_records(got, records)
    assert [r["step"] for r in got if "val_loss" in r] == val_steps
    assert_same_weights(dist_weights(out, val_steps[-1], K), weights)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["val_loss"] == records[-1]["val_loss"]
    return out, summary, before


@pytest.mark.parametrize("method,K,extra", CASES, ids=[f"{m}-K{K}" for m, K, _ in CASES])
def test_dist_equals_simulator(tmp_path, method, K, extra):
    out, summary, before = run_dist_against_sim(tmp_path, method, K, extra, val_steps=[3, 6])
    assert summary["engine"] == "dist"
    assert len(summary["stage_stats"]) == K
    assert (out / "config.json").is_file()
    # Old per-stage files are pruned once a newer update is complete.
    assert ckpts.complete_updates(out, K) == [6]
    assert children_of(os.getpid()) <= before  # every worker reaped


def test_link_emulation_delays_but_changes_no_number(tmp_path):
    """20 ms latency per message: the same losses, and the run takes at least the round trips
    the first update cannot avoid (activation forward, gradient back)."""
    records, _ = sim_reference(tmp_path, "pipedream", 2)
    cfg = make_cfg(tmp_path / "dist", "pipedream", 2, "--train.engine=dist", "--link.latency_ms=20",
                   "--link.bandwidth_mbps=100")
    t0 = time.perf_counter()
    assert train_dist(cfg, start_method="fork") == 0
    assert_same_records(read_metrics(cfg.run.out_dir), records)
    stats = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())["stage_stats"]
    # Stage 0 waits for 6 gradients and stage 1 for 6 activations + 2x2 validation ones, each
    # >= 20 ms after it left; the first of each cannot overlap anything.
    assert stats[0]["recv_wait_s"] >= 0.04 and stats[1]["recv_wait_s"] >= 0.02
    assert time.perf_counter() - t0 >= 0.06


# -- failures ------------------------------------------------------------------------------------


def test_killed_worker_ends_the_run_quickly(tmp_path, monkeypatch, capfd):
    """Stage 1 exits after update 3 (a fresh interpreter per stage: the spawn start method):
    the launcher names it, stops the others long before dist.timeout_s (300 s here), and reaps
    everyone."""
    monkeypatch.setenv("PIPENAG_DIST_FAIL", "1:3")
    cfg = make_cfg(tmp_path / "dist", "pipedream", 3, "--train.engine=dist", "--train.steps=8",
                   "--dist.timeout_s=300")
    before = children_of(os.getpid())
    t0 = time.perf_counter()
    rc = train_dist(cfg, start_method="spawn")
    elapsed = time.perf_counter() - t0
    assert rc == 1
    err = capfd.readouterr().err
    assert "pipenag train: error: stage 1 exited with status 17" in err
    assert children_of(os.getpid()) <= before  # no worker left, not even a zombie
    # The records stop at update 3 (the last stage is at most one update ahead of stage 1).
    assert [r["step"] for r in read_metrics(cfg.run.out_dir)][-1] <= 4
    # Includes starting three fresh interpreters (~15 s on a busy 2-core machine); waiting for
    # the timeout would take 300 s.
    assert elapsed < 150


def test_hung_worker_times_out_and_is_named(tmp_path, monkeypatch, capfd):
    """Stage 1 stops answering after update 2: its neighbours give up after dist.timeout_s=3,
    the launcher blames stage 1 (the one still running) and kills it."""
    monkeypatch.setenv("PIPENAG_DIST_FAIL", "1:2:hang")
    cfg = make_cfg(tmp_path / "dist", "pipedream", 3, "--train.engine=dist", "--dist.timeout_s=3")
    before = children_of(os.getpid())
    t0 = time.perf_counter()
    assert train_dist(cfg, start_method="fork") == 1
    assert time.perf_counter() - t0 < 20
    last_line = capfd.readouterr().err.strip().splitlines()[-1]
    assert "stage 1 stopped answering" in last_line and "stopping stage 1" in last_line
    assert children_of(os.getpid()) <= before


@pytest.mark.parametrize("method,K", [("pipedream", 3), ("pipemare", 2)])
def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, method, K):
    """Stage 0 killed after update 6, before its checkpoint 6 (checkpoints every 2 updates);
    `--resume` continues from update 4, the newest that every stage saved, drops the records the
    later stages wrote after it, and gives the records and weights of an uninterrupted run."""
    extra = ("--train.engine=dist", "--train.steps=8", "--train.checkpoint_every=2")
    full = make_cfg(tmp_path / "full", method, K, *extra)
    assert train_dist(full, start_method="fork") == 0

    cfg = make_cfg(tmp_path / "cut", method, K, *extra)
    monkeypatch.setenv("PIPENAG_DIST_FAIL", "0:6")
    assert train_dist(cfg, start_method="fork") == 1
    monkeypatch.delenv("PIPENAG_DIST_FAIL")
    out = Path(cfg.run.out_dir)
    assert ckpts.complete_updates(out, K)[-1] == 4
    # The last stage wrote update 5's record before its gradient let stage 0 reach update 6.
    assert [r["step"] for r in read_metrics(out)][:5] == [1, 2, 3, 4, 5]
    resumed = load_run_config(out)
    assert resumed.train.engine == "dist"
    assert train_dist(resumed, resume=True, start_method="fork") == 0
    assert_same_records(read_metrics(out), read_metrics(full.run.out_dir))
    assert_same_weights(dist_weights(out, 8, K), dist_weights(Path(full.run.out_dir), 8, K))


# -- torchrun ------------------------------------------------------------------------------------


def test_torchrun_runs_the_same_workers(tmp_path):
    """`torchrun --nproc-per-node 2 -m pipenag train --engine dist` == the simulator."""
    records, weights = sim_reference(tmp_path, "gpipe", 2)
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "pipenag", "train", "--config", TINY, "--method", "gpipe", "--stages", "2",
           "--engine", "dist", "--out", str(out), *BASE]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_records(read_metrics(out), records)
    assert_same_weights(dist_weights(out, 6, 2), weights)


def _free_port() -> int:
    from pipenag.runtime.launch import free_port

    return free_port()


def test_world_size_must_match_the_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = make_cfg(tmp_path / "d", "pipedream", 2, "--train.engine=dist")
    with pytest.raises(ValueError, match="WORLD_SIZE=3"):
        train_dist(cfg)


def test_resume_without_complete_checkpoint_is_a_clear_error(tmp_path):
    cfg = make_cfg(tmp_path / "d", "pipedream", 2, "--train.engine=dist")
    with pytest.raises(ValueError, match="no update has a checkpoint from all 2 stages"):
        train_dist(cfg, resume=True)


def test_non_finite_loss_stops_the_run_like_the_simulator(tmp_path, capfd):
    """lr 1e30 makes update 2's loss NaN: the last stage records it, writes a "diverged"
    summary, and the launcher stops the run with status 1, as train_sim does."""
    cfg = make_cfg(tmp_path / "dist", "pipedream", 2, "--train.engine=dist", "--optim.lr=1e30")
    assert train_dist(cfg, start_method="fork") == 1
    assert "non-finite training loss nan at update 2" in capfd.readouterr().err
    records = read_metrics(cfg.run.out_dir)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["train_loss"] != records[-1]["train_loss"]
    summary = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["engine"] == "dist"
