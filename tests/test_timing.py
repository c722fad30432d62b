"""The timing model against the closed forms of pipeline schedules.

    python -m pytest tests/test_timing.py -q

With unit forward and backward times and free links, a flushing schedule (gpipe, 1f1b) takes
2 (M + K - 1) per update and keeps each stage busy M / (M + K - 1) of the time; pipedream never
flushes, so its utilization tends to 1 as the run grows. A link latency L delays each of the
2 (K - 1) hops of the fill and drain.
"""

import pytest

from pipenag.schedules import Action, Schedule
from pipenag.timing import bubble_fraction, simulate

SYNC_CASES = [(name, K, M) for name in ("gpipe", "1f1b") for K, M in [(1, 1), (1, 4), (2, 3), (3, 4), (4, 2), (5, 8)]]


@pytest.mark.parametrize("name,K,M", SYNC_CASES)
def test_flush_schedules_makespan_and_utilization(name, K, M):
    tl = simulate(Schedule(name, K, M), 1)
    assert tl.makespan == 2 * (M + K - 1)
    for u in tl.utilization:
        assert u == pytest.approx(M / (M + K - 1), abs=1e-12)
        assert 1 - u == pytest.approx(bubble_fraction(K, M), abs=1e-12)
    assert tl.busy == [2.0 * M] * K
    # a flush per update: n updates take n times as long
    assert simulate(Schedule(name, K, M), 3).makespan == 3 * 2 * (M + K - 1)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_flush_schedules_forward_backward_times(name):
    K, M = 3, 4
    tl = simulate(Schedule(name, K, M), 1, forward_time=1.0, backward_time=2.0)
    assert tl.makespan == (M + K - 1) * 3.0
    # a step at the end of every update adds to the critical path once per update
    tl = simulate(Schedule(name, K, M), 3, step_time=0.5)
    assert tl.makespan == 3 * (2 * (M + K - 1) + 0.5)
    assert tl.busy == [3 * 2.0 * M] * K  # steps are not counted as busy


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_pipedream_utilization_tends_to_one(K):
    s = Schedule("pipedream", K, 1)
    previous = 0.0
    for n in (1, 2, 5, 20, 100, 400):
        tl = simulate(s, n)
        # fill and drain once: 2 (K - 1) idle slots per stage over the whole run
        assert tl.makespan == 2 * n + 2 * (K - 1)
        assert min(tl.utilization) > previous
        previous = min(tl.utilization)
    assert previous > 0.98


def test_pipedream_beats_gpipe_at_equal_microbatches():
    K, M, n = 4, 4, 10
    sync = simulate(Schedule("gpipe", K, M), n).makespan
    asyn = simulate(Schedule("pipedream", K, 1), n * M).makespan
    assert sync == n * 2 * (M + K - 1)
    assert asyn == 2 * n * M + 2 * (K - 1)
    assert asyn < sync


@pytest.mark.parametrize("name,K,M", [("gpipe", 3, 4), ("gpipe", 4, 2), ("1f1b", 2, 5), ("2bw", 3, 3)])
def test_latency_and_transfer_time_add_per_hop(name, K, M):
    base = simulate(Schedule(name, K, M), 1).makespan
    # one update: the fill and the drain each cross K - 1 links
    for latency, transfer in [(0.5, 0.0), (0.0, 0.25), (0.5, 0.25)]:
        tl = simulate(Schedule(name, K, M), 1, latency=latency, transfer_time=transfer)
        if name == "gpipe":
            assert tl.makespan == base + 2 * (K - 1) * (latency + transfer)
        else:
            assert tl.makespan >= base + 2 * (K - 1) * (latency + transfer)
        assert tl.busy == simulate(Schedule(name, K, M), 1).busy  # latency is idle time
    # no links, no effect
    assert simulate(Schedule(name, 1, M), 2, latency=3.0).makespan == simulate(Schedule(name, 1, M), 2).makespan


@pytest.mark.parametrize("K,latency", [(2, 0.5), (4, 0.5), (4, 2.0), (3, 0.0)])
def test_pipedream_steady_state_period_with_latency(K, latency):
    """Stage k keeps tau_k + 1 = K - k microbatches in flight, and one round trip from its
    forward to its backward takes 2 (K - k) compute + 2 (K - 1 - k) latency, so a microbatch
    completes every 2 + 2 L (K - 1) / K (stage 0 is the bottleneck): latency the window of
    in-flight microbatches cannot hide."""
    s = Schedule("pipedream", K, 1)
    m1 = simulate(s, 60, latency=latency).makespan
    m2 = simulate(s, 120, latency=latency).makespan
    assert (m2 - m1) / 60 == pytest.approx(2 + 2 * latency * (K - 1) / K, rel=1e-9)


def test_transfers_queue_on_a_busy_link():
    # a transfer longer than the compute of a microbatch makes the link the bottleneck
    K, M = 2, 6
    tl = simulate(Schedule("gpipe", K, M), 1, transfer_time=2.0)
    f1 = sorted(e.start for e in tl.events if e.action.stage == 1 and e.action.kind == "F")
    assert [b - a for a, b in zip(f1, f1[1:])] == [2.0] * (M - 1)


def test_per_stage_times_and_bad_values():
    tl = simulate(Schedule("gpipe", 2, 2), 1, forward_time=[1.0, 3.0], backward_time=[1.0, 3.0])
    # stage 1 is the bottleneck: F0 at 1..4, F1 4..7, B0 7..10, B1 10..13, stage 0 B1 13..14
    assert tl.makespan == 14.0
    with pytest.raises(ValueError, match="forward_time"):
        simulate(Schedule("gpipe", 2, 2), 1, forward_time=[1.0])
    with pytest.raises(ValueError, match="backward_time"):
        simulate(Schedule("gpipe", 2, 2), 1, backward_time=-1.0)
    with pytest.raises(ValueError, match="latency"):
        simulate(Schedule("gpipe", 2, 2), 1, latency=-1.0)


class _Deadlocked(Schedule):
    def all_actions(self, num_updates, start_update=0):
        # stage 0 waits for B0 before sending F0 onward: nothing can ever run
        return [[Action(0, "B", 0), Action(0, "F", 0)], [Action(1, "F", 0), Action(1, "B", 0)]]


def test_deadlock_is_detected():
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(_Deadlocked("gpipe", 2, 1), 1)
