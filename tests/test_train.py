"""`pipenag train` with the simulator engine: the run folder, pinned losses, determinism,
resume after a kill, divergence, and errors caught before any work.

    python -m pytest tests/test_train.py -q

Every run uses configs/tiny.toml cut down to a 100k-character corpus and a dozen updates
(about a second each after torch's first import).
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, TINY, Interrupt, sim_weights, simulator_stopped_at, subprocess_env, tiny_config

import pipenag.train as train_mod
from pipenag.checkpoint import SIM_PART, CheckpointStore
from pipenag.cli import main as cli_main
from pipenag.config import Config
from pipenag.methods import METHODS
from pipenag.metrics import read_metrics
from pipenag.train import train_main, train_sim

STEPS = 12
RUN = [f"--train.steps={STEPS}", "--train.eval_every=4"]


def make_cfg(out, *extra) -> Config:
    return tiny_config(out, *RUN, *extra)


def checkpoints(out) -> list[int]:
    """The simulator run's complete checkpoint updates."""
    return CheckpointStore(out, [SIM_PART]).complete_updates()


def run(out, *extra):
    """Train in this process; returns (summary, metrics lines, config)."""
    cfg = make_cfg(out, *extra)
    summary = train_sim(cfg)
    return summary, read_metrics(out), cfg


def losses(metrics, key="train_loss"):
    return [r.get(key) for r in metrics]


# ------------------------------------------------------------------------------ run folder

@pytest.mark.slow
def test_run_folder_contents(tmp_path):
    summary, metrics, cfg = run(tmp_path)
    # config.json is the resolved config and loads back into an equal Config.
    assert Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    # metrics.jsonl: one JSON object per update.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    per_update = 1 * 4 * 32  # M=1 (pipedream) x microbatch 4 x block 32
    times = []
    for r in metrics:
        assert {"step", "tokens", "train_loss", "lr", "time_s"} <= set(r)
        assert r["tokens"] == r["step"] * per_update
        assert math.isfinite(r["train_loss"]) and r["lr"] > 0
        times.append(r["time_s"])
        assert ("val_loss" in r) == (r["step"] % 4 == 0 or r["step"] == STEPS)
    assert times == sorted(times)
    assert metrics[0]["lr"] == pytest.approx(3e-3)  # round(0.06 * 12) = 1 warm-up update
    assert metrics[-1]["lr"] == pytest.approx(3e-4)  # cosine ends at 0.1 lr
    # summary.json
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary
    assert saved["status"] == "ok"
    assert saved["val_loss"] == metrics[-1]["val_loss"]
    assert saved["tokens"] == STEPS * per_update
    assert saved["updates"] == STEPS
    assert saved["wall_time_s"] > 0
    assert (saved["method"], saved["stages"]) == ("nesterov", 4)
    # The final checkpoint is there and complete.
    assert checkpoints(tmp_path) == [STEPS]
    assert CheckpointStore(tmp_path, [SIM_PART]).load(STEPS, SIM_PART)["update"] == STEPS


@pytest.mark.slow
def test_pinned_first_losses(tmp_path):
    # Measured once (2026-11, torch 2.13.0+cpu, Python 3.11.7, one thread) with
    #   python -m pipenag train --config configs/tiny.toml --train.steps=12 --data.max_chars=100000
    #       --train.eval_every=4 --run.threads=1 --out /tmp/x
    # and read from metrics.jsonl. The builtin corpus comes from this Python's standard library
    # (reference manual topics first), so another Python version may move these numbers.
    # Update 1 is ln(256) = 5.545 up to the init: the byte model starts near uniform.
    _, metrics, _ = run(tmp_path)
    pinned = [5.539050102233887, 5.415638446807861, 5.235570907592773, 5.0957136154174805, 4.985378742218018]
    assert losses(metrics)[:5] == pytest.approx(pinned, abs=1e-4)
    val = {r["step"]: r["val_loss"] for r in metrics if "val_loss" in r}
    assert val == pytest.approx({4: 4.996356, 8: 4.758511, 12: 4.687248}, abs=1e-4)


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path):
    _, a, _ = run(tmp_path / "a")
    _, b, _ = run(tmp_path / "b")
    _, c, _ = run(tmp_path / "c", "--train.seed=1")
    assert losses(a) == losses(b)
    assert losses(a, "val_loss") == losses(b, "val_loss")
    assert losses(a) != losses(c)
    assert all(x != y for x, y in zip(losses(a)[:3], losses(c)[:3]))


@pytest.mark.slow
def test_gpipe_and_1f1b_give_the_same_numbers(tmp_path):
    _, a, _ = run(tmp_path / "a", "--pipeline.method=gpipe", "--train.steps=4")
    _, b, _ = run(tmp_path / "b", "--pipeline.method=1f1b", "--train.steps=4")
    assert losses(a) == losses(b)
    assert a[-1]["tokens"] == 4 * 4 * 4 * 32  # M=4 microbatches per update


# ------------------------------------------------------------------------------ resume

DRIVER = """
import sys, time
import pipenag.engine.sim as sim
step = sim.Simulator.step
def slow_step(self, batch):
    # Slow every update down so that the test can kill the run between two checkpoints.
    time.sleep(0.15)
    return step(self, batch)
sim.Simulator.step = slow_step
from pipenag.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "killed"
    args = ["train", "--config", TINY, "--out", str(run_dir), *FAST, *RUN, "--train.checkpoint_every=3"]
    # `python -m pipenag train ...` with each update slowed by a sleep (DRIVER), so the kill
    # lands in the middle of the run rather than after it has finished.
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed_at = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = checkpoints(run_dir)
            if done and done[-1] >= 3:
                proc.send_signal(signal.SIGKILL)
                killed_at = done[-1]
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert killed_at is not None, f"no checkpoint seen; rc={proc.returncode} stderr:\n{err.decode()}"
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < STEPS
    assert not (run_dir / "summary.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "pipenag", "train", "--resume", str(run_dir)],
                             cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    after = read_metrics(run_dir)
    _, reference, _ = run(tmp_path / "straight", "--train.checkpoint_every=3")
    assert [r["step"] for r in after] == list(range(1, STEPS + 1))
    assert losses(after) == losses(reference)
    assert losses(after, "val_loss") == losses(reference, "val_loss")
    assert losses(after, "lr") == losses(reference, "lr")
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == reference[-1]["val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nesterov", "pipemare", "gpipe", "basis-rotation", "muon-wp"])
def test_resume_in_process_matches_uninterrupted_run(tmp_path, monkeypatch, method):
    # Stop in update 8 (after the checkpoint of update 6 and the metrics line of update 7):
    # the resumed run must drop line 7, redo it and end with the uninterrupted run's numbers.
    extra = [f"--pipeline.method={method}", "--train.checkpoint_every=3"]
    _, reference, _ = run(tmp_path / "straight", *extra)
    with simulator_stopped_at(monkeypatch, 7), pytest.raises(Interrupt):
        run(tmp_path / "cut", *extra)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 8))
    assert checkpoints(tmp_path / "cut") == [3, 6]
    assert train_main(None, resume=str(tmp_path / "cut")) == 0
    after = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in after] == list(range(1, STEPS + 1))
    assert losses(after) == losses(reference)
    assert losses(after, "val_loss") == losses(reference, "val_loss")


# ------------------------------------------------------------------------------ divergence

@pytest.mark.slow
def test_huge_lr_diverges_with_status_1(tmp_path, capsys):
    out = tmp_path / "div"
    rc = cli_main(["train", "--config", TINY, "--out", str(out), *FAST, *RUN, "--optim.lr=1e6",
                   "--train.checkpoint_every=1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: non-finite training loss" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    last = read_metrics(out)[-1]
    assert last["train_loss"] is None  # strict JSON: the non-finite loss is written as null
    assert summary["val_loss"] is None
    assert summary["updates"] == last["step"] < STEPS
    assert checkpoints(out)[-1] == last["step"] - 1
    for stage in sim_weights(out, last["step"] - 1):
        assert all(torch.isfinite(t).all() for t in stage.values())


@pytest.mark.slow
def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import pipenag.build as build

    real = build.lm_loss
    calls = {"n": 0}

    def loss_going_bad(logits, targets):
        # nesterov runs one microbatch per update: the 5th training loss is the first bad one.
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("inf") if calls["n"] >= 5 else loss

    monkeypatch.setattr(build, "lm_loss", loss_going_bad)
    out = tmp_path / "nan"
    rc = train_main(make_cfg(out, "--train.checkpoint_every=2", "--train.eval_every=0"))
    assert rc == 1
    assert "non-finite training loss" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["updates"] == 5
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    assert checkpoints(out) == [2, 4]
    # The last good checkpoint resumes into a working simulator.
    monkeypatch.setattr(build, "lm_loss", real)
    assert train_main(None, resume=str(out)) == 0
    assert math.isfinite(json.loads((out / "summary.json").read_text())["val_loss"])


# ------------------------------------------------------------------------------ bad inputs

def _no_data(*args, **kwargs):
    raise AssertionError("data was loaded before the input was checked")


@pytest.mark.parametrize("extra, message", [
    (["--stages", "8"], "cannot split 4 blocks into 8 stages"),
    (["--method", "nestrov"], "pipeline.method='nestrov': must be one of 'gpipe',"),
    (["--engine", "sims"], "train.engine='sims': must be one of 'sim', 'dist'"),
    (["--method", "gpipe", "--pipeline.schedule=pipedream"], "pipeline.schedule='pipedream'"),
    (["--method", "pipemare", "--pipeline.schedule=2bw"], "pipeline.schedule='2bw'"),
    (["--method", "pipemare", "--pipeline.stash=on"], "pipeline.stash='on'"),
    (["--method", "pipedream", "--pipeline.num_microbatches=2"], "pipeline.num_microbatches=2"),
    (["--method", "2bw", "--pipeline.num_microbatches=3"], "pipeline.num_microbatches=3"),
    (["--optim.lr=0"], "optim.lr=0.0"),
    (["--model.nlayer=3"], "unknown config key 'model.nlayer'"),
    (["--train.steps"], "needs a value"),
])
def test_bad_inputs_fail_before_any_work(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(train_mod, "build_data", _no_data)
    out = tmp_path / "run"
    rc = cli_main(["train", "--config", TINY, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("pipenag train: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_missing_data_path(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["train", "--config", TINY, "--out", str(out), "--data.source=/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("pipenag train: error: data.source='/nonexistent'")
    assert len(err.strip().splitlines()) == 1
    assert not (out / "config.json").exists()


def test_malformed_toml_and_missing_config(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layer = 3\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipenag train: error: ") and "not valid TOML" in err
    assert len(err.strip().splitlines()) == 1
    assert cli_main(["train", "--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_without_a_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mod, "build_data", _no_data)
    assert cli_main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipenag train: error: --resume") and "no config.json" in err
    # A run folder whose process died before its first checkpoint.
    make_cfg(tmp_path).save(tmp_path / "config.json")
    assert cli_main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipenag train: error: --resume") and "no complete checkpoint" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pipenag", "train", "--config", TINY, "--stages", "8",
                          "--out", str(tmp_path / "run")], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == "pipenag train: error: pipeline.num_stages=8 with model.n_layer=4: cannot split 4 " \
                                 "blocks into 8 stages: each stage needs at least one block"


# ------------------------------------------------------------------------------ every method

@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains(tmp_path, method):
    summary, metrics, _ = run(tmp_path, f"--pipeline.method={method}", "--train.steps=6")
    assert summary["status"] == "ok" and summary["method"] == method
    assert [r["step"] for r in metrics] == list(range(1, 7))
    assert all(math.isfinite(x) for x in losses(metrics))
    assert math.isfinite(summary["val_loss"])
    assert summary["val_loss"] < math.log(256) + 0.1


# ------------------------------------------------------------------------------ outputs

def test_metrics_are_strict_json(tmp_path):
    from pipenag.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path)
    writer.write({"step": 1, "train_loss": float("nan"), "lr": 1e-3, "val_loss": float("inf")})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line) == {"step": 1, "train_loss": None, "lr": 1e-3, "val_loss": None}


@pytest.mark.slow
def test_tensorboard_has_the_scalars_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, metrics, _ = run(tmp_path, "--run.tensorboard=true", "--train.steps=6")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("train_loss", "lr", "tokens", "val_loss"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], r[key]) for r in metrics if key in r]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(train_mod, "build_data", _no_data)
    rc = cli_main(["train", "--config", TINY, "--out", str(tmp_path / "run"), "--run.tensorboard=true"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'pipenag[tensorboard]'" in err and len(err.strip().splitlines()) == 1
