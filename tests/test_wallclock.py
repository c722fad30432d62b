"""The wall-clock model: calibrated stage costs, the link on the real bytes, shared cores.

    python -m pytest tests/test_wallclock.py -q
"""

from __future__ import annotations

import pytest

from helpers import tiny_config
from pipenag.schedules import Schedule
from pipenag.timing import simulate
from pipenag.wallclock import StageCosts, _processor_sharing, calibrate, predict, simulate_shared

SCHEDULES = [("pipedream", 4, 1, ()), ("gpipe", 4, 4, ()), ("1f1b", 3, 2, ()), ("pipedream", 4, 1, (8, 6, 4, 1)),
             ("2bw", 3, 3, ()), ("zb-h1", 4, 6, ())]


@pytest.mark.parametrize("name,K,M,depths", SCHEDULES)
def test_processor_sharing_with_a_core_per_stage_is_the_plain_model(name, K, M, depths):
    s = Schedule(name, K, M, depths)
    f, b = [1.0, 2.0, 1.0, 1.5][:K], [2.0, 1.0, 2.0, 1.0][:K]
    plain = simulate(s, 6, f, b, 0.3, latency=0.7, transfer_time=0.4, backward_transfer_time=0.2)
    shared = _processor_sharing(s, 6, f, b, 0.3, 0.7, 0.4, 0.2, lambda n: 1.0)
    assert shared.makespan == pytest.approx(plain.makespan, abs=1e-9)
    assert {e.action: (round(e.start, 9), round(e.end, 9)) for e in shared.events} == \
        {e.action: (round(e.start, 9), round(e.end, 9)) for e in plain.events}


def test_two_busy_stages_on_one_core_take_twice_as_long():
    s = Schedule("pipedream", 2, 1)
    assert simulate_shared(s, 50, cores=1).makespan == pytest.approx(2 * simulate(s, 50).makespan, rel=0.03)
    # a flushing schedule with bubbles loses less than 2x: only the overlapping passes share
    g = Schedule("gpipe", 2, 4)
    ratio = simulate_shared(g, 10, cores=1).makespan / simulate(g, 10).makespan
    assert 1.0 < ratio < 2.0


def test_calibrate_times_every_stage_and_caches(tmp_path):
    cfg = tiny_config(tmp_path / "r", f"--data.cache_dir={tmp_path / 'cache'}")
    costs = calibrate(cfg, repeats=2, warmup=1)
    assert costs.num_stages == 4 and costs.threads == 1
    assert all(t > 0 for t in costs.forward + costs.backward + costs.step)
    files = list((tmp_path / "cache" / "calibration").glob("*.json"))
    assert len(files) == 1
    assert calibrate(cfg, repeats=2, warmup=1) == costs  # read back from the cache, not measured again
    other = tiny_config(tmp_path / "r", f"--data.cache_dir={tmp_path / 'cache'}", "--pipeline.method=muon")
    calibrate(other, repeats=1, warmup=1)
    assert len(list((tmp_path / "cache" / "calibration").glob("*.json"))) == 2  # another optimizer, another entry


def test_predict_prices_the_link_the_codec_and_the_depths(tmp_path):
    base = tiny_config(tmp_path / "r", "--pipeline.method=pipedream", "--train.steps=40")
    costs = StageCosts((0.01,) * 4, (0.02,) * 4, (0.001,) * 4, 1, "test")
    free = predict(base, costs)
    assert free.steady_s_per_update == pytest.approx(0.031, rel=1e-6)  # F + B + S of a stage, no bubble
    slow = predict(base.with_overrides(["--link.latency_ms=30", "--link.bandwidth_mbps=10"]), costs)
    assert slow.steady_s_per_update > 3 * free.steady_s_per_update
    assert slow.transfer_s[0] == pytest.approx(4 * 32 * 40 * 4 * 8 / 10e6)
    packed = predict(base.with_overrides(["--link.latency_ms=30", "--link.bandwidth_mbps=10",
                                          "--link.compress_activations=int8", "--link.compress_gradients=int8"]), costs)
    assert packed.transfer_s[0] < slow.transfer_s[0] / 3.5
    assert packed.steady_s_per_update < slow.steady_s_per_update
    deep = predict(base.with_overrides(["--link.latency_ms=30", "--link.bandwidth_mbps=10",
                                        "--pipeline.in_flight=12,9,6,1"]), costs)
    assert deep.in_flight == (12, 9, 6, 1) and deep.steady_s_per_update < slow.steady_s_per_update
    gpipe = predict(base.with_overrides(["--pipeline.method=gpipe"]), costs)
    # gpipe, M = 4 per update: (M + K - 1) (F + B) + S per update, the flush included
    assert gpipe.steady_s_per_update == pytest.approx(7 * 0.03 + 0.001, rel=1e-6)
    with pytest.raises(ValueError, match="costs for 4 stages"):
        predict(base.with_overrides(["--pipeline.num_stages=2"]), costs)


def test_codec_costs_are_measured_per_direction_and_charged_to_the_passes_that_do_them(tmp_path):
    from pipenag.wallclock import with_message_costs

    cfg = tiny_config(tmp_path / "r", f"--data.cache_dir={tmp_path / 'cache'}", "--link.compress_activations=int8")
    costs = calibrate(cfg, repeats=2, warmup=1)
    assert costs.encode[0] > 0 and costs.decode[0] > 0  # int8 on the activations
    assert costs.encode[1] == 0 and costs.decode[1] == 0  # nothing on the gradients
    plain = calibrate(tiny_config(tmp_path / "r", f"--data.cache_dir={tmp_path / 'cache'}"), repeats=2, warmup=1)
    assert plain.encode == (0.0, 0.0) and plain.decode == (0.0, 0.0)  # another codec, another cache entry
    made_up = StageCosts((1.0,) * 3, (2.0,) * 3, (0.0,) * 3, 1, "test", encode=(0.1, 0.01), decode=(0.2, 0.02))
    fwd, bwd = with_message_costs(made_up)
    # stage 0 encodes its activation, stage 1 decodes one and encodes one, stage 2 only decodes
    assert fwd == pytest.approx([1.1, 1.3, 1.2])
    # stage 2 encodes the gradient it sends, stage 1 decodes one and encodes one, stage 0 decodes
    assert bwd == pytest.approx([2.02, 2.03, 2.01])


def test_a_slowdown_table_replaces_processor_sharing():
    s = Schedule("pipedream", 2, 1)
    plain = simulate(s, 50)
    assert simulate_shared(s, 50, slowdown=(1.0, 1.0)).makespan == pytest.approx(plain.makespan, rel=1e-9)
    # both stages compute nearly all the time: each at half speed takes nearly twice as long
    assert simulate_shared(s, 50, slowdown=(1.0, 2.0)).makespan == pytest.approx(2 * plain.makespan, rel=0.03)
    # past the table: s(last) * n / last, here 4 stages on a table of 2 entries = processor sharing on 1 core
    s4 = Schedule("pipedream", 4, 1)
    assert simulate_shared(s4, 30, slowdown=(1.0, 2.0)).makespan == pytest.approx(
        simulate_shared(s4, 30, cores=1).makespan, rel=1e-9)


def test_measure_contention_is_one_alone_and_positive_beyond():
    from pipenag.wallclock import measure_contention

    import torch

    threads = torch.get_num_threads()
    table = measure_contention(2, seconds=0.2)
    assert len(table) == 2 and table[0] == 1.0 and table[1] > 0.5  # a smoke test: the value is the machine's
    assert torch.get_num_threads() == threads  # the caller's torch threads are left as they were


def test_measure_contention_runs_the_configs_own_stages(tmp_path):
    from pipenag.wallclock import _stage_iteration, measure_contention

    import torch

    cfg = tiny_config(tmp_path / "r", "--pipeline.method=pipedream")
    # the workload is the run's stage: one forward, backward and step per call, on its runner
    once = _stage_iteration(cfg, cfg.pipeline.num_stages - 1, torch.Generator().manual_seed(0))
    once()
    once()
    table = measure_contention(2, seconds=0.2, cfg=cfg)
    assert len(table) == 2 and table[0] == 1.0 and table[1] > 0.5  # a smoke test: the value is the machine's


def test_a_split_backward_is_calibrated_and_priced_as_its_two_passes(tmp_path):
    cfg = tiny_config(tmp_path / "r", f"--data.cache_dir={tmp_path / 'cache'}", "--pipeline.method=zb-h1")
    costs = calibrate(cfg, repeats=2, warmup=1)
    assert len(costs.weight) == costs.num_stages and all(w > 0 for w in costs.weight)  # the W pass, measured
    assert calibrate(cfg, repeats=2, warmup=1) == costs  # the W costs survive the cache
    assert calibrate(tiny_config(tmp_path / "r", f"--data.cache_dir={tmp_path / 'cache'}"),
                     repeats=2, warmup=1).weight == ()  # no split, no W
    # the model charges the W passes their own cost: a W as long as the whole backward costs time
    halves = StageCosts((0.01,) * 4, (0.02,) * 4, (0.0,) * 4, 1, "test")  # W unknown: the backward split in half
    measured = StageCosts((0.01,) * 4, (0.01,) * 4, (0.0,) * 4, 1, "test", weight=(0.02,) * 4)
    assert predict(cfg, measured).steady_s_per_update > 1.2 * predict(cfg, halves).steady_s_per_update
    # and processor sharing at a core per stage is the plain model with the same W costs
    s = Schedule("zb-h1", 4, 6)
    plain = simulate(s, 6, 1.0, 1.0, 0.2, weight_time=[2.0, 1.5, 1.0, 0.5])
    shared = _processor_sharing(s, 6, 1.0, 1.0, 0.2, 0.0, 0.0, None, lambda n: 1.0, [2.0, 1.5, 1.0, 0.5])
    assert shared.makespan == pytest.approx(plain.makespan, abs=1e-9)

