"""`pipenag plan` against what a small run really holds on CPU.

    python -m pytest -q tests/test_plan.py

Parameters and optimizer state are compared exactly with the real optimizers after a step, the
stashed weight copies exactly with the simulator's peak, the activations within 15% of the
bytes autograd saves (saved_tensors_hooks), and the paper configs' parameter counts with the
model built on the meta device.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipenag.build import build_pipeline
from pipenag.cli import main
from pipenag.config import load_config
from pipenag.model import GPT, lm_loss
from pipenag.optim.factory import OPTIMIZERS
from pipenag.plan import flops_per_token, plan_stages

VOCAB = 61


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (the machine may be shared): restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(*extra: str):
    return load_config("configs/tiny.toml", ["--pipeline.num_stages=2", "--model.n_embd=32", "--model.block_size=16",
                                             f"--model.vocab_size={VOCAB}", "--data.microbatch_size=2", *extra])


def batches(M: int, cfg, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = cfg.data.microbatch_size, cfg.model.block_size
    return [(torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g))
            for _ in range(M)]


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_and_optimizer_state_exact(name):
    cfg = small("--pipeline.method=pipedream", f"--optim.name={name}")
    parts = build_pipeline(cfg, VOCAB)
    parts.simulator().step(batches(1, cfg))
    planned = plan_stages(cfg)
    for st, stage, opt in zip(planned, parts.stages, parts.optimizers):
        assert st.params == sum(p.numel() for p in stage.parameters())
        assert st.param_bytes == sum(p.numel() * p.element_size() for p in stage.parameters())
        assert st.optimizer_bytes == state_bytes(opt), name


def test_sgd_with_momentum_state_exact():
    cfg = small("--pipeline.method=pipedream", "--optim.name=sgd", "--optim.momentum=0.9")
    parts = build_pipeline(cfg, VOCAB)
    parts.simulator().step(batches(1, cfg))
    assert [st.optimizer_bytes for st in plan_stages(cfg)] == [state_bytes(o) for o in parts.optimizers] != [0, 0]


class _PeakDict(dict):
    """A dict that remembers the most entries it ever held."""

    peak = 0

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.peak = max(self.peak, len(self))


@pytest.mark.parametrize("extra", [("--pipeline.method=nesterov",), ("--pipeline.method=pipedream-wp",),
                                   ("--pipeline.method=gpipe",), ("--pipeline.method=2bw",),
                                   ("--pipeline.method=pipemare",),
                                   ("--pipeline.method=pipedream", "--pipeline.in_flight=6,3,1")])
def test_stash_peak_matches_the_simulator(extra):
    stages = 3
    cfg = small(f"--pipeline.num_stages={stages}", "--model.n_layer=3", *extra)
    parts = build_pipeline(cfg, VOCAB)
    sim = parts.simulator()
    for runner in sim.runners:
        runner.snapshots = _PeakDict()
    for update in range(7):  # past the deepest stage's fill (6)
        sim.step(batches(sim.num_microbatches, cfg, seed=update))
    planned = plan_stages(cfg)
    assert [r.snapshots.peak for r in sim.runners] == [st.stash_copies for st in planned]
    assert [st.stash_bytes for st in planned] == [
        r.snapshots.peak * sum(p.numel() * 4 for p in r.params) for r in sim.runners]


def measured_saved_bytes(stage, x, target=None) -> int:
    """Bytes of the distinct storages autograd saves in one forward of `stage` (parameters,
    which exist anyway, left out)."""
    params = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(x)
        if target is not None:
            out = lm_loss(out, target)
    out.sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("shape", [dict(n_embd=32, n_head=2, block_size=16, n_layer=3, batch=2),
                                   dict(n_embd=48, n_head=4, block_size=24, n_layer=4, batch=3)])
def test_activation_estimate_within_15_percent(shape):
    cfg = small("--pipeline.num_stages=3", f"--model.n_layer={shape['n_layer']}",
                f"--model.n_embd={shape['n_embd']}", f"--model.n_head={shape['n_head']}",
                f"--model.block_size={shape['block_size']}", f"--data.microbatch_size={shape['batch']}")
    parts = build_pipeline(cfg, VOCAB)
    B, T, C = shape["batch"], shape["block_size"], shape["n_embd"]
    g = torch.Generator().manual_seed(0)
    for st, stage in zip(plan_stages(cfg), parts.stages):
        x = (torch.randint(0, VOCAB, (B, T), generator=g) if stage.is_first
             else torch.randn(B, T, C, generator=g, requires_grad=True))
        y = torch.randint(0, VOCAB, (B, T), generator=g) if stage.is_last else None
        measured = measured_saved_bytes(stage, x, y)
        assert abs(st.activation_bytes_per_microbatch - measured) <= 0.15 * measured, (st.stage, measured)


def test_activations_in_flight_follow_the_schedule():
    cfg = small("--pipeline.num_stages=3", "--model.n_layer=3", "--pipeline.method=nesterov")
    assert [st.microbatches_held for st in plan_stages(cfg)] == [3, 2, 1]
    gpipe = plan_stages(small("--pipeline.method=gpipe", "--pipeline.num_microbatches=5"))
    assert [st.microbatches_held for st in gpipe] == [5, 5]
    for st in gpipe:
        assert st.activation_bytes == 5 * st.activation_bytes_per_microbatch


def test_receive_buffers_use_the_codec_sizes():
    from pipenag.link.messages import message_bytes

    cfg = small("--link.compress_activations=int8")
    first, last = plan_stages(cfg)
    window = 2 + 1 + cfg.train.eval_batches  # max(M=1, d_0=2) + 1 + the validation passes
    assert first.recv_bytes == window * message_bytes(cfg, "gradient")
    assert last.recv_bytes == window * message_bytes(cfg, "activation") < first.recv_bytes


def test_flop_time_and_calibrated_time(tmp_path, capsys):
    assert main(["plan", "--config", "configs/tiny.toml", "--tflops", "0.001", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["time"]["s_per_update"] > 0 and out["time"]["tokens_per_s"] > 0
    assert main(["plan", "--config", "configs/tiny.toml", "--calibrate", f"--data.cache_dir={tmp_path}"]) == 0
    text = capsys.readouterr().out
    assert "calibrated on this machine" in text and "stage" in text


@pytest.mark.parametrize("path, low, high", [("configs/paper-base.toml", 130e6, 138e6),
                                             ("configs/paper-1b.toml", 0.9e9, 1.1e9)])
def test_paper_configs(path, low, high, capsys, monkeypatch):
    cfg = load_config(path)
    assert (cfg.model.n_embd, cfg.model.block_size, cfg.model.vocab_size, cfg.data.microbatch_size,
            cfg.pipeline.num_stages, cfg.model.n_layer, cfg.train.steps) == (
        768 if "base" in path else 2688, 512, 50257, 8, 8, 8, 50_000)
    assert (cfg.optim.lr, cfg.optim.warmup_fraction, cfg.optim.min_lr_ratio, cfg.optim.weight_decay,
            cfg.optim.grad_clip, cfg.pipeline.method) == (3e-4, 0.06, 0.1, 0.01, 10.0, "nesterov")
    with torch.device("meta"):
        count = GPT(cfg.model).num_params()
    assert low < count < high

    # plan never allocates the model: every GPT it builds is on the meta device
    built = []
    original = GPT.__init__

    def on_meta_only(self, *args, **kwargs):
        built.append(torch.empty(0).device.type)
        original(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "__init__", on_meta_only)
    assert main(["plan", "--config", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert built and set(built) == {"meta"}
    assert out["num_params"] == count and len(out["stages"]) == 8
    assert out["total_bytes"] == sum(st["total_bytes"] for st in out["stages"])
    assert out["flops_per_token"] == flops_per_token(cfg.model)
