"""pipeline.in_flight: deeper asynchronous pipelines. The default lists equal today's, every
valid depth list realizes its versions and staleness without deadlock, invalid ones are named,
"auto" reaches its target, and both engines give the same numbers with the depths set.

    python -m pytest tests/test_in_flight.py -q
"""

from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path

import pytest

from helpers import (assert_same_records, assert_same_state_dicts, children_of, dist_weights, make_dist_cfg,
                     run_dist_against_sim, sim_reference, tiny_config)
from pipenag.cli import main as cli_main
from pipenag.config import load_config
from pipenag.methods import resolve
from pipenag.metrics import read_metrics
from pipenag.schedules import Action, Schedule, default_in_flight
from pipenag.timing import plan_in_flight, simulate, steady_utilization, utilization_bound


def reference_async_1f1b(K: int, M: int, k: int, start: int, num_updates: int) -> list[Action]:
    """The asynchronous 1F1B lists as they were before in_flight existed (tau_k = K-1-k warm-up
    forwards, then F(j + tau_k), B(j), S after each update), written out independently."""
    out, tau = [], K - 1 - k
    first, total = start * M, num_updates * M
    out += [Action(k, "F", j) for j in range(first, min(first + tau, total))]
    for j in range(first, total):
        if j + tau < total:
            out.append(Action(k, "F", j + tau))
        out.append(Action(k, "B", j))
        if (j + 1) % M == 0:
            out.append(Action(k, "S", j // M))
    return out


@pytest.mark.parametrize("name,K", [(n, K) for n in ("pipedream", "2bw") for K in range(1, 7)])
def test_default_depths_give_todays_lists_and_versions(name, K):
    M = 1 if name == "pipedream" else K + 1
    default = Schedule(name, K, M)
    explicit = Schedule(name, K, M, default_in_flight(K))
    assert default.depths == default_in_flight(K) == tuple(K - k for k in range(K))
    for start, n in [(0, 5), (2, 5)]:
        for k in range(K):
            assert default.actions(k, n, start) == reference_async_1f1b(K, M, k, start, n)
            assert explicit.actions(k, n, start) == default.actions(k, n, start)
    for k in range(K):
        assert default.staleness(k) == (K - 1 - k if name == "pipedream" else 1)
        assert default.versions_kept(k) == (K - k if name == "pipedream" else 2)
        for j in range(12):
            assert explicit.forward_version(k, j) == default.forward_version(k, j)
            for stash in (True, False):
                assert explicit.backward_version(k, j, stash) == default.backward_version(k, j, stash)


def test_the_default_config_resolves_to_todays_schedule():
    assert resolve(load_config(None, [])).schedule.in_flight == ()
    assert resolve(load_config(None, ["--pipeline.in_flight=auto"])).schedule.in_flight == ()  # no link


def random_depths(rng: random.Random, K: int, most: int) -> tuple[int, ...]:
    """A random valid depth list: non-increasing, each in [1, most]."""
    return tuple(sorted((rng.randint(1, most) for _ in range(K)), reverse=True))


def random_cases():
    rng = random.Random(0)
    for K in range(1, 7):
        for _ in range(6):
            yield "pipedream", K, 1, random_depths(rng, K, 3 * K + 2)
            M = rng.randint(K, 2 * K + 1)
            yield "2bw", K, M, random_depths(rng, K, M + 1)


CASES = list(random_cases())


def steps_before(actions):
    done, out = 0, []
    for a in actions:
        out.append(done)
        done += a.kind == "S"
    return out


@pytest.mark.parametrize("name,K,M,depths", CASES, ids=[f"{c[0]}-K{c[1]}-{'.'.join(map(str, c[3]))}" for c in CASES])
def test_random_depths_realize_versions_staleness_and_depth(name, K, M, depths):
    s = Schedule(name, K, M, depths)
    n = 6
    for start in (0, 2):
        for k in range(K):
            acts = s.actions(k, n, start)
            mbs = set(range(start * M, n * M))
            assert sorted(a.index for a in acts if a.kind == "F") == sorted(mbs)
            assert sorted(a.index for a in acts if a.kind == "B") == sorted(mbs)
            assert [a.index for a in acts if a.kind == "S"] == list(range(start, n))
            done_at = {}
            for a, done in zip(acts, steps_before(acts)):
                done += start
                done_at[(a.kind, a.index)] = done
                if a.kind == "F":
                    v = s.forward_version(k, a.index)
                    assert 0 <= v <= done and done - v < s.versions_kept(k), (str(a), v, done)
                elif a.kind == "B":
                    assert s.backward_version(k, a.index, stash=False) == done
                    # with stashing, the forward's version must still be held at the backward
                    assert done - s.backward_version(k, a.index, stash=True) < s.versions_kept(k)
            if start == 0 and name == "pipedream":
                # staleness = steps between a microbatch's forward and its backward (past the warm-up)
                for j in range(depths[k] - 1, n * M):
                    assert done_at[("B", j)] - done_at[("F", j)] == s.staleness(k) == depths[k] - 1
        # the depth: microbatches forwarded but not yet backwarded, at most and just before a backward
        for k in range(K):
            in_flight, most = 0, 0
            for a in s.actions(k, n):
                if a.kind == "B":
                    most = max(most, in_flight)
                in_flight += {"F": 1, "B": -1, "S": 0}[a.kind]
            assert most == min(depths[k], n * M), (k, most)


@pytest.mark.parametrize("name,K,M,depths", CASES[::3])
def test_random_depths_do_not_deadlock_in_the_timing_model(name, K, M, depths):
    s = Schedule(name, K, M, depths)
    rng = random.Random(hash(depths) % 1000)
    for _ in range(3):
        tl = simulate(s, 5, forward_time=[rng.uniform(0.5, 2) for _ in range(K)],
                      backward_time=[rng.uniform(0.5, 2) for _ in range(K)], latency=rng.uniform(0, 3),
                      transfer_time=rng.uniform(0, 2))
        assert len(tl.events) == sum(len(s.actions(k, 5)) for k in range(K))


@pytest.mark.parametrize("depths,name,M,match", [
    ((4, 3, 2), "pipedream", 1, "one depth per stage"),
    ((4, 0, 0, 0), "pipedream", 1, ">= 1"),
    ((1, 2, 2, 1), "pipedream", 1, "must not increase"),
    ((4, 3, 2, 2, ), "gpipe", 4, "asynchronous schedules"),
    ((6, 3, 2, 1), "2bw", 4, r"M \+ 1 = 5"),
])
def test_invalid_depths_are_named(depths, name, M, match):
    with pytest.raises(ValueError, match="in_flight=.*" + match):
        Schedule(name, 4, M, depths)


def test_the_increasing_list_would_deadlock():
    """The rule is needed, not just cautious: bypass the check and the lists deadlock."""
    s = Schedule("pipedream", 2, 1)
    object.__setattr__(s, "in_flight", (1, 2))
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(s, 4)


@pytest.mark.parametrize("override,message", [
    ("--pipeline.in_flight=8,6,4", "pipeline.in_flight='8,6,4': needs one depth per stage"),
    ("--pipeline.in_flight=8,x,4,1", "pipeline.in_flight='8,x,4,1': expected"),
    ("--pipeline.in_flight=8,6,0,1", "every depth must be >= 1"),
    ("--pipeline.in_flight=4,6,4,1", "pipeline.in_flight=.*must not increase"),
])
def test_invalid_config_values_are_one_line_errors(tmp_path, capsys, override, message):
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--method", "pipedream", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    import re

    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "r").exists()


def test_toml_list_and_command_line_agree(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[pipeline]\nmethod = \"pipedream\"\nin_flight = [12, 9, 6, 1]\n")
    a = resolve(load_config(path)).schedule
    b = resolve(load_config(None, ["--pipeline.method=pipedream", "--pipeline.in_flight=12,9,6,1"])).schedule
    assert a == b and a.depths == (12, 9, 6, 1)
    assert [a.staleness(k) for k in range(4)] == [11, 8, 5, 0]
    # saved and loaded again (config.json): the same run
    cfg = load_config(path)
    cfg.save(tmp_path / "config.json")
    from pipenag.config import Config

    assert Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg


def test_auto_needs_pass_ms_with_a_link():
    with pytest.raises(ValueError, match="pipeline.pass_ms"):
        resolve(load_config(None, ["--pipeline.in_flight=auto", "--link.latency_ms=30"]))


def test_auto_gives_k_minus_k_without_a_link_and_deeper_with_one():
    assert plan_in_flight("pipedream", 4, 1, 1.0, 1.0, 0.0, 0.0) == (4, 3, 2, 1)
    transfer = 512 * 1024 * 8 / 100e6
    depths = plan_in_flight("pipedream", 4, 1, 0.02, 0.02, 0.03, transfer)
    # the Little's-law estimate: about 15, 11, 6, 1
    assert depths[-1] == 1 and 14 <= depths[0] <= 17 and 10 <= depths[1] <= 12 and 5 <= depths[2] <= 7


@pytest.mark.parametrize("K,latency,transfer", [(4, 0.03, 0.0419), (4, 0.005, 0.0042), (6, 0.1, 0.0839),
                                                (3, 0.03, 0.0)])
def test_auto_reaches_its_target_and_no_depth_can_drop(K, latency, transfer):
    f, b = 0.02, 0.02
    depths = plan_in_flight("pipedream", K, 1, f, b, latency, transfer)
    goal = 0.97 * utilization_bound(f, b, transfer)
    assert steady_utilization(Schedule("pipedream", K, 1, depths), f, b, latency, transfer) >= goal
    for k in range(K):
        lower = list(depths)
        lower[k] -= 1
        if lower[k] < 1 or (k + 1 < K and lower[k] < lower[k + 1]):
            continue
        assert steady_utilization(Schedule("pipedream", K, 1, tuple(lower)), f, b, latency, transfer) < goal


def test_auto_2bw_respects_its_cap():
    depths = plan_in_flight("2bw", 4, 4, 0.02, 0.02, 0.03, 0.0419)
    assert max(depths) <= 5
    Schedule("2bw", 4, 4, depths)


def test_auto_in_a_config_uses_the_real_message_size():
    """B x T x C x 4 bytes on the link, the forward a third of pipeline.pass_ms."""
    base = ["--pipeline.method=pipedream", "--pipeline.in_flight=auto", "--link.latency_ms=30",
            "--link.bandwidth_mbps=100", "--pipeline.pass_ms=40"]
    for extra in (["--data.microbatch_size=1"], ["--data.microbatch_size=64"], ["--model.n_embd=256"]):
        cfg = load_config(None, base + extra)
        num_bytes = cfg.data.microbatch_size * cfg.model.block_size * cfg.model.n_embd * 4
        expected = plan_in_flight("pipedream", 4, 1, 0.04 / 3, 0.08 / 3, 0.03, num_bytes * 8 / 100e6)
        assert resolve(cfg).schedule.depths == expected
    assert resolve(load_config(None, base + ["--pipeline.method=gpipe"])).schedule.in_flight == ()


def test_cli_schedule_prints_the_depths(capsys):
    assert cli_main(["schedule", "--name", "pipedream", "--stages", "4", "--updates", "10",
                     "--pipeline.in_flight=8,6,4,1"]) == 0
    out = capsys.readouterr().out
    assert "in flight per stage: [8, 6, 4, 1]; staleness: [7, 5, 3, 0]" in out
    assert "stage 0 (keeps 8)" in out
    assert "stage 0: 0F0 0F1 0F2 0F3 0F4 0F5 0F6 0F7 0B0 0S0 0F8 0B1" in out
    assert cli_main(["schedule", "--name", "pipedream", "--stages", "4", "--pipeline.in_flight=1,6,4,1"]) == 2


def test_run_header_prints_depths_and_staleness(tmp_path, capsys):
    from pipenag.train import train_sim

    cfg = tiny_config(tmp_path / "r", "--pipeline.method=pipedream", "--pipeline.in_flight=6,4,2,1",
                      "--train.steps=3", "--run.progress=true")
    train_sim(cfg)
    out = capsys.readouterr()
    assert "in flight [6, 4, 2, 1], staleness [5, 3, 1, 0]" in out.out + out.err


@pytest.mark.parametrize("method", ["pipedream", "nesterov-nows", "pipemare", "pipedream-wp"])
def test_simulator_uses_the_deeper_staleness(tmp_path, method):
    """Deeper depths change the numbers (staler gradients), and every method that reads the
    staleness (nows momentum, PipeMare's lr and prediction, forward prediction) takes it."""
    from pipenag.build import build_pipeline, memory_report

    deep = tiny_config(tmp_path / "a", f"--pipeline.method={method}", "--pipeline.in_flight=7,5,3,1")
    parts = build_pipeline(deep, 256)
    s = parts.resolved.schedule
    assert [s.staleness(k) for k in range(4)] == [6, 4, 2, 0]
    if method == "nesterov-nows":
        assert parts.optimizers[0].param_groups[0]["betas"][0] == pytest.approx(0.9 + 0.09 * 6 / 7)
    if method == "pipemare":
        runner = parts.runner(0)
        assert runner.predictor.tau == 6
        assert parts.lr_fns[0](1) < parts.lr_fns[3](1)
    if method == "pipedream-wp":
        assert parts.runner(0).extrapolation == pytest.approx(deep.optim.predict_scale * 6)
    if method == "pipedream":
        assert [r["weight_versions"] for r in memory_report(parts)] == [7, 5, 3, 1]


@pytest.mark.slow
def test_deeper_depths_change_the_numbers_and_resume_bit_identically(tmp_path, monkeypatch):
    from helpers import Interrupt, simulator_stopped_at
    from pipenag.train import train_main, train_sim

    extra = ["--pipeline.method=nesterov", "--pipeline.in_flight=7,5,3,1", "--train.steps=12",
             "--train.checkpoint_every=3", "--train.eval_every=4"]
    straight = tiny_config(tmp_path / "straight", *extra)
    train_sim(straight)
    default = tiny_config(tmp_path / "default", *extra[:1], *extra[2:])
    train_sim(default)
    ref = read_metrics(straight.run.out_dir)
    assert [r["train_loss"] for r in ref] != [r["train_loss"] for r in read_metrics(default.run.out_dir)]
    with simulator_stopped_at(monkeypatch, 7), pytest.raises(Interrupt):
        train_sim(tiny_config(tmp_path / "cut", *extra))
    assert train_main(None, resume=str(tmp_path / "cut")) == 0
    assert_same_records(read_metrics(tmp_path / "cut"), ref)


@pytest.mark.slow
@pytest.mark.parametrize("method,K,depths,extra", [
    ("nesterov", 3, "6,4,1", ("--link.latency_ms=5", "--link.bandwidth_mbps=200")),
    ("pipemare", 3, "5,5,2", ("--train.checkpoint_every=2",)),
    ("2bw", 2, "4,2", ("--pipeline.num_microbatches=3",)),
])
def test_dist_equals_simulator_with_in_flight(tmp_path, method, K, depths, extra):
    run_dist_against_sim(tmp_path, method, K, (f"--pipeline.in_flight={depths}", *extra), val_steps=[3, 6])


@pytest.mark.slow
def test_dist_resume_and_restarts_with_in_flight(tmp_path, monkeypatch):
    """Killed mid-run under dist.max_restarts: the group restarts from its newest checkpoint
    (deeper stashes included) and ends equal to the simulator."""
    from pipenag.faults import FAIL_ENV
    from pipenag.runtime.launch import train_dist

    extra = ("--pipeline.in_flight=6,4,1", "--train.checkpoint_every=2")
    records, weights = sim_reference(make_dist_cfg(tmp_path / "sim", "pipedream", 3, *extra))
    monkeypatch.setenv(FAIL_ENV, "0:5:kill")
    cfg = make_dist_cfg(tmp_path / "dist", "pipedream", 3, "--train.engine=dist", "--dist.max_restarts=1", *extra)
    before = children_of(os.getpid())
    assert train_dist(cfg, start_method="fork") == 0
    assert children_of(os.getpid()) <= before
    out = Path(cfg.run.out_dir)
    assert_same_records(read_metrics(out), records)
    assert_same_state_dicts(dist_weights(out, 6, 3), weights)
    assert json.loads((out / "summary.json").read_text())["restarts"]["count"] == 1


def test_sweep_grid_takes_depth_lists():
    from pipenag.sweep import parse_grid

    assert parse_grid(["pipeline.in_flight=8,6,4,1;auto;"]) == [
        ("pipeline.in_flight=8,6,4,1",), ("pipeline.in_flight=auto",), ("pipeline.in_flight=",)]
    assert parse_grid(["pipeline.in_flight=8,6,4,1"]) == [("pipeline.in_flight=8,6,4,1",)]
    assert parse_grid(["optim.lr=1,2"]) == [("optim.lr=1",), ("optim.lr=2",)]
