"""A diagonal Gaussian, optionally squashed by tanh (what the Gaussian actors return).

Written here because the reference code's distrax is not a dependency; the formulas are the standard ones.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

_LOG_2PI = math.log(2.0 * math.pi)


class DiagGaussian(flax.struct.PyTreeNode):
    """N(loc, diag(scale²)) over the last axis; with tanh=True the variable is tanh of that Gaussian."""

    loc: jax.Array
    scale: jax.Array  # broadcastable to loc
    tanh: bool = flax.struct.field(pytree_node=False, default=False)

    def mode(self) -> jax.Array:
        """The Gaussian's mean (squashed when tanh=True, as the reference code's mode())."""
        return jnp.tanh(self.loc) if self.tanh else self.loc

    def sample(self, key: jax.Array) -> jax.Array:
        u = self.loc + jnp.broadcast_to(self.scale, self.loc.shape) * jax.random.normal(key, self.loc.shape)
        return jnp.tanh(u) if self.tanh else u

    def log_prob(self, x: jax.Array, eps: float = 1e-6) -> jax.Array:
        """Log density of x, summed over the last axis. With tanh, x is clipped to ±(1 - eps) before atanh."""
        if self.tanh:
            x = jnp.clip(x, -1.0 + eps, 1.0 - eps)
            u = jnp.arctanh(x)
            # log|d tanh(u)/du| = log(1 - tanh(u)²) = 2 (log 2 - u - softplus(-2u)), stable for large |u|.
            log_det = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))
            return self._gaussian_log_prob(u) - log_det.sum(-1)
        return self._gaussian_log_prob(x)

    def _gaussian_log_prob(self, u: jax.Array) -> jax.Array:
        scale = jnp.broadcast_to(self.scale, self.loc.shape)
        z = (u - self.loc) / scale
        return (-0.5 * z**2 - jnp.log(scale) - 0.5 * _LOG_2PI).sum(-1)
