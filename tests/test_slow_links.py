"""The arithmetic of the slow-link decision table (experiments/slow_links.py): where a loss curve
crosses the target, which synchronous lr is the reference, and which host's runs count."""

import csv
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import slow_links  # noqa: E402
from slow_links import BENCH_TOKENS_PER_MICROBATCH, BUDGET, crossing, groups, mean_curve, sync_losses  # noqa: E402


def test_crossing_interpolates_between_the_evaluations_around_the_target():
    curve = [(100, 3.0), (200, 2.5), (300, 2.0), (400, 1.9)]
    # 2.2 lies 0.3 of the way from 2.5 to 2.0: 200 + 0.6 * 100.
    assert crossing(curve, 2.2) == pytest.approx(260.0)
    assert crossing(curve, 2.0) == pytest.approx(300.0)  # reached exactly at an evaluation
    assert crossing(curve, 3.5) == pytest.approx(100.0)  # already below at the first evaluation
    assert crossing(curve, 1.8) is None  # never reached


def test_mean_curve_averages_the_seeds_at_their_common_evaluations():
    runs = [{"curve": [(1, 3.0), (2, 2.0), (3, 1.0)]}, {"curve": [(2, 4.0), (3, 3.0)]}]
    assert mean_curve(runs) == [(2, 3.0), (3, 2.0)]


def run(method, M, lr, seed, final, budget=BUDGET):
    key = (method, 1, M, "", "none", lr, budget)
    return {"key": key, "seed": seed, "val_loss": final, "curve": [(budget // 2, final + 0.5), (budget, final)]}


def test_the_synchronous_reference_is_the_lr_best_on_the_tuning_seed_at_a_whole_budget():
    runs = [run("gpipe-muon", 4, 1e-2, 1, 1.9), run("gpipe-muon", 4, 3e-2, 1, 1.8), run("gpipe-muon", 4, 3e-2, 2, 2.0),
            run("gpipe-muon", 4, 1e-1, 1, 2.4),
            # M = 32 makes 62 updates of 32 microbatches: its budget is 1,984 microbatches, counted;
            # a run of another length is not a reference.
            run("gpipe", 32, 1e-3, 1, 2.8, budget=BUDGET // (32 * BENCH_TOKENS_PER_MICROBATCH) * 32
                * BENCH_TOKENS_PER_MICROBATCH),
            run("gpipe", 4, 3e-3, 1, 1.0, budget=4 * BUDGET)]
    sync = sync_losses(groups(runs))
    assert set(sync) == {("gpipe-muon", 4), ("gpipe", 32)}
    best = sync[("gpipe-muon", 4)]
    assert best["lr"] == 3e-2 and best["seeds"] == [1, 2]
    assert best["final"] == pytest.approx(1.9)  # the mean of the chosen lr's seeds
    assert best["lrs_tried"] == [1e-2, 3e-2, 1e-1]


def test_an_earlier_hosts_runs_are_left_out_where_a_recorded_machine_ran_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no compression or corrections data here
    monkeypatch.setattr(slow_links, "DATA", tmp_path)
    ident = {"method": "gpipe", "stages": "1", "M": "4", "in_flight": "", "codec": "none", "lr": "0.003",
             "budget": str(BUDGET), "tokens": str(BUDGET)}
    rows = [{**ident, "seed": "1", "val_loss": "2.25", "machine": ""},  # earlier host, same setting: out
            {**ident, "seed": "2", "val_loss": "2.24", "machine": ""},
            {**ident, "seed": "1", "val_loss": "2.26", "machine": "host c"},
            {**ident, "M": "8", "seed": "1", "val_loss": "2.38", "machine": ""}]  # no recorded run: kept
    for name, data in (("runs.csv", rows),
                       ("curves.csv", [{**{k: r[k] for k in ident}, "seed": r["seed"], "val_loss": r["val_loss"]}
                                       for r in rows])):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    got = sorted((r["key"][2], r["seed"], r["val_loss"]) for r in slow_links.read_losses())
    assert got == [(4, 1, 2.26), (8, 1, 2.38)]


def test_the_fastest_synchronous_row_to_a_goal_weighs_tokens_by_its_seconds_per_microbatch():
    curve = [(10 * BENCH_TOKENS_PER_MICROBATCH, 2.0), (20 * BENCH_TOKENS_PER_MICROBATCH, 1.0)]
    slow_few = {"label": "a", "M": 4, "spm": 1.0, "s": {"curve": curve}}
    fast_many = {"label": "b", "M": 8, "spm": 0.5, "s": {"curve": [(c * 2, v) for c, v in curve]}}  # twice the tokens
    assert slow_links.seconds_to(curve, 1.5, 1.0) == pytest.approx(15.0)
    assert slow_links.seconds_to(curve, 0.5, 1.0) is None
    # 1.2 at 18 microbatches x 1 s for a, at 36 x 0.5 s for b: a tie at 18 s; at 0.4 s per microbatch b wins.
    _, seconds = slow_links.fastest_to([slow_few, fast_many], 1.2)
    assert seconds == pytest.approx(18.0)
    assert slow_links.fastest_to([slow_few, {**fast_many, "spm": 0.4}], 1.2)[0]["label"] == "b"  # 14.4 s
    assert slow_links.fastest_to([slow_few], 0.5) is None
