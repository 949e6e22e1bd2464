"""Interpolation paths between noise x0 (t = 0) and data x1 (t = 1)."""

from __future__ import annotations

import jax


def linear_path(x0: jax.Array, x1: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The linear (rectified-flow / OT) path: x_t = (1 - t) x0 + t x1 and its conditional velocity x1 - x0.

    t must broadcast against x0, e.g. shape (batch, 1)."""
    return (1.0 - t) * x0 + t * x1, x1 - x0
