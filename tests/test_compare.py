"""`pipenag compare`: equal tokens, identical data and weights, one row per method, and bad
names rejected before any training.

    python -m pytest tests/test_compare.py -q
"""

import csv
import json
from pathlib import Path

import pytest
import torch

from pipenag.cli import main as cli_main
from pipenag.compare import (add_equal_time_losses, compare_main, loss_at_time, parse_methods,
                              stage_forward_costs, update_times)
from pipenag.config import ModelConfig, load_config
from pipenag.metrics import read_metrics
from pipenag.schedules import Schedule


TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


def tiny_cfg(out: Path, **extra):
    overrides = ["--train.steps=8", "--data.max_chars=100000", "--train.eval_every=4", "--run.threads=1",
                 "--run.progress=false", f"--run.out_dir={out}"]
    overrides += [f"--{k}={v}" for k, v in extra.items()]
    return load_config(TINY, overrides)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    rc = compare_main("gpipe,pipedream,nesterov", tiny_cfg(out))
    return out, rc


@pytest.mark.slow
def test_writes_one_row_per_method(compared):
    out, rc = compared
    assert rc == 0
    for name in ("summary.md", "summary.csv", "summary.json"):
        assert (out / name).is_file()
    pytest.importorskip("matplotlib")
    assert (out / "loss.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["method"] for r in rows] == ["gpipe", "pipedream", "nesterov"]
    md = (out / "summary.md").read_text()
    assert all(f"`{m}`" in md for m in ("gpipe", "pipedream", "nesterov"))
    for r in rows:
        assert r["status"] == "ok"
        assert float(r["val_loss"]) > 0 and float(r["sim_time"]) > 0


@pytest.mark.slow
def test_equal_tokens(compared):
    out, _ = compared
    rows = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["gpipe"]["updates"] == "2"  # budget 8 microbatches // M = 4
    assert rows["pipedream"]["updates"] == rows["nesterov"]["updates"] == "8"
    assert len({r["tokens"] for r in rows.values()}) == 1
    assert int(rows["gpipe"]["tokens"]) == 8 * 4 * 32  # microbatches x batch x block_size
    # Evaluations fall on the same token counts for every method.
    data = json.loads((out / "summary.json").read_text())
    evals = {r["method"]: [e["tokens"] for e in r["evals"]] for r in data["rows"]}
    assert evals["gpipe"] == evals["pipedream"] == evals["nesterov"] == [512, 1024]


@pytest.mark.slow
def test_identical_weights_and_data(compared):
    out, _ = compared
    first = {m: read_metrics(out / m)[0]["train_loss"] for m in ("pipedream", "nesterov")}
    # Same initial weights, same first microbatch, no update before its forward.
    assert first["pipedream"] == first["nesterov"]
    cfg_p = json.loads((out / "pipedream" / "config.json").read_text())
    cfg_g = json.loads((out / "gpipe" / "config.json").read_text())
    assert cfg_p["train"]["seed"] == cfg_g["train"]["seed"]
    assert cfg_g["train"]["steps"] == 2 and cfg_g["train"]["eval_every"] == 1


def test_bad_method_fails_before_training(tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match="valid methods: gpipe, 1f1b, pipedream"):
        compare_main("pipedream,nesterov,nope", tiny_cfg(out))
    assert not out.exists()
    # A bad override of a later variant also stops everything before the first run.
    with pytest.raises(ValueError, match="optim.lr"):
        compare_main("pipedream,nesterov:optim.lr=-1", tiny_cfg(out))
    assert not out.exists()
    assert cli_main(["compare", "--methods", "gpipe,nope", "--config", str(TINY), "--out", str(out)]) == 2
    assert not out.exists()


def test_parse_methods_variants():
    vs = parse_methods("nesterov, nesterov:optim.momentum=0.9:optim.lr=1e-3 ,gpipe")
    assert [v.method for v in vs] == ["nesterov", "nesterov", "gpipe"]
    assert vs[1].overrides == ("optim.momentum=0.9", "optim.lr=1e-3")
    with pytest.raises(ValueError, match="twice"):
        parse_methods("gpipe,gpipe")
    with pytest.raises(ValueError, match="section.key=value"):
        parse_methods("gpipe:lr=1")
    with pytest.raises(ValueError, match="at least one"):
        parse_methods(" , ")


@pytest.mark.slow
def test_variant_overrides_reach_the_run(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.steps": 4})
    assert compare_main("pipedream,pipedream:optim.lr=1e-2", cfg) == 0
    run_cfg = json.loads((tmp_path / "pipedream_optim.lr-1e-2" / "config.json").read_text())
    assert run_cfg["optim"]["lr"] == 0.01
    a, b = read_metrics(tmp_path / "pipedream"), read_metrics(tmp_path / "pipedream_optim.lr-1e-2")
    assert a[0]["train_loss"] == b[0]["train_loss"] and a[-1]["train_loss"] != b[-1]["train_loss"]


def test_simulated_time_axis():
    # Unit costs, backward = 2 forward: a flushing schedule takes (M + K - 1) * 3 per update.
    K, M, U = 4, 4, 3
    done = update_times(Schedule("gpipe", K, M), U, [1.0] * K)
    assert done == pytest.approx([(M + K - 1) * 3 * u for u in range(1, U + 1)])
    # Pipedream in steady state finishes one update per forward + backward time.
    done = update_times(Schedule("pipedream", K, 1), 40, [1.0] * K)
    assert done[-1] - done[-2] == pytest.approx(3.0)
    costs = stage_forward_costs(ModelConfig(n_layer=8, n_embd=64, n_head=4, block_size=64), 4, 256)
    assert costs[:3] == [2.0, 2.0, 2.0] and costs[3] == pytest.approx(2 + 2 * 64 * 256 / (24 * 64**2 + 4 * 64 * 64))


def test_loss_at_equal_time():
    evals = [{"sim_time": 10.0, "val_loss": 3.0}, {"sim_time": 20.0, "val_loss": 2.0}]
    assert loss_at_time(evals, 15.0) == pytest.approx(2.5)
    assert loss_at_time(evals, 20.0) == 2.0
    assert loss_at_time(evals, 5.0) is None and loss_at_time(evals, 25.0) is None
    rows = [{"status": "ok", "sim_time": 20.0, "evals": evals},
            {"status": "ok", "sim_time": 15.0, "evals": [{"sim_time": 15.0, "val_loss": 2.7}]},
            {"status": "diverged", "sim_time": 1.0, "evals": []}]
    assert add_equal_time_losses(rows) == 15.0
    assert [r["val_loss_at_equal_time"] for r in rows] == [pytest.approx(2.5), 2.7, None]


@pytest.mark.slow
def test_summary_has_equal_time_column(compared):
    out, _ = compared
    rows = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    # pipedream and nesterov finish first (no bubble): at that time their loss is their final loss.
    assert rows["pipedream"]["val_loss_at_equal_time"] == rows["pipedream"]["val_loss"]
    assert float(rows["pipedream"]["sim_time"]) < float(rows["gpipe"]["sim_time"])
