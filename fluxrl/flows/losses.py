"""Flow-matching losses."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fluxrl.flows.paths import linear_path

# velocity_fn(observations, x_t, t) -> predicted velocity, same shape as x_t; t has shape (*batch, 1).
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def flow_matching_errors(velocity_fn: VelocityFn, observations: jax.Array, actions: jax.Array, key: jax.Array):
    """Per-sample conditional flow-matching error on the linear path, averaged over action dims:
    mean_d (v(s, x_t, t) - (a - x0))², with x0 ~ N(0, I), t ~ U[0, 1], x_t = (1 - t) x0 + t a. Shape (*batch,).

    The mean over action dims (not the sum) is the FQL convention; weights such as FQL's alpha assume it."""
    x_key, t_key = jax.random.split(key)
    x0 = jax.random.normal(x_key, actions.shape, actions.dtype)
    t = jax.random.uniform(t_key, (*actions.shape[:-1], 1), actions.dtype)
    x_t, target = linear_path(x0, actions, t)
    return jnp.mean((velocity_fn(observations, x_t, t) - target) ** 2, axis=-1)


def flow_matching_loss(velocity_fn: VelocityFn, observations: jax.Array, actions: jax.Array, key: jax.Array):
    """The BC flow loss: the mean of `flow_matching_errors` over the batch."""
    return jnp.mean(flow_matching_errors(velocity_fn, observations, actions, key))
