"""Value / critic ensembles, flow vector fields and Gaussian actors (the reference code's network shapes)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxrl.nn.distributions import DiagGaussian
from fluxrl.nn.mlp import MLP, default_init, ensemblize


class Value(nn.Module):
    """V(s) or Q(s, a): an MLP on concat(s, a) with a scalar output.

    With num_ensembles > 1 the output has a leading member axis: (num_ensembles, *batch); else (*batch,)."""

    hidden_dims: Sequence[int]
    layer_norm: bool = True
    num_ensembles: int = 2

    @nn.compact
    def __call__(self, observations: jax.Array, actions: jax.Array | None = None) -> jax.Array:
        inputs = observations if actions is None else jnp.concatenate([observations, actions], axis=-1)
        mlp_cls = ensemblize(MLP, self.num_ensembles) if self.num_ensembles > 1 else MLP
        return mlp_cls((*self.hidden_dims, 1), activate_final=False, layer_norm=self.layer_norm)(inputs)[..., 0]


class VectorField(nn.Module):
    """v(s, x, t): an MLP on concat(s, x, t) with the raw scalar time as one input (no time embedding), as in
    FQL. Its output has x's size. With times=None it is a map (s, z) -> action: FQL's one-step policy."""

    hidden_dims: Sequence[int]
    layer_norm: bool = False

    @nn.compact
    def __call__(self, observations: jax.Array, x: jax.Array, times: jax.Array | float | None = None) -> jax.Array:
        inputs = [observations, x]
        if times is not None:
            t = jnp.asarray(times, x.dtype)
            if t.ndim == x.ndim - 1 and t.ndim > 0:  # one time per row, given as shape (*batch,)
                t = t[..., None]
            inputs.append(jnp.broadcast_to(t, (*x.shape[:-1], 1)))
        return MLP((*self.hidden_dims, x.shape[-1]), activate_final=False, layer_norm=self.layer_norm)(
            jnp.concatenate(inputs, axis=-1)
        )


class GaussianActor(nn.Module):
    """pi(a|s) = N(mean(s), diag(std²)), optionally tanh-squashed.

    std: const_std=True fixes log std = 0 (std 1); otherwise log stds are learned, state-dependent or not.
    Log stds are clipped to [log_std_min, log_std_max]. The mean layer starts small (final_fc_init_scale)."""

    hidden_dims: Sequence[int]
    action_dim: int
    layer_norm: bool = False
    log_std_min: float = -5.0
    log_std_max: float = 2.0
    tanh_squash: bool = False
    state_dependent_std: bool = False
    const_std: bool = True
    final_fc_init_scale: float = 1e-2

    @nn.compact
    def __call__(self, observations: jax.Array, temperature: float = 1.0) -> DiagGaussian:
        features = MLP(self.hidden_dims, activate_final=True, layer_norm=self.layer_norm)(observations)
        means = nn.Dense(self.action_dim, kernel_init=default_init(self.final_fc_init_scale), name="mean_net")(
            features
        )
        if self.state_dependent_std:
            log_stds = nn.Dense(
                self.action_dim, kernel_init=default_init(self.final_fc_init_scale), name="log_std_net"
            )(features)
        elif self.const_std:
            log_stds = jnp.zeros_like(means)
        else:
            log_stds = self.param("log_stds", nn.initializers.zeros, (self.action_dim,))
        log_stds = jnp.clip(log_stds, self.log_std_min, self.log_std_max)
        return DiagGaussian(means, jnp.exp(log_stds) * temperature, tanh=self.tanh_squash)
