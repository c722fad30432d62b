"""The comparison of experiments/run_length.py with the best synchronous schedule: which runs
are the reference, and the microbatch at which a curve reaches the synchronous loss."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from run_length import first_reach, merge_sync, sync_of_runs, sync_reference, sync_table  # noqa: E402


def sync_row(seed, budget_mb, loss, method="gpipe-muon", M="4", codec="none", lr="0.03"):
    return {"method": method, "M": M, "codec": codec, "lr": lr, "seed": str(seed), "budget": str(budget_mb * 512),
            "val_loss": str(loss)}


def curve_rows(seed, budget_mb, points, **kw):
    return [dict(sync_row(seed, budget_mb, loss, **kw), tokens=str(mb * 512)) for mb, loss in points]


def test_only_gpipe_muon_at_m4_lr_3e2_without_a_codec_is_the_reference():
    runs = [sync_row(1, 2000, 1.79), sync_row(1, 8000, 1.42), sync_row(1, 2000, 1.5, codec="int8"),
            sync_row(1, 2000, 1.5, M="8"), sync_row(1, 2000, 1.5, lr="0.01"), sync_row(1, 2000, 1.5, method="gpipe")]
    curves = curve_rows(1, 8000, [(2000, 1.9), (2400, 1.7), (8000, 1.42)]) + curve_rows(1, 8000, [(400, 1.0)], codec="int8")
    ref = sync_reference(runs, curves)
    assert set(ref) == {(1, 2000), (1, 8000)}
    assert ref[(1, 2000)] == (1.79, [])
    assert ref[(1, 8000)] == (1.42, [(2000, 1.9), (2400, 1.7), (8000, 1.42)])
    with pytest.raises(ValueError, match="differ"):
        sync_reference(runs + [sync_row(1, 2000, 1.80)], curves)


def test_first_reach_and_the_token_ratio_against_the_synchronous_run_of_the_same_length():
    assert first_reach([(80, 3.0), (160, 2.0), (240, 1.0)], 2.0) == 160
    assert first_reach([(80, 3.0)], 2.0) is None
    sync = {(1, 2000): (1.8, [(2000, 1.8)]), (1, 8000): (1.4, [(2000, 1.9), (2400, 1.75), (8000, 1.4)])}
    run = {"method": "muon-wp", "stages": 8, "seed": 1, "updates": 8000, "val_loss": 1.5,
           "curve": [{"step": s, "val_loss": v} for s, v in [(2400, 1.85), (3000, 1.79), (8000, 1.5)]]}
    never = dict(run, curve=[{"step": 8000, "val_loss": 1.81}], val_loss=1.81)
    lines = sync_table([run, never, dict(run, seed=2)], sync)  # seed 2: no reference, no row
    assert len(lines) == 8
    assert lines[2].split("|")[5:11] == [" 1.5000 ", " 1.4000 ", " +0.1000 ", " 3,000 ", " 2,400 ", " 1.25x "]
    assert lines[3].split("|")[8:11] == [" not reached ", " 2,400 ", " > 3.33x "]
    # the seed mean counts only the seeds that reach the loss, and says which did not
    assert lines[7] == "| muon-wp | 8 | 8,000 | 1.25x, > 3.33x | 1.25x (1 of 2 seeds) |"


def test_the_seed_mean_of_token_ratios_and_a_method_that_never_reaches_the_loss():
    sync = {(s, n): (1.8, [(2000, 1.8), (2400, 1.7)]) for s in (1, 2) for n in (2000, 8000)}
    run = {"method": "muon-wp", "stages": 32, "seed": 1, "updates": 8000, "val_loss": 1.5,
           "curve": [{"step": 3000, "val_loss": 1.8}]}
    lines = sync_table([run, dict(run, seed=2, curve=[{"step": 6000, "val_loss": 1.79}]),
                        dict(run, method="nesterov", curve=[{"step": 8000, "val_loss": 1.9}])], sync)
    assert lines[-2:] == ["| nesterov | 32 | 8,000 | > 4.00x | none reach it |",
                          "| muon-wp | 32 | 8,000 | 1.50x, 3.00x | 2.25x +- 0.75 |"]


def test_the_experiments_own_synchronous_runs_count_microbatches_from_tokens_and_must_agree():
    row = {"method": "gpipe-muon", "stages": 1, "seed": 2, "lr": 0.03, "val_loss": 1.4, "updates": 2000,
           "tokens": 8000 * 512, "curve": [{"step": 40, "tokens": 160 * 512, "val_loss": 2.6}]}
    own = sync_of_runs([row, dict(row, lr=0.01, val_loss=9.0), dict(row, method="muon-wp", val_loss=9.0)])
    assert own == {(2, 8000): (1.4, [(160, 2.6)])}
    assert merge_sync({(1, 2000): (1.8, [])}, own) == {(1, 2000): (1.8, []), (2, 8000): (1.4, [(160, 2.6)])}
    with pytest.raises(ValueError, match="seed 2, 8000 microbatches differ"):
        merge_sync(own, {(2, 8000): (1.41, [])})


def test_the_penalty_exponent_per_seed_and_its_seed_mean():
    from run_length import table

    records = []
    for seed, (short, long) in {1: (0.8, 0.4), 2: (0.8, 0.2)}.items():  # 4x the tokens: N^-0.5 and N^-1
        for length, pen in (("2k", short), ("8k", long)):
            records += [{"method": "muon-wp", "length": length, "stages": 1, "seed": seed, "val_loss": 1.0},
                        {"method": "muon-wp", "length": length, "stages": 32, "seed": seed, "val_loss": 1.0 + pen}]
    lines = table(records)
    assert "| muon-wp | 32 | 1 | +0.8000 | +0.4000 | 0.50 | -0.50 |" in lines
    assert "| muon-wp | 32 | 2 | +0.8000 | +0.2000 | 0.25 | -1.00 |" in lines
    assert lines[-1] == "| muon-wp | 32 | mean of 2 | | | | -0.75 +- 0.25 |"
    assert "| muon-wp | 32 | 8,000 | 1,2 | 1.0000 | 1.3000 | +0.3000 +- 0.1000 |" in lines


def test_the_trend_over_three_lengths_predicts_the_longest_from_the_two_shorter():
    from run_length import trend_table

    records = []
    for length, pen in (("2k", 0.8), ("8k", 0.4), ("32k", 0.1)):  # N^-0.5, then N^-1
        records += [{"method": "muon-wp", "length": length, "stages": 1, "seed": 1, "val_loss": 1.0},
                    {"method": "muon-wp", "length": length, "stages": 32, "seed": 1, "val_loss": 1.0 + pen}]
    lines = trend_table(records + [dict(records[-1], seed=2)])  # seed 2 has one length only: no row
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[:6] == ["muon-wp", "32", "1", "+0.8000", "+0.4000", "+0.1000"]
    assert cells[6] == "+0.2000"  # 0.4 * 4^-0.5: what the 2k-8k exponent predicts at 32k
    assert cells[7] == "-1.00"
    assert cells[8] == "-0.75"  # least squares through log 0.8, log 0.4, log 0.1 at log N, N = 2k, 8k, 32k
    assert trend_table(records[:4]) == []  # no seed with every length: no table


def test_the_best_run_of_any_length_on_each_side():
    from run_length import best_reach_table

    sync = {(1, 2000): (1.8, [(1920, 1.85), (2000, 1.8)]),
            (1, 8000): (1.4, [(2000, 1.9), (2400, 1.79), (7840, 1.39), (8000, 1.4)])}
    def run(n, points):
        return {"method": "muon-wp", "stages": 32, "seed": 1, "updates": n, "val_loss": points[-1][1],
                "curve": [{"step": s, "val_loss": v} for s, v in points]}
    lines = best_reach_table([run(8000, [(6000, 1.79), (8000, 1.5)]), run(32000, [(5000, 1.8), (30000, 1.4)])], sync)
    rows = [[c.strip() for c in line.split("|")[4:-1]] for line in lines[2:]]
    # the 1.8 loss: the 32k run gets there first (5,000), the synchronous 2k run at 2,000
    assert rows[0] == ["1.8000 (2,000)", "5,000 (32,000)", "2,000 (2,000)", "2.50x"]
    # the 1.4 loss: the synchronous 8k run dips to 1.39 at 7,840, before its final evaluation
    assert rows[1] == ["1.4000 (8,000)", "30,000 (32,000)", "7,840 (8,000)", "3.83x"]
    lines = best_reach_table([run(8000, [(8000, 1.5)])], sync)
    assert lines[-1].endswith("| not reached in 8,000 | 7,840 (8,000) | > 1.02x |")
    # a run that stops (2,000) before the synchronous run gets there (7,840) bounds nothing: no row
    assert [line.split(" | ")[3] for line in best_reach_table([run(2000, [(2000, 1.85)])], sync)[2:]] == ["1.8000 (2,000)"]


def test_k32_against_k1_inside_the_same_schedule():
    from run_length import same_schedule_table

    def run(K, points):
        return {"method": "muon-wp", "stages": K, "seed": 1, "updates": 8000, "val_loss": points[-1][1],
                "curve": [{"step": s, "val_loss": v} for s, v in points]}
    k1 = run(1, [(1000, 2.0), (2000, 1.8), (4000, 1.6), (8000, 1.5)])
    k32 = run(32, [(1000, 2.5), (2000, 2.2), (3000, 1.95), (6000, 1.7), (8000, 1.55)])
    lines = same_schedule_table([k32, k1, dict(k32, seed=2)])  # seed 2 has no K = 1 run: no row
    assert lines[2:] == ["| muon-wp | 8,000 | 1 | its own | 2.0000: 3.00x | 1.8000: 3.00x | 1.6000: 2.00x | 1.5000: > 1.00x |"]
    # another method is read against its own K = 1 run where it has one, and against Muon's
    ef = dict(k32, method="muon-wp-ef", curve=[{"step": 1000, "val_loss": 2.0}, {"step": 8000, "val_loss": 1.4}])
    ef1 = dict(k1, method="muon-wp-ef", curve=[{"step": 1000, "val_loss": 1.9}, {"step": 8000, "val_loss": 1.3}])
    assert same_schedule_table([ef, k1])[2:] == [
        "| muon-wp-ef | 8,000 | 1 | Muon's (muon-wp) | 2.0000: 1.00x | 1.8000: 4.00x | 1.6000: 2.00x | 1.5000: 1.00x |"]
    assert [line.split(" | ")[3] for line in same_schedule_table([ef, ef1, k1])[2:]] == ["its own", "Muon's (muon-wp)"]
    # the best synchronous schedule's run of the same seed and length is a reference too (its
    # curve in microbatches, as sync_reference gives it); another length or seed is not
    sync = {(1, 8000): (1.45, [(1000, 1.9), (2000, 1.7), (4000, 1.55), (8000, 1.45)]), (1, 2000): (1.8, [(2000, 1.8)])}
    assert same_schedule_table([k32, k1], sync=sync)[2:] == [
        "| muon-wp | 8,000 | 1 | its own | 2.0000: 3.00x | 1.8000: 3.00x | 1.6000: 2.00x | 1.5000: > 1.00x |",
        "| muon-wp | 8,000 | 1 | synchronous (gpipe-muon) | 1.9000: 6.00x | 1.7000: 3.00x | 1.5500: 2.00x | 1.4500: > 1.00x |"]


def test_error_feedback_at_c_3_and_5_takes_its_short_runs_from_the_c_probes(tmp_path, monkeypatch):
    import run_length
    from paired_runs import read_runs, write_data

    run = {"stages": 32, "seed": 1, "val_loss": 2.3, "updates": 2000, "tokens": 1024000, "wall_time_s": 1.0, "lr": 3e-3,
           "curve": [{"step": 2000, "tokens": 1024000, "val_loss": 2.3}]}
    write_data(tmp_path / "c32", [dict(run, method=run_length.EF_C3), dict(run, method="muon-wp-ef:optim.ef_scale=0.3")])
    write_data(tmp_path / "c5k", [dict(run, method=run_length.EF_C5, stages=1, val_loss=1.8),
                                  dict(run, method=run_length.EF_C5, stages=8, val_loss=1.9)])  # K = 8: no length table
    monkeypatch.setattr(run_length, "CORRECTIONS", tmp_path)
    got = run_length.corrections_ef(read_runs)  # c1 and the others have no files: no runs
    assert [(r["method"], r["stages"], r["val_loss"]) for r in got] == [(run_length.EF_C3, 32, 2.3), (run_length.EF_C5, 1, 1.8)]
    assert run_length.ORDER[-2:] == [run_length.EF_C3, run_length.EF_C5]  # so that the tables can place their rows
