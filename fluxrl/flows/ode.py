"""Fixed-step ODE integrators for flow sampling, written with lax.scan (one compiled step, any step count)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# velocity_fn(x, t) -> dx/dt, same shape as x; t is a scalar array (vector fields broadcast it per row).
OdeFn = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("euler", "midpoint")


def integrate(
    velocity_fn: OdeFn,
    x0: jax.Array,
    num_steps: int,
    method: str = "euler",
    t0: float = 0.0,
    t1: float = 1.0,
    clip: tuple[float, float] | None = None,
    clip_every_step: bool = False,
    return_path: bool = False,
):
    """Integrate dx/dt = velocity_fn(x, t) from t0 to t1 in `num_steps` equal steps.

    euler:    x <- x + h v(x, t_i),                           t_i = t0 + (t1 - t0) i / num_steps
    midpoint: x <- x + h v(x + h/2 v(x, t_i), t_i + h/2)
    clip=(lo, hi) clips the result (FQL clips the final action to [-1, 1]); with clip_every_step it also clips
    after every step. return_path=True also returns the states before each step, shape (num_steps, *x0.shape).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown ODE method '{method}'; known: {', '.join(METHODS)}.")
    h = (t1 - t0) / num_steps

    def step(x, i):
        t = t0 + (t1 - t0) * (i / num_steps)
        if method == "euler":
            x_next = x + h * velocity_fn(x, t)
        else:
            x_mid = x + (0.5 * h) * velocity_fn(x, t)
            x_next = x + h * velocity_fn(x_mid, t + 0.5 * h)
        if clip is not None and clip_every_step:
            x_next = jnp.clip(x_next, *clip)
        return x_next, x

    x1, path = jax.lax.scan(step, x0, jnp.arange(num_steps, dtype=x0.dtype))
    if clip is not None:
        x1 = jnp.clip(x1, *clip)
    return (x1, path) if return_path else x1


def euler(velocity_fn: OdeFn, x0: jax.Array, num_steps: int, **kwargs):
    """Euler integration from t = 0 to 1 (see `integrate`)."""
    return integrate(velocity_fn, x0, num_steps, method="euler", **kwargs)


def midpoint(velocity_fn: OdeFn, x0: jax.Array, num_steps: int, **kwargs):
    """Explicit midpoint (RK2) integration from t = 0 to 1 (see `integrate`)."""
    return integrate(velocity_fn, x0, num_steps, method="midpoint", **kwargs)
