"""Multi-node on one machine, as CI can run it: two torchrun agents on 127.0.0.1 (c10d
rendezvous), each its own subprocess with 2 of the 4 stages.

    python -m pytest tests/test_multinode.py -q

The two agents stand for two machines: the ranks span them, stage boundaries between them
carry activations over gloo, and on a failure every agent must restart its workers. The run
folder is shared (one machine), and run.threads=1 is set explicitly, as docs/dist.md asks for a
multi-node run whose numbers must equal the simulator's. Each test checks that no process of
the run is left behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import helpers
from helpers import DIST_BASE, FAST, ROOT, TINY, make_dist_cfg, sim_reference, subprocess_env

from pipenag.faults import FAIL_ENV
from pipenag.metrics import read_metrics
from pipenag.runtime.launch import free_port

K = 4
PER_AGENT = 2
STEPS = 12
RUN = (f"--train.steps={STEPS}", "--train.checkpoint_every=3", "--train.eval_every=4")
AGENT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's records and final weights (the simulator's)."""
    return sim_reference(make_dist_cfg(tmp_path_factory.mktemp("ref"), "pipedream", K, *RUN))


def run_two_agents(out: Path, *torchrun_args: str, fault: str = "", extra: tuple = ()) -> list[subprocess.CompletedProcess]:
    """Start two torchrun agents (node ranks 0 and 1) on one c10d rendezvous at 127.0.0.1 and
    wait for both; returns their results. The training arguments are make_dist_cfg's."""
    port = free_port()
    train = ["-m", "pipenag", "train", "--config", TINY, *FAST, *DIST_BASE, "--method", "pipedream",
             "--stages", str(K), "--engine", "dist", "--out", str(out), *RUN, *extra]
    env = subprocess_env(**({FAIL_ENV: fault} if fault else {}))
    agents = []
    for node_rank in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(PER_AGENT),
               "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"test-{port}", *torchrun_args, *train]
        agents.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True))
    results = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=AGENT_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(agent.args, agent.returncode, stdout, stderr))
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    return results


def processes_using(out: Path) -> list[int]:
    """Pids of live processes whose command line names the run folder (zombies excluded: a
    reaped process has no /proc entry, an unreaped one an empty command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(out) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def assert_nothing_left(out: Path) -> None:
    deadline = time.monotonic() + 10  # the agents have exited; their workers die with them
    while processes_using(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_using(out) == []


def assert_like_uninterrupted(out: Path, reference) -> dict:
    return helpers.assert_like_uninterrupted(out, reference, STEPS, K)


@pytest.mark.slow
def test_two_agents_equal_the_simulator(tmp_path, reference):
    out = tmp_path / "run"
    results = run_two_agents(out)
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:] + results[1].stderr[-2000:]
    summary = assert_like_uninterrupted(out, reference)
    assert summary["engine"] == "dist" and len(summary["stage_stats"]) == K and summary["threads"] == 1
    # The last stage's agent prints the final line; which agent that is, the rendezvous decides.
    assert sum("val_loss" in r.stdout for r in results) == 1
    assert_nothing_left(out)


@pytest.mark.slow
def test_a_killed_worker_restarts_both_agents_from_the_checkpoint(tmp_path, reference):
    """Stage 1 (on one of the agents) is SIGKILLed after update 7. Its agent restarts its group;
    the other agent's workers lose their neighbours, and it rejoins the rendezvous too. Both
    restart from set 6 with train.resume=auto and finish like an uninterrupted run."""
    out = tmp_path / "run"
    results = run_two_agents(out, "--max-restarts", "1", fault="1:7:kill", extra=("--train.resume=auto",))
    err = "".join(r.stderr for r in results)
    assert [r.returncode for r in results] == [0, 0], err[-4000:]
    assert "PIPENAG_FAIL fault 1:7:kill" in err
    summary = assert_like_uninterrupted(out, reference)
    assert [e["resumed_from"] for e in summary["restarts"]["events"]] == [6]
    assert_nothing_left(out)


@pytest.mark.slow
def test_without_restarts_a_killed_worker_ends_both_agents(tmp_path):
    """Without --max-restarts, a SIGKILL of stage 1 ends both agents with an error: the other
    node's workers see their connections close (not a timeout: dist.timeout_s is 120 s here)."""
    out = tmp_path / "run"
    results = run_two_agents(out, fault="1:3:kill", extra=("--dist.timeout_s=120",))
    assert all(r.returncode != 0 for r in results)
    err = "".join(r.stderr for r in results)
    assert "lost stage 1" in err and "stopped answering" not in err
    assert [r["step"] for r in read_metrics(out)][-1] <= 4
    assert_nothing_left(out)
