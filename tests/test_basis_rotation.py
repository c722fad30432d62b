"""BasisRotation against an independent reference of the paper's recursion, and the torch contract.

    OMP_NUM_THREADS=1 python -m pytest tests/test_basis_rotation.py -q
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from pipenag.optim.basis_rotation import BasisRotation


DT = torch.float64
SHAPES = [(6, 3), (3, 7), (4, 4), (5,)]

# Two settings: defaults but for a short refresh period, and one with weight decay, a
# separate covariance decay and a refresh period that does not divide the first one's.
CASES = [
    dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, refresh_every=4, cov_beta=None),
    dict(lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, refresh_every=3, cov_beta=0.9),
]


def eig_descending(a):
    vals, vecs = torch.linalg.eigh(a)
    return vecs[:, torch.argsort(vals, descending=True)]


def reference(w0, grads, *, lr, betas, eps, weight_decay, refresh_every, cov_beta, geometry):
    """The recursion of arXiv 2602.03515 for one parameter, written out with plain torch ops.

    Shares no code with the optimizer. An unrotated side is an explicit identity basis with
    no refresh (multiplying by the identity is exact, so this is the same arithmetic).

    Returns:
        One dict per step: the weights W and the recursion's tensors (M, V; for a matrix
        also L, R, QL, QR) after that step.
    """
    b1, b2 = betas
    b = b2 if cov_beta is None else cov_beta
    w = w0.clone()
    if w.dim() != 2:
        m_, v_ = torch.zeros_like(w), torch.zeros_like(w)
        out = []
        for t, g in enumerate(grads, start=1):
            m_ = b1 * m_ + (1 - b1) * g
            v_ = b2 * v_ + (1 - b2) * g**2
            w = w - lr * weight_decay * w
            w = w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * (m_ / (v_.sqrt() + eps))
            out.append({"W": w, "M": m_, "V": v_})
        return out

    m, n = w.shape
    rot_left = geometry == "bi" or m <= n  # uni: the smaller side, rows for a square matrix
    rot_right = geometry == "bi" or m > n
    M, V = torch.zeros(m, n, dtype=w.dtype), torch.zeros(m, n, dtype=w.dtype)
    L, R = torch.zeros(m, m, dtype=w.dtype), torch.zeros(n, n, dtype=w.dtype)
    QL = None if rot_left else torch.eye(m, dtype=w.dtype)
    QR = None if rot_right else torch.eye(n, dtype=w.dtype)
    out = []
    for t, G in enumerate(grads, start=1):
        if rot_left:
            L = b * L + (1 - b) * (G @ G.T)
        if rot_right:
            R = b * R + (1 - b) * (G.T @ G)
        if t == 1:
            if rot_left:
                QL = eig_descending(L)
            if rot_right:
                QR = eig_descending(R)
        elif t % refresh_every == 0:
            if rot_left:
                order = torch.argsort(torch.diag(QL.T @ L @ QL), descending=True)
                V = V[order, :]
                QL = torch.linalg.qr(L @ QL[:, order]).Q
            if rot_right:
                order = torch.argsort(torch.diag(QR.T @ R @ QR), descending=True)
                V = V[:, order]
                QR = torch.linalg.qr(R @ QR[:, order]).Q
        Gr = QL.T @ G @ QR
        M = b1 * M + (1 - b1) * G
        V = b2 * V + (1 - b2) * Gr**2
        U = QL @ ((QL.T @ M @ QR) / (V.sqrt() + eps)) @ QR.T
        w = w - lr * weight_decay * w
        w = w - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * U
        out.append({"W": w, "M": M, "V": V, "L": L, "R": R, "QL": QL, "QR": QR})
    return out


def make_problem(shapes, num_steps, dtype=DT, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = [torch.randn(s, generator=g, dtype=DT).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=DT).to(dtype) for s in shapes] for _ in range(num_steps)]
    return w0, grads


def clone_state(state):
    return {k: v.clone() for k, v in state.items()}


def run_optimizer(w0, grads, start=0, **kwargs):
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = BasisRotation(params, **kwargs)
    history = []
    for step_grads in grads[start:]:
        for p, gr in zip(params, step_grads):
            p.grad = None if gr is None else gr.clone()
        opt.step()
        history.append([{"param": p.detach().clone()} | clone_state(opt.state[p]) for p in params])
    return params, opt, history


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def close_weights(actual, expected):
    # Looser atol than the state: in the "bi" geometry the first rotated gradient is diagonal
    # up to rounding, and that rounding noise (1e-17, which depends on the matmul's memory
    # layout) is divided by about eps = 1e-8 in the first update. A wrong recursion moves the
    # weights by O(lr) = 1e-2.
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("geometry", ["bi", "uni"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(geometry, case):
    kw = CASES[case]
    num_steps = 25
    w0, grads = make_problem(SHAPES, num_steps, seed=case)
    params, opt, history = run_optimizer(w0, grads, geometry=geometry, **kw)
    names = {
        "exp_avg": "M", "exp_avg_sq": "V",
        "cov_left": "L", "cov_right": "R", "basis_left": "QL", "basis_right": "QR",
    }
    for i, shape in enumerate(SHAPES):
        ref = reference(w0[i], [g[i] for g in grads], geometry=geometry, **kw)
        if len(shape) == 2:
            m, n = shape
            sides = ["left", "right"] if geometry == "bi" else ["left" if m <= n else "right"]
        else:
            sides = []
        expected_keys = {"step", "exp_avg", "exp_avg_sq"} | {
            f"{kind}_{side}" for kind in ("cov", "basis") for side in sides
        }
        # Every step, not only the last: the initial basis order is visible in the state
        # until the first refresh re-sorts it.
        for t in range(num_steps):
            ours = history[t][i]
            assert set(ours) - {"param"} == expected_keys
            assert ours["step"].item() == t + 1
            close_weights(ours["param"], ref[t]["W"])
            for key in expected_keys - {"step"}:
                close(ours[key], ref[t][names[key]])


@pytest.fixture
def linalg_calls(monkeypatch):
    """Records (name, dtype, shape) of every eigh and qr the optimizer runs."""
    calls = []
    eigh, qr = torch.linalg.eigh, torch.linalg.qr

    def spy_eigh(a, *args, **kwargs):
        calls.append(("eigh", a.dtype, tuple(a.shape)))
        return eigh(a, *args, **kwargs)

    def spy_qr(a, *args, **kwargs):
        calls.append(("qr", a.dtype, tuple(a.shape)))
        return qr(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", spy_eigh)
    monkeypatch.setattr(torch.linalg, "qr", spy_qr)
    return calls


@pytest.mark.parametrize(
    "dtype, compute", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (DT, DT)]
)
def test_dtypes_and_decomposition_schedule(linalg_calls, dtype, compute):
    num_steps, k = 9, 4
    w0, grads = make_problem([(6, 3)], num_steps, dtype=dtype)
    params, opt, _ = run_optimizer(w0, grads, refresh_every=k, geometry="bi")
    state = opt.state[params[0]]
    for key in ("exp_avg", "exp_avg_sq", "cov_left", "cov_right", "basis_left", "basis_right"):
        assert state[key].dtype == dtype, key
    assert state["step"].dtype == torch.float32
    # eigh once per side at step 1, then qr once per side at steps 4 and 8, all in `compute`.
    assert linalg_calls == [("eigh", compute, (6, 6)), ("eigh", compute, (3, 3))] + 2 * [
        ("qr", compute, (6, 6)),
        ("qr", compute, (3, 3)),
    ]
    assert torch.isfinite(params[0]).all()


def test_float32_close_to_float64_reference():
    # eps=1e-4: in the "bi" geometry the first rotated gradient is diagonal up to rounding,
    # and that rounding noise (1e-8 in float32, 1e-16 in float64) is divided by about eps,
    # so with a tiny eps the two precisions legitimately differ at step 1.
    kw = dict(CASES[0], lr=1e-3, eps=1e-4)
    # Only shapes whose rotated covariances have no null space at step 1: a null-space basis
    # is arbitrary, so float32 and float64 would pick different ones.
    w0, grads = make_problem([(4, 4), (6, 3)], 12)
    w32 = [w.float() for w in w0]
    g32 = [[g.float() for g in step] for step in grads]
    for i, geometry in enumerate(["bi", "uni"]):
        params, _, _ = run_optimizer(w32, g32, geometry=geometry, **kw)
        ref = reference(w0[i], [g[i] for g in grads], geometry=geometry, **kw)
        moved = params[i].detach().double() - w0[i]
        torch.testing.assert_close(moved, ref[-1]["W"] - w0[i], rtol=1e-3, atol=1e-6)


def test_uni_tall_refreshes_only_on_schedule(linalg_calls):
    # cov_beta=0.5 makes the column covariance follow the latest gradients, so a power step
    # at any step would move the basis; it must move only at t = 5 and t = 10.
    k, num_steps = 5, 12
    w0, grads = make_problem([(6, 3)], num_steps, seed=3)
    params = [torch.nn.Parameter(w0[0].clone())]
    opt = BasisRotation(params, refresh_every=k, cov_beta=0.5, geometry="uni")
    bases = []
    for t in range(1, num_steps + 1):
        params[0].grad = grads[t - 1][0]
        opt.step()
        bases.append(opt.state[params[0]]["basis_right"].clone())
    state = opt.state[params[0]]
    assert "cov_left" not in state and "basis_left" not in state
    assert state["cov_right"].shape == (3, 3)
    for t in range(2, num_steps + 1):
        changed = not torch.equal(bases[t - 1], bases[t - 2])
        assert changed == (t % k == 0), t
    assert [c[0] for c in linalg_calls] == ["eigh", "qr", "qr"]


@pytest.mark.parametrize("geometry", ["bi", "uni"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bit_identical(geometry, dtype):
    num_steps, split = 13, 6  # refreshes at t = 8 and 12 happen after the resume
    w0, grads = make_problem(SHAPES, num_steps, dtype=dtype, seed=7)
    # The bias gets no gradient for the first 3 steps: it has no state at first, and then a
    # step count of its own.
    for step_grads in grads[:3]:
        step_grads[3] = None
    kw = dict(lr=1e-2, refresh_every=4, weight_decay=0.01, geometry=geometry)

    full_params, full_opt, _ = run_optimizer(w0, grads, **kw)

    params, opt, _ = run_optimizer(w0, grads[:split], **kw)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = BasisRotation(resumed, **kw)
    opt2.load_state_dict(torch.load(buf))
    for step_grads in grads[split:]:
        for p, gr in zip(resumed, step_grads):
            p.grad = None if gr is None else gr.clone()
        opt2.step()

    for p, q in zip(resumed, full_params):
        assert torch.equal(p, q)
        s, s_full = opt2.state[p], full_opt.state[q]
        assert set(s) == set(s_full)
        for key in s:
            assert s[key].dtype == s_full[key].dtype, key
            assert torch.equal(s[key], s_full[key]), key


@pytest.mark.parametrize(
    "kwargs, name, bad",
    [
        (dict(lr=-1.0), "learning rate", "-1.0"),
        (dict(betas=(1.0, 0.999)), "beta", "1.0"),
        (dict(betas=(0.9, -0.1)), "beta", "-0.1"),
        (dict(eps=-1e-8), "epsilon", "-1e-08"),
        (dict(weight_decay=-0.5), "weight_decay", "-0.5"),
        (dict(refresh_every=0), "refresh_every", "0"),
        (dict(refresh_every=2.5), "refresh_every", "2.5"),
        (dict(refresh_every=True), "refresh_every", "True"),
        (dict(cov_beta=1.0), "cov_beta", "1.0"),
        (dict(cov_beta=-0.2), "cov_beta", "-0.2"),
        (dict(geometry="tri"), "geometry", "'tri'"),
    ],
)
def test_invalid_arguments(kwargs, name, bad):
    with pytest.raises(ValueError, match=re.escape(bad)) as info:
        BasisRotation([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    assert name in str(info.value)


def test_sparse_gradient_raises():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        BasisRotation([p]).step()


@pytest.mark.parametrize("geometry", ["bi", "uni"])
def test_decreases_least_squares(geometry):
    # Sanity only: the equivalence test above is the evidence that the update is right.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 8, generator=g, dtype=DT)
    b = torch.randn(20, 5, generator=g, dtype=DT)
    w = torch.nn.Parameter(torch.zeros(8, 5, dtype=DT))
    bias = torch.nn.Parameter(torch.zeros(5, dtype=DT))
    opt = BasisRotation([w, bias], lr=0.05, refresh_every=5, geometry=geometry)

    def closure():
        opt.zero_grad()
        loss = ((a @ w + bias - b) ** 2).mean()
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(200):
        opt.step(closure)
    last = closure().item()
    optimum = torch.linalg.lstsq(torch.cat([a, torch.ones(20, 1, dtype=DT)], 1), b).solution
    best = ((torch.cat([a, torch.ones(20, 1, dtype=DT)], 1) @ optimum - b) ** 2).mean().item()
    assert last - best < 0.05 * (first - best)
