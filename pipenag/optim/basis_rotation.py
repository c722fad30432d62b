"""Adam in the eigenbasis of each weight matrix's gradient covariance (basis rotation).

    from pipenag.optim import BasisRotation
    opt = BasisRotation(model.parameters(), lr=1e-3, refresh_every=10, geometry="bi")
    pipenag train --method basis-rotation --stages 8      # on the blocks' matrices, AdamW elsewhere

Jung, Shin, Lee, "Basis rotation for asynchronous pipeline parallelism", ICML 2026,
arXiv 2602.03515. The second moment of Adam is kept in a basis that (approximately)
diagonalises the gradient covariance of each matrix, as in SOAP; the paper shows that this
makes Adam far less sensitive to the gradient staleness of asynchronous pipelines. The
optimizer only sees the gradients it is handed; weight stashing lives in the engine.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["BasisRotation", "GEOMETRIES"]

GEOMETRIES = ("bi", "uni")


class BasisRotation(Optimizer):
    r"""Adam whose second moment lives in the eigenbasis of the gradient covariance.

    For a 2-D parameter W (m x n) with gradient G, at every step (t counts from 1;
    M, V are m x n, the covariances L (m x m) and R (n x n) start at zero, the bases
    QL, QR are unset until the first step)::

        t <- t + 1;  b <- cov_beta if given else beta2
        L <- b L + (1 - b) G G^T;   R <- b R + (1 - b) G^T G
        if QL, QR unset:  QL, QR <- eigenvectors of L, R, by descending eigenvalue
        elif t % refresh_every == 0:  for (Q, F) in (QL, L), (QR, R):
            order <- argsort(diag(Q^T F Q), descending)
            permute V along Q's axis (rows for QL, columns for QR) by order
            Q <- qr(F Q[:, order]).Q           one warm-started power-iteration step
        Gr <- QL^T G QR
        M <- beta1 M + (1 - beta1) G           first moment in the original basis
        V <- beta2 V + (1 - beta2) Gr^2        second moment in the rotated basis
        U <- QL ((QL^T M QR) / (sqrt(V) + eps)) QR^T
        W <- W - lr weight_decay W
        W <- W - lr sqrt(1 - beta2^t) / (1 - beta1^t) U

    ``geometry="bi"`` rotates both sides. ``geometry="uni"`` rotates only the side of the
    smaller dimension (the left side, L and QL, when m <= n, so a square matrix rotates its
    rows); the other basis is the identity and its covariance is neither stored nor updated.
    Parameters that are not 2-D get the same update with no rotation (plain AdamW with the
    bias correction folded into the step size).

    The eigendecompositions and QR factorisations run in the parameter's dtype, or in
    float32 for float16/bfloat16 parameters (their results are cast back). All state is kept
    in the parameter's dtype, which is what ``load_state_dict`` casts floating state to, so a
    resumed run continues bit for bit.

    State per parameter (created on its first step with a gradient): ``step`` (a CPU float32
    tensor, like torch's Adam), ``exp_avg`` (M), ``exp_avg_sq`` (V); for rotated sides of a
    matrix also ``cov_left`` (L) / ``cov_right`` (R) and ``basis_left`` (QL) /
    ``basis_right`` (QR). A basis key is absent until it is first computed (in the same step
    in which the state is created). The learning rate is read from ``group["lr"]`` at every
    step, so LR schedulers and the pipeline engine can change it.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate, >= 0.
        betas: (beta1, beta2), the decay rates of M and V, each in [0, 1).
        eps: added to sqrt(V) in the denominator, >= 0.
        weight_decay: decoupled weight decay, >= 0 (multiplies W by 1 - lr * weight_decay).
        refresh_every: refresh the bases (one power-iteration step) when t is a multiple of
            this, an int >= 1.
        cov_beta: decay rate of the covariances, in [0, 1); None uses beta2.
        geometry: "bi" (rotate rows and columns) or "uni" (rotate the smaller side only).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        refresh_every: int = 10,
        cov_beta: float | None = None,
        geometry: str = "bi",
    ) -> None:
        if not (float(lr) >= 0.0 and math.isfinite(float(lr))):
            raise ValueError(f"Invalid learning rate: {lr}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (need two values)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (need 0 <= beta < 1)")
        if not (eps >= 0.0 and math.isfinite(eps)):
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"Invalid refresh_every value: {refresh_every!r} (need an int >= 1)")
        if cov_beta is not None and not 0.0 <= cov_beta < 1.0:
            raise ValueError(f"Invalid cov_beta value: {cov_beta} (need None or 0 <= cov_beta < 1)")
        if geometry not in GEOMETRIES:
            raise ValueError(f"Invalid geometry: {geometry!r}; expected one of {GEOMETRIES}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "refresh_every": refresh_every,
            "cov_beta": cov_beta,
            "geometry": geometry,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            cov_beta = beta2 if group["cov_beta"] is None else group["cov_beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BasisRotation does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state, group["geometry"])
                _basis_rotation_update(
                    p,
                    p.grad,
                    state,
                    lr=float(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    refresh_every=group["refresh_every"],
                    cov_beta=cov_beta,
                )
        return loss

    @staticmethod
    def _init_state(p: Tensor, state: dict, geometry: str) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if p.dim() != 2:
            return
        m, n = p.shape
        # Which covariances exist decides which sides are rotated; the bases are added by
        # the first update, once the covariances hold a gradient.
        if geometry == "bi" or m <= n:
            state["cov_left"] = p.new_zeros(m, m)
        if geometry == "bi" or m > n:
            state["cov_right"] = p.new_zeros(n, n)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """LAPACK-backed factorisations need float32 at least (and half precision is too coarse)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _eigenbasis(cov: Tensor) -> Tensor:
    """Eigenvectors of the symmetric `cov`, columns by descending eigenvalue, in cov's dtype."""
    _, vecs = torch.linalg.eigh(cov.to(_compute_dtype(cov.dtype)))
    # LAPACK hands back column-major factors; the bases are kept row-major so that the
    # matmuls (whose rounding depends on the layout) do not depend on where a basis came
    # from, e.g. a checkpoint that did not keep strides.
    return vecs.flip(1).to(cov.dtype).contiguous()


def _refresh(cov: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """One warm-started power-iteration step on `basis`.

    Returns:
        (order, new_basis): the permutation that sorts the current basis by its Rayleigh
        quotients diag(Q^T F Q), descending, and qr(F Q[:, order]).Q in the basis' dtype.
    """
    dtype = _compute_dtype(cov.dtype)
    f, q = cov.to(dtype), basis.to(dtype)
    fq = f @ q  # (k, k); reused: its columns permuted are F Q[:, order]
    order = torch.argsort((q * fq).sum(0), descending=True)
    new_basis, _ = torch.linalg.qr(fq[:, order])
    return order, new_basis.to(basis.dtype).contiguous()


def _basis_rotation_update(
    p: Tensor,
    g: Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    refresh_every: int,
    cov_beta: float,
) -> None:
    """The class docstring's recursion for one parameter."""
    state["step"] += 1
    t = int(state["step"].item())
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    cov_left, cov_right = state.get("cov_left"), state.get("cov_right")

    if cov_left is not None:
        cov_left.mul_(cov_beta).add_(g @ g.mT, alpha=1.0 - cov_beta)
    if cov_right is not None:
        cov_right.mul_(cov_beta).add_(g.mT @ g, alpha=1.0 - cov_beta)

    # A missing basis means the side has not been decomposed yet (only true at t = 1). Each
    # side tests its own basis: testing an unrotated side's basis would refresh every step.
    for side, cov, axis in (("left", cov_left, 0), ("right", cov_right, 1)):
        if cov is None:
            continue
        key = f"basis_{side}"
        if key not in state:
            state[key] = _eigenbasis(cov)
        elif t % refresh_every == 0:
            # V is indexed by basis vector, so it must follow the basis' new column order.
            order, state[key] = _refresh(cov, state[key])
            exp_avg_sq.copy_(exp_avg_sq.index_select(axis, order))
    basis_left, basis_right = state.get("basis_left"), state.get("basis_right")

    # Not lerp_: at t = 1 this rounds exactly like (1 - beta1) G. In the "bi" geometry the
    # first rotated M is diagonal up to rounding and that noise is divided by about eps, so
    # its rounding shows in the first update (and in comparisons with the plain formula).
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    g_rot = _rotate(g, basis_left, basis_right)
    exp_avg_sq.mul_(beta2).addcmul_(g_rot, g_rot, value=1.0 - beta2)
    # One buffer holds sqrt(V) + eps and then the rotated ratio (out-of-place for M itself,
    # which _rotate returns unchanged for an unrotated parameter).
    ratio = exp_avg_sq.sqrt().add_(eps)
    torch.div(_rotate(exp_avg, basis_left, basis_right), ratio, out=ratio)
    update = _unrotate(ratio, basis_left, basis_right)

    if weight_decay != 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.add_(update, alpha=-lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t))


def _rotate(x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """QL^T x QR, skipping an identity side. May return x itself when both are None."""
    if left is not None:
        x = left.mT @ x
    if right is not None:
        x = x @ right
    return x


def _unrotate(x: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """QL x QR^T, skipping an identity side."""
    if left is not None:
        x = left @ x
    if right is not None:
        x = x @ right.mT
    return x
