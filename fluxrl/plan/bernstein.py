"""Bernstein polynomial trajectories: x(t) = sum_k c_k B_k^n((t - t0) / (t1 - t0)), with the matrices that map the
n + 1 coefficients to positions, velocities and accelerations at sample times (as Flow-Opt's precursor SwarmGen
parametrises each robot's path: order 10, 50 samples over 5 s)."""

from __future__ import annotations

import numpy as np
from scipy.special import comb


def _basis(order: int, tau: np.ndarray) -> np.ndarray:
    if order < 0:
        return np.zeros((tau.size, 0))
    k = np.arange(order + 1)
    return comb(order, k) * tau[:, None] ** k * (1.0 - tau[:, None]) ** (order - k)


def _derivative(order: int, lower: np.ndarray) -> np.ndarray:
    """d/dtau of the order-n basis from the order-(n-1) one: n (B_{k-1}^{n-1} - B_k^{n-1})."""
    out = np.zeros((lower.shape[0], order + 1))
    out[:, 1:] += lower
    out[:, :-1] -= lower
    return order * out


def bernstein_matrices(order: int, times, t0: float | None = None, t1: float | None = None):
    """(P, Pdot, Pddot), each (len(times), order + 1), float64: positions, first and second time derivatives at
    `times` of the order-`order` Bernstein basis on [t0, t1] (default: the first and last time)."""
    times = np.asarray(times, np.float64).reshape(-1)
    t0 = times[0] if t0 is None else t0
    t1 = times[-1] if t1 is None else t1
    scale = 1.0 / (t1 - t0)
    tau = (times - t0) * scale
    p = _basis(order, tau)
    pdot = _derivative(order, _basis(order - 1, tau)) * scale
    if order >= 2:
        inner = _derivative(order - 1, _basis(order - 2, tau))
        pddot = _derivative(order, inner) * scale**2
    else:
        pddot = np.zeros_like(p)
    return p, pdot, pddot
