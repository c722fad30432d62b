"""Delay compensation (DC-ASGD, Zheng et al., ICML 2017) in StageRunner: the gradient applied is
g + lambda g * g (w_now - w_stale). Checked against a float64 recursion written out here (a
linear stage, whose weight gradient is known in closed form), lambda = 0 == pipedream bit for
bit, no correction at pipedream's last stage, resume and runtime == simulator.

    python -m pytest tests/test_delay_compensation.py -q
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_resume_is_bit_identical, run_dist_against_sim, tiny_config, train_random_tokens

from pipenag.build import build_pipeline
from pipenag.config import load_config
from pipenag.engine.stage import compensate_delay_, make_runner
from pipenag.methods import resolve
from pipenag.schedules import Schedule

SMALL = ["--model.n_layer=4", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=8"]
F64 = torch.float64


def test_compensate_delay_formula():
    g = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64)
    now = torch.tensor([0.3, 0.1, -1.0, 2.0], dtype=F64)
    stale = torch.tensor([0.1, 0.4, -0.5, 1.0], dtype=F64)
    grads = [g.clone(), None]
    compensate_delay_(grads, [now, now], [stale, stale], 0.5)
    want = [1.0 + 0.5 * 1.0 * 0.2, -2.0 + 0.5 * 4.0 * -0.3, 0.5 + 0.5 * 0.25 * -0.5, 0.0]
    torch.testing.assert_close(grads[0], torch.tensor(want, dtype=F64), rtol=1e-15, atol=1e-15)
    assert grads[1] is None


def linear_stage(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2, bias=False, dtype=F64)


def inputs(num_microbatches, seed=1):
    """(x, dL/dy) pairs: a stage-0 runner gets its output's gradient from the next stage."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 2, generator=g, dtype=F64))
            for _ in range(num_microbatches)]


LR = 0.3


def drive(schedule, lam, num_updates, stage_idx=0, module=None, loss_fn=None, data=None):
    """Run one stage's runner in the simulator's order (forward, backward of each microbatch of
    an update, then the step) with SGD(lr=LR) and a recording of the gradient each step applies."""
    module = module if module is not None else linear_stage()
    applied = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            applied.append(module.weight.grad.detach().clone())
            return super().step(closure)

    runner = make_runner(schedule, stage_idx, module, Recording(module.parameters(), lr=LR), loss_fn,
                         delay_compensation=lam)
    M = schedule.num_microbatches
    data = data if data is not None else inputs(M * num_updates)
    for u in range(num_updates):
        for i in range(M):
            mb = u * M + i
            x, gy = data[mb]
            if runner.is_last:
                runner.forward(mb, x, gy)
                runner.backward(mb)
            else:
                runner.forward(mb, x)
                runner.backward(mb, gy)
        runner.step()
    return module.weight.detach().clone(), applied


@pytest.mark.parametrize("schedule", [Schedule("pipedream", 3, 1), Schedule("2bw", 2, 2)], ids=["pipedream", "2bw"])
def test_runner_matches_the_float64_recursion(schedule):
    lam, num_updates = 0.7, 6
    M = schedule.num_microbatches
    got, applied = drive(schedule, lam, num_updates)
    data = inputs(M * num_updates)
    versions = [linear_stage().weight.detach().clone()]  # w_0, w_1, ...
    for u in range(num_updates):
        # y = x W^T, so dL/dW = sum over the update's microbatches of gy^T x, whatever W is.
        g = sum(gy.T @ x for x, gy in data[u * M:(u + 1) * M])
        stale = versions[schedule.forward_version(0, u * M)]  # the version the forwards used
        now = versions[u]
        g_dc = g + lam * g * g * (now - stale)
        torch.testing.assert_close(applied[u], g_dc, rtol=1e-12, atol=1e-14)
        versions.append(now - LR * g_dc)
    torch.testing.assert_close(got, versions[-1], rtol=1e-12, atol=1e-14)
    # The first update has no staleness (w_stale = w_0 = w_now); later ones are corrected.
    torch.testing.assert_close(applied[0], sum(gy.T @ x for x, gy in data[:M]), rtol=1e-14, atol=1e-15)
    assert not torch.allclose(applied[-1], sum(gy.T @ x for x, gy in data[-M:]))


def test_no_correction_at_the_last_pipedream_stage():
    s = Schedule("pipedream", 3, 1)
    data = inputs(6)
    loss_fn = lambda out, target: (out - target).square().mean()  # noqa: E731
    with_dc = drive(s, 5.0, 6, stage_idx=2, module=linear_stage(), loss_fn=loss_fn, data=data)
    without = drive(s, 0.0, 6, stage_idx=2, module=linear_stage(), loss_fn=loss_fn, data=data)
    assert torch.equal(with_dc[0], without[0])
    assert all(torch.equal(a, b) for a, b in zip(with_dc[1], without[1]))
    # ... while stage 0 of the same schedule is corrected (the check above can fail).
    assert not torch.equal(drive(s, 5.0, 6, data=data)[0], drive(s, 0.0, 6, data=data)[0])


def test_bad_lambda_raises():
    with pytest.raises(ValueError, match="delay_compensation=-1.0"):
        make_runner(Schedule("pipedream", 2, 1), 0, linear_stage(), torch.optim.SGD(linear_stage().parameters(), lr=0.1),
                    None, delay_compensation=-1.0)


# -- the method ------------------------------------------------------------------------------------

def cfg_for(method, *extra, stages=2, steps=20):
    return load_config(overrides=SMALL + [f"--pipeline.method={method}", f"--pipeline.num_stages={stages}",
                                          f"--train.steps={steps}", *extra])


def test_method_resolves_lambda_and_refuses_stash_off():
    assert resolve(cfg_for("pipedream-dc")).delay_compensation == 0.04
    assert resolve(cfg_for("pipedream-dc", "--optim.dc_lambda=0.5")).delay_compensation == 0.5
    assert resolve(cfg_for("pipedream", "--optim.dc_lambda=0.5")).delay_compensation == 0.0
    with pytest.raises(ValueError, match="pipeline.stash='off'.*pipedream-dc"):
        resolve(cfg_for("pipedream-dc", "--pipeline.stash=off"))
    with pytest.raises(ValueError, match="optim.dc_lambda=-0.1"):
        cfg_for("pipedream-dc", "--optim.dc_lambda=-0.1")
    parts = build_pipeline(cfg_for("pipedream-dc", "--optim.dc_lambda=0.5"), vocab_size=32)
    assert [r.delay_compensation for r in parts.simulator().runners] == [0.5, 0.5]
    assert parts.runner(0).delay_compensation == 0.5  # what the runtime builds


def simulate(cfg, num_updates=4, seed=0):
    return train_random_tokens(cfg, num_updates, seed)


@pytest.mark.parametrize("extra", [[], ["--pipeline.schedule=2bw"]], ids=["pipedream", "2bw"])
def test_lambda_zero_is_pipedream_bit_for_bit(extra):
    lr = ["--optim.lr=3e-2", *extra]
    got = simulate(cfg_for("pipedream-dc", "--optim.dc_lambda=0", *lr))
    want = simulate(cfg_for("pipedream", *lr))
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    corrected = simulate(cfg_for("pipedream-dc", "--optim.dc_lambda=100", *lr))
    assert corrected[0] != want[0]


# -- training runs -----------------------------------------------------------------------------------

RUN = ["--train.steps=12", "--train.eval_every=4", "--pipeline.method=pipedream-dc", "--optim.dc_lambda=2"]


@pytest.mark.slow
def test_resume_in_process_matches_uninterrupted_run(tmp_path, monkeypatch):
    assert_resume_is_bit_identical(tmp_path, monkeypatch, [*RUN, "--train.checkpoint_every=3"])


@pytest.mark.slow
def test_dist_equals_simulator_with_delay_compensation(tmp_path):
    run_dist_against_sim(tmp_path, "pipedream-dc", 3, ("--optim.dc_lambda=2", "--train.checkpoint_every=2"),
                         val_steps=[3, 6])
