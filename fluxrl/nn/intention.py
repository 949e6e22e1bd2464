"""The intention encoder of InFOM: p_e(z | s', a'), a diagonal Gaussian over latent intentions.

Shape as the official code's IntentionEncoder (chongyi-zheng/infom, utils/networks.py): an MLP on concat(s', a')
with activate_final=True (LayerNorm after every activation when layer_norm is on), then two Dense heads for the
mean and the log std, both with the default variance-scaling init. The log std is *not* clipped (as in the
official code).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxrl.nn.distributions import DiagGaussian
from fluxrl.nn.mlp import MLP, default_init


class IntentionEncoder(nn.Module):
    hidden_dims: Sequence[int]
    latent_dim: int
    layer_norm: bool = True

    @nn.compact
    def __call__(self, observations: jax.Array, actions: jax.Array) -> DiagGaussian:
        features = MLP(self.hidden_dims, activate_final=True, layer_norm=self.layer_norm)(
            jnp.concatenate([observations, actions], axis=-1)
        )
        means = nn.Dense(self.latent_dim, kernel_init=default_init(), name="mean_net")(features)
        log_stds = nn.Dense(self.latent_dim, kernel_init=default_init(), name="log_std_net")(features)
        return DiagGaussian(means, jnp.exp(log_stds))


def kl_to_standard_normal(dist: DiagGaussian) -> jax.Array:
    """KL(N(mu, diag sigma²) || N(0, I)) per latent dimension (not summed): ½(mu² + sigma² - 1) - log sigma.

    This is the corrected formula of the official code (commit 04712b0, issue #2); the released code used
    log sigma where 2 log sigma belongs."""
    log_std = jnp.log(dist.scale)
    return 0.5 * (dist.loc**2 + dist.scale**2 - 1.0) - log_std
