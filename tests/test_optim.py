"""DelayedNesterov against the paper's Eq. 10, torch's SGD, and the torch optimizer contract.

    python -m pytest tests/test_optim.py -q
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from pipenag.optim import OPTIMIZERS, DelayedNesterov, build_optimizer
from pipenag.optim.factory import nows_beta1


DT = torch.float64


def gamma_of(t: int, schedule: str, mu: float) -> float:
    """Written out again here, not imported, so the reference shares no code with the optimizer."""
    return mu if schedule == "constant" else max(0.0, (t - 2) / t)


def quadratic(n: int = 7, seed: int = 0):
    """f(w) = 0.5 w'Aw - b'w with A SPD, eigenvalues in [0.5, 2]; returns (A, b, x0)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.linspace(0.5, 2.0, n, dtype=DT)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(n, generator=g, dtype=DT)
    x0 = torch.randn(n, generator=g, dtype=DT)
    return a, b, x0


def eq10_reference(a, b, x0, *, lr, mu, schedule, discount, tau, num_steps):
    """The paper's Eq. 10 in w-coordinates, independent of the optimizer's y-form.

        w_{t+1} = w_t + gamma_t (w_t - w_{t-1}) - lr c_t grad f(w_{t-tau} + d_{t-tau}),
        d_s = gamma_s (w_s - w_{s-1}),  c_t = 1 - gamma_t (discount) or 1 (no discount).

    Index alignment with the optimizer (derived by substituting the map below into Eq. 10):
    the optimizer's step t (1-based, like torch's `step`) produces w_{t+1} from w_t, w_{t-1},
    and its parameters after step t are the look-ahead point
        y_t = w_{t+1} + gamma_{t+1} (w_{t+1} - w_t)   (so y_{t-1} = w_t + d_t).
    Initial condition: w_0 = w_1 = x0 (no velocity, i.e. m_0 = 0), hence y_0 = x0, and for
    s <= 1 the look-ahead w_s + d_s is x0 (w_s = x0 for s <= 0 too). The stale gradient of
    step t is at w_{t-tau} + d_{t-tau} = y_{t-1-tau}: the optimizer's parameters after step
    t-1-tau, i.e. the weights a forward pass used tau updates ago.

    Returns:
        [y_0, y_1, ..., y_T] computed from the w sequence via the map above.
    """
    w = {0: x0.clone(), 1: x0.clone()}

    def w_at(s):
        return w[max(s, 0)]

    def lookahead(s):
        if s <= 1:  # w_s = w_{s-1} = x0
            return x0.clone()
        return w_at(s) + gamma_of(s, schedule, mu) * (w_at(s) - w_at(s - 1))

    for t in range(1, num_steps + 1):
        gamma = gamma_of(t, schedule, mu)
        c = (1.0 - gamma) if discount else 1.0
        z = lookahead(t - tau)
        grad = a @ z - b
        w[t + 1] = w[t] + gamma * (w[t] - w[t - 1]) - lr * c * grad
    ys = [x0.clone()]
    for t in range(1, num_steps + 1):
        ys.append(w[t + 1] + gamma_of(t + 1, schedule, mu) * (w[t + 1] - w[t]))
    return ys


def split_params(x: torch.Tensor) -> list[torch.nn.Parameter]:
    """Spread a vector over a (2, 2) matrix and a vector, to exercise several tensors."""
    return [torch.nn.Parameter(x[:4].reshape(2, 2).clone()), torch.nn.Parameter(x[4:].clone())]


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def set_grads(params, grad: torch.Tensor) -> None:
    i = 0
    for p in params:
        p.grad = grad[i : i + p.numel()].reshape(p.shape).clone()
        i += p.numel()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("discount", [True, False])
@pytest.mark.parametrize("schedule", ["constant", "theory"])
@pytest.mark.parametrize("tau", [0, 2, 5])
def test_equals_paper_eq10_with_stale_lookahead_gradients(tau, schedule, discount, foreach):
    a, b, x0 = quadratic()
    lr, mu, num_steps = 0.05, 0.9, 40
    ref = eq10_reference(a, b, x0, lr=lr, mu=mu, schedule=schedule, discount=discount, tau=tau, num_steps=num_steps)

    params = split_params(x0)
    opt = DelayedNesterov(params, lr=lr, momentum=mu, momentum_schedule=schedule, discount=discount, foreach=foreach)
    ys = [flat(params).clone()]
    for t in range(1, num_steps + 1):
        stale = ys[max(t - 1 - tau, 0)]  # parameters after step t-1-tau
        set_grads(params, a @ stale - b)
        opt.step()
        ys.append(flat(params).clone())

    assert max(y.abs().max().item() for y in ref) > 0.1  # the trajectory really moves
    for t, (y, y_ref) in enumerate(zip(ys, ref)):
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg=f"step {t}")


@pytest.mark.parametrize("foreach", [False, True])
def test_no_discount_equals_torch_sgd_nesterov(foreach):
    a, b, x0 = quadratic(seed=1)
    mu, lr = 0.9, 0.03
    ours = split_params(x0)
    theirs = split_params(x0)
    opt = DelayedNesterov(ours, lr=lr, momentum=mu, discount=False, foreach=foreach)
    ref = torch.optim.SGD(theirs, lr=lr, momentum=mu, nesterov=True, dampening=0, foreach=foreach)
    for _ in range(20):
        set_grads(ours, a @ flat(ours) - b)
        set_grads(theirs, a @ flat(theirs) - b)
        opt.step()
        ref.step()
        torch.testing.assert_close(flat(ours), flat(theirs), rtol=1e-13, atol=1e-13)
    assert (flat(ours) - x0).abs().max() > 0.1


@pytest.mark.parametrize("foreach", [False, True])
def test_weight_decay_is_decoupled_and_first(foreach):
    # Two steps by hand, constant momentum: y_t = (1-lr wd) y_{t-1} - lr [mu m_t + (1-mu) g_t].
    lr, mu, wd = 0.1, 0.8, 0.5
    y0 = torch.tensor([1.0, -2.0, 3.0], dtype=DT)
    g1 = torch.tensor([0.5, 0.25, -1.0], dtype=DT)
    g2 = torch.tensor([-0.3, 0.7, 0.2], dtype=DT)
    p = torch.nn.Parameter(y0.clone())
    opt = DelayedNesterov([p], lr=lr, momentum=mu, weight_decay=wd, foreach=foreach)
    p.grad = g1.clone()
    opt.step()
    m1 = (1 - mu) * g1
    y1 = (1 - lr * wd) * y0 - lr * (mu * m1 + (1 - mu) * g1)
    torch.testing.assert_close(p.detach(), y1, rtol=1e-14, atol=1e-14)
    p.grad = g2.clone()
    opt.step()
    m2 = mu * m1 + (1 - mu) * g2
    y2 = (1 - lr * wd) * y1 - lr * (mu * m2 + (1 - mu) * g2)
    torch.testing.assert_close(p.detach(), y2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], m2, rtol=1e-14, atol=1e-14)
    assert opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("foreach", [False, True])
def test_maximize_negates_the_gradient(foreach):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, dtype=DT, generator=g)
    grads = [torch.randn(5, dtype=DT, generator=g) for _ in range(4)]
    p_max, p_min = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    opt_max = DelayedNesterov([p_max], lr=0.1, momentum=0.9, maximize=True, foreach=foreach)
    opt_min = DelayedNesterov([p_min], lr=0.1, momentum=0.9, foreach=foreach)
    for gr in grads:
        p_max.grad, p_min.grad = gr.clone(), -gr
        opt_max.step()
        opt_min.step()
    torch.testing.assert_close(p_max.detach(), p_min.detach(), rtol=0, atol=0)
    torch.testing.assert_close(p_max.grad, grads[-1], rtol=0, atol=0)  # grads left untouched


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -1.0},
        {"lr": float("nan")},
        {"lr": 0.1, "momentum": 1.0},
        {"lr": 0.1, "momentum": -0.1},
        {"lr": 0.1, "weight_decay": -0.01},
        {"lr": 0.1, "momentum_schedule": "cosine"},
        {"lr": 0.1, "discount": "yes"},
        {"lr": torch.tensor([0.1, 0.2])},
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        DelayedNesterov([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("schedule", ["constant", "theory"])
def test_foreach_equals_loop(schedule):
    g = torch.Generator().manual_seed(4)
    shapes = [(3, 4), (4,), (2, 3, 2), (1,)]
    init = [torch.randn(s, dtype=DT, generator=g) for s in shapes]
    runs = {}
    for foreach in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = DelayedNesterov(params, lr=0.05, momentum=0.95, weight_decay=0.1, momentum_schedule=schedule, foreach=foreach)
        gg = torch.Generator().manual_seed(5)
        for step in range(12):
            for i, p in enumerate(params):
                # parameter 2 gets no gradient on its first 3 steps: its step count lags,
                # so the foreach path must bucket tensors with different gamma_t
                p.grad = None if (i == 2 and step < 3) else torch.randn(p.shape, dtype=DT, generator=gg)
            opt.step()
        runs[foreach] = (params, opt)
    (p_loop, o_loop), (p_fe, o_fe) = runs[False], runs[True]
    for a, b in zip(p_loop, p_fe):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert o_fe.state[p_fe[2]]["step"].item() == 9 and o_fe.state[p_fe[0]]["step"].item() == 12


def test_parameter_without_grad_gets_no_state():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = DelayedNesterov([p, q], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    assert set(opt.state[p]) == {"step", "momentum_buffer"}
    assert q not in opt.state
    assert torch.equal(q.detach(), torch.ones(2))


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_continues_identically(foreach):
    a, b, x0 = quadratic(seed=2)

    def run(params, opt, n):
        for _ in range(n):
            set_grads(params, a @ flat(params) - b)
            opt.step()

    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, momentum_schedule="theory", foreach=foreach)
    params = split_params(x0)
    opt = DelayedNesterov(params, **kw)
    run(params, opt, 5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)

    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = DelayedNesterov(params2, lr=1.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(torch.load(buf))
    assert opt2.param_groups[0]["momentum_schedule"] == "theory"
    run(params, opt, 5)
    run(params2, opt2, 5)
    torch.testing.assert_close(flat(params), flat(params2), rtol=0, atol=0)
    assert opt2.state[params2[0]]["step"].item() == 10


def test_drives_least_squares_to_low_loss():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 8, dtype=DT, generator=g)
    w_true = torch.randn(8, 1, dtype=DT, generator=g)
    y = x @ w_true
    model = torch.nn.Linear(8, 1, bias=True).to(DT)
    opt = DelayedNesterov(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5
    assert losses[-1] < 1e-6 * losses[0]


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.tensor([2.0], dtype=DT))
    opt = DelayedNesterov([p], lr=0.1, momentum=0.5)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 4.0
    assert p.item() < 2.0


def test_works_with_lambda_lr_scheduler():
    a, b, x0 = quadratic(seed=7)
    factors = [0.0, 1.0, 0.5, 0.25, 2.0, 1.0]
    params, params_ref = split_params(x0), split_params(x0)
    opt = DelayedNesterov(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: factors[min(e, len(factors) - 1)])
    opt_ref = DelayedNesterov(params_ref, lr=0.1, momentum=0.9)
    for step, f in enumerate(factors):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * f)
        opt_ref.param_groups[0]["lr"] = 0.1 * f
        set_grads(params, a @ flat(params) - b)
        set_grads(params_ref, a @ flat(params_ref) - b)
        opt.step()
        opt_ref.step()
        sched.step()
        if step == 0:  # lr 0: the parameters stay put, only the momentum moves
            torch.testing.assert_close(flat(params), x0, rtol=0, atol=0)
        torch.testing.assert_close(flat(params), flat(params_ref), rtol=0, atol=0)
    assert (flat(params) - x0).abs().max() > 0.01


# ---- build_optimizer: presets are the torch optimizers they claim to be ----


def _param():
    return [torch.nn.Parameter(torch.zeros(3, dtype=DT))]


def test_build_nesterov_is_torch_nadam_with_paper_settings():
    opt = build_optimizer("nesterov", _param(), lr=3e-4, weight_decay=0.01)
    assert type(opt) is torch.optim.NAdam
    group = opt.param_groups[0]
    assert group["lr"] == 3e-4
    assert group["betas"] == (0.99, 0.999)
    assert group["eps"] == 1e-8
    assert group["momentum_decay"] == 0.004
    assert group["decoupled_weight_decay"] is True
    assert group["weight_decay"] == 0.01
    opt = build_optimizer("nesterov", _param(), lr=1e-3, momentum=0.95, momentum_decay=0.4)
    assert opt.param_groups[0]["betas"] == (0.95, 0.999) and opt.param_groups[0]["momentum_decay"] == 0.4


def test_build_nesterov_steps_like_a_hand_built_nadam():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, dtype=DT, generator=g)
    grads = [torch.randn(4, dtype=DT, generator=g) for _ in range(5)]
    p1, p2 = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    ours = build_optimizer("nesterov", [p1], lr=1e-2, weight_decay=0.01)
    ref = torch.optim.NAdam(
        [p2], lr=1e-2, betas=(0.99, 0.999), eps=1e-8, weight_decay=0.01, momentum_decay=0.004, decoupled_weight_decay=True
    )
    for gr in grads:
        p1.grad, p2.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=0, atol=0)


def test_build_nesterov_nows_per_stage_beta1():
    num_stages = 4
    betas = []
    for k in range(num_stages):
        opt = build_optimizer("nesterov-nows", _param(), lr=1e-3, stage_idx=k, num_stages=num_stages)
        assert type(opt) is torch.optim.NAdam and opt.param_groups[0]["decoupled_weight_decay"] is True
        betas.append(opt.param_groups[0]["betas"][0])
    assert betas == pytest.approx([0.9 + 0.09 * 3 / 4, 0.9 + 0.09 * 2 / 4, 0.9 + 0.09 / 4, 0.9])
    assert nows_beta1(0, 1) == 0.9
    opt = build_optimizer("nesterov-nows", _param(), lr=1e-3, momentum=0.97, stage_idx=0, num_stages=4)
    assert opt.param_groups[0]["betas"] == (0.97, 0.999)
    for bad in [dict(), dict(stage_idx=0), dict(stage_idx=4, num_stages=4), dict(stage_idx=-1, num_stages=4), dict(stage_idx=0, num_stages=0)]:
        with pytest.raises(ValueError):
            build_optimizer("nesterov-nows", _param(), lr=1e-3, **bad)


def test_build_other_presets():
    opt = build_optimizer("adamw", _param(), lr=1e-3, weight_decay=0.01)
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    assert opt.param_groups[0]["weight_decay"] == 0.01
    opt = build_optimizer("adamw", _param(), lr=1e-3, momentum=0.0)
    assert opt.param_groups[0]["betas"] == (0.0, 0.999)  # an explicit 0 is kept

    opt = build_optimizer("sgd", _param(), lr=0.1)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["momentum"] == 0.0
    opt = build_optimizer("sgd", _param(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4

    opt = build_optimizer("nesterov-sgd", _param(), lr=0.1, momentum_schedule="theory", discount=False, foreach=False)
    assert type(opt) is DelayedNesterov
    group = opt.param_groups[0]
    assert group["momentum"] == 0.99 and group["momentum_schedule"] == "theory"
    assert group["discount"] is False and group["foreach"] is False


def test_build_rejects_unknown_names_and_bad_numbers():
    with pytest.raises(ValueError) as err:
        build_optimizer("adam", _param(), lr=1e-3)
    for name in OPTIMIZERS:
        assert name in str(err.value)
    for kwargs in [dict(lr=-1.0), dict(lr=float("inf")), dict(lr=1e-3, weight_decay=-0.1), dict(lr=1e-3, momentum=1.0),
                   dict(lr=1e-3, momentum_decay=-1.0), dict(lr=1e-3, momentum_schedule="linear")]:
        for name in OPTIMIZERS:
            stage = dict(stage_idx=0, num_stages=2) if name == "nesterov-nows" else {}
            params = _stage_module() if name in ("basis-rotation", "muon") else _param()
            with pytest.raises(ValueError):
                build_optimizer(name, params, **kwargs, **stage)


def _stage_module(seed: int = 0, dtype=torch.float64):
    from pipenag.config import ModelConfig
    from pipenag.split import build_stages

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    return build_stages(cfg, 1, seed=seed)[0].to(dtype)


@pytest.mark.parametrize("name", ["basis-rotation", "muon"])
def test_matrix_optimizers_need_the_module(name):
    with pytest.raises(ValueError, match=f"optimizer '{name}' splits a stage.*pass the stage module"):
        build_optimizer(name, _param(), lr=1e-3)


def test_build_basis_rotation_is_basis_rotation_on_the_matrices_and_adamw_elsewhere():
    """The preset == BasisRotation on the blocks' nn.Linear weights and torch AdamW on the rest
    (embeddings, head, norms, biases), built independently here, over steps whose lr is set
    through param_groups as the engine does; float64, bit for bit."""
    from pipenag.optim import BasisRotation

    a, b = _stage_module(), _stage_module()
    opt = build_optimizer("basis-rotation", a, lr=1e-3, weight_decay=0.01)
    linear = {n for n, m in b.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    hidden = [p for n, p in b.named_parameters() if n.rsplit(".", 1)[0] in linear and n.endswith(".weight")]
    rest = [p for p in b.parameters() if all(p is not h for h in hidden)]
    assert len(hidden) == 8  # 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    refs = [BasisRotation(hidden, lr=1e-3, weight_decay=0.01),
            torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)]
    gen = torch.Generator().manual_seed(0)
    for step in range(12):  # crosses the basis refresh at step 10
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in a.parameters()]
        for pa, pb, g in zip(a.parameters(), b.parameters(), grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        lr = 1e-3 / (1 + step)
        for group in opt.param_groups:
            group["lr"] = lr
        for ref in refs:
            for group in ref.param_groups:
                group["lr"] = lr
        opt.step()
        for ref in refs:
            ref.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_adamw_takes_the_fused_kernel_on_cuda_only():
    from types import SimpleNamespace

    from pipenag.optim import build_optimizer, build_muon
    from pipenag.optim.composite import cuda_fused

    on = SimpleNamespace(device=torch.device("cuda", 0))
    off = SimpleNamespace(device=torch.device("cpu"))
    assert cuda_fused([on, on]) is True
    assert cuda_fused([{"params": [on]}, {"params": [on]}]) is True
    assert cuda_fused([on, off]) is None  # a mixed list keeps torch's default
    assert cuda_fused([on], foreach=False) is None  # an explicit foreach is kept (fused excludes it)
    assert cuda_fused([]) is None
    # On the CPU every AdamW pipenag builds stays torch's default path: the numbers never change.
    p = torch.nn.Parameter(torch.ones(3))
    assert build_optimizer("adamw", [p], lr=0.1).defaults["fused"] is None
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for opt in (build_muon(module, lr=0.1), build_optimizer("basis-rotation", module, lr=0.1)):
        adamw = [o for o in opt._optimizers if isinstance(o, torch.optim.AdamW)]
        assert adamw and all(o.defaults["fused"] is None for o in adamw)
