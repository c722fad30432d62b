"""The statistics of the paired experiments (experiments/paired_runs.py): the numbers of
docs/results/compression.md and the corrections table come from these functions."""

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from paired_runs import machine_key, merge_data, paired, read_data, read_runs, unpaired, write_data  # noqa: E402


def rec(method, seed, loss, machine=None, stages=8):
    r = {"method": method, "stages": stages, "seed": seed, "val_loss": loss}
    if machine is not None:
        r["machine"] = machine
    return r


def test_paired_difference_and_its_standard_error_by_hand():
    records = [rec("base", 1, 2.0), rec("base", 2, 2.5), rec("base", 3, 3.0),
               rec("m", 1, 2.1), rec("m", 2, 2.3), rec("m", 3, 3.3), rec("m", 4, 9.0)]  # seed 4: no pair
    n, loss_base, loss_m, diff, se = paired(records, "m", "base", 8)
    diffs = [0.1, -0.2, 0.3]
    assert n == 3
    assert loss_base == pytest.approx(2.5) and loss_m == pytest.approx((2.1 + 2.3 + 3.3) / 3)
    assert diff == pytest.approx(statistics.fmean(diffs))
    assert se == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert paired(records, "m", "base", 32) is None


def test_pairs_only_within_a_machine_and_unpaired_across():
    records = [rec("base", 1, 2.0, "a"), rec("base", 2, 2.4, "a"), rec("m", 1, 2.2, "b"), rec("m", 2, 2.8, "b")]
    assert paired(records, "m", "base", 8) is None
    n_base, n, mean_base, mean, diff, se = unpaired(records, "m", "base", 8)
    assert (n_base, n) == (2, 2)
    assert diff == pytest.approx(2.5 - 2.2)
    assert se == pytest.approx(math.sqrt(0.08 / 2 + 0.18 / 2))
    assert unpaired(records[:3], "m", "base", 8) is None  # one run of m: no spread


def test_data_files_round_trip_with_and_without_machine(tmp_path):
    runs = [{"method": "m", "stages": 8, "seed": 1, "val_loss": 2.123456789012345, "updates": 10, "tokens": 640,
             "wall_time_s": 1.0, "machine": "X family 1 AVX2", "lr": 0.003,
             "curve": [{"step": 8, "tokens": 64, "val_loss": 3.0}]},
            {"method": "m", "stages": 8, "seed": 2, "val_loss": 2.0, "updates": 10, "tokens": 640,
             "wall_time_s": 1.0, "curve": []}]
    write_data(tmp_path, runs)
    back = read_runs(tmp_path)
    assert back[0] == {"method": "m", "stages": 8, "seed": 1, "val_loss": 2.123456789012345,
                       "machine": "X family 1 AVX2", "lr": 0.003}
    assert "machine" not in back[1] and "lr" not in back[1]
    assert read_runs(tmp_path / "missing") == []
    assert machine_key(None) == ""
    assert machine_key({"cpu_id": "AuthenticAMD family 26 model 2 stepping 1", "cpu_capability": "AVX512"}) == \
        "AuthenticAMD family 26 model 2 stepping 1 AVX512"
    # a host checked to reproduce another's runs bit for bit files its runs under that one's key
    assert machine_key({"cpu_id": "AuthenticAMD family 25 model 17 stepping 1", "cpu_capability": "AVX512"}) == \
        "AuthenticAMD family 26 model 2 stepping 1 AVX512"
    assert machine_key({"cpu_id": "AuthenticAMD family 25 model 1 stepping 1", "cpu_capability": "AVX2"}) == \
        "AuthenticAMD family 25 model 1 stepping 1 AVX2"


def run(seed, lr, loss, steps=(8, 16)):
    return {"method": "m", "stages": 32, "seed": seed, "val_loss": loss, "updates": 10, "tokens": 640,
            "wall_time_s": 1.5, "machine": "X", "lr": lr,
            "curve": [{"step": s, "tokens": 64 * s, "val_loss": loss + 1.0 / s} for s in steps]}


def test_a_later_sessions_runs_are_merged_into_the_data_files_not_over_them(tmp_path):
    # the first session's runs, their run folders gone since: three lrs of one (method, K, seed)
    first = [run(0, 1e-3, 2.9), run(0, 3e-3, 2.7), run(0, 1e-2, 2.8)]
    write_data(tmp_path, first)
    assert read_data(tmp_path) == first
    # a later session re-runs one of them (it replaces that run) and adds a new lr
    later = [run(0, 3e-3, 2.65, steps=(8, 16, 24)), run(0, 3e-4, 3.1)]
    assert merge_data(tmp_path, later) == 2
    back = {r["lr"]: r for r in read_data(tmp_path)}
    assert sorted(back) == [3e-4, 1e-3, 3e-3, 1e-2]
    assert back[3e-3] == later[0] and back[1e-3] == first[0] and back[1e-2] == first[2]
    assert merge_data(tmp_path / "new", later) == 0 and read_data(tmp_path / "new") == later


def test_curves_written_before_they_had_an_lr_column_go_to_their_runs_in_order(tmp_path):
    runs = [run(0, 1e-3, 2.9), run(0, 3e-3, 2.7), run(1, 3e-3, 2.6, steps=(8,))]
    write_data(tmp_path, runs)
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    (tmp_path / "curves.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert "lr" not in (tmp_path / "curves.csv").read_text().splitlines()[0]
    assert read_data(tmp_path) == runs


def test_a_run_made_again_keeps_its_place_in_the_data_files(tmp_path):
    first = [run(0, 1e-3, 2.9), run(0, 3e-3, 2.7), run(0, 1e-2, 2.8)]
    write_data(tmp_path, first)
    again = [run(0, 1e-2, 2.8), run(0, 1e-3, 2.9)]  # the same runs, collected in another order
    assert merge_data(tmp_path, again) == 1
    assert read_data(tmp_path) == first
    assert merge_data(tmp_path, [run(0, 3e-4, 3.1), run(0, 3e-3, 2.6)]) == 2
    assert [r["lr"] for r in read_data(tmp_path)] == [1e-3, 3e-3, 1e-2, 3e-4]
