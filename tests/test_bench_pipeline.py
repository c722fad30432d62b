"""`pipenag bench pipeline`: sleeping stages in real processes under every schedule.

    python -m pytest tests/test_bench_pipeline.py -q

No timing is asserted (speed is what the benchmark reports, docs/results/pipeline.md); these
tests check that it runs the real executor end to end (every stage checks that each message
carries the microbatch it expects, so a mismatched channel fails the run) and the report's shape.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipenag.bench.pipeline import SCHEDULES, SleepStage, main, plan, updates_for



@pytest.mark.slow
def test_bench_runs_every_schedule_and_ends_with_json(capsys):
    rc = main(["--stages", "3", "--microbatches", "2", "--compute-ms", "1", "--updates", "4", "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert list(report) == list(SCHEDULES)
    for name, r in report.items():
        assert r["throughput"] > 0
        assert len(r["utilization"]) == 3 and all(0 < u <= 1 for u in r["utilization"])
        assert r["microbatches"] == (8 if name != "2bw" else 9)  # 2bw: M' = 3, ceil(8 / 3) updates
        assert r["predicted_throughput"] > 0
    assert any(line.startswith("throughput ratios: pipedream/gpipe") for line in lines)


@pytest.mark.slow
def test_bench_with_an_emulated_link(capsys):
    """The link settings come from the config. With 3 ms of latency per message the event
    model predicts far less throughput than without, and the measured throughput cannot beat
    the model (sleeps and emulated links only add time): so the link really delayed the
    messages."""
    rc = main(["--stages", "2", "--microbatches", "2", "--compute-ms", "1", "--updates", "3",
               "--schedules", "pipedream,gpipe", "--link.latency_ms=3", "--link.bandwidth_mbps=50", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(report) == ["pipedream", "gpipe"]
    for r in report.values():
        no_link = 1 / (2 * 1e-3)  # one forward and one backward of 1 ms per microbatch, at best
        assert r["predicted_throughput"] < 0.5 * no_link
        assert r["throughput"] <= 1.02 * r["predicted_throughput"]


def test_sleep_stage_rejects_a_message_of_another_microbatch():
    stage = SleepStage(1, 3, 0.0, 0.0, (4,))
    out = stage.forward(5, torch.full((4,), 5.0))
    assert torch.equal(out, torch.full((4,), 5.0))
    with pytest.raises(AssertionError, match="carries microbatch 4"):
        stage.backward(5, torch.full((4,), 4.0))


def test_plan_uses_the_schedules_microbatch_rules():
    assert plan("pipedream", 8, 4).num_microbatches == 1
    assert plan("2bw", 8, 4).num_microbatches == 8
    assert plan("gpipe", 8, 4).num_microbatches == 4
    assert updates_for(plan("2bw", 8, 4), 400) == 50
