"""run.dtype: bfloat16 compute under autocast, float32 everywhere else, the same numbers in both
engines.

    python -m pytest tests/test_dtype.py -q
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_resume_is_bit_identical, run_dist_against_sim, sim_reference, tiny_config
from pipenag.build import build_pipeline, compute_dtype
from pipenag.config import load_config
from pipenag.engine.stage import compute_call

BF16 = ("--run.dtype=bfloat16",)


def test_compute_call_autocasts_and_returns_float32():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    plain = compute_call(lin, x)
    low = compute_call(lin, x, torch.bfloat16)
    assert plain.dtype == low.dtype == torch.float32
    assert not torch.equal(plain, low) and torch.allclose(plain, low, atol=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = lin(x)
    assert expected.dtype == torch.bfloat16 and torch.equal(low, expected.float())


def test_bfloat16_changes_the_compute_only(tmp_path):
    ref, _ = sim_reference(tiny_config(tmp_path / "fp32", "--train.steps=6"))
    low, _ = sim_reference(tiny_config(tmp_path / "bf16", "--train.steps=6", *BF16))
    a, b = [r["train_loss"] for r in ref], [r["train_loss"] for r in low]
    assert a != b and all(abs(x - y) < 0.05 for x, y in zip(a, b))
    parts = build_pipeline(tiny_config(tmp_path / "p", *BF16), 256)
    assert compute_dtype(parts.cfg) is torch.bfloat16
    assert all(p.dtype == torch.float32 for s in parts.stages for p in s.parameters())  # master weights
    sim = parts.simulator()
    x = torch.randint(0, 256, (4, 32))
    sim.step([(x, x)])
    for runner in sim.runners:
        assert runner.autocast_dtype is torch.bfloat16
        for state in runner.optimizer.state.values():
            assert all(v.dtype == torch.float32 for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
        for snapshot in runner.snapshots.values():
            assert all(t.dtype == torch.float32 for t in snapshot)


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="run.dtype='float16': must be one of"):
        load_config(None, ["--run.dtype=float16"])


@pytest.mark.slow
def test_bfloat16_resume_is_bit_identical(tmp_path, monkeypatch):
    assert_resume_is_bit_identical(tmp_path, monkeypatch, ["--train.steps=12", "--train.checkpoint_every=3",
                                                           "--train.eval_every=4", *BF16])


@pytest.mark.slow
@pytest.mark.parametrize("method,K", [("nesterov", 3), ("pipemare", 2)])
def test_bfloat16_dist_equals_simulator(tmp_path, method, K):
    run_dist_against_sim(tmp_path, method, K, BF16, val_steps=[3, 6])


def test_bfloat16_split_backward_equals_the_whole_one(tmp_path):
    """zb-h1's B and W passes (pipenag/engine/split_backward.py) through autocast's casts give
    gpipe's numbers in bfloat16 too, bit for bit."""
    runs = {m: sim_reference(tiny_config(tmp_path / m, f"--pipeline.method={m}", "--train.steps=4", *BF16))[0]
            for m in ("gpipe", "zb-h1")}
    assert [r["train_loss"] for r in runs["zb-h1"]] == [r["train_loss"] for r in runs["gpipe"]]
