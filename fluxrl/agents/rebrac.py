"""ReBRAC (Tarasov et al., NeurIPS 2023): TD3+BC with LayerNorm critics and separate actor / critic BC
penalties, as in the FQL repository (agents/rebrac.py).

Networks: twin critic Q_phi (LayerNorm) and deterministic tanh actor pi(s) = tanh(mean(s)) (the mode of a
tanh-squashed Gaussian; mean layer initialised at scale actor_fc_scale), each with a target copy.

  critic  a' = clip(pibar(s') + clip(0.2 eps, -0.5, 0.5), -1, 1),  eps ~ N(0, I)
          y = r + gamma * mask * (min_i Qbar_i(s', a') - alpha_critic ||a' - a'_data||²)
          L_Q = mean_{i, batch} (Q_i(s, a) - y)²
  actor   q = min_i Q_i(s, pi(s))  (online critic, frozen),  lambda = stop_grad(1 / mean |q|)
          L_pi = -mean(lambda q) + alpha_actor mean ||pi(s) - a||²
The actor loss enters only on every actor_freq-th update (updates are counted from 1, as the official loop's
`i % actor_freq == 0`), and only then do both targets move, toward the pre-update online parameters.
On the other updates the actor's gradient is zero but Adam still applies its momentum to it, exactly as the
official single-optimizer update does.
Acting: pi(s) plus clipped noise 0.2 eps (deterministic=True, the official evaluation, gives pi(s)); clipped.

Deviations: the actor term is always computed and multiplied by 0 or 1 (the official code skips it with a
static flag), so the actor metrics are logged on every update. Gradient routing is explicit (stop_gradient on
both targets and on the critic inside the actor loss).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fluxrl.agents.base import (
    PAPER_DISCOUNTS,
    AgentState,
    BatchSpec,
    check_preset,
    copy_tree,
    create_state,
    example_dims,
    gradient_step,
    merge_tables,
    polyak,
    with_task_values,
)
from fluxrl.errors import FluxrlError
from fluxrl.nn import GaussianActor, Value

NAME = "rebrac"
EVAL_DETERMINISTIC = True
NUM_CRITICS = 2


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # polyak rate of both targets
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    tanh_squash: bool = True
    actor_fc_scale: float = 0.01  # init scale of the actor's last layer
    alpha_actor: float = 0.0  # actor BC coefficient (per task)
    alpha_critic: float = 0.0  # critic BC coefficient (per task)
    actor_freq: int = 2  # actor and target updates every actor_freq updates
    actor_noise: float = 0.2  # target-policy smoothing noise std
    actor_noise_clip: float = 0.5


PRESETS = {
    "paper": Config(),
    "cpu": Config(actor_hidden=(256, 256), critic_hidden=(256, 256)),
}

# The FQL README's ReBRAC commands (humanoidmaze-medium: 0.01 / 0.01 with discount 0.995; visual-cube-single:
# 1 / 0) and the InFOM README's baseline commands (state-based cube-single: 1 / 1; ExORL cheetah: 0.1 / 0.1).
# The InFOM repository's ReBRAC is the same update with actor_freq 4 (here the FQL code's 2) after BC
# pre-training on the reward-free data, which this agent does not do. The FQL paper's other per-environment
# values are not in the code or READMEs, so other tasks keep the defaults (0 / 0: plain TD3 with LayerNorm) --
# set alpha_actor / alpha_critic yourself.
TASK_VALUES = merge_tables(
    PAPER_DISCOUNTS,
    {
        "humanoidmaze-medium-navigate": {"alpha_actor": 0.01, "alpha_critic": 0.01},
        "visual-cube-single-play": {"alpha_actor": 1.0, "alpha_critic": 0.0},
        "cube-single-play": {"alpha_actor": 1.0, "alpha_critic": 1.0},
        "cheetah": {"alpha_actor": 0.1, "alpha_critic": 0.1},
    },
)
PER_TASK_FIELDS = ("alpha_actor", "alpha_critic")


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    check_preset(PRESETS, preset)
    return with_task_values(config, task_name, TASK_VALUES)


BATCH_SPEC = BatchSpec(
    keys=("observations", "actions", "rewards", "masks", "next_observations", "next_actions")
)


def _critic(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=NUM_CRITICS)


def _actor(config: Config, action_dim: int) -> GaussianActor:
    return GaussianActor(
        config.actor_hidden,
        action_dim,
        layer_norm=config.actor_layer_norm,
        tanh_squash=config.tanh_squash,
        state_dependent_std=False,
        const_std=True,
        final_fc_init_scale=config.actor_fc_scale,
    )


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    if config.actor_freq < 1:
        raise FluxrlError(f"rebrac config field actor_freq is {config.actor_freq}; it must be at least 1.")
    obs, actions, action_dim = example_dims(example_batch)
    critic_key, actor_key = jax.random.split(key)
    params = {
        "critic": _critic(config).init(critic_key, obs, actions)["params"],
        "actor": _actor(config, action_dim).init(actor_key, obs)["params"],
    }
    return create_state(params, copy_tree(params), config, action_dim)


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    """Q_i(s, a) of every ensemble member, shape (NUM_CRITICS, batch)."""
    return _critic(config).apply({"params": critic_params}, observations, actions)


def policy_actions(actor_params, observations, action_dim: int, config: Config) -> jax.Array:
    """pi(s): the actor's mode (tanh of the mean)."""
    return _actor(config, action_dim).apply({"params": actor_params}, observations).mode()


def smoothing_noise(key, shape, config: Config) -> jax.Array:
    noise = jax.random.normal(key, shape) * config.actor_noise
    return jnp.clip(noise, -config.actor_noise_clip, config.actor_noise_clip)


def critic_loss(critic_params, target_critic_params, target_actor_params, batch, key, config: Config):
    """TD3-style target with a BC penalty on a'; the target params must come stop-gradiented."""
    next_obs, action_dim = batch["next_observations"], batch["actions"].shape[-1]
    next_actions = policy_actions(target_actor_params, next_obs, action_dim, config)
    next_actions = jnp.clip(next_actions + smoothing_noise(key, next_actions.shape, config), -1.0, 1.0)
    next_q = critic_values(target_critic_params, next_obs, next_actions, config).min(axis=0)
    next_q = next_q - config.alpha_critic * jnp.sum((next_actions - batch["next_actions"]) ** 2, axis=-1)
    target_q = jax.lax.stop_gradient(batch["rewards"] + config.discount * batch["masks"] * next_q)
    q = critic_values(critic_params, batch["observations"], batch["actions"], config)
    loss = jnp.mean((q - target_q) ** 2)
    return loss, {"critic_loss": loss, "q_mean": q.mean(), "q_max": q.max(), "q_min": q.min()}


def actor_loss(actor_params, critic_fn: Callable[[jax.Array, jax.Array], jax.Array], batch, config: Config):
    """-mean(lambda q) + alpha_actor * BC. critic_fn(obs, actions) -> (members, batch): a frozen critic."""
    actions = policy_actions(actor_params, batch["observations"], batch["actions"].shape[-1], config)
    q = critic_fn(batch["observations"], actions).min(axis=0)
    mse = jnp.sum((actions - batch["actions"]) ** 2, axis=-1)
    lam = jax.lax.stop_gradient(1.0 / jnp.abs(q).mean())
    q_loss = -(lam * q).mean()
    bc_loss = (config.alpha_actor * mse).mean()
    loss = q_loss + bc_loss
    # The official 'std' is that of the pre-squash Gaussian: const_std, so always 1.
    return loss, {"total_loss": loss, "actor_loss": q_loss, "bc_loss": bc_loss, "std": jnp.ones(()), "mse": mse.mean()}


def is_actor_step(step: jax.Array, config: Config) -> jax.Array:
    """Whether the update that follows `step` completed updates is an actor (and target) update."""
    return (step + 1) % config.actor_freq == 0


def total_loss(params, state: AgentState, batch, key):
    config = state.config
    frozen = jax.lax.stop_gradient(params)
    target = jax.lax.stop_gradient(state.target_params)
    c_loss, c_info = critic_loss(params["critic"], target["critic"], target["actor"], batch, key, config)

    def frozen_critic(obs, actions):
        return critic_values(frozen["critic"], obs, actions, config)

    a_loss, a_info = actor_loss(params["actor"], frozen_critic, batch, config)
    actor_weight = is_actor_step(state.step, config).astype(a_loss.dtype)
    metrics = {f"critic/{k}": v for k, v in c_info.items()} | {f"actor/{k}": v for k, v in a_info.items()}
    return c_loss + actor_weight * a_loss, metrics


def update(state: AgentState, batch, key):
    params, opt_state, metrics = gradient_step(state, lambda p: total_loss(p, state, batch, key))
    moved = polyak(state.params, state.target_params, state.config.tau)
    full = is_actor_step(state.step, state.config)
    target = jax.tree_util.tree_map(lambda m, t: jnp.where(full, m, t), moved, state.target_params)
    new_state = state.replace(params=params, target_params=target, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def loss_metrics(state: AgentState, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def act(state: AgentState, observations, key, deterministic=False):
    actions = policy_actions(state.params["actor"], observations, state.action_dim, state.config)
    noise = jnp.where(deterministic, 0.0, smoothing_noise(key, actions.shape, state.config))
    return jnp.clip(actions + noise, -1.0, 1.0)
