"""Checkpoints load weights-only: a crafted file is refused before it runs any code.

    python -m pytest tests/test_checkpoint_safety.py -q
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from helpers import make_dist_cfg, tiny_config
from pipenag import atomic
from pipenag.checkpoint import SIM_PART, CheckpointStore, UnsafeCheckpoint, load_weights_only, stage_part


class _Payload:
    """Unpickling this creates `path` (what an attacker's code would do, made harmless)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(store: CheckpointStore, update: int, part: str, marker: Path) -> None:
    """Replace `part`'s checkpoint of `update` with a malicious pickle and a matching sidecar."""
    buf = io.BytesIO()
    torch.save({"sim": _Payload(str(marker)), "fingerprint": "x", "elapsed": 0.0}, buf)  # as torch writes it
    data = buf.getvalue()
    path = store.path(update, part)
    digest = atomic.write_bytes(path, data)
    atomic.write_text(path.with_suffix(".sha256"), f"{digest} {len(data)}\n")
    assert store.verify(update, part) is None  # the checksum does not help: it matches


def test_the_payload_would_run_under_a_full_unpickle(tmp_path):
    """The control: the planted file really does run code when loaded the unsafe way."""
    marker = tmp_path / "pwned"
    store = CheckpointStore(tmp_path, [SIM_PART])
    _plant(store, 5, SIM_PART, marker)
    torch.load(store.path(5, SIM_PART), weights_only=False)
    assert marker.exists()


def test_load_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    store = CheckpointStore(tmp_path, [SIM_PART])
    _plant(store, 5, SIM_PART, marker)
    with pytest.raises(UnsafeCheckpoint, match="weights-only"):
        store.load(5, SIM_PART)
    assert not marker.exists()


def test_plain_state_round_trips(tmp_path):
    state = {"w": torch.randn(3, 2), "step": torch.tensor(4.0), "n": 3, "x": 0.5, "s": "abc",
             "l": [1, (2, 3)], "none": None, "rng": torch.get_rng_state()}
    atomic.torch_save(state, tmp_path / "a.pt")
    got = load_weights_only(tmp_path / "a.pt")
    assert got.keys() == state.keys()
    assert torch.equal(got["w"], state["w"]) and got["l"] == [1, (2, 3)] and got["s"] == "abc"


def test_simulator_resume_refuses_a_malicious_checkpoint(tmp_path, capsys):
    from pipenag.cli import main
    from pipenag.train import train_sim

    out = tmp_path / "run"
    cfg = tiny_config(out, "--train.steps=6", "--train.checkpoint_every=3", "--train.eval_every=0")
    assert train_sim(cfg)["status"] == "ok"
    metrics_before = (out / "metrics.jsonl").read_bytes()
    marker = tmp_path / "pwned"
    _plant(CheckpointStore(out, [SIM_PART]), 6, SIM_PART, marker)
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "u00000006-sim.pt" in err[0]
    # train.resume = "auto" takes the same path
    with pytest.raises(UnsafeCheckpoint):
        train_sim(tiny_config(out, "--train.steps=6", "--train.checkpoint_every=3", "--train.eval_every=0",
                              "--train.resume=auto"))
    assert not marker.exists()
    assert (out / "metrics.jsonl").read_bytes() == metrics_before  # nothing written over the run


def test_every_set_damaged_is_named(tmp_path, capsys):
    from pipenag.cli import main
    from pipenag.train import train_sim

    out = tmp_path / "run"
    cfg = tiny_config(out, "--train.steps=6", "--train.checkpoint_every=3", "--train.eval_every=0")
    assert train_sim(cfg)["status"] == "ok"
    store = CheckpointStore(out, [SIM_PART])
    assert store.complete_updates() == [3, 6]
    for update in (3, 6):
        path = store.path(update, SIM_PART)
        path.write_bytes(path.read_bytes()[:100])
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "every complete checkpoint" in last and "update 3" in last and "update 6" in last
    assert "before its first checkpoint" not in err


@pytest.mark.slow
def test_runtime_resume_refuses_a_malicious_checkpoint(tmp_path, capsys):
    """The launcher refuses the set before it starts a worker; no file appears."""
    from pipenag.runtime.launch import train_dist

    K = 2
    cfg = make_dist_cfg(tmp_path / "run", "pipedream", K, "--train.engine=dist", "--train.checkpoint_every=3")
    assert train_dist(cfg, start_method="fork") == 0
    marker = tmp_path / "pwned"
    store = CheckpointStore(cfg.run.out_dir, [stage_part(k) for k in range(K)])
    _plant(store, 6, stage_part(1), marker)
    with pytest.raises(UnsafeCheckpoint, match="u00000006-stage1.pt"):
        train_dist(cfg, resume=True, start_method="fork")
    assert not marker.exists()
    assert not os.path.exists(Path(cfg.run.out_dir) / "pwned")
