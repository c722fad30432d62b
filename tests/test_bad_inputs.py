"""Bad input, one table: every case is a one-line error naming the field or the file, exit
status 2, before any work, and an existing run folder is left exactly as it was.

    python -m pytest tests/test_bad_inputs.py -q

(A crafted checkpoint and damaged checkpoints: tests/test_checkpoint_safety.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import FAST, TINY
from pipenag.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An existing finished run, and the bad files the cases point at."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    assert main(["train", "--config", TINY, "--out", str(run), *FAST, "--train.steps=2", "--train.eval_every=0"]) == 0
    (root / "empty.txt").write_text("")
    (root / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (root / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 200)
    (root / "typo.toml").write_text("[optim]\nlrr = 1e-3\n")
    shards = root / "shards"
    assert main(["data", "prepare", "--config", TINY, "--data.max_chars=100000", "--out", str(shards)]) == 0
    train_shard = sorted(shards.glob("train-*.bin"))[0]
    train_shard.write_bytes(train_shard.read_bytes()[:-100])  # truncated, as a copy cut short
    return root


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# (case id, argv after `pipenag train` with {run} and {root} filled in, what the line must name)
CASES = [
    ("lr-nan", ["--out", "{run}", "--optim.lr=nan"], r"optim\.lr='nan'"),
    ("lr-inf", ["--out", "{run}", "--optim.lr=inf"], r"optim\.lr='inf'"),
    ("lr-negative", ["--out", "{run}", "--optim.lr=-1"], r"optim\.lr=-1"),
    ("stages-over-blocks", ["--out", "{run}", "--config", TINY, "--stages", "9"], r"pipeline\.num_stages=9 with model\.n_layer=4"),
    ("in-flight-length", ["--out", "{run}", "--pipeline.in_flight=3,2"], r"pipeline\.in_flight='3,2': needs one depth per stage"),
    ("in-flight-increasing", ["--out", "{run}", "--pipeline.in_flight=1,2,3,4"], r"pipeline\.in_flight=\[1, 2, 3, 4\]: depths must not increase"),
    ("in-flight-sync", ["--out", "{run}", "--method", "gpipe", "--pipeline.in_flight=4,3,2,1"], r"pipeline\.in_flight=.*asynchronous"),
    ("in-flight-auto-no-pass", ["--out", "{run}", "--pipeline.in_flight=auto", "--link.latency_ms=30"], r"pipeline\.pass_ms"),
    ("codec-name", ["--out", "{run}", "--link.compress_activations=int9"], r"link\.compress_activations='int9'"),
    ("codec-block", ["--out", "{run}", "--link.compress_gradients=int4-hadamard", "--link.block_size=48"], r"link\.block_size=48"),
    ("data-empty", ["--out", "{run}", "--data.source={root}/empty.txt"], r"empty\.txt"),
    ("data-binary", ["--out", "{run}", "--data.source={root}/binary.dat"], r"binary\.dat' is not a text file"),
    ("data-not-utf8", ["--out", "{run}", "--data.source={root}/latin1.txt"], r"latin1\.txt' is not UTF-8"),
    ("data-missing", ["--out", "{run}", "--data.source={root}/nope.txt"], r"nope\.txt"),
    ("shard-truncated", ["--out", "{run}", "--config", TINY, "--data.max_chars=100000", "--data.source=shards:{root}/shards"],
     r"train-00000\.bin"),
    ("toml-typo", ["--out", "{run}", "--config", "{root}/typo.toml"], r"unknown config key 'optim\.lrr'"),
    ("cli-typo", ["--out", "{run}", "--optim.lrr=1e-3"], r"unknown config key 'optim\.lrr'"),
    ("resume-other-model", ["--resume", "{run}", "--model.n_embd=64"], r"model\.n_embd=64 differs"),
    ("resume-other-split", ["--resume", "{run}", "--pipeline.num_stages=2"], r"pipeline\.num_stages=2 differs"),
    ("auto-resume-other-run", ["--config", TINY, *FAST, "--out", "{run}", "--train.resume=auto", "--model.n_embd=48"],
     r"another run"),
    ("resume-not-a-run", ["--resume", "{root}"], r"no config\.json"),
]


@pytest.mark.parametrize("argv,names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_the_run_alone(files, capsys, argv, names):
    run = files / "run"
    before = snapshot(run)
    argv = [a.format(run=run, root=files) for a in argv]
    assert main(["train", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pipenag train: error: ")
    assert re.search(names, lines[0]), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(run) == before  # nothing written over the existing run
