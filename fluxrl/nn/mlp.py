"""MLPs and ensembles, shaped as in the FQL / OGBench reference code.

- Dense kernels use variance_scaling(scale, "fan_avg", "uniform"); biases start at zero.
- GELU activations. When layer_norm is on, LayerNorm comes *after* the activation of each hidden layer
  (the output layer gets neither, unless activate_final is set, in which case it gets both).
- Ensembles are `nn.vmap` over a leading member axis: each member has its own parameters (stacked along axis 0)
  and sees the same input.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp


def default_init(scale: float = 1.0) -> Callable:
    """The reference code's kernel initialiser: uniform with variance scale / fan_avg."""
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


class MLP(nn.Module):
    """Dense layers of sizes `hidden_dims` (the last entry is the output size)."""

    hidden_dims: Sequence[int]
    activate_final: bool = False
    layer_norm: bool = False
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.gelu
    kernel_init: Any = default_init()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i, size in enumerate(self.hidden_dims):
            x = nn.Dense(size, kernel_init=self.kernel_init)(x)
            if i + 1 < len(self.hidden_dims) or self.activate_final:
                x = self.activation(x)
                if self.layer_norm:
                    x = nn.LayerNorm()(x)
        return x


def ensemblize(module_cls: type[nn.Module], num_members: int) -> type[nn.Module]:
    """A module class whose instances hold `num_members` independent copies of `module_cls`.

    Inputs are shared (not split); outputs gain a leading member axis of size `num_members`."""
    return nn.vmap(
        module_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=None,
        out_axes=0,
        axis_size=num_members,
    )
