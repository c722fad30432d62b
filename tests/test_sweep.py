"""`pipenag sweep`: the plan (tuning, controls), parallel == serial, resume after a kill, and the
report's numbers recomputed by hand.

    python -m pytest tests/test_sweep.py -q
"""

from __future__ import annotations

import csv
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY, subprocess_env

from pipenag.cli import main as cli_main
from pipenag.sweep_report import crossing, mean_curve, read_data, report_from_data

# 2 methods x 2 K x 2 seeds on the tiny config, lr tuned from two values on seed 0.
ARGS = ["sweep", "--config", TINY, "--methods", "gpipe,pipedream", "--stages", "1,2", "--seeds", "1,2",
        "--lrs", "1e-3,3e-3", "--tune-lr", "--train.steps=12", "--train.eval_every=4", "--data.max_chars=100000",
        "--train.eval_batches=2"]


def read_runs(out: Path, trained_only: bool = True) -> dict[tuple, dict]:
    """runs.csv keyed by (method, K, seed, lr, tuning); by default only the runs trained at
    their K (not a synchronous run standing for another K)."""
    with open(out / "runs.csv", newline="") as f:
        return {(r["method"], r["stages"], r["seed"], r["lr"], r["tuning"]): r for r in csv.DictReader(f)
                if not trained_only or r["stages"] == r["trained_stages"]}


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    assert cli_main([*ARGS, "--jobs", "1", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_plan_tunes_on_seed_0_and_adds_the_k1_control(serial):
    runs = read_runs(serial)
    tuning = {k: r for k, r in runs.items() if r["tuning"] == "True"}
    # gpipe runs once per seed (at K = 1: its numbers do not depend on K); pipedream at K = 1, 2.
    assert {(m, k, s) for m, k, s, _, _ in tuning} == {("gpipe", "1", "0"), ("pipedream", "1", "0"),
                                                     ("pipedream", "2", "0")}
    assert {lr for _, _, _, lr, _ in tuning} == {"0.001", "0.003"}
    for method, k in (("pipedream", "1"), ("pipedream", "2"), ("gpipe", "1")):
        scores = {float(r["val_loss"]): r["lr"] for (m, kk, _, _, _), r in tuning.items() if (m, kk) == (method, k)}
        best = scores[min(scores)]
        chosen = {r["lr"] for (m, kk, _, _, t), r in runs.items()
                  if (m, kk, t) == (method, k, "False") and r["chosen_lr"] == "True"}
        assert chosen == {best}
    # The reported seeds; gpipe's run at K = 1 also stands for K = 2, with its numbers.
    reported = [key for key in runs if key[4] == "False"]
    assert {s for _, _, s, _, _ in reported} == {"1", "2"}
    every = read_runs(serial, trained_only=False)
    for (m, k, s, lr, t), r in every.items():
        if m == "gpipe" and k == "2":
            assert r["trained_stages"] == "1" and r["val_loss"] == every[(m, "1", s, lr, t)]["val_loss"]


@pytest.mark.slow
def test_parallel_jobs_give_the_serial_numbers_and_a_rerun_skips_them(serial, tmp_path, capsys):
    out = tmp_path / "parallel"
    assert cli_main([*ARGS, "--jobs", "2", "--out", str(out)]) == 0
    a, b = read_runs(serial), read_runs(out)
    assert a.keys() == b.keys()
    assert {k: r["val_loss"] for k, r in a.items()} == {k: r["val_loss"] for k, r in b.items()}
    assert (serial / "summary.csv").read_text() == (out / "summary.csv").read_text()
    capsys.readouterr()
    assert cli_main([*ARGS, "--jobs", "2", "--out", str(out)]) == 0  # everything is done: nothing runs
    err = capsys.readouterr().err
    assert "lr tuning: 6 runs, 6 already done, 0 to train" in err
    # gpipe 2 seeds at K = 1; pipedream 2 seeds at K = 2 and at K = 1 (also the control of K = 2
    # when both K chose the same lr, else 2 more).
    assert "already done, 0 to train" in err.split("reported runs: ")[1].splitlines()[0]


@pytest.mark.slow
def test_killed_sweep_resumes_with_the_same_numbers(serial, tmp_path):
    """SIGKILL the sweep (2 worker processes) once a run has finished: its workers die with it,
    and the sweep run again trains only what was not finished and ends with the numbers of an
    uninterrupted sweep."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipenag", *ARGS, "--jobs", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    workers: set[int] = set()
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            workers |= _children(proc.pid)
            if len(list(out.glob("runs/*/K*/seed*/lr*/summary.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    assert workers, "no worker processes seen"
    _wait_gone(workers)
    finished = len(list(out.glob("runs/*/K*/seed*/lr*/summary.json")))
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"lr tuning: 6 runs, {min(finished, 6)} already done" in res.stderr
    a, b = read_runs(serial), read_runs(out)
    assert {k: r["val_loss"] for k, r in a.items()} == {k: r["val_loss"] for k, r in b.items()}


def _children(pid: int) -> set[int]:
    from helpers import children_of

    return children_of(pid)


def _wait_gone(pids: set[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if _alive(p)}
        time.sleep(0.05)
    assert not alive, f"worker processes {alive} outlived the killed sweep"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_report_numbers_recomputed_by_hand(serial, tmp_path):
    records = [r for r in read_data(serial) if not r["tuning"]]
    rows = {(r["method"], r["stages"]): r for r in report_from_data(serial, tmp_path / "replot")}
    assert (tmp_path / "replot" / "summary.md").read_text().count("| `") == 4  # gpipe K=1,2; pipedream K=1,2
    gpipe = [r for r in records if r["method"] == "gpipe" and r["stages"] == 1 and r["chosen_lr"]]
    target = statistics.fmean(r["val_loss"] for r in gpipe)
    pd2 = [r for r in records if (r["method"], r["stages"]) == ("pipedream", 2) and r["chosen_lr"]]
    lr = pd2[0]["lr"]
    pd1 = {r["seed"]: r["val_loss"] for r in records if (r["method"], r["stages"], r["lr"]) == ("pipedream", 1, lr)}
    diffs = [r["val_loss"] - pd1[r["seed"]] for r in pd2]
    row = rows[("pipedream", 2)]
    assert row["val_loss_mean"] == pytest.approx(statistics.fmean(r["val_loss"] for r in pd2))
    assert row["val_loss_std"] == pytest.approx(statistics.stdev(r["val_loss"] for r in pd2))
    assert row["delay_penalty"] == pytest.approx(statistics.fmean(diffs))
    assert row["delay_penalty_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(2))
    # Tokens to target: by hand on the seed-mean curve.
    curve = mean_curve(pd2)
    want = crossing(curve, target, "tokens")
    assert row["tokens_to_target"] == want
    gp_tokens = crossing(mean_curve(gpipe), target, "tokens")
    assert row["tokens_ratio"] == (None if want is None else pytest.approx(want / gp_tokens))
    # gpipe at K = 2 is the K = 1 run with the simulated time of a 2-stage gpipe: slower per token.
    assert rows[("gpipe", 2)]["val_loss_mean"] == rows[("gpipe", 1)]["val_loss_mean"]
    assert rows[("gpipe", 2)]["time_ratio"] == 1.0 and rows[("gpipe", 2)].get("delay_penalty") is None


@pytest.mark.slow
def test_tune_stages_tunes_once_per_method(tmp_path, capsys):
    out = tmp_path / "s"
    assert cli_main([*ARGS, "--tune-stages", "2", "--jobs", "1", "--out", str(out)]) == 0
    runs = read_runs(out)
    tuning = {(m, k) for (m, k, _, _, t) in runs if t == "True"}
    assert tuning == {("gpipe", "1"), ("pipedream", "2")}  # one tuning K per method
    chosen = {(m, k): lr for (m, k, _, lr, t), r in runs.items() if t == "False" and r["chosen_lr"] == "True"}
    assert chosen[("pipedream", "1")] == chosen[("pipedream", "2")]  # the K = 1 control shares the lr


@pytest.mark.slow
def test_report_of_two_sweeps_together(serial, tmp_path):
    """Data files split by method into two folders, reported together (--report-from A,B),
    give the table of the whole sweep."""
    for name, keep in (("a", "gpipe"), ("b", "pipedream")):
        folder = tmp_path / name
        folder.mkdir()
        for data in ("runs.csv", "curves.csv"):
            lines = (serial / data).read_text().splitlines()
            folder.joinpath(data).write_text("\n".join([lines[0]] + [x for x in lines[1:] if x.startswith(keep + ",")]) + "\n")
    out = tmp_path / "together"
    assert cli_main(["sweep", "--report-from", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(out)]) == 0
    assert (out / "summary.csv").read_text() == (serial / "summary.csv").read_text()


def test_crossing_interpolates_and_reports_not_reached():
    evals = [{"tokens": 0, "val_loss": 5.0, "sim_time": 0.0}, {"tokens": 100, "val_loss": 3.0, "sim_time": 10.0},
             {"tokens": 200, "val_loss": 2.0, "sim_time": 30.0}]
    assert crossing(evals, 4.0, "tokens") == 50.0
    assert crossing(evals, 2.5, "sim_time") == 20.0
    assert crossing(evals, 5.5, "tokens") == 0.0
    assert crossing(evals, 1.0, "tokens") is None


@pytest.mark.parametrize("extra, message", [
    (["--methods", "gpipe,nope"], "unknown method 'nope'"),
    (["--methods", "gpipe", "--seeds", "0,1", "--lrs", "1e-3,3e-3", "--tune-lr"], "--tune-seed=0 is also a reported seed"),
    (["--methods", "gpipe", "--tune-lr"], "--tune-lr needs at least two learning rates"),
    (["--methods", "pipedream", "--stages", "1,8"], "cannot split 4 blocks into 8 stages"),
    (["--methods", "gpipe", "--grid", "optim.lr"], "expected section.key=v1,v2"),
    (["--methods", "gpipe", "--steps", "5"], "--steps is a shortcut of `pipenag train`, not of sweep: "
                                             "a sweep compares methods at equal tokens"),
    (["--methods", "gpipe", "--engine=dist"], "--engine is a shortcut of `pipenag train`"),
])
def test_bad_sweeps_fail_before_any_run(tmp_path, capsys, extra, message):
    assert cli_main(["sweep", "--config", TINY, "--out", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipenag sweep: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_wallclock_columns_are_the_models_seconds(serial, tmp_path, monkeypatch, capsys):
    """--wallclock adds the wall-clock model's seconds per update of every run (calibrated,
    cached) and the wall time to target = updates to the target x those seconds."""
    import json
    import shutil

    from pipenag.config import Config
    from pipenag.wallclock import calibrate, predict

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the calibration cache
    out = tmp_path / "copy"
    shutil.copytree(serial, out)
    for path in out.glob("runs/**/config.json"):  # the copies' run folders are their own
        saved = json.loads(path.read_text())
        saved["run"]["out_dir"] = saved["run"]["out_dir"].replace(str(serial), str(out))
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    assert cli_main([*ARGS, "--jobs", "1", "--out", str(out), "--report-only", "--wallclock", "--target", "5.5"]) == 0
    assert "wall time to target (model)" in (out / "summary.md").read_text()
    rows = {(r["method"], r["stages"]): r for r in json.loads((out / "summary.json").read_text())["rows"]}
    runs = read_runs(out)
    key = next(k for k, r in runs.items() if k[:2] == ("pipedream", "2") and r["tuning"] == "False"
               and r["chosen_lr"] == "True")
    folder = next(out.glob(f"runs/pipedream/K2/seed{key[2]}/lr{float(key[3]):g}"))
    cfg = Config.from_dict(json.loads((folder / "config.json").read_text()))
    assert float(runs[key]["model_s_per_update"]) == predict(cfg, calibrate(cfg)).steady_s_per_update
    reached = [r for r in rows.values() if r["tokens_to_target"] is not None]
    assert reached  # a loose target that every curve reaches
    for r in reached:
        run = next(v for k, v in read_runs(out, trained_only=False).items()
                   if k[0] == r["method"] and k[1] == str(r["stages"]))
        tokens_per_update = int(run["tokens"]) / int(run["updates"])
        assert r["wall_to_target_s"] == pytest.approx(r["tokens_to_target"] / tokens_per_update
                                                      * r["model_s_per_update"])
    # gpipe at K = 2 stands for its K = 1 run, with the model's time of a 2-stage gpipe
    assert rows[("gpipe", 2)]["model_s_per_update"] != rows[("gpipe", 1)]["model_s_per_update"]
