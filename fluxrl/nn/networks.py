"""Value / critic ensembles, flow vector fields and Gaussian actors (the reference code's network shapes)."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

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
            inputs.append(_time_column(times, x))
        return MLP((*self.hidden_dims, x.shape[-1]), activate_final=False, layer_norm=self.layer_norm)(
            jnp.concatenate(inputs, axis=-1)
        )


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """[sin(t f_k), cos(t f_k)], f_k = 10000^(-k / (dim/2 - 1)), k < dim/2, zero-padded to an odd dim (Diffusion
    Policy's SinusoidalPosEmb, which GFP's and SFP's official code use). t has shape (..., 1)."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=t.dtype) * (-math.log(10000.0) / max(half - 1, 1)))
    args = t * freqs
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros((*emb.shape[:-1], 1), emb.dtype)], axis=-1)
    return emb


class EmbeddedTimeVectorField(nn.Module):
    """v(s, x, t): an MLP on concat(s, x, sinusoidal(time_scale * t)), output of x's size (GFP's VaBC flow, SFP's
    velocity; SFP's official sin_embedding_scale is the time_scale)."""

    hidden_dims: Sequence[int]
    time_embedding_dim: int
    layer_norm: bool = False
    time_scale: float = 1.0

    @nn.compact
    def __call__(self, observations: jax.Array, x: jax.Array, times: jax.Array) -> jax.Array:
        t = jnp.broadcast_to(jnp.asarray(times, x.dtype), (*x.shape[:-1], 1))
        embedding = sinusoidal_embedding(t * self.time_scale, self.time_embedding_dim)
        return MLP((*self.hidden_dims, x.shape[-1]), layer_norm=self.layer_norm)(
            jnp.concatenate([observations, x, embedding], axis=-1))


def _time_column(times: jax.Array | float, x: jax.Array) -> jax.Array:
    """The time input as one column per row of x; times is a scalar or one time per row, shape (*batch,)."""
    t = jnp.asarray(times, x.dtype)
    if t.ndim == x.ndim - 1 and t.ndim > 0:
        t = t[..., None]
    return jnp.broadcast_to(t, (*x.shape[:-1], 1))


def vector_field_given(vf: VectorField, params: dict, observations: jax.Array) -> Callable[[jax.Array, Any], jax.Array]:
    """(x, t) -> vf.apply({"params": params}, observations, x, t), with the observations' share of the first layer
    (observations @ K_s + b) computed once, here, instead of at every call: a flow that integrates many x for one
    condition (K Euler steps, N Monte-Carlo samples) pays for it once. `observations` need only broadcast against
    x's leading axes, e.g. (B, 1, d) for x of shape (B, N, dx). Equal to vf.apply up to float rounding."""
    mlp = params["MLP_0"]
    kernel, bias = mlp["Dense_0"]["kernel"], mlp["Dense_0"]["bias"]
    d = observations.shape[-1]
    share = observations @ kernel[:d] + bias
    x_kernel, t_kernel = kernel[d:-1], kernel[-1]  # VectorField's input order: (observations, x, t)
    # The rest of the MLP: its layers renumbered from 0, as an MLP one layer shorter names them.
    depth = len(vf.hidden_dims)
    rest = MLP((*vf.hidden_dims[1:], mlp[f"Dense_{depth}"]["kernel"].shape[-1]), layer_norm=vf.layer_norm)
    rest_params = {f"Dense_{i - 1}": mlp[f"Dense_{i}"] for i in range(1, depth + 1)}
    if vf.layer_norm:
        rest_params |= {f"LayerNorm_{i - 1}": mlp[f"LayerNorm_{i}"] for i in range(1, depth)}

    def velocity(x: jax.Array, times: jax.Array | float) -> jax.Array:
        if x.shape[-1] != x_kernel.shape[0]:
            raise ValueError(
                f"x has {x.shape[-1]} features, but this vector field (with times) takes {x_kernel.shape[0]} "
                f"next to the {d} condition features."
            )
        hidden = rest.activation(share + x @ x_kernel + _time_column(times, x) * t_kernel)
        if vf.layer_norm:
            hidden = nn.LayerNorm().apply({"params": mlp["LayerNorm_0"]}, hidden)
        return rest.apply({"params": rest_params}, hidden)

    return velocity


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
