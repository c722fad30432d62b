"""train.steps counts updates, train.microbatch_budget counts microbatches, and both mean the
same in train, compare and sweep: a line copied from one command to another trains the same run.

    python -m pytest tests/test_budget.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, TINY, subprocess_env, tiny_config
from pipenag.compare import apply_microbatch_budget, legacy_budget_note, method_config, parse_methods
from pipenag.config import load_config


def test_a_budget_becomes_updates_and_intervals_in_microbatches(tmp_path):
    cfg = tiny_config(tmp_path / "r", "--pipeline.method=gpipe", "--train.microbatch_budget=40",
                      "--train.eval_every=20", "--train.log_every=8", "--train.checkpoint_every=0")
    run = apply_microbatch_budget(cfg)
    assert (run.train.steps, run.train.eval_every, run.train.log_every) == (10, 5, 2)  # M = 4
    assert run.train.microbatch_budget == 0 and run.train.checkpoint_every == 0  # spent; 0 stays off
    assert apply_microbatch_budget(run) == run  # applying it again changes nothing
    one = apply_microbatch_budget(cfg.with_overrides(["--pipeline.method=pipedream"]))
    assert (one.train.steps, one.train.eval_every) == (40, 20)  # M = 1
    plain = tiny_config(tmp_path / "r", "--pipeline.method=gpipe", "--train.steps=7")
    assert apply_microbatch_budget(plain) is plain  # no budget: train.steps are updates


def test_the_library_entry_points_spend_a_budget_as_pipenag_train_does(tmp_path):
    from pipenag.train import train_sim

    # train_sim given a config with a budget (as load_config("configs/bench.toml") returns one)
    # trains budget // M updates, not train.steps' default
    cfg = tiny_config(tmp_path / "r", "--pipeline.method=gpipe", "--train.microbatch_budget=12",
                      "--train.eval_every=4", "--train.checkpoint_every=0")
    assert cfg.train.steps != 3
    summary = train_sim(cfg)
    assert summary["updates"] == 3 and summary["tokens"] == 12 * cfg.data.microbatch_size * cfg.model.block_size
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved == apply_microbatch_budget(cfg).to_dict()  # the run's config is the spent one, as in `train`


def test_compare_and_train_build_the_same_run_config(tmp_path):
    cfg = tiny_config(tmp_path / "cmp", "--train.microbatch_budget=24", "--train.eval_every=8")
    for spec in ("gpipe", "pipedream", "2bw", "gpipe:pipeline.num_microbatches=2"):
        variant = parse_methods(spec)[0]
        from_compare, M = method_config(cfg, variant, tmp_path / "cmp")
        by_hand = cfg.with_overrides([f"--pipeline.method={variant.method}", *(f"--{o}" for o in variant.overrides),
                                      f"--run.out_dir={from_compare.run.out_dir}"])
        assert apply_microbatch_budget(by_hand) == from_compare
        assert from_compare.train.steps == 24 // M
    # the older spelling, train.steps as the budget of a comparison, still gives the same runs
    legacy = tiny_config(tmp_path / "cmp", "--train.steps=24", "--train.eval_every=8")
    for spec in ("gpipe", "pipedream"):
        v = parse_methods(spec)[0]
        assert method_config(legacy, v, tmp_path / "cmp")[0] == method_config(cfg, v, tmp_path / "cmp")[0]


def test_the_later_of_steps_and_budget_wins(tmp_path):
    toml = tmp_path / "b.toml"
    toml.write_text(open(TINY).read().replace("steps = 40", "microbatch_budget = 40"))
    assert load_config(toml).train.microbatch_budget == 40
    cli = load_config(toml, ["--train.steps=7"])  # steps on the command line turn the file's budget off
    assert (cli.train.steps, cli.train.microbatch_budget) == (7, 0)
    both = load_config(toml, ["--train.steps=7", "--train.microbatch_budget=12"])
    assert both.train.microbatch_budget == 12
    assert load_config(toml, ["--train.seed=3"]).train.microbatch_budget == 40  # anything else keeps it


@pytest.mark.parametrize("value,match", [("-1", "train.microbatch_budget=-1: must be >= 0"),
                                         ("2", "train.microbatch_budget=2: method 'gpipe' takes 4 microbatches")])
def test_bad_budgets_name_the_field(tmp_path, value, match):
    with pytest.raises(ValueError, match=match):
        apply_microbatch_budget(tiny_config(tmp_path / "r", "--pipeline.method=gpipe",
                                            f"--train.microbatch_budget={value}"))


def test_a_comparison_says_when_it_reads_steps_as_its_budget(tmp_path, capsys):
    legacy_budget_note("sweep", tiny_config(tmp_path / "r", "--train.steps=24"))
    assert "--train.microbatch_budget=24" in capsys.readouterr().out
    legacy_budget_note("sweep", tiny_config(tmp_path / "r", "--train.microbatch_budget=24"))
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_a_compare_run_is_pipenag_train_with_the_same_line(tmp_path):
    line = ["--config", TINY, "--train.microbatch_budget=16", "--train.eval_every=8", "--data.max_chars=100000",
            "--run.threads=1", "--pipeline.num_stages=2"]

    def pipenag(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "pipenag", *args], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    pipenag("compare", "--methods", "gpipe", *line, "--out", str(tmp_path / "cmp"))
    pipenag("train", "--method", "gpipe", *line, "--out", str(tmp_path / "train"))
    a = json.loads((tmp_path / "cmp" / "gpipe" / "summary.json").read_text())
    b = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert a["updates"] == b["updates"] == 4
    assert a["val_loss"] == b["val_loss"]
    ca = json.loads((tmp_path / "cmp" / "gpipe" / "config.json").read_text())
    cb = json.loads((tmp_path / "train" / "config.json").read_text())
    ca["run"].pop("out_dir"), cb["run"].pop("out_dir")
    assert ca == cb
