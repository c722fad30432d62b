"""The tables of experiments/lr_tuning.py: the edge mark of the tuning table (a best lr on the
edge of the grid must never read as tuned) and the second seed's verdict."""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from lr_tuning import second_seed, table  # noqa: E402


def rec(method, stages, seed, lr, loss):
    return {"method": method, "stages": stages, "seed": seed, "lr": lr, "val_loss": loss}


def row(lines, method, stages):
    (line,) = [x for x in lines if x.startswith(f"| {method} | {stages} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_a_best_lr_on_the_edge_is_marked_and_a_diverged_run_counts_as_worst():
    lines = table([rec("pipedream", 8, 0, 1e-3, 2.8), rec("pipedream", 8, 0, 3e-3, 2.7),
                   rec("pipedream", 8, 0, 1e-2, 2.6),
                   rec("muon", 32, 0, 1e-3, 2.5), rec("muon", 32, 0, 3e-3, 2.4), rec("muon", 32, 0, 1e-2, math.nan)])
    assert row(lines, "pipedream", 8)[-2:] == ["0.01", "NO: on the edge"]
    assert row(lines, "pipedream", 8)[4] == "**2.6000**"
    assert row(lines, "muon", 32)[-2:] == ["0.003", "yes"]


def test_the_second_seed_agrees_disagrees_or_is_flat():
    seed0 = [rec(m, 8, 0, lr, loss) for m, lr, loss in
             [("pipedream", 3e-3, 2.7), ("pipedream", 1e-2, 2.6), ("nesterov", 3e-3, 2.4), ("nesterov", 1e-3, 2.3),
              ("muon-wp-ef", 3e-3, 1.9), ("muon-wp-ef", 1e-2, 1.8)]]
    seed1 = [rec("pipedream", 8, 1, 1e-2, 2.55), rec("nesterov", 8, 1, 1e-3, 2.45), rec("muon-wp-ef", 8, 1, 1e-2, 1.895)]
    base = [rec("pipedream", 8, 1, 3e-3, 2.65), rec("nesterov", 8, 1, 3e-3, 2.41), rec("muon-wp-ef", 8, 1, 3e-3, 1.9)]
    lines = second_seed(seed0 + seed1, base)
    assert row(lines, "pipedream", 8)[-2:] == ["-0.1000", "yes"]
    assert row(lines, "nesterov", 8)[2] == "0.001" and row(lines, "nesterov", 8)[-1] == "no: 3e-3 is better"
    assert row(lines, "muon-wp-ef", 8)[-1].startswith("flat")
    # no seed-1 run at 3e-3 to compare with: no row
    assert len(second_seed(seed0 + seed1, base[:1])) == 3


def test_the_warm_up_table_sets_the_default_fraction_beside_the_sweeps_overrides():
    from lr_tuning import warmup_table

    records = [rec("muon-wp", 32, 0, 3e-3, 2.43), rec("muon-wp:optim.warmup_fraction=0.2", 32, 0, 3e-3, 2.41),
               rec("muon-wp:optim.warmup_fraction=0.02", 32, 0, 3e-3, 2.47),
               rec("muon-wp", 32, 0, 1e-2, 2.0),  # another lr: not the warm-up comparison
               rec("nesterov", 32, 0, 3e-3, 2.6)]  # no warm-up runs of its own: no row
    lines = warmup_table(records)
    assert lines[0] == "| method | K | warm-up 0.02 | warm-up 0.06 | warm-up 0.2 | best |"
    assert row(lines, "muon-wp", 32) == ["muon-wp", "32", "2.4700", "2.4300", "2.4100", "0.2"]
    assert len(lines) == 3


def test_the_tuned_lr_is_paired_by_seed_with_the_runs_at_3e3():
    import statistics

    from lr_tuning import tuned_table

    base = [rec("pipedream", 8, s, 3e-3, loss) for s, loss in [(1, 2.65), (2, 2.47), (3, 2.63)]]
    records = [rec("pipedream", 8, s, 1e-2, loss) for s, loss in [(1, 2.58), (2, 2.50), (3, 2.55)]]
    records.append(rec("pipedream", 8, 0, 1e-2, 2.0))  # the tuning seed: not a reported seed
    records.append(rec("pipedream", 8, 4, 1e-2, 2.0))  # no run at 3e-3 to pair with
    lines = tuned_table(records, base)
    assert len(lines) == 3
    cells = row(lines, "pipedream", 8)
    diffs = [2.58 - 2.65, 2.50 - 2.47, 2.55 - 2.63]
    assert cells[2:6] == ["0.01", "1,2,3", f"{(2.65 + 2.47 + 2.63) / 3:.4f}", f"{(2.58 + 2.50 + 2.55) / 3:.4f}"]
    assert cells[6] == f"{statistics.fmean(diffs):+.4f} +- {statistics.stdev(diffs) / 3 ** 0.5:.4f}"


def test_the_penalty_at_the_tuned_lr_pairs_each_seed_with_its_own_k1_control():
    import statistics

    from lr_tuning import penalty_table

    records = [rec("nesterov", 8, s, 1e-3, v) for s, v in [(1, 2.35), (2, 2.35), (3, 2.24)]]
    records += [rec("nesterov", 1, s, 1e-3, v) for s, v in [(1, 2.05), (2, 2.10), (3, 2.04)]]
    records += [rec("nesterov", 1, 1, 3e-3, 1.0), rec("nesterov", 8, 0, 1e-3, 9.0), rec("nesterov", 1, 0, 1e-3, 0.0)]
    lines = penalty_table(records)
    assert len(lines) == 3  # another lr's control and the tuning seed are not paired
    diffs = [0.30, 0.25, 0.20]
    assert row(lines, "nesterov", 8) == ["nesterov", "8", "0.001", "3",
                                         f"{statistics.fmean(diffs):+.4f} +- {statistics.stdev(diffs) / 3 ** 0.5:.4f}"]
