"""The paired table of experiments/corrections.py: every correction against its base method, and
the EF paper's 2BW setting against the synchronous schedule at the same K."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from corrections import ASYNC_2BW, SYNC_2BW, command, table  # noqa: E402


def runs(method, K, losses):
    return [{"method": method, "stages": K, "seed": seed, "val_loss": v} for seed, v in enumerate(losses, 1)]


def test_the_2bw_runs_pair_with_each_other_and_with_the_synchronous_schedule():
    records = runs(SYNC_2BW, 8, [2.0, 2.1, 2.2]) + runs(ASYNC_2BW, 8, [2.1, 2.3, 2.2]) + runs("2bw-muon-ef", 8, [2.0, 2.2, 2.3])
    rows = [line.split(" | ") for line in table(records)[2:5]]
    assert [(r[0], r[1]) for r in rows] == [("| 2bw-muon-ef", ASYNC_2BW), ("| " + ASYNC_2BW, SYNC_2BW), ("| 2bw-muon-ef", SYNC_2BW)]
    assert rows[0][6] == "-0.0333 +- 0.0667 |"  # differences -0.1, -0.1, +0.1
    assert rows[1][6] == "+0.1000 +- 0.0577 |"  # +0.1, +0.2, 0.0
    assert rows[2][6] == "+0.0667 +- 0.0333 |"  # 0.0, +0.1, +0.1
    assert table(records)[5] == ""  # no other pair has runs


def test_the_2bw_sweep_runs_at_its_own_lr_and_the_others_at_3e3():
    b8, b8sync, k8 = command("b8", 1), command("b8sync", 1), command("k8", 2)
    assert b8[b8.index("--lrs") + 1] == "3e-2" and b8[b8.index("--methods") + 1].split(",") == [ASYNC_2BW, "2bw-muon-ef"]
    assert b8sync[b8sync.index("--lrs") + 1] == "3e-2" and b8sync[b8sync.index("--methods") + 1] == SYNC_2BW
    assert k8[k8.index("--lrs") + 1] == "3e-3" and k8[k8.index("--jobs") + 1] == "2"
    with pytest.raises(KeyError):
        command("k64", 1)


def test_the_lr_probe_lists_each_method_at_each_lr_per_seed():
    from corrections import lr_table

    records = [{"method": m, "stages": 8, "seed": 1, "lr": lr, "val_loss": v}
               for m, lr, v in [("2bw-muon-ef", 3e-2, 2.2), (ASYNC_2BW, 1e-2, 2.3), (ASYNC_2BW, 3e-2, 2.4)]]
    assert lr_table(records, [ASYNC_2BW, "2bw-muon-ef"], 8)[2:] == [
        f"| {ASYNC_2BW} | 8 | 1 | 0.01 | 2.3000 |", f"| {ASYNC_2BW} | 8 | 1 | 0.03 | 2.4000 |",
        "| 2bw-muon-ef | 8 | 1 | 0.03 | 2.2000 |"]


def test_the_c_probes_sit_beside_muon_wp_as_c_0_and_muon_wp_ef_as_c_1():
    from corrections import scale_table

    records = (runs("muon-wp", 32, [2.5]) + runs("muon-wp-ef", 32, [2.4]) + runs("muon-wp-ef:optim.ef_scale=0.3", 32, [2.45])
               + runs("muon-wp-ef:optim.ef_scale=3", 32, [2.3]) + runs("muon-wp-ef", 1, [1.8, 1.7])
               + runs("muon", 32, [9.0]))  # K = 1 has no probe (no row); muon is not a point of the curve
    lines = scale_table(records)
    assert lines[2:] == ["| 32 | 1 | 2.5000 | 2.4500 | 2.4000 | 2.3000 | 3 (top of the grid) |"]
    inner = [dict(r, val_loss=2.2) if r["method"] == "muon-wp-ef" else r for r in records]
    assert scale_table(inner)[2].endswith("| 2.2000 | 2.3000 | 1 |")  # an interior best is not marked
    c1 = command("c1", 1)
    assert c1[c1.index("--methods") + 1].split(",") == ["muon-wp-ef:optim.ef_scale=0.3", "muon-wp-ef:optim.ef_scale=3"]
    assert c1[c1.index("--stages") + 1] == "1"


def test_the_delay_penalty_pairs_each_seed_with_its_own_k1_run_on_the_same_machine():
    from corrections import penalty_table

    records = (runs("muon-wp", 1, [1.8, 1.9, 1.7]) + runs("muon-wp", 32, [2.5, 2.4]) + runs("muon-wp", 8, [2.0, 2.1, 2.0])
               + runs("pipedream", 8, [2.6]))  # no K = 1 run: no row
    other = [dict(r, machine="b") for r in runs("muon-wp", 16, [9.0])]  # seed 1 on another machine: no pair
    lines = penalty_table(records + other)
    assert lines[2:] == ["| muon-wp | 8 | 3 | 1.8000 | 2.0333 | +0.2333 +- 0.0333 |",  # +0.2, +0.2, +0.3
                         "| muon-wp | 32 | 2 | 1.8500 | 2.4500 | +0.6000 +- 0.1000 |"]  # +0.7, +0.5


def test_error_feedback_at_c_3_pairs_with_its_base_and_with_the_default_c():
    from corrections import EF_C3

    records = runs("muon-wp", 16, [2.2, 2.1]) + runs("muon-wp-ef", 16, [2.1, 2.1]) + runs(EF_C3, 16, [2.0, 1.9])
    rows = [line for line in table(records) if line.startswith(f"| {EF_C3} | muon-wp")]
    assert rows == [f"| {EF_C3} | muon-wp | 16 | 2 | 2.1500 | 1.9500 | -0.2000 +- 0.0000 |",
                    f"| {EF_C3} | muon-wp-ef | 16 | 2 | 2.1000 | 1.9500 | -0.1500 +- 0.0500 |"]
    for name, K, seeds in [("k8c3", "8", "1,2,3"), ("k16c3", "16", "1,2,3"), ("c32s3", "32", "3"), ("c1s3", "1", "3")]:
        cmd = command(name, 1)
        assert (cmd[cmd.index("--methods") + 1], cmd[cmd.index("--stages") + 1], cmd[cmd.index("--seeds") + 1]) == (EF_C3, K, seeds)


def test_the_lr_grid_of_c_3_marks_an_optimum_on_either_edge():
    from corrections import EF_C3, lr_grid

    def at(lr, K, seed, v):
        return {"method": EF_C3, "stages": K, "seed": seed, "lr": lr, "val_loss": v}

    records = [at(1e-3, 32, 1, 2.4), at(3e-3, 32, 1, 2.3), at(1e-2, 32, 1, 2.5),  # interior
               at(1e-3, 8, 1, 1.9), at(3e-3, 8, 1, 1.88), at(1e-2, 8, 1, 1.85),  # top edge
               at(3e-3, 8, 2, 1.7),  # one lr only: no row
               dict(at(1e-2, 32, 2, 1.0), method="muon-wp-ef")]  # another method: not read
    assert lr_grid(records, EF_C3) == ["| K | seed | lr 0.001 | lr 0.003 | lr 0.01 | best lr |", "|---|---|---|---|---|---|",
                                       "| 8 | 1 | 1.9000 | 1.8800 | 1.8500 | 0.01 (top of the grid) |",
                                       "| 32 | 1 | 2.4000 | 2.3000 | 2.5000 | 0.003 |"]
    low = [dict(r, val_loss=1.0) if r["lr"] == 1e-3 and r["stages"] == 32 else r for r in records]
    assert lr_grid(low, EF_C3)[3] == "| 32 | 1 | 1.0000 | 2.3000 | 2.5000 | 0.001 (bottom of the grid) |"
    cmd = command("c3lr32", 1)
    assert (cmd[cmd.index("--methods") + 1], cmd[cmd.index("--stages") + 1], cmd[cmd.index("--lrs") + 1]) == (EF_C3, "32", "1e-3,1e-2")


def test_error_feedback_at_c_5_pairs_with_muon_wp_and_with_c_3():
    from corrections import EF_C3, EF_C5, ef_at

    records = runs("muon-wp", 32, [2.5, 2.5]) + runs(EF_C3, 32, [2.3, 2.3]) + runs(EF_C5, 32, [2.2, 2.25])
    rows = [line for line in table(records) if line.startswith(f"| {EF_C5} | muon-wp")]
    assert rows == [f"| {EF_C5} | muon-wp | 32 | 2 | 2.5000 | 2.2250 | -0.2750 +- 0.0250 |",
                    f"| {EF_C5} | {EF_C3} | 32 | 2 | 2.3000 | 2.2250 | -0.0750 +- 0.0250 |"]
    one = [line for line in table(records[:1] + records[2:3] + records[4:5]) if line.startswith(f"| {EF_C5} | muon-wp |")]
    assert one == [f"| {EF_C5} | muon-wp | 32 | 1 | 2.5000 | 2.2000 | -0.3000 (one seed) |"]  # no s.e. of one pair
    for name, method, K, seeds in [("c5k32", EF_C5, "32", "1,2"), ("c5s3", EF_C5, "32", "3"), ("c5k", EF_C5, "1,8,16", "1"),
                                   ("c7k32", ef_at("7"), "32", "1,2"), ("c5k16s23", EF_C5, "16", "2,3")]:
        cmd = command(name, 1)
        assert (cmd[cmd.index("--methods") + 1], cmd[cmd.index("--stages") + 1], cmd[cmd.index("--seeds") + 1]) == (method, K, seeds)


def test_runs_at_another_lr_are_read_against_the_synchronous_run_of_their_seed(monkeypatch):
    from corrections import EF_C3, against_sync

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the synchronous runs' data files
    run = {"method": EF_C3, "stages": 8, "seed": 1, "updates": 2000, "lr": 1e-2, "val_loss": 1.5,
           "curve": [{"step": 1000, "val_loss": 2.0}, {"step": 1600, "val_loss": 1.7}, {"step": 2000, "val_loss": 1.5}]}
    row = against_sync([run])[2]
    # seed 1's gpipe-muon run of 2,000 microbatches ends at 1.7911 (docs/results/data/slow_links):
    # this run is there at 1,600, 0.80x the synchronous run's 2,000
    assert row.startswith(f"| {EF_C3} | 8 | 2,000 | 1 | 1.5000 | 1.7911 | -0.2911 | 1,600 | 2,000 | 0.80x |")
