"""link.compress_activations / link.compress_gradients: the same quantize -> dequantize in both
engines, the packed bytes on the real transport, and a non-finite value still stops the run.
(The codecs' own math: tests/test_codec.py.)

    python -m pytest tests/test_compression.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import run_dist_against_sim, sim_reference, tiny_config
from pipenag.build import build_pipeline, evaluate
from pipenag.config import load_config
from pipenag.link import make_codec
from pipenag.link.messages import codecs, message_bytes, wire_summary
from pipenag.metrics import read_metrics

BOTH_INT8 = ("--link.compress_activations=int8", "--link.compress_gradients=int8")


def test_none_is_the_default_and_changes_nothing(tmp_path):
    """Explicit "none" is the default config, and the numbers of a run without compression."""
    a = tiny_config(tmp_path / "a", "--train.steps=4")
    b = tiny_config(tmp_path / "b", "--train.steps=4", "--link.compress_activations=none",
                    "--link.compress_gradients=none")
    assert codecs(a) == (None, None)
    ra, _ = sim_reference(a)
    rb, _ = sim_reference(b)
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]


def test_compression_changes_the_numbers_and_is_deterministic(tmp_path):
    base, _ = sim_reference(tiny_config(tmp_path / "none", "--train.steps=4"))
    one, _ = sim_reference(tiny_config(tmp_path / "int8", "--train.steps=4", *BOTH_INT8))
    two, _ = sim_reference(tiny_config(tmp_path / "int8b", "--train.steps=4", *BOTH_INT8))
    assert [r["train_loss"] for r in one] == [r["train_loss"] for r in two]
    assert [r["train_loss"] for r in one] != [r["train_loss"] for r in base]
    # int8 is close: the same losses to about 1e-2
    assert all(abs(a["train_loss"] - b["train_loss"]) < 5e-2 for a, b in zip(one, base))


def test_the_simulator_applies_the_codec_between_stages_only(tmp_path):
    """Every activation the next stage receives is codec.roundtrip of what the stage sent; the
    last stage's loss and the first stage's input gradient are not sent and not compressed."""
    cfg = tiny_config(tmp_path / "r", "--link.compress_activations=int4", "--link.compress_gradients=int8")
    parts = build_pipeline(cfg, 256)
    sim = parts.simulator()
    act, grad = sim.activation_codec, sim.gradient_codec
    assert act.name == "int4" and grad.name == "int8"
    seen = {"F": [], "B": []}
    for k, runner in enumerate(sim.runners):
        fwd, bwd = runner.forward, runner.backward

        def forward(mb, x, y=None, fwd=fwd, k=k):
            if k > 0:
                seen["F"].append(x)
            out = fwd(mb, x, y)
            if k < len(sim.runners) - 1:
                seen.setdefault(("sent", k), out)
            return out

        def backward(mb, g=None, bwd=bwd, k=k):
            if g is not None:
                seen["B"].append(g)
            return bwd(mb, g)

        runner.forward, runner.backward = forward, backward
    x = torch.randint(0, 256, (4, 32))
    sim.step([(x, x)])
    assert torch.equal(seen["F"][0], act.roundtrip(seen[("sent", 0)]))
    # every gradient a stage received was decoded: re-encoding a decoded int8 tensor gives it
    # back unchanged (the codec is idempotent on its own output), which raw gradients are not
    assert seen["B"]
    for g in seen["B"]:
        assert torch.equal(grad.roundtrip(g), g)
    raw = torch.randn(4, 32, 40)
    assert not torch.equal(grad.roundtrip(raw), raw)


def test_evaluation_sends_its_activations_through_the_codec():
    cfg = load_config(None, ["--model.n_layer=2", "--model.n_embd=16", "--model.n_head=2", "--model.block_size=8",
                             "--pipeline.num_stages=2"])
    parts = build_pipeline(cfg, 64)
    batch = [(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))]
    plain = evaluate(parts.stages, batch)
    coded = evaluate(parts.stages, batch, make_codec("int4"))
    assert plain != coded and abs(plain - coded) < 0.5


def test_message_sizes_per_direction():
    cfg = load_config(None, ["--link.compress_activations=int8", "--link.compress_gradients=int4-hadamard"])
    numel = cfg.data.microbatch_size * cfg.model.block_size * cfg.model.n_embd
    assert message_bytes(cfg) == numel * 4
    assert message_bytes(cfg, "activation") == math.ceil(numel / 64) * (4 + 64)
    assert message_bytes(cfg, "gradient") == math.ceil(numel / 64) * (4 + 32)
    summary = wire_summary(cfg)
    assert summary["activations"]["ratio"] == pytest.approx(4 * 64 / 68)
    assert summary["gradients"]["codec"] == "int4-hadamard"


@pytest.mark.parametrize("override,match", [
    ("--link.compress_activations=int3", "link.compress_activations='int3': must be one of"),
    ("--link.block_size=-4", "link.block_size=-4"),
])
def test_bad_codec_settings_are_one_line_errors(tmp_path, capsys, override, match):
    from pipenag.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert not (tmp_path / "r").exists()


def test_hadamard_needs_a_power_of_two_block(tmp_path):
    with pytest.raises(ValueError, match="link.block_size=48"):
        load_config(None, ["--link.compress_gradients=int4-hadamard", "--link.block_size=48"])


def test_a_non_finite_activation_still_stops_the_run(tmp_path, capsys):
    """A huge lr blows the weights up to inf/NaN; through an int8 link they stay non-finite (the
    codec turns a block with a non-finite value into NaN) and the run stops with status diverged."""
    from pipenag.train import train_sim

    cfg = tiny_config(tmp_path / "r", "--optim.lr=1e6", "--pipeline.method=pipedream", "--train.steps=40",
                      *BOTH_INT8)
    summary = train_sim(cfg)
    assert summary["status"] == "diverged"
    assert any(r["train_loss"] is None for r in read_metrics(cfg.run.out_dir))


@pytest.mark.slow
@pytest.mark.parametrize("method,K,extra", [
    ("nesterov", 3, BOTH_INT8),
    ("pipemare", 2, ("--link.compress_activations=int4", "--link.latency_ms=3")),
    ("gpipe", 2, ("--link.compress_gradients=int4-hadamard",)),
    ("2bw", 3, ("--link.compress_activations=int4-hadamard", "--link.compress_gradients=int8",
                "--link.block_size=32", "--pipeline.in_flight=4,3,1")),
])
def test_dist_equals_simulator_with_compression(tmp_path, method, K, extra):
    out, summary, _ = run_dist_against_sim(tmp_path, method, K, extra, val_steps=[3, 6])
    # the real transport sent the packed bytes: their size per message is the codec's
    cfg = load_config(None, [f"--{e[2:]}" for e in extra if e.startswith("--link.")])
    numel = 4 * 32 * 40  # configs/tiny.toml: microbatch 4, block_size 32, n_embd 40
    act, grad = codecs(cfg)
    for k, stats in enumerate(summary["stage_stats"]):
        wire = stats["wire"]
        if k < K - 1:
            expected = act.packed_numel(numel) if act else numel * 4
            assert wire["activations"]["bytes_per_message"] == expected
        if k > 0:
            expected = grad.packed_numel(numel) if grad else numel * 4
            assert wire["gradients"]["bytes_per_message"] == expected
    assert summary["messages"]["activations"]["codec"] == (act.name if act else "none")
