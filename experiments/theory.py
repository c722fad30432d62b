"""Experiment (e): the paper's convergence setting -- DelayedNesterov with the `theory` momentum
schedule on convex quadratics with a fixed gradient delay, against the same without the
(1 - gamma) discount and against delayed plain gradient descent.

    nice -n 10 python experiments/theory.py --steps 20000 --delays 0,1,4,16 --out docs/results

Setting (Ajanthan et al., ICML 2025, Eq. 10 and its sublinear-rate result: convex, smooth,
fixed delay tau, deterministic gradients). The objective is f(w) = 0.5 (w - w*)^T A (w - w*),
f* = 0, L = largest eigenvalue of A = 1, ||w*|| = 1, w_0 = 0. Two problems:

- `diag`: d = 200, A = diag(1/i^2), condition number 4e4 (ill-conditioned, smallest
  eigenvalue 2.5e-5, so for these run lengths it behaves as merely convex);
- `lsq`: least squares with the Gram matrix A = X^T X / n of a square Gaussian X (200 x 200),
  rescaled to L = 1; its smallest eigenvalues crowd towards 0 (hard edge of the
  Marchenko-Pastur law), so it is also effectively only convex over these run lengths.

Step t (1-based) of an optimizer gets the gradient taken at the parameters after step
t-1-tau (the initial ones while t-1-tau < 0): the stage-0 view of a pipeline with delay tau.
DelayedNesterov's parameters are the look-ahead points y_t = w_{t+1} + gamma_{t+1}(w_{t+1}-w_t);
the iterate w is recovered from them (w_{t+1} = (y_t + gamma_{t+1} w_t) / (1 + gamma_{t+1}))
and, as a check, compared with a direct implementation of Eq. 10 in w coordinates. We plot
t * (f(w_t) - f*): bounded means a O(1/t) rate.

Learning rates: for each delay, every method runs on a grid eta = L^-1 * {1, 1/2, ..., 1/256};
the plots and the table show, per delay and method, the eta of the grid with the smallest
final gap among the runs that still converge (`stable`), i.e. each method tuned.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

from pipenag.optim import DelayedNesterov
from pipenag.optim.delayed_nesterov import momentum_at

METHODS = {
    "nesterov": "DelayedNesterov, theory schedule, (1 - gamma_t) discount: the paper's Eq. 10",
    "nesterov-nodiscount": "DelayedNesterov, theory schedule, discount=False (classical NAG, stale gradient)",
    "sgd": "plain gradient descent with the same stale gradient",
}
LR_GRID = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]


def make_problem(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, w*) in float64, L = 1, ||w*|| = 1."""
    gen = torch.Generator().manual_seed(seed)
    if name == "diag":
        d = 200
        A = torch.diag(torch.tensor([1.0 / (i * i) for i in range(1, d + 1)], dtype=torch.float64))
    elif name == "lsq":
        n, d = 200, 200
        X = torch.randn(n, d, generator=gen, dtype=torch.float64)
        A = X.T @ X / n
        A = A / torch.linalg.eigvalsh(A).max()
    else:
        raise ValueError(f"problem={name!r}: expected 'diag' or 'lsq'")
    w_star = torch.randn(A.shape[0], generator=gen, dtype=torch.float64)
    return A, w_star / w_star.norm()


def gap(A: torch.Tensor, w_star: torch.Tensor, w: torch.Tensor) -> float:
    e = w - w_star
    return 0.5 * float(e @ (A @ e))


def run(method: str, A: torch.Tensor, w_star: torch.Tensor, tau: int, lr: float, steps: int,
        record_every: int = 1) -> dict:
    """Run `steps` delayed steps of one of METHODS.

    Returns:
        {"t": [...], "gap": [...], "max_w_error": float}: the optimality gap of the iterate after
        t steps (t = 0 is the start), and for the nesterov methods the largest (relative)
        difference between the iterate recovered from the optimizer and the direct recursion
        in w coordinates (Eq. 10, or Eq. 10 with the discount factor 1).
    """
    d = A.shape[0]
    p = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    nesterov = method.startswith("nesterov")
    discount = method == "nesterov"
    if nesterov:
        opt = DelayedNesterov([p], lr=lr, momentum_schedule="theory", discount=discount, foreach=False)
    else:
        opt = torch.optim.SGD([p], lr=lr)
    history = [p.detach().clone()]  # parameters after step s, s = 0, 1, ...
    w = p.detach().clone()  # the iterate (w_{t+1} in the paper's numbering after t steps)
    # Direct Eq. 10: w_{t+1} = w_t + d_t - lr (1 - g_t) grad f(w_{t-tau} + d_{t-tau}).
    eq_prev, eq_cur, looks = w.clone(), w.clone(), []
    ts, gaps, max_err = [0], [gap(A, w_star, w)], 0.0
    start_gap = gaps[0]
    for t in range(1, steps + 1):
        src = history[max(0, t - 1 - tau)]
        p.grad = A @ (src - w_star)
        opt.step()
        y = p.detach().clone()
        history.append(y)
        if len(history) > tau + 2:
            history[-(tau + 3)] = None  # only the last tau + 1 versions are read again
        if nesterov:
            g_next = momentum_at(t + 1, "theory", 0.0)
            w = (y + g_next * w) / (1.0 + g_next)
            g_t = momentum_at(t, "theory", 0.0)
            look = eq_cur + g_t * (eq_cur - eq_prev)
            looks.append(look)
            stale = looks[max(0, t - 1 - tau)]
            c = (1.0 - g_t) if discount else 1.0
            eq_prev, eq_cur = eq_cur, look - lr * c * (A @ (stale - w_star))
            if len(looks) > tau + 2:
                looks[-(tau + 3)] = None
            scale = max(1.0, float(eq_cur.abs().max()))
            max_err = max(max_err, float((w - eq_cur).abs().max()) / scale)
        else:
            w = y
        if t % record_every == 0 or t == steps:
            g = gap(A, w_star, w)
            ts.append(t)
            gaps.append(g)
            if not math.isfinite(g) or g > 1e6 * start_gap:
                break
    return {"t": ts, "gap": gaps, "max_w_error": max_err}


def stable(result: dict, steps: int) -> bool:
    """Finished all steps with a finite gap that still shrinks: the largest gap in the last
    quarter of the run is below 0.9 x the largest in the second quarter and below the start.
    (An O(1/t) method gives a ratio near 1/3; a marginally stable oscillation, such as delayed
    SGD at lr = 1/L with tau = 1, gives 1 and fails.)"""
    t, g = result["t"], result["gap"]
    if t[-1] != steps or not all(math.isfinite(x) for x in g):
        return False
    second = [x for s, x in zip(t, g) if steps / 4 <= s < steps / 2]
    last = [x for s, x in zip(t, g) if s >= 3 * steps / 4]
    return max(last) < 0.9 * max(second) and max(last) < g[0]


def tail_max(result: dict, fraction: float = 0.25) -> float:
    """max of t * gap over the last `fraction` of the run."""
    T = result["t"][-1]
    return max(s * x for s, x in zip(result["t"], result["gap"]) if s >= (1 - fraction) * T)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--delays", default="0,1,4,16")
    parser.add_argument("--problems", default="diag,lsq")
    parser.add_argument("--record-every", type=int, default=7)
    parser.add_argument("--out", default="runs/theory", help="folder for theory.json and the PNGs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    delays = [int(x) for x in args.delays.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"steps": args.steps, "lr_grid": LR_GRID, "python": platform.python_version(),
                     "torch": torch.__version__, "problems": {}}
    for prob in args.problems.split(","):
        A, w_star = make_problem(prob)
        per_prob = results["problems"][prob] = {}
        for tau in delays:
            for method in METHODS:
                grid, best_lr, best_curve = {}, None, None
                for lr in LR_GRID:
                    r = run(method, A, w_star, tau, lr, args.steps, args.record_every)
                    ok = stable(r, args.steps)
                    grid[lr] = {"stable": ok, "final_gap": r["gap"][-1], "final_t": r["t"][-1],
                                "max_w_error": r["max_w_error"]}
                    if ok and (best_curve is None or r["gap"][-1] < best_curve["gap"][-1]):
                        best_lr, best_curve = lr, r
                per_prob[f"{method} tau={tau}"] = {"method": method, "tau": tau, "lr": best_lr,
                                                   "curve": best_curve, "grid": grid}
                best = per_prob[f"{method} tau={tau}"]
                if best["lr"] is None:
                    print(f"{prob} {method:19s} tau={tau:2d}: unstable at every lr of the grid", flush=True)
                    continue
                c = best["curve"]
                best["tail_max_t_gap"] = tail_max(c)
                half = {"t": [t for t in c["t"] if t <= args.steps // 2],
                        "gap": c["gap"][:len([t for t in c["t"] if t <= args.steps // 2])]}
                print(f"{prob} {method:19s} tau={tau:2d}: lr {best['lr']:.4g} (best stable), "
                      f"max t*gap over t in [{3 * args.steps // 8}, {args.steps // 2}]: {tail_max(half):.4g}, "
                      f"over [{3 * args.steps // 4}, {args.steps}]: {best['tail_max_t_gap']:.4g}, final gap "
                      f"{c['gap'][-1]:.3e}, max |w - Eq.10| {c['max_w_error']:.1e}", flush=True)
    (out / "theory.json").write_text(json.dumps(results) + "\n")
    plot(results, out)
    return 0


def plot(results: dict, out: Path) -> None:
    """One figure per problem, one panel per delay, t * gap of each method (its best lr)."""
    from pipenag.plots import plot_panels

    for prob, per_prob in results["problems"].items():
        panels: dict[str, dict] = {}
        for best in per_prob.values():
            c = best["curve"]
            if c is None:
                continue
            panel = panels.setdefault(f"delay tau = {best['tau']}", {})
            panel[f"{best['method']} (lr {best['lr']:g})"] = (
                c["t"][1:], [t * max(g, 1e-300) for t, g in zip(c["t"][1:], c["gap"][1:])])
        plot_panels(panels, out / f"exp_e_theory_{prob}.png", xlabel="step t", ylabel="t * (f(w_t) - f*)",
                    title=f"{prob}: t * optimality gap (each method at its best stable lr)",
                    logx=True, logy=True)


if __name__ == "__main__":
    sys.exit(main())
