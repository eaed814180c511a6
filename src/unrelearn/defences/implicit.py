"""Implicit differentiation through a proximal model of fine-tuning (ResAlign's hypergradient).

Fine-tuning from ``theta`` is modelled as the proximal point (the minimizer inside the Moreau
envelope of ``L_FT``)

    theta_FT*(theta) = argmin_t  L_FT(t) + ||t - theta||^2 / (2 gamma).

Its stationarity condition ``grad L_FT(theta_FT*) + (theta_FT* - theta) / gamma = 0``,
differentiated in ``theta``, gives ``d theta_FT* / d theta = (I + gamma H)^-1`` with ``H`` the
Hessian of ``L_FT`` at ``theta_FT*``. The gradient of any ``L(theta_FT*(theta))`` is therefore

    x = (I + gamma H)^-1 b,    b = grad L(theta_FT*),

solved here by (relaxed) Richardson iteration ``x <- x + omega (b - (I + gamma H) x)``; with
``omega = 1`` this is the ResAlign paper's ``x <- b - gamma H x`` (the paper writes
``gamma b - gamma H x``, which solves for ``gamma x``: the factor is absorbed in beta). Only
Hessian-vector products are needed; no fine-tuning trajectory is stored.

The iteration converges when ``0 < omega (1 + gamma lambda) < 2`` for every eigenvalue
``lambda`` of ``H``; ``H`` is symmetric, so the residual's norm then shrinks every step. When it grows, the step ``omega`` is halved (and recorded); an
``H`` with eigenvalues below ``-1 / gamma`` makes ``I + gamma H`` indefinite, and no step size
helps: such a solve ends unconverged and says so, it is never replaced by something else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Params = dict[str, torch.Tensor]


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in a)  # type: ignore[return-value]


def norm(a: Mapping[str, torch.Tensor]) -> float:
    return float(torch.sqrt(_dot(a, a))) if a else 0.0


class HessianOperator:
    """``v -> H v`` for ``H`` the Hessian of ``loss_fn`` at ``params``.

    The gradient is taken once with its graph; every product is one more backward pass through
    that graph (reverse over reverse), so K products cost one forward, one backward and K double
    backwards. Needs attention with a double backward (:func:`unrelearn.model.differentiable_attention`).
    """

    def __init__(self, loss_fn: Callable[[Params], torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
        self.leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        loss = loss_fn(self.leaves)
        grads = torch.autograd.grad(loss, list(self.leaves.values()), create_graph=True, allow_unused=True)
        self.loss = float(loss.detach())
        self.grads = {n: g for n, g in zip(self.leaves, grads) if g is not None and g.requires_grad}
        self.products = 0

    def __call__(self, vector: Mapping[str, torch.Tensor]) -> Params:
        self.products += 1
        if not self.grads:  # L_FT is linear (or constant) in these parameters: H = 0
            return {n: torch.zeros_like(p) for n, p in self.leaves.items()}
        dot = sum((g * vector[n].to(g.dtype)).sum() for n, g in self.grads.items())
        names = list(self.grads)
        products = torch.autograd.grad(dot, [self.leaves[n] for n in names], retain_graph=True, allow_unused=True)
        by_name = dict(zip(names, products))
        return {n: torch.zeros_like(p) if by_name.get(n) is None else by_name[n] for n, p in self.leaves.items()}


@dataclass
class SolveResult:
    """The solution of ``(I + gamma H) x = b`` and how the solve went.

    ``residuals`` holds ``||(I + gamma H) x - b|| / ||b||`` of every iterate evaluated (the first
    is ``x = b``, the first-order answer); ``dampings`` counts the halvings of ``step_size``.
    """

    x: Params
    residuals: list[float] = field(default_factory=list)
    step_size: float = 1.0
    dampings: int = 0
    converged: bool = True
    residual: float = 0.0  # of the returned x


def richardson_solve(
    hessian: Callable[[Mapping[str, torch.Tensor]], Params],
    b: Mapping[str, torch.Tensor],
    gamma: float,
    iterations: int = 5,
    tolerance: float = 0.1,
    step_size: float = 1.0,
) -> SolveResult:
    """``x = (I + gamma H)^-1 b`` from ``iterations`` Richardson updates (``iterations + 1``
    Hessian-vector products: the last measures the residual of the final iterate).

    An update that increases the residual is undone and retried with half the step size. The
    result is the iterate with the smallest residual; ``converged`` says whether that residual
    is at most ``tolerance``.
    """
    b = {n: v.detach() for n, v in b.items()}
    b_norm = norm(b)
    if b_norm == 0.0:
        return SolveResult({n: torch.zeros_like(v) for n, v in b.items()}, [0.0], step_size)

    def residual_of(x: Params) -> Params:
        hx = hessian(x)
        return {n: b[n] - x[n] - gamma * hx[n] for n in b}

    # Below this the residual is rounding noise, whose wobble must not read as divergence.
    floor = 100 * max(torch.finfo(v.dtype).eps for v in b.values())
    x = dict(b)
    r = residual_of(x)
    r_norm = norm(r)
    result = SolveResult(x, [r_norm / b_norm], step_size)
    for _ in range(iterations):
        if r_norm <= floor * b_norm:
            break
        candidate = {n: x[n] + result.step_size * r[n] for n in b}
        r_candidate = residual_of(candidate)
        candidate_norm = norm(r_candidate)
        result.residuals.append(candidate_norm / b_norm)
        if not candidate_norm < r_norm:  # growth (or NaN): the step overshoots an eigenvalue
            result.step_size /= 2
            result.dampings += 1
            continue
        x, r, r_norm = candidate, r_candidate, candidate_norm
    result.x = x
    result.residual = r_norm / b_norm
    result.converged = result.residual <= tolerance
    return result
