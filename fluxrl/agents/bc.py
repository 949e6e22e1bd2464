"""Gaussian behaviour cloning: maximum likelihood of the data actions under pi(a|s) = N(mean(s), diag(std²)).

  L = -mean_batch log pi(a|s)
Network: the Gaussian actor of FQL's IQL baseline (4x512 GELU MLP, mean layer initialised at scale 1e-2).
Std: fixed at 1 by default (const_std=True, as OGBench's GCBC and the FQL repository's IQL actor); then the loss
is ½·mean ||a - mean(s)||² + const, i.e. least squares on the mean. const_std=False learns state-independent
log stds (clipped to [-5, 2]).
Acting: deterministic=True (what the official evaluation uses, temperature 0) returns the mean; otherwise a
sample. Both are clipped to [-1, 1].

The FQL repository has no BC agent; this is the IQL actor trained with unit AWR weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fluxrl.agents.base import AgentState, BatchSpec, check_preset, create_state, example_dims, gradient_step
from fluxrl.nn import GaussianActor

NAME = "bc"
EVAL_DETERMINISTIC = True


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)
    actor_layer_norm: bool = False
    const_std: bool = True


PRESETS = {"paper": Config(), "cpu": Config(actor_hidden=(256, 256))}


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """Behaviour cloning has no per-task values."""
    check_preset(PRESETS, preset)
    return config


BATCH_SPEC = BatchSpec(keys=("observations", "actions"))


def actor_network(config, action_dim: int) -> GaussianActor:
    """The Gaussian actor (any config with actor_hidden / actor_layer_norm / const_std; IQL uses it too)."""
    return GaussianActor(
        config.actor_hidden,
        action_dim,
        layer_norm=config.actor_layer_norm,
        state_dependent_std=False,
        const_std=config.const_std,
    )


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    obs, _, action_dim = example_dims(example_batch)
    params = {"actor": actor_network(config, action_dim).init(key, obs)["params"]}
    return create_state(params, {}, config, action_dim)


def actor_metrics(dist, actions, log_prob) -> dict:
    return {
        "bc_log_prob": log_prob.mean(),
        "mse": jnp.mean((dist.mode() - actions) ** 2),
        "std": jnp.mean(dist.scale),
    }


def total_loss(params, state: AgentState, batch, key):
    del key  # maximum likelihood needs no randomness
    dist = actor_network(state.config, state.action_dim).apply({"params": params["actor"]}, batch["observations"])
    log_prob = dist.log_prob(batch["actions"])
    loss = -log_prob.mean()
    info = {"actor_loss": loss} | actor_metrics(dist, batch["actions"], log_prob)
    return loss, {f"actor/{k}": v for k, v in info.items()}


def update(state: AgentState, batch, key):
    params, opt_state, metrics = gradient_step(state, lambda p: total_loss(p, state, batch, key))
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def loss_metrics(state: AgentState, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def gaussian_act(state: AgentState, observations, key, deterministic) -> jax.Array:
    """Mean (deterministic) or sample of the Gaussian actor at state.params['actor'], clipped to [-1, 1]."""
    dist = actor_network(state.config, state.action_dim).apply({"params": state.params["actor"]}, observations)
    return jnp.clip(jnp.where(deterministic, dist.mode(), dist.sample(key)), -1.0, 1.0)


def act(state: AgentState, observations, key, deterministic=False):
    return gaussian_act(state, observations, key, deterministic)
