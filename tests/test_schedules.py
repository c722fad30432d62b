"""Schedules as data: every action list is complete, ordered, deadlock free, and realizes the
weight versions of docs/schedules.md.

    python -m pytest tests/test_schedules.py -q
"""

import itertools

import pytest
import torch

from pipenag.cli import main as cli_main
from pipenag.schedules import SCHEDULES, Action, Schedule, microbatches_per_update
from pipenag.timing import simulate



def schedules_under_test():
    """(name, K, M) for all four schedules, K = 1..5 and several M (the legal ones)."""
    for name, K in itertools.product(SCHEDULES, range(1, 6)):
        if name == "pipedream":
            ms = [1]
        elif name == "2bw":
            ms = sorted({K, K + 1, 2 * K})
        else:
            ms = [1, 2, 3, 5]
        for M in ms:
            yield name, K, M


CASES = list(schedules_under_test())
RANGES = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 3), (2, 4), (3, 4)]  # (start_update, num_updates)


def steps_before(actions):
    """For each action of one stage's list, the number of S actions before it in that list."""
    done, out = 0, []
    for a in actions:
        out.append(done)
        if a.kind == "S":
            done += 1
    return out


@pytest.mark.parametrize("name,K,M", CASES)
def test_action_lists_complete_and_ordered(name, K, M):
    s = Schedule(name, K, M)
    for start, n in RANGES:
        mbs = set(range(start * M, n * M))
        for k in range(K):
            acts = s.actions(k, n, start)
            assert all(a.stage == k for a in acts)
            fwd = [a.index for a in acts if a.kind == "F"]
            bwd = [a.index for a in acts if a.kind == "B"]
            steps = [a.index for a in acts if a.kind == "S"]
            # each F and B exactly once per microbatch of the updates covered
            assert sorted(fwd) == sorted(mbs) and len(set(fwd)) == len(fwd)
            assert sorted(bwd) == sorted(mbs) and len(set(bwd)) == len(bwd)
            # one S per update, in order
            assert steps == list(range(start, n))
            pos = {(a.kind, a.index): i for i, a in enumerate(acts)}
            for j in mbs:
                assert pos[("F", j)] < pos[("B", j)], f"{name} stage {k}: B{j} before F{j}"
            for u in range(start, n):
                last_b = max(pos[("B", j)] for j in range(u * M, (u + 1) * M))
                assert pos[("S", u)] > last_b, f"{name} stage {k}: S{u} before its last backward"
                # ... and no backward of a later update sneaks in before the step
                for j in range((u + 1) * M, n * M):
                    assert pos[("B", j)] > pos[("S", u)]


@pytest.mark.parametrize("name,K,M", CASES)
def test_action_lists_realize_versions(name, K, M):
    """The version each F and B should use exists when the action runs: the forward's version is
    at most the steps done before it (with start_update steps made by the earlier run), and the
    stash-off backward's version is exactly the steps done before it."""
    s = Schedule(name, K, M)
    for start, n in RANGES:
        for k in range(K):
            acts = s.actions(k, n, start)
            for a, done in zip(acts, steps_before(acts)):
                done += start
                if a.kind == "F":
                    v = s.forward_version(k, a.index)
                    assert 0 <= v <= done, (str(a), v, done)
                    # the version is no older than the stage keeps
                    assert done - v < s.versions_kept(k), (str(a), v, done)
                    if name == "pipedream" and start == 0:
                        # the asynchronous semantics: the latest weights at that moment
                        assert v == done, (str(a), v, done)
                    if name in ("gpipe", "1f1b"):
                        assert v == done
                elif a.kind == "B":
                    assert s.backward_version(k, a.index, stash=False) == done, (str(a), done)
                    assert s.backward_version(k, a.index, stash=True) == s.forward_version(k, a.index)


@pytest.mark.parametrize("name,K,M", CASES)
def test_microbatches_in_flight(name, K, M):
    """Activation memory: microbatches forwarded but not yet backwarded at stage k. GPipe holds
    the whole update (M); 1F1B and the asynchronous schedules at most tau_k + 1 (PipeDream's
    1F1B: tau_k warm-up forwards, then one forward per backward)."""
    s = Schedule(name, K, M)
    n = 4
    for k in range(K):
        in_flight, most = 0, 0
        for a in s.actions(k, n):
            in_flight += {"F": 1, "B": -1, "W": 0, "S": 0}[a.kind]  # zb-h1's W: tests/test_zero_bubble.py
            most = max(most, in_flight)
        tau = K - 1 - k
        expected = {"gpipe": M, "1f1b": min(tau + 1, M), "zb-h1": min(tau + 1, M)}.get(name, min(tau + 1, n * M))
        assert most == expected, (k, most, expected)


def test_pipedream_resumed_lists_match_uninterrupted_run():
    """A run resumed at update u replays the forwards in flight: the resumed list is the tail
    of the uninterrupted list after S(u-1), preceded by the re-done warm-up forwards."""
    s = Schedule("pipedream", 4, 1)
    for k in range(4):
        full = s.actions(k, 6)
        for start in range(1, 6):
            cut = full.index(Action(k, "S", start - 1)) + 1
            tail = full[cut:]
            resumed = s.actions(k, 6, start)
            redo = [a for a in full[:cut] if a.kind == "F" and a.index >= start]
            assert resumed == redo + tail


@pytest.mark.parametrize("name,K,M", CASES)
def test_timing_simulation_has_no_deadlock(name, K, M):
    s = Schedule(name, K, M)
    for n in (1, 2, 4):
        tl = simulate(s, n)
        assert len(tl.events) == sum(len(s.actions(k, n)) for k in range(K))
        # an action starts only after its producer ended (forward chain, backward chain)
        end = {(e.action.stage, e.action.kind, e.action.index): e.end for e in tl.events}
        for e in tl.events:
            a = e.action
            if a.kind == "F" and a.stage > 0:
                assert e.start >= end[(a.stage - 1, "F", a.index)]
            if a.kind == "B" and a.stage < K - 1:
                assert e.start >= end[(a.stage + 1, "B", a.index)]
            if a.kind == "B":
                assert e.start >= end[(a.stage, "F", a.index)]


def test_versions_pinned_examples():
    """A few entries of the version table in docs/schedules.md, written out by hand."""
    pd = Schedule("pipedream", 4, 1)
    assert [pd.forward_version(0, j) for j in range(6)] == [0, 0, 0, 0, 1, 2]
    assert [pd.forward_version(2, j) for j in range(6)] == [0, 0, 1, 2, 3, 4]
    assert [pd.forward_version(3, j) for j in range(6)] == [0, 1, 2, 3, 4, 5]
    assert [pd.backward_version(0, j, False) for j in range(6)] == [0, 1, 2, 3, 4, 5]
    assert [pd.versions_kept(k) for k in range(4)] == [4, 3, 2, 1]
    tb = Schedule("2bw", 3, 3)
    assert [tb.forward_version(1, j) for j in range(9)] == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    g = Schedule("gpipe", 3, 2)
    assert [g.forward_version(0, j) for j in range(6)] == [0, 0, 1, 1, 2, 2]


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("zero-bubble", 2, 2)
    with pytest.raises(ValueError, match="num_microbatches=2"):
        Schedule("pipedream", 2, 2)
    with pytest.raises(ValueError, match="num_microbatches=3"):
        Schedule("2bw", 4, 3)
    with pytest.raises(ValueError, match="num_stages=0"):
        Schedule("gpipe", 0, 2)
    with pytest.raises(ValueError, match="num_microbatches=0"):
        Schedule("gpipe", 2, 0)
    s = Schedule("gpipe", 2, 2)
    with pytest.raises(ValueError, match="stage_idx=2"):
        s.actions(2, 1)
    with pytest.raises(ValueError, match="start_update=3"):
        s.actions(0, 2, 3)
    with pytest.raises(ValueError):
        Action.parse("2X0")
    with pytest.raises(ValueError):
        simulate(s, 1, forward_time=[1.0])  # one value per stage needed


def test_action_parse_round_trip():
    for name, K, M in [("gpipe", 3, 4), ("1f1b", 12, 12), ("pipedream", 11, 1), ("2bw", 2, 3)]:
        s = Schedule(name, K, M)
        for k in range(K):
            for a in s.actions(k, 12):
                assert Action.parse(str(a)) == a
    assert str(Action(2, "F", 0)) == "2F0"
    assert Action.parse("10B123") == Action(10, "B", 123)


def test_microbatches_per_update_are_legal():
    for name, K, asked in itertools.product(SCHEDULES, range(1, 9), (0, 1, 3, 8)):
        M = microbatches_per_update(name, K, asked)
        Schedule(name, K, M)  # raises on an M the schedule forbids
        if name in ("gpipe", "1f1b"):
            assert M == (asked or 4)
    assert microbatches_per_update("pipedream", 8, 4) == 1
    assert microbatches_per_update("2bw", 8, 4) == 8 and microbatches_per_update("2bw", 2) == 4


def test_staleness_is_the_update_delay_of_each_schedule():
    assert [Schedule("pipedream", 4, 1).staleness(k) for k in range(4)] == [3, 2, 1, 0]
    assert [Schedule("2bw", 3, 3).staleness(k) for k in range(3)] == [1, 1, 1]
    assert [Schedule(name, 3, 2).staleness(k) for name in ("gpipe", "1f1b") for k in range(3)] == [0] * 6


@pytest.mark.parametrize("name", SCHEDULES)
def test_cli_schedule_prints_grid(name, capsys):
    assert cli_main(["schedule", "--name", name, "--stages", "3", "--updates", "2"]) == 0
    out = capsys.readouterr().out
    for k in range(3):
        assert f"stage {k}: " in out
    assert "utilization" in out and "F0" in out and "B0" in out and "2S1" in out


def test_cli_schedule_grid_gpipe_exact(capsys):
    assert cli_main(["schedule", "--name", "gpipe", "--stages", "2", "--microbatches", "2",
                     "--updates", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    grid = [line.split() for line in lines if line.startswith("stage ")][:2]
    # one column per unit slot, makespan 2 (M + K - 1) = 6
    assert grid[0] == ["stage", "0:", "F0", "F1", ".", ".", "B0", "B1"]
    assert grid[1] == ["stage", "1:", ".", "F0", "F1", "B0", "B1", "."]


def test_cli_schedule_bad_name_is_an_error(capsys):
    assert cli_main(["schedule", "--name", "nope", "--stages", "2"]) == 2
    assert "unknown schedule" in capsys.readouterr().err
