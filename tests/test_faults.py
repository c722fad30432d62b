"""Faults: restarts from the last complete checkpoint with nothing lost or doubled, checkpoints
that verify, and the same numbers as an uninterrupted run (and as the simulator).

    python -m pytest tests/test_faults.py -q

Faults come from pipenag.faults (PIPENAG_FAIL=STAGE:UPDATE[:KIND], each fires once per run):
a SIGKILL at a random update (several seeds), an exit, a hang (the timeout path), a silent stage
(alive, but its sends are lost: the timeout names the link), a kill while writing a checkpoint,
two faults in one run; files damaged on disk between attempts. Every
restarted run must end with the records (losses, lrs, validation losses) and the final weights
of the uninterrupted run, bit for bit, and leave no process behind.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import helpers
from helpers import (ROOT, TINY, assert_same_records, assert_same_state_dicts, children_of, dist_weights,
                     Interrupt, make_dist_cfg, sim_reference, sim_weights, simulator_stopped_at, subprocess_env,
                     tiny_config)

from pipenag.checkpoint import SIM_PART, CheckpointStore, stage_part
from pipenag.faults import FAIL_ENV, parse
from pipenag.metrics import read_metrics
from pipenag.run import read_events
from pipenag.runtime.launch import free_port, train_dist
from pipenag.train import train_sim

K = 3
STEPS = 12
RUN = (f"--train.steps={STEPS}", "--train.checkpoint_every=3", "--train.eval_every=4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's records and final weights (the simulator's: the dist engine
    equals it bit for bit, tests/test_dist.py)."""
    return sim_reference(make_dist_cfg(tmp_path_factory.mktemp("ref"), "pipedream", K, *RUN))


def run_dist(out: Path, fault: str, monkeypatch, *extra: str, start_method: str = "fork") -> tuple[int, Path]:
    monkeypatch.setenv(FAIL_ENV, fault)
    cfg = make_dist_cfg(out, "pipedream", K, "--train.engine=dist", *RUN, *extra)
    before = children_of(os.getpid())
    rc = train_dist(cfg, start_method=start_method)
    assert children_of(os.getpid()) <= before  # every worker reaped, restarts included
    return rc, out


def assert_like_uninterrupted(out: Path, reference) -> dict:
    return helpers.assert_like_uninterrupted(out, reference, STEPS, K)


# -- the runtime restarts by itself ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_update_is_survived(tmp_path, monkeypatch, capfd, reference, seed):
    rng = random.Random(seed)
    stage, update = rng.randrange(K), rng.randint(1, STEPS - 1)
    rc, out = run_dist(tmp_path / "run", f"{stage}:{update}:kill", monkeypatch, "--dist.max_restarts=2")
    assert rc == 0
    err = capfd.readouterr().err
    assert f"stage {stage} was killed by SIGKILL" in err and "restarting (1 of 2)" in err
    summary = assert_like_uninterrupted(out, reference)
    (event,) = summary["restarts"]["events"]
    assert summary["restarts"]["count"] == 1 and event["stage"] == stage
    assert event["resumed_from"] == max(u for u in (0, 3, 6, 9) if u <= update)
    assert "SIGKILL" in event["cause"] and event["failed_after_update"] <= update + 1


@pytest.mark.slow
def test_killed_while_writing_its_checkpoint(tmp_path, monkeypatch, reference):
    """Stage 1 dies half-way through its checkpoint of update 6: set 6 is incomplete, the run
    restarts from set 3, and the half-written temporary file is cleaned up."""
    rc, out = run_dist(tmp_path / "run", "1:6:checkpoint", monkeypatch, "--dist.max_restarts=1")
    assert rc == 0
    summary = assert_like_uninterrupted(out, reference)
    assert summary["restarts"]["events"][0]["resumed_from"] == 3
    assert not list((out / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_hung_worker_times_out_and_the_run_goes_on(tmp_path, monkeypatch, reference):
    rc, out = run_dist(tmp_path / "run", "2:5:hang", monkeypatch, "--dist.max_restarts=1", "--dist.timeout_s=3")
    assert rc == 0
    summary = assert_like_uninterrupted(out, reference)
    (event,) = summary["restarts"]["events"]
    assert "stage 2 stopped answering" in event["cause"] and event["resumed_from"] == 3


@pytest.mark.slow
def test_silent_stage_is_named_by_its_link_killed_and_restarted(tmp_path, monkeypatch, reference):
    """Stage 1 goes silent after update 5: alive, with its connections and receives, but it
    never sends again. A neighbour's receive times out after dist.timeout_s with an error that
    names the link and the message awaited; the launcher blames stage 1, kills the group (stage
    1 included, still running: run_dist checks that no child is left) and restarts from set 3."""
    rc, out = run_dist(tmp_path / "run", "1:5:silent", monkeypatch, "--dist.max_restarts=1", "--dist.timeout_s=3")
    assert rc == 0
    summary = assert_like_uninterrupted(out, reference)
    (event,) = summary["restarts"]["events"]
    assert event["stage"] == 1 and event["resumed_from"] == 3
    cause = event["cause"]
    assert "stage 1 stopped answering: nothing on the link stage 1 -> stage " in cause
    assert ("(activations); the activation of microbatch" in cause or "(gradients); the gradient of microbatch" in cause)
    assert "did not arrive within 3 s" in cause
    assert "stage 1" in cause.split("; stopping ")[1]  # alive until the launcher stopped it


@pytest.mark.slow
def test_silent_stage_without_restarts_fails_naming_the_link(tmp_path, monkeypatch, capfd):
    """K=2, the last stage goes silent after update 3 (it blocks before sending its next
    gradient): stage 0 times out on the link 1 -> 0, the launcher stops stage 1, which is still
    alive, and the run fails with status 1, blaming stage 1, with no process left."""
    monkeypatch.setenv(FAIL_ENV, "1:3:silent")
    cfg = make_dist_cfg(tmp_path / "run", "pipedream", 2, "--train.engine=dist", *RUN, "--dist.timeout_s=3")
    before = children_of(os.getpid())
    assert train_dist(cfg, start_method="fork") == 1
    assert children_of(os.getpid()) <= before
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pipenag train: error: stage 0: stage 1 stopped answering: nothing on the link "
                           "stage 1 -> stage 0 (gradients); the gradient of microbatch")
    assert "did not arrive within 3 s" in last and last.endswith("; stopping stage 1")
    (failure,) = read_events(cfg.run.out_dir)
    assert failure["event"] == "failure" and failure["stage"] == 1 and failure["exit_status"] == 3


@pytest.mark.slow
def test_two_faults_in_one_run(tmp_path, monkeypatch, reference):
    rc, out = run_dist(tmp_path / "run", "0:4:kill,2:10:exit", monkeypatch, "--dist.max_restarts=2")
    assert rc == 0
    summary = assert_like_uninterrupted(out, reference)
    assert [e["resumed_from"] for e in summary["restarts"]["events"]] == [3, 9]
    assert [e["stage"] for e in summary["restarts"]["events"]] == [0, 2]


@pytest.mark.slow
def test_restarts_run_out_and_every_failure_is_named(tmp_path, monkeypatch, capfd):
    rc, out = run_dist(tmp_path / "run", "1:4:exit,0:5:exit", monkeypatch, "--dist.max_restarts=1")
    assert rc == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pipenag train: error: stage 0 exited with status 17")
    assert "after 1 restart(s); earlier failures: attempt 1: stage 1 exited with status 17" in last
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["failure", "resume", "failure"]


@pytest.mark.slow
def test_a_diverged_run_is_not_restarted(tmp_path, monkeypatch, capfd):
    rc, out = run_dist(tmp_path / "run", "", monkeypatch, "--dist.max_restarts=2", "--optim.lr=1e30")
    assert rc == 1
    err = capfd.readouterr().err
    assert "restarting" not in err and "non-finite training loss" in err
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"


# -- damaged checkpoints -----------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["corrupt", "truncate"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_set(tmp_path, monkeypatch, capfd, reference, how):
    """The run stops after update 8 (sets 3 and 6 complete); stage 1's file of set 6 is then
    damaged on disk. Resuming warns in one line, uses set 3, and ends like an uninterrupted run."""
    rc, out = run_dist(tmp_path / "run", "0:8:exit", monkeypatch)
    assert rc == 1
    store = CheckpointStore(out, [stage_part(k) for k in range(K)])
    assert store.complete_updates() == [3, 6]
    _damage(store.path(6, stage_part(1)), how)
    capfd.readouterr()
    monkeypatch.delenv(FAIL_ENV)
    cfg = make_dist_cfg(out, "pipedream", K, "--train.engine=dist", *RUN, "--train.resume=auto")
    assert train_dist(cfg, start_method="fork") == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "u00000006-stage1.pt" in warnings[0]
    assert ("checksum mismatch" if how == "corrupt" else "truncated") in warnings[0]
    assert "Traceback" not in err
    summary = assert_like_uninterrupted(out, reference)
    assert summary["restarts"]["events"][-1]["resumed_from"] == 3


# -- the simulator ----------------------------------------------------------------------------


@pytest.mark.slow
def test_simulator_auto_resume_with_a_damaged_checkpoint(tmp_path, monkeypatch, capsys):
    """The simulator's checkpoints follow the same rules: stopped in update 8, its newest
    checkpoint (6) corrupted, train.resume=auto warns, falls back to 3, ends bit-identical."""
    cfg = tiny_config(tmp_path / "straight", *RUN, "--pipeline.num_stages=3")
    straight = train_sim(cfg)
    out = tmp_path / "cut"
    with simulator_stopped_at(monkeypatch, 7), pytest.raises(Interrupt):
        train_sim(tiny_config(out, *RUN, "--pipeline.num_stages=3"))
    store = CheckpointStore(out, [SIM_PART])
    assert store.complete_updates() == [3, 6]
    _damage(store.path(6, SIM_PART), "corrupt")
    capsys.readouterr()
    summary = train_sim(tiny_config(out, *RUN, "--pipeline.num_stages=3", "--train.resume=auto"))
    assert "checkpoint of update 6 is damaged" in capsys.readouterr().err
    assert_same_records(read_metrics(out), read_metrics(tmp_path / "straight"))
    assert summary["val_loss"] == straight["val_loss"] and summary["restarts"]["count"] == 1
    assert_same_state_dicts(sim_weights(out, STEPS), sim_weights(tmp_path / "straight", STEPS))


def test_auto_resume_refuses_another_run(tmp_path):
    tiny_config(tmp_path, *RUN).save(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"train.resume='auto': .* is another run \(optim.lr differ\)"):
        train_sim(tiny_config(tmp_path, *RUN, "--optim.lr=1e-4", "--train.resume=auto"))


def test_auto_resume_without_a_checkpoint_starts_fresh(tmp_path):
    summary = train_sim(tiny_config(tmp_path, "--train.steps=3", "--train.resume=auto"))
    assert summary["status"] == "ok" and summary["restarts"]["count"] == 0


# -- the store and the hook -------------------------------------------------------------------


def test_store_keeps_the_newest_two_complete_sets_and_newer_partial_ones(tmp_path):
    parts = ["stage0", "stage1"]
    store = CheckpointStore(tmp_path, parts)
    for u in (2, 4, 6):
        for p in parts:
            store.save(u, p, {"u": u, "p": p})
    store.save(8, "stage0", {"u": 8})  # stage 1 has not written 8 yet
    assert store.complete_updates() == [4, 6]
    assert store.updates("stage0") == [4, 6, 8] and store.updates("stage1") == [4, 6]
    assert store.newest_verified_set() == 6
    assert store.verify(6, "stage1") is None
    _damage(store.path(6, "stage1"), "corrupt")
    warned = []
    assert store.newest_verified_set(warn=warned.append) == 4 and len(warned) == 1
    (tmp_path / "checkpoints" / ".u00000010-stage0.pt.x1y2.tmp").write_bytes(b"half")
    store.clean_temporary("stage0")
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    store.discard_after(4, "stage0")
    assert store.updates("stage0", with_orphans=True) == [4]


def test_fault_specs_are_checked():
    assert [str(f) for f in parse("1:7:kill, 0:3")] == ["1:7:kill", "0:3:exit"]
    assert [str(f) for f in parse("1:3:silent,2:1:slow,0:2:slow:45")] == ["1:3:silent", "2:1:slow:20", "0:2:slow:45"]
    assert parse("0:2:slow:45")[0].ms == 45.0
    for bad in ("1", "a:3", "1:3:explode", "1:2:kill:x", "1:3:silent:5", "1:3:slow:x", "1:3:slow:-1",
                "1:3:slow:nan", "1:3:slow:5:5"):
        with pytest.raises(ValueError, match=FAIL_ENV):
            parse(bad)


def test_silent_and_slow_act_only_in_the_stage_they_fired_in(tmp_path, monkeypatch):
    """after_update starts a due silent or slow fault for a runtime stage (in this process),
    records it as fired, and the simulator (stage None) ignores both kinds."""
    from pipenag import faults

    monkeypatch.setattr(faults, "_silent", set())
    monkeypatch.setattr(faults, "_slow_s", {})
    monkeypatch.setenv(FAIL_ENV, "1:2:silent,0:2:slow:30")
    faults.after_update(tmp_path, None, 2)  # the simulator: nothing happens, nothing fires
    assert not (tmp_path / faults.FIRED).exists()
    faults.after_update(tmp_path, 1, 1)
    assert not faults.is_silent(1)
    faults.after_update(tmp_path, 1, 2)
    faults.after_update(tmp_path, 0, 2)
    assert faults.is_silent(1) and not faults.is_silent(0)
    assert faults.extra_pass_s(0) == pytest.approx(0.030) and faults.extra_pass_s(1) == 0.0
    assert (tmp_path / faults.FIRED).read_text().split() == ["1:2:silent", "0:2:slow:30"]


# -- torchrun and the thread rule ---------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_max_restarts_with_auto_resume(tmp_path, reference):
    """`torchrun --max-restarts 1 ... --train.resume=auto`: torchrun restarts every worker after
    stage 1 exits, they pick the run up from its checkpoint, and the numbers are unchanged."""
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(K), "--max-restarts", "1",
           "--master-port", str(free_port()), "-m", "pipenag", "train", "--config", TINY, "--method", "pipedream",
           "--stages", str(K), "--engine", "dist", "--out", str(out), "--data.max_chars=60000",
           "--train.eval_batches=2", "--run.threads=1", "--run.progress=false", "--train.resume=auto", *RUN]
    proc = subprocess.run(cmd, env=subprocess_env(**{FAIL_ENV: "1:7:exit"}), capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = assert_like_uninterrupted(out, reference)
    assert [e["resumed_from"] for e in summary["restarts"]["events"]] == [6]


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 4])
def test_default_threads_give_the_same_numbers_in_both_engines(tmp_path, stages):
    """run.threads=0 (the default) and no OMP_NUM_THREADS: the simulator uses the threads a
    worker of the same run would (cores // processes per machine), so `pipenag train` with
    either engine gives the same numbers bit for bit without anyone setting a thread count.
    Both run as users run them (fresh processes: a fork of a process whose thread pool has
    started is not safe)."""
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS")
    common = ["-m", "pipenag", "train", "--config", TINY, "--method", "nesterov", "--stages", str(stages),
              "--data.max_chars=60000", "--train.steps=8", "--train.checkpoint_every=4", "--train.eval_every=4",
              "--train.eval_batches=2", "--run.progress=false"]
    for engine in ("sim", "dist"):
        res = subprocess.run([sys.executable, *common, "--engine", engine, "--out", str(tmp_path / engine)],
                             env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-2000:]
    assert_same_records(read_metrics(tmp_path / "dist"), read_metrics(tmp_path / "sim"))
    assert_same_state_dicts(dist_weights(tmp_path / "dist", 8, stages), sim_weights(tmp_path / "sim", 8))
    threads = json.loads((tmp_path / "sim" / "summary.json").read_text())["threads"]
    assert threads == max(1, (os.cpu_count() or 1) // stages)
