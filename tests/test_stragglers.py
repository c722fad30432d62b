"""Stragglers: per-stage moving medians of the compute times, the warning that names a slow
stage, and what a straggler costs in the pipeline benchmark and the timing model.

    python -m pytest tests/test_stragglers.py -q

A slow stage is injected with PIPENAG_FAIL=STAGE:UPDATE:slow:MS (pipenag.faults): it sleeps MS
more in every forward and backward. No test asserts a speed: the real runs check which stage
is named (and that the numbers do not change), the model's costs are pure arithmetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_same_records, make_dist_cfg, sim_reference

from pipenag.bench.pipeline import main as bench_main
from pipenag.bench.pipeline import parse_stage_ms, straggler_cost, uniform_stage_s
from pipenag.faults import FAIL_ENV
from pipenag.metrics import find_stragglers, read_metrics
from pipenag.run import per_microbatch_ms, read_events
from pipenag.runtime.executor import MEDIAN_WINDOW, Executor
from pipenag.runtime.launch import train_dist
from pipenag.schedules import Schedule
from pipenag.timing import simulate

RUN = ("--train.steps=12", "--train.eval_every=4", "--train.log_every=2")

# -- the rule --------------------------------------------------------------------------------


def test_a_stage_above_one_and_a_half_times_the_median_is_a_straggler():
    assert find_stragglers([2.0, 2.0, 4.0, 2.0]) == {2: 2.0}
    assert find_stragglers([2.0, 2.0, 2.9, 2.0]) == {}
    assert find_stragglers([2.0, None, 9.0, 2.0]) == {2: 2.0}  # a stage not heard from is left out
    assert find_stragglers([5.0, None]) == {}  # one known stage: nothing to compare with
    # Two stages: the median is the mean, so the slow one must be over 3x the other.
    assert find_stragglers([1.0, 2.9]) == {}
    assert find_stragglers([1.0, 3.1]) == {1: 2.05}
    with pytest.raises(ValueError, match="ratio=1.0"):
        find_stragglers([1.0, 2.0], ratio=1.0)


def test_time_per_microbatch_is_forward_plus_backward_plus_a_share_of_the_step():
    times = {"forward_ms": [1.0, 2.0, None], "backward_ms": [2.0, 4.0, 1.0], "step_ms": [4.0, None, 1.0]}
    assert per_microbatch_ms(times, num_microbatches=4) == [4.0, 6.0, None]


class _ClockStage:
    """A stage whose passes advance a fake clock: forwards take 3 ms, then 10 ms from
    microbatch `slow_from` on; backwards 5 ms; steps 1 ms."""

    def __init__(self, slow_from: int):
        self.now, self.slow_from = 0.0, slow_from

    def forward(self, j, x, target=None):
        self.now += 0.010 if j >= self.slow_from else 0.003
        return x.sum()

    def backward(self, j, grad=None):
        self.now += 0.005

    def step(self):
        self.now += 0.001


def test_executor_keeps_moving_medians_of_the_last_passes():
    import torch

    stage = _ClockStage(slow_from=40)
    ex = Executor(stage, Schedule("pipedream", 1, 1), 0, None, 80, inputs=lambda j: torch.zeros(1),
                  targets=lambda j: torch.zeros(1), clock=lambda: stage.now)
    stats = ex.run()
    medians = ex.medians_ms()
    # 80 forwards, the last 40 slow: the window holds only slow ones.
    assert MEDIAN_WINDOW <= 40
    assert medians["forward_ms"] == pytest.approx(10.0)
    assert medians["backward_ms"] == pytest.approx(5.0) and medians["step_ms"] == pytest.approx(1.0)
    assert stats.to_dict()["median_ms"] == medians
    assert Executor(stage, Schedule("pipedream", 1, 1), 0, None, 1, inputs=lambda j: torch.zeros(1),
                    targets=lambda j: torch.zeros(1)).medians_ms()["forward_ms"] is None  # nothing run yet


# -- real runs ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_slow_stage_is_named_in_the_progress_line_and_events(tmp_path, monkeypatch, capfd):
    """Stage 1 of 3 sleeps 40 ms more per pass from update 1 on: the last stage's records carry
    every stage's medians, events.jsonl gets a straggler event for stage 1, the progress line
    names it, and no number changes."""
    records, _ = sim_reference(make_dist_cfg(tmp_path / "sim", "pipedream", 3, *RUN))
    monkeypatch.setenv(FAIL_ENV, "1:1:slow:40")
    cfg = make_dist_cfg(tmp_path / "dist", "pipedream", 3, "--train.engine=dist", "--run.progress=true", *RUN)
    assert train_dist(cfg, start_method="fork") == 0
    out = Path(cfg.run.out_dir)
    got = read_metrics(out)
    assert_same_records(got, records)
    timed = [r for r in got if "stage_times" in r]
    assert [r["step"] for r in timed] == [2, 4, 6, 8, 10, 12]
    assert all(v is not None for v in timed[-1]["stage_times"]["forward_ms"])  # every stage heard from
    # a sleep lasts at least what it asked for, so this holds on any machine
    assert timed[-1]["stage_times"]["forward_ms"][1] >= 40 and timed[-1]["stage_times"]["backward_ms"][1] >= 40
    events = [e for e in read_events(out) if e["event"] == "straggler"]
    assert 1 in {e["stage"] for e in events}
    first = next(e for e in events if e["stage"] == 1)
    assert first["ratio"] > 1.5 and first["ms_per_microbatch"] >= 80
    progress = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[")]
    assert any("straggler: stage 1 (" in line for line in progress)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage_stats"][1]["median_ms"]["forward_ms"] >= 40


@pytest.mark.slow
def test_no_straggler_without_a_slow_stage(tmp_path, monkeypatch, capfd):
    """Two balanced stages (2 blocks each), no fault: the medians are recorded, no warning."""
    monkeypatch.delenv(FAIL_ENV, raising=False)
    cfg = make_dist_cfg(tmp_path / "dist", "pipedream", 2, "--train.engine=dist", "--run.progress=true", *RUN)
    assert train_dist(cfg, start_method="fork") == 0
    out = Path(cfg.run.out_dir)
    last = [r for r in read_metrics(out) if "stage_times" in r][-1]["stage_times"]
    assert all(v is not None and v > 0 for v in last["forward_ms"] + last["backward_ms"])
    assert not [e for e in read_events(out) if e["event"] == "straggler"]
    assert "straggler" not in capfd.readouterr().err


# -- the benchmark and the timing model ---------------------------------------------------------


def test_stage_ms_needs_one_number_per_stage():
    assert parse_stage_ms("20, 20,40,20", 4) == [20.0, 20.0, 40.0, 20.0]
    for bad, words in (("20,20,40", "3 value"), ("20,x,40,20", "not comma-separated"),
                       ("20,-1,40,20", ">= 0"), ("20,inf,40,20", ">= 0")):
        with pytest.raises(ValueError, match=f"--stage-ms=.*{words}"):
            parse_stage_ms(bad, 4)


def test_bench_refuses_a_bad_stage_ms_before_starting_workers(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--stages", "3", "--stage-ms", "1,2"])
    assert e.value.code == 2
    assert "--stage-ms='1,2': 2 value(s) for 3 stages" in capsys.readouterr().err


def test_the_model_prices_a_straggler():
    """gpipe, K=2, M=2, one update: with stage 1 at 2 units per pass the makespan is 10 (stage 1
    runs F0 1-3, F1 3-5, B1 5-7, B0 7-9; stage 0 ends with B0 9-10) against 6 with both at 1:
    cost 1 - 6/10. Asynchronous 1F1B runs at the slowest stage's pace, 1/(2 x 2) microbatches
    per unit against 1/(2 x 1): the cost tends to a half."""
    gpipe = Schedule("gpipe", 2, 2)
    assert simulate(gpipe, 1, forward_time=[1, 2], backward_time=[1, 2]).makespan == 10
    cost = straggler_cost(gpipe, 1, [1.0, 2.0], baseline_s=[1.0, 1.0])
    assert cost["predicted_cost"] == pytest.approx(0.4)
    assert cost["predicted_throughput"] == pytest.approx(2 / 10)
    pipedream = straggler_cost(Schedule("pipedream", 4, 1), 400, [1.0, 1.0, 2.0, 1.0])
    assert uniform_stage_s([1.0, 1.0, 2.0, 1.0]) == [1.0] * 4
    assert pipedream["predicted_cost"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_bench_reports_the_straggler_cost(capsys):
    rc = bench_main(["--stages", "3", "--microbatches", "2", "--stage-ms", "1,4,1", "--updates", "3",
                     "--schedules", "pipedream,gpipe", "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    for r in report.values():
        assert set(r["straggler_cost"]) == {"measured", "predicted"}
        assert 0 < r["straggler_cost"]["predicted"] < 1
        assert r["uniform"]["microbatches"] == r["microbatches"]
    assert "straggler      mb/s  without" in out
