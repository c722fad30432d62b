"""Error feedback (pipenag.optim.ErrorFeedback, arXiv 2606.30634 in issue 19's form): against a
float64 recursion written out here, c = 0 == the base optimizer bit for bit, state_dict round
trips, the "-ef" optimizer names and methods, resume and runtime == simulator.

    python -m pytest tests/test_error_feedback.py -q
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import (train_random_tokens, Interrupt, assert_same_records, assert_same_state_dicts, run_dist_against_sim,
                     simulator_stopped_at, tiny_config)

from pipenag.build import build_pipeline, memory_report
from pipenag.checkpoint import SIM_PART, CheckpointStore
from pipenag.config import load_config
from pipenag.metrics import read_metrics
from pipenag.optim import CompositeOptimizer, ErrorFeedback, build_optimizer
from pipenag.train import train_main, train_sim

SMALL = ["--model.n_layer=4", "--model.n_head=2", "--model.n_embd=16", "--model.block_size=8"]


def grad_sequence(shapes, steps, seed=0, dtype=torch.float64):
    """A fixed list (one per step) of gradient lists, independent of the weights."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(steps)]


def init_params(shapes, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


SHAPES = [(3, 4), (5,)]
LRS = [0.1, 0.05, 0.2, 0.1, 0.02, 0.1]  # changed between steps through the wrapper's param_groups


def run_wrapped(make_base, c, grads, lrs=LRS, foreach=None):
    params = [torch.nn.Parameter(x.clone()) for x in init_params(SHAPES)]
    opt = ErrorFeedback(make_base(params), c=c, foreach=foreach)
    for gs, lr in zip(grads, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def reference_ef(base_update, c, grads, lrs=LRS):
    """x_{t+1} = x_t - u_t - c (u_t - u_{t-1}), u_0 = 0, with u_t = base_update(t, x_t, g_t, lr)
    (the base optimizer's decrement, written by hand in float64)."""
    xs = init_params(SHAPES)
    prev = [torch.zeros_like(x) for x in xs]
    for t, (gs, lr) in enumerate(zip(grads, lrs), start=1):
        us = base_update(t, xs, gs, lr)
        xs = [x - u - c * (u - m) for x, u, m in zip(xs, us, prev)]
        prev = us
    return xs


@pytest.mark.parametrize("c", [1.0, 0.5, 2.0])
def test_sgd_base_matches_the_float64_recursion(c):
    wd = 0.1  # torch SGD's coupled L2 term: u_t = lr (g_t + wd x_t) depends on x_t
    grads = grad_sequence(SHAPES, len(LRS))
    got, _ = run_wrapped(lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=wd), c, grads)
    want = reference_ef(lambda t, xs, gs, lr: [lr * (g + wd * x) for x, g in zip(xs, gs)], c, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_first_step_is_one_plus_c_times_the_base_update():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = ErrorFeedback(torch.optim.SGD([p], lr=0.5), c=0.25)
    p.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    opt.step()  # u_0 = 0: x_1 = x_0 - (1 + c) u_1
    assert torch.equal(p.detach(), -(1.25 * 0.5) * torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert torch.equal(opt.state[p]["prev_update"], torch.tensor([0.5, -1.0], dtype=torch.float64))


@pytest.mark.parametrize("c", [1.0, 0.3])
def test_adamw_base_matches_the_float64_recursion(c):
    b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.01
    grads = grad_sequence(SHAPES, len(LRS))
    got, _ = run_wrapped(lambda ps: torch.optim.AdamW(ps, lr=0.1, betas=(b1, b2), eps=eps, weight_decay=wd),
                         c, grads)
    m = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    v = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]

    def adamw_update(t, xs, gs, lr):
        us = []
        for i, (x, g) in enumerate(zip(xs, gs)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            us.append(lr * wd * x + lr * m_hat / (v_hat.sqrt() + eps))  # x - AdamW's step(x)
        return us

    want = reference_ef(adamw_update, c, grads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def tiny_module(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 8), torch.nn.GELU(),
                               torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))


def train_module(module, opt, steps=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 11, (4, 6), generator=g)
        loss = module(idx).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in module.parameters()]


BASES = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01),
    "nadam": lambda m: torch.optim.NAdam(m.parameters(), lr=1e-2, betas=(0.99, 0.999), weight_decay=0.01,
                                         decoupled_weight_decay=True),
    "muon": lambda m: build_optimizer("muon", m, lr=1e-2, weight_decay=0.01),
}


@pytest.mark.parametrize("base", list(BASES))
def test_c_zero_is_the_base_optimizer_bit_for_bit(base):
    plain = train_module(a := tiny_module(), BASES[base](a))
    zero = train_module(b := tiny_module(), ErrorFeedback(BASES[base](b), c=0.0))
    one = train_module(d := tiny_module(), ErrorFeedback(BASES[base](d), c=1.0))
    assert all(torch.equal(x, y) for x, y in zip(plain, zero))
    assert not all(torch.equal(x, y) for x, y in zip(plain, one))  # so the check above can fail


@pytest.mark.parametrize("c", [0.0, 1.0])
def test_foreach_and_loop_paths_agree_bit_for_bit(c):
    grads = grad_sequence(SHAPES, len(LRS), dtype=torch.float64)
    make = lambda ps: torch.optim.AdamW(ps, lr=0.1)  # noqa: E731
    loop, _ = run_wrapped(make, c, grads, foreach=False)
    fused, _ = run_wrapped(make, c, grads, foreach=True)
    assert all(torch.equal(a, b) for a, b in zip(loop, fused))


@pytest.mark.parametrize("base", list(BASES))
def test_state_dict_round_trip_mid_run_is_bit_identical(base):
    ref_module = tiny_module()
    ref_opt = ErrorFeedback(BASES[base](ref_module), c=0.7)
    train_module(ref_module, ref_opt, steps=3)
    buf = io.BytesIO()  # through torch.save, as checkpoints go
    torch.save({"module": ref_module.state_dict(), "opt": ref_opt.state_dict()}, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    n = len(list(ref_module.parameters()))
    assert sorted(saved["opt"]["state"]) == list(range(n))
    assert all(set(s) == {"prev_update"} for s in saved["opt"]["state"].values())
    assert saved["opt"]["c"] == 0.7
    straight = train_module(ref_module, ref_opt, steps=4, seed=5)

    module = tiny_module(seed=9)  # other weights, restored below
    opt = ErrorFeedback(BASES[base](module), c=0.7)
    module.load_state_dict(saved["module"])
    opt.load_state_dict(saved["opt"])
    resumed = train_module(module, opt, steps=4, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    # Without the previous updates the run is another one (so the round trip matters).
    module = tiny_module(seed=9)
    opt = ErrorFeedback(BASES[base](module), c=0.7)
    module.load_state_dict(saved["module"])
    opt.load_state_dict({**saved["opt"], "state": {}})
    assert not all(torch.equal(a, b) for a, b in zip(straight, train_module(module, opt, steps=4, seed=5)))


def test_param_groups_are_the_base_groups_before_and_after_loading():
    module = tiny_module()
    base = torch.optim.AdamW(module.parameters(), lr=1e-3)
    opt = ErrorFeedback(base)
    opt.param_groups[0]["lr"] = 0.5
    assert base.param_groups[0]["lr"] == 0.5
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)
    assert opt.param_groups is base.param_groups
    opt.param_groups[0]["lr"] = 0.25
    assert base.param_groups[0]["lr"] == 0.25
    # torch's LR schedulers drive the wrapper like any optimizer.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    train_module(module, opt, steps=1)
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.125)


def test_state_view_shows_base_and_wrapper_state():
    module = tiny_module()
    opt = ErrorFeedback(BASES["muon"](module))
    train_module(module, opt, steps=1)
    for p in module.parameters():
        assert "prev_update" in opt.state[p]
        assert ("exp_avg" in opt.state[p]) != ("momentum_buffer" in opt.state[p])  # AdamW or Muon part
    assert len(opt.state) == len(list(module.parameters()))


@pytest.mark.parametrize("c", [-0.1, float("nan"), float("inf"), True, "1"])
def test_bad_c_raises(c):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="error-feedback scale c"):
        ErrorFeedback(torch.optim.SGD([p], lr=0.1), c=c)


def test_bad_base_and_bad_state_dict_raise():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="base_optimizer must be a torch.optim.Optimizer"):
        ErrorFeedback([p])
    opt = ErrorFeedback(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(ValueError, match="'base' and 'state'"):
        opt.load_state_dict(torch.optim.SGD([p], lr=0.1).state_dict())
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({**sd, "state": {0: {"prev_update": torch.zeros(3)}}})
    with pytest.raises(ValueError, match="parameter 4"):
        opt.load_state_dict({**sd, "state": {4: {"prev_update": torch.zeros(2)}}})


# -- names, config and methods ---------------------------------------------------------------------

def test_ef_optimizer_names_wrap_their_base():
    module = tiny_module()
    opt = build_optimizer("adamw-ef", module, lr=1e-3, weight_decay=0.01, ef_scale=0.5)
    assert type(opt) is ErrorFeedback and type(opt.base_optimizer) is torch.optim.AdamW
    assert opt.c == 0.5 and opt.defaults["betas"] == (0.9, 0.999)
    opt = build_optimizer("muon-ef", module, lr=1e-3)
    assert type(opt.base_optimizer) is CompositeOptimizer and opt.c == 1.0
    assert [type(o).__name__ for o in opt.base_optimizer.optimizers] == ["Muon", "AdamW"]
    with pytest.raises(ValueError, match="ef_scale"):
        build_optimizer("adamw-ef", module, lr=1e-3, ef_scale=-1.0)
    with pytest.raises(ValueError, match="pass the stage module"):
        build_optimizer("muon-ef", list(module.parameters()), lr=1e-3)


def cfg_for(method, *extra, stages=4, steps=20):
    return load_config(overrides=SMALL + [f"--pipeline.method={method}", f"--pipeline.num_stages={stages}",
                                          f"--train.steps={steps}", *extra])


@pytest.mark.parametrize("method, base_type", [("pipedream-ef", torch.optim.AdamW), ("muon-ef", CompositeOptimizer),
                                               ("2bw-muon-ef", CompositeOptimizer)])
def test_ef_methods_build_error_feedback_with_the_config_scale(method, base_type):
    parts = build_pipeline(cfg_for(method, "--optim.ef_scale=0.25"), vocab_size=32)
    for stage, opt in zip(parts.stages, parts.optimizers):
        assert type(opt) is ErrorFeedback and type(opt.base_optimizer) is base_type and opt.c == 0.25
        assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in stage.parameters()}
    assert build_pipeline(cfg_for(method), vocab_size=32).optimizers[0].c == 1.0  # the default
    with pytest.raises(ValueError, match="optim.ef_scale=-1.0"):
        cfg_for(method, "--optim.ef_scale=-1")


def test_memory_report_counts_the_previous_update():
    ef = build_pipeline(cfg_for("pipedream-ef"), vocab_size=32)
    sim = ef.simulator()
    for r in sim.runners:  # state exists after a step
        for p in r.params:
            p.grad = torch.zeros_like(p)
        r.optimizer.step()
    base = build_pipeline(cfg_for("pipedream"), vocab_size=32)
    for opt in base.optimizers:
        for p in [p for g in opt.param_groups for p in g["params"]]:
            p.grad = torch.zeros_like(p)
        opt.step()
    plain = memory_report(base)
    for a, b in zip(memory_report(ef), plain):
        assert a["optimizer_state_bytes"] == b["optimizer_state_bytes"] + a["param_bytes"]


def simulate(cfg, num_updates=4, seed=0):
    return train_random_tokens(cfg, num_updates, seed)


# At K = 1 error feedback still changes the update (it is not a delay correction), so the
# method is not its base at one stage; what holds is that c = 0 is the base method.
@pytest.mark.parametrize("method, base, extra", [("pipedream-ef", "pipedream", []), ("muon-ef", "muon", []),
                                                 ("muon-wp-ef", "muon-wp", []),
                                                 ("2bw-muon-ef", "muon", ["--pipeline.schedule=2bw"])])
def test_c_zero_is_the_base_method_bit_for_bit(method, base, extra):
    lr = ["--optim.lr=1e-2"]
    got = simulate(cfg_for(method, "--optim.ef_scale=0", *lr, stages=2))
    want = simulate(cfg_for(base, *lr, *extra, stages=2))
    assert got[0] == want[0]
    assert_same_state_dicts(got[1], want[1])
    other = simulate(cfg_for(method, *lr, stages=2))
    assert other[0] != want[0]


def test_ef_changes_the_update_at_one_stage():
    lr = ["--optim.lr=1e-2"]
    assert simulate(cfg_for("pipedream-ef", *lr, stages=1))[0] != simulate(cfg_for("pipedream", *lr, stages=1))[0]


# -- training runs -----------------------------------------------------------------------------------

RUN = ["--train.steps=12", "--train.eval_every=4"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pipedream-ef", "2bw-muon-ef"])
def test_resume_in_process_matches_uninterrupted_run(tmp_path, monkeypatch, method):
    extra = [*RUN, f"--pipeline.method={method}", "--train.checkpoint_every=3"]
    train_sim(tiny_config(tmp_path / "straight", *extra))
    reference = read_metrics(tmp_path / "straight")
    with simulator_stopped_at(monkeypatch, 7), pytest.raises(Interrupt):
        train_sim(tiny_config(tmp_path / "cut", *extra))
    assert CheckpointStore(tmp_path / "cut", [SIM_PART]).complete_updates() == [3, 6]
    assert train_main(None, resume=str(tmp_path / "cut")) == 0
    assert_same_records(read_metrics(tmp_path / "cut"), reference)
    # The final optimizer states agree too, previous updates included.
    a = CheckpointStore(tmp_path / "cut", [SIM_PART]).load(12, SIM_PART)["sim"]["stages"]
    b = CheckpointStore(tmp_path / "straight", [SIM_PART]).load(12, SIM_PART)["sim"]["stages"]
    for sa, sb in zip(a, b):
        assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
        for i in sa["optimizer"]["state"]:
            assert torch.equal(sa["optimizer"]["state"][i]["prev_update"], sb["optimizer"]["state"][i]["prev_update"])


@pytest.mark.slow
def test_dist_equals_simulator_with_error_feedback(tmp_path):
    # Checkpoints every 2 updates: the runtime saves and prunes the wrapper's state too.
    run_dist_against_sim(tmp_path, "2bw-muon-ef", 2, ("--train.checkpoint_every=2",), val_steps=[3, 6])
