"""Flow behaviour cloning: FQL's BC flow on its own (no critic).

  L_BC = mean ||v(s, x_t, t) - (a - x_0)||²,  x_t = (1 - t) x_0 + t a,  x_0 ~ N(0, I), t ~ U[0, 1]
  (mean over batch and action dims; exactly FQL's bc_flow_loss, same network: 4x512 MLP on concat(s, x, t)).
Acting: flow_steps Euler steps from z ~ N(0, I), clipped to [-1, 1]; deterministic=True starts from z = 0.

The official FQL repository has no stand-alone flow-BC agent; this is its BC-flow component with the same
defaults (lr 3e-4, batch 256, 10 Euler steps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fluxrl.agents.base import AgentState, BatchSpec, check_preset, create_state, example_dims, gradient_step
from fluxrl.errors import FluxrlError
from fluxrl.flows import euler, flow_matching_loss
from fluxrl.nn import VectorField

NAME = "flow_bc"
EVAL_DETERMINISTIC = False  # a flow policy is evaluated by sampling, like FQL's


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)
    actor_layer_norm: bool = False
    flow_steps: int = 10


PRESETS = {"paper": Config(), "cpu": Config(actor_hidden=(256, 256))}


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """Behaviour cloning has no per-task values."""
    check_preset(PRESETS, preset)
    return config


BATCH_SPEC = BatchSpec(keys=("observations", "actions"))


def flow_network(config) -> VectorField:
    """The BC flow v(s, x, t) (FQL's `actor_bc_flow`; any config with actor_hidden / actor_layer_norm)."""
    return VectorField(config.actor_hidden, layer_norm=config.actor_layer_norm)


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    if config.flow_steps < 1:
        raise FluxrlError(f"flow_bc config field flow_steps is {config.flow_steps}; it must be at least 1.")
    obs, actions, action_dim = example_dims(example_batch)
    params = {"actor_bc_flow": flow_network(config).init(key, obs, actions, actions[:, :1])["params"]}
    return create_state(params, {}, config, action_dim)


def bc_flow_loss(flow_params, batch, key, config) -> jax.Array:
    """L_BC of the flow at `flow_params` on the batch's (observations, actions)."""

    def velocity(s, x, t):
        return flow_network(config).apply({"params": flow_params}, s, x, t)

    return flow_matching_loss(velocity, batch["observations"], batch["actions"], key)


def total_loss(params, state: AgentState, batch, key):
    loss = bc_flow_loss(params["actor_bc_flow"], batch, key, state.config)
    return loss, {"actor/bc_flow_loss": loss}


def update(state: AgentState, batch, key):
    params, opt_state, metrics = gradient_step(state, lambda p: total_loss(p, state, batch, key))
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def loss_metrics(state: AgentState, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def sample_flow(flow_params, observations, noises, config) -> jax.Array:
    """flow_steps Euler steps of the flow from `noises`, clipped to [-1, 1]."""

    def velocity(x, t):
        return flow_network(config).apply({"params": flow_params}, observations, x, t)

    return euler(velocity, noises, config.flow_steps, clip=(-1.0, 1.0))


def act(state: AgentState, observations, key, deterministic=False):
    noises = jax.random.normal(key, (*observations.shape[:-1], state.action_dim))
    noises = jnp.where(deterministic, jnp.zeros_like(noises), noises)
    return sample_flow(state.params["actor_bc_flow"], observations, noises, state.config)
