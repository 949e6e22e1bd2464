"""Flow Q-learning (FQL; Park, Li & Levine, ICML 2025), following the official code (seohongpark/fql,
agents/fql.py) step by step.

Networks: critic Q_phi (2-member ensemble, LayerNorm) and its target; BC flow v_omega(s, x, t); one-step policy
mu_theta(s, z). One Adam over all three (their losses touch disjoint parameters).

Per batch (mean over batch and, for squared errors, over action dims):
  critic    a' = clip(mu(s', z')),  y = r + gamma * mask * agg_i Qbar_i(s', a')   (agg = mean, or min)
            L_Q = mean_{i, batch} (Q_i(s, a) - y)²
  BC flow   L_BC = mean ||v(s, x_t, t) - (a - x_0)||²,  x_t = (1 - t) x_0 + t a,  x_0 ~ N(0, I), t ~ U[0, 1]
  distill   a_hat = clip(Euler_{flow_steps}(v, s, z)) with no gradient into v;  L_D = mean ||mu(s, z) - a_hat||²
  Q term    L_q = -mean_batch mean_i Q_i(s, clip(mu(s, z)))  (online critics, frozen); with normalize_q_loss it
            is multiplied by stop_grad(1 / mean |q|)
  total     L_Q + L_BC + alpha * L_D + L_q
After the Adam step the target critic moves toward the critic's *pre-update* parameters (the official code
averages `self.network.params`, i.e. the parameters the gradient was taken at).
Acting: a = clip(mu(s, z)), z ~ N(0, I): one network call. The official evaluation samples z even at
"temperature 0", hence EVAL_DETERMINISTIC = False; deterministic=True here uses z = 0.

Deviations from the official code: none in the update. Gradient routing is written out (stop_gradient on the
target critic, on the frozen critic in L_q, on the one-step policy inside the TD target and on the distillation
target) where the official code relies on calling modules without `params=`.
Dataset actions arrive clipped to ±(1 - 1e-5) by the engine, as the official loader clips them.
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
    merge_tables,
    policy_noise,
    step_with_targets,
    with_task_values,
)
from fluxrl.agents.flow_bc import bc_flow_loss, flow_network, sample_flow
from fluxrl.errors import FluxrlError
from fluxrl.nn import Value

NAME = "fql"
EVAL_DETERMINISTIC = False
NUM_CRITICS = 2
Q_AGGS = ("mean", "min")


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # target critic polyak rate
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # BC flow and one-step policy
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    q_agg: str = "mean"  # aggregation of the target critics in the TD target: "mean" or "min"
    alpha: float = 10.0  # distillation weight; tuned per environment (see TASK_VALUES)
    flow_steps: int = 10  # Euler steps of the BC flow for the distillation target
    normalize_q_loss: bool = False  # off in the paper; the README recommends it for new tasks


PRESETS = {
    "paper": Config(),
    "cpu": Config(actor_hidden=(256, 256), critic_hidden=(256, 256)),
}

# Official README, "Reproducing the main results" (offline RL). Keys are dataset names; a task matches the
# longest key it starts with. OGBench noisy datasets, pointmaze and DMC have no paper value: defaults apply.
TASK_VALUES = merge_tables(
    PAPER_DISCOUNTS,
    {
        # OGBench, state-based
        "antmaze-large-navigate": {"alpha": 10.0, "q_agg": "min"},
        "antmaze-giant-navigate": {"alpha": 10.0, "q_agg": "min"},
        "humanoidmaze-medium-navigate": {"alpha": 30.0},
        "humanoidmaze-large-navigate": {"alpha": 30.0},
        "antsoccer-arena-navigate": {"alpha": 10.0},
        "cube-single-play": {"alpha": 300.0},
        "cube-double-play": {"alpha": 300.0},
        "scene-play": {"alpha": 300.0},
        "puzzle-3x3-play": {"alpha": 1000.0},
        "puzzle-4x4-play": {"alpha": 1000.0},
        # OGBench, pixel-based
        "visual-cube-single-play": {"alpha": 300.0},
        "visual-cube-double-play": {"alpha": 100.0},
        "visual-scene-play": {"alpha": 100.0},
        "visual-puzzle-3x3-play": {"alpha": 300.0},
        "visual-puzzle-4x4-play": {"alpha": 300.0},
        # D4RL
        "antmaze-umaze": {"alpha": 10.0},
        "antmaze-umaze-diverse": {"alpha": 10.0},
        "antmaze-medium-play": {"alpha": 10.0},
        "antmaze-medium-diverse": {"alpha": 10.0},
        "antmaze-large-play": {"alpha": 3.0},
        "antmaze-large-diverse": {"alpha": 3.0},
        "pen-human": {"alpha": 10000.0, "q_agg": "min"},
        "pen-cloned": {"alpha": 10000.0, "q_agg": "min"},
        "pen-expert": {"alpha": 3000.0, "q_agg": "min"},
        "door-human": {"alpha": 30000.0, "q_agg": "min"},
        "door-cloned": {"alpha": 30000.0, "q_agg": "min"},
        "door-expert": {"alpha": 30000.0, "q_agg": "min"},
        "hammer-human": {"alpha": 30000.0, "q_agg": "min"},
        "hammer-cloned": {"alpha": 10000.0, "q_agg": "min"},
        "hammer-expert": {"alpha": 30000.0, "q_agg": "min"},
        "relocate-human": {"alpha": 10000.0, "q_agg": "min"},
        "relocate-cloned": {"alpha": 30000.0, "q_agg": "min"},
        "relocate-expert": {"alpha": 30000.0, "q_agg": "min"},
    },
)
PER_TASK_FIELDS = ("alpha",)


# Official README, offline-to-online commands: where alpha differs from the offline value (D4RL antmaze keeps it).
ONLINE_TASK_VALUES = merge_tables(
    TASK_VALUES,
    {
        "humanoidmaze-medium-navigate": {"alpha": 100.0},
        "antsoccer-arena-navigate": {"alpha": 30.0},
        "pen-cloned": {"alpha": 1000.0},
        "door-cloned": {"alpha": 1000.0},
        "hammer-cloned": {"alpha": 1000.0},
        "relocate-cloned": {"alpha": 10000.0},
    },
)


def for_task(config: Config, task_name: str | None, preset: str, online: bool = False) -> Config:
    """The paper's per-task alpha / q_agg / discount (the offline-to-online table when the run has online steps);
    they depend on the task's reward scale, not on network size, so the cpu preset gets them too."""
    check_preset(PRESETS, preset)
    return with_task_values(config, task_name, ONLINE_TASK_VALUES if online else TASK_VALUES)


BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "masks", "next_observations"))


def _validate(config: Config) -> None:
    if config.q_agg not in Q_AGGS:
        raise FluxrlError(f"fql config field q_agg is '{config.q_agg}'; it must be one of {', '.join(Q_AGGS)}.")
    if config.flow_steps < 1:
        raise FluxrlError(f"fql config field flow_steps is {config.flow_steps}; it must be at least 1.")


def _critic(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=NUM_CRITICS)


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    _validate(config)
    obs, actions, action_dim = example_dims(example_batch)
    critic_key, flow_key, onestep_key = jax.random.split(key, 3)
    params = {
        "critic": _critic(config).init(critic_key, obs, actions)["params"],
        "actor_bc_flow": flow_network(config).init(flow_key, obs, actions, actions[:, :1])["params"],
        "actor_onestep_flow": flow_network(config).init(onestep_key, obs, actions)["params"],
    }
    return create_state(params, {"critic": copy_tree(params["critic"])}, config, action_dim)


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    """Q_i(s, a) of every ensemble member, shape (NUM_CRITICS, batch)."""
    return _critic(config).apply({"params": critic_params}, observations, actions)


def onestep_actions(onestep_params, observations, noises, config: Config) -> jax.Array:
    """mu(s, z), unclipped (same network shape as the BC flow, without the time input)."""
    return flow_network(config).apply({"params": onestep_params}, observations, noises)


def critic_loss(critic_params, target_critic_params, onestep_params, batch, key, config: Config):
    """TD regression; `target_critic_params` and `onestep_params` must come stop-gradiented."""
    next_obs = batch["next_observations"]
    noises = jax.random.normal(key, batch["actions"].shape)
    next_actions = jnp.clip(onestep_actions(onestep_params, next_obs, noises, config), -1.0, 1.0)
    next_qs = critic_values(target_critic_params, next_obs, next_actions, config)
    next_q = next_qs.min(axis=0) if config.q_agg == "min" else next_qs.mean(axis=0)
    target_q = jax.lax.stop_gradient(batch["rewards"] + config.discount * batch["masks"] * next_q)
    q = critic_values(critic_params, batch["observations"], batch["actions"], config)
    loss = jnp.mean((q - target_q) ** 2)
    return loss, {"critic_loss": loss, "q_mean": q.mean(), "q_max": q.max(), "q_min": q.min()}


def actor_loss(
    bc_flow_params,
    onestep_params,
    distill_flow_params,
    critic_fn: Callable[[jax.Array, jax.Array], jax.Array],
    batch,
    key,
    config: Config,
):
    """L_BC + alpha * L_D + L_q.

    bc_flow_params: trained by L_BC only. distill_flow_params: the same flow, stop-gradiented by the caller,
    used for the distillation target. critic_fn(obs, actions) -> (members, batch) Q values of a frozen critic
    (a closure over stop-gradiented critic params; tests pass a known function)."""
    obs, actions = batch["observations"], batch["actions"]
    flow_key, noise_key, sample_key = jax.random.split(key, 3)
    bc_loss = bc_flow_loss(bc_flow_params, batch, flow_key, config)

    noises = jax.random.normal(noise_key, actions.shape)
    target_actions = jax.lax.stop_gradient(sample_flow(distill_flow_params, obs, noises, config))
    policy_actions = onestep_actions(onestep_params, obs, noises, config)
    distill_loss = jnp.mean((policy_actions - target_actions) ** 2)

    q = critic_fn(obs, jnp.clip(policy_actions, -1.0, 1.0)).mean(axis=0)
    q_loss = -q.mean()
    if config.normalize_q_loss:
        q_loss = jax.lax.stop_gradient(1.0 / jnp.abs(q).mean()) * q_loss

    loss = bc_loss + config.alpha * distill_loss + q_loss
    # Logged like the official code: squared error of freshly sampled policy actions to the data actions.
    sample_noises = jax.random.normal(sample_key, actions.shape)
    sampled = jnp.clip(onestep_actions(jax.lax.stop_gradient(onestep_params), obs, sample_noises, config), -1.0, 1.0)
    return loss, {
        "actor_loss": loss,
        "bc_flow_loss": bc_loss,
        "distill_loss": distill_loss,
        "q_loss": q_loss,
        "q": q.mean(),
        "mse": jnp.mean((sampled - actions) ** 2),
    }


def total_loss(params, state: AgentState, batch, key):
    """L_Q + actor loss at `params` (the differentiated tree); targets and frozen copies from stop_gradient."""
    config = state.config
    critic_key, actor_key = jax.random.split(key)
    frozen = jax.lax.stop_gradient(params)
    target = jax.lax.stop_gradient(state.target_params)
    c_loss, c_info = critic_loss(
        params["critic"], target["critic"], frozen["actor_onestep_flow"], batch, critic_key, config
    )

    def frozen_critic(obs, actions):
        return critic_values(frozen["critic"], obs, actions, config)

    a_loss, a_info = actor_loss(
        params["actor_bc_flow"],
        params["actor_onestep_flow"],
        frozen["actor_bc_flow"],
        frozen_critic,
        batch,
        actor_key,
        config,
    )
    metrics = {f"critic/{k}": v for k, v in c_info.items()} | {f"actor/{k}": v for k, v in a_info.items()}
    return c_loss + a_loss, metrics


def update(state: AgentState, batch, key):
    # Official order: the target critic follows the parameters the gradient was taken at (pre-update).
    return step_with_targets(state, lambda p: total_loss(p, state, batch, key))


def loss_metrics(state: AgentState, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def act(state: AgentState, observations, key, deterministic=False):
    noises = policy_noise(key, observations, state.action_dim, deterministic)
    return jnp.clip(onestep_actions(state.params["actor_onestep_flow"], observations, noises, state.config), -1.0, 1.0)
