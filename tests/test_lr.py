"""The learning-rate schedules: warm-up + cosine, and PipeMare's delay discount.

    python -m pytest tests/test_lr.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from pipenag.optim import DelayedNesterov, delay_discount_lr, warmup_cosine_lr



def test_warmup_is_linear_to_the_peak():
    # 6% of 100 updates = 6 warm-up steps: lr * k / 6.
    for k in range(1, 7):
        assert warmup_cosine_lr(k, 100, 3e-4) == pytest.approx(3e-4 * k / 6, rel=1e-12)
    assert warmup_cosine_lr(6, 100, 3e-4) == pytest.approx(3e-4, rel=1e-12)
    assert warmup_cosine_lr(1, 1000, 1.0) == pytest.approx(1 / 60, rel=1e-12)


def test_cosine_decays_monotonically_to_min_ratio():
    total, peak = 100, 3e-4
    lrs = [warmup_cosine_lr(s, total, peak) for s in range(6, total + 1)]
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=1e-12)
    # half way through the decay (step 6 + 47 of 94) the cosine is at the mean of peak and min
    assert warmup_cosine_lr(53, total, peak) == pytest.approx(0.55 * peak, rel=1e-12)
    assert warmup_cosine_lr(total, total, 2.0, min_lr_ratio=0.0) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine_lr(500, 500, 2.0, min_lr_ratio=0.25) == pytest.approx(0.5, rel=1e-12)


def test_no_warmup_starts_near_peak():
    lrs = [warmup_cosine_lr(s, 50, 1.0, warmup_fraction=0.0) for s in range(1, 51)]
    assert lrs[0] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 50)), rel=1e-12)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize(
    "args",
    [
        (0, 100, 1.0),
        (101, 100, 1.0),
        (1, 0, 1.0),
        (1, 100, -1.0),
        (1, 100, float("nan")),
        (1, 100, 1.0, 1.5),
        (1, 100, 1.0, 0.06, 1.2),
        (1.5, 100, 1.0),
    ],
)
def test_warmup_cosine_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        warmup_cosine_lr(*args)


def test_delay_discount_values():
    lr, tau, anneal = 1e-3, 4, 100
    assert delay_discount_lr(lr, tau, 0, anneal) == pytest.approx(lr / 4, rel=1e-12)
    assert delay_discount_lr(lr, tau, 50, anneal) == pytest.approx(lr / 2, rel=1e-12)  # 4^(1/2)
    assert delay_discount_lr(lr, tau, 100, anneal) == pytest.approx(lr, rel=1e-12)
    assert delay_discount_lr(lr, tau, 1000, anneal) == pytest.approx(lr, rel=1e-12)
    assert delay_discount_lr(lr, 0, 0, anneal) == lr  # last stage: no delay
    assert delay_discount_lr(lr, 1, 0, anneal) == pytest.approx(lr, rel=1e-12)
    assert delay_discount_lr(lr, 7, 10**6, 0) == pytest.approx(lr / 7, rel=1e-12)  # no annealing
    steps = [delay_discount_lr(lr, 3, s, anneal) for s in range(0, 101)]
    assert all(b > a for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("args", [(1e-3, -1, 0, 10), (1e-3, 0.5, 0, 10), (-1e-3, 2, 0, 10), (1e-3, 2, -1, 10)])
def test_delay_discount_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        delay_discount_lr(*args)


def test_schedule_drives_an_optimizer_through_lambda_lr():
    total, peak = 20, 0.1
    p = torch.nn.Parameter(torch.zeros(2))
    opt = DelayedNesterov([p], lr=peak)
    # LambdaLR's epoch e is the number of scheduler steps taken, so the update about to be
    # applied is e + 1.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: warmup_cosine_lr(min(e + 1, total), total, 1.0))
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    expected = [warmup_cosine_lr(s, total, peak) for s in range(1, total + 1)]
    assert seen == pytest.approx(expected, rel=1e-12)
