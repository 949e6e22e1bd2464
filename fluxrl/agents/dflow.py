"""Decision Flow (DF; Hu et al., arXiv 2505.20350): action generation as a flow MDP, solved per flow step.

Only the abstract-level description of DF was reachable (no code, no method section), so this is a defensible
version of exactly that description; every choice is listed in docs/dflow.md.

Flow MDP (for one environment state s; T = flow_steps, dt = 1 / T, t_k = k dt):
  flow state     (s, x_k, t_k), x_0 ~ N(0, I)
  flow action    the velocity u = u_theta(s, x_k, t_k)
  transition     x_{k+1} = x_k + dt u  (deterministic Euler step)
  reward         terminal Q(s, clip(x_T)); intermediate r_k = 0 (direction-oriented) or
                 r_k = -alpha D_k, D_k = dt mean_dims (u - v_beta(s, x_k, t_k))² (divergence-oriented)
  discount       gamma_f = 1
Networks: critic Q_i (2 members, LayerNorm) + target; policy flow u_theta(s, x, t); flow critic V_f(s, x, t)
(LayerNorm MLP on concat(s, x, t)); with variant "div" also a behaviour flow v_beta(s, x, t).

Per batch (one Adam over all modules; mean over the batch):
  critic       a' = clip(Euler_T(u_theta, s', z')),  y = r + gamma * mask * agg_i Qbar_i(s', a')  (agg: mean or min)
               L_Q = mean_{i, batch} (Q_i(s, a) - y)²
  rollout      x_0 ~ N(0, I), x_{k+1} = x_k + dt u_theta(s, x_k, t_k), no gradient;
               R = mean_i Q_i(s, clip(x_T)) (online critic, frozen)
  flow critic  G_k = R + sum_{j >= k} r_j  (the return to go of the deterministic chain: the fixed point of the
               flow Bellman backup V_f(x_k, t_k) = r_k + V_f(x_{k+1}, t_{k+1}) for gamma_f = 1);
               L_V = mean_{k = 1..T-1} (V_f(s, x_k, t_k) - G_k)²
  policy       each flow step k is one decision: x'_k = x_k + dt u_theta(s, x_k, t_k) at the rollout's x_k, valued
               by W_k(x'_k) = V_f(s, x'_k, t_{k+1}) (frozen) for k < T - 1 and mean_i Q_i(s, clip(x'_k)) for k = T - 1
    "dir"      L_pi = alpha L_FM(u_theta) - sum_k W_k(x'_k)
               (the value signal steers each step's direction; the flow-matching loss on the data keeps the
               directions those of the behaviour)
    "div"      L_pi = sum_k [alpha D_k(u_theta) - W_k(x'_k)] + L_FM(v_beta),  D_k against vbar_beta = stop_grad(v_beta)
               (the divergence from the behaviour flow is part of the flow reward, so V_f prices future divergence)
  L_FM(v) = mean ||v(s, x_t, t) - (a - x_0)||², x_t = (1 - t) x_0 + t a (mean over dims, as FQL)
  total        L_Q + L_V + L_pi; then the target critic moves toward its pre-update parameters (tau = 0.005).
Both variants give the same strength to alpha: for a locally linear value, each step's velocity moves by
d grad W / (2 alpha) (d = action dims), so the action moves by about d grad Q / (2 alpha), as FQL's one-step policy.
Acting: a = clip(Euler_T(u_theta, s, z)), z ~ N(0, I) (deterministic=True: z = 0); EVAL_DETERMINISTIC = False.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fluxrl.agents import fql
from fluxrl.agents.base import (
    AgentState,
    BatchSpec,
    check_preset,
    copy_tree,
    create_state,
    example_dims,
    policy_noise,
    step_with_targets,
    with_task_values,
)
from fluxrl.agents.flow_bc import bc_flow_loss, flow_network, sample_flow
from fluxrl.errors import FluxrlError
from fluxrl.nn import Value

NAME = "dflow"
EVAL_DETERMINISTIC = False
NUM_CRITICS = 2
Q_AGGS = ("mean", "min")
VARIANTS = ("dir", "div")

# critic_fn(observations, actions) -> (*batch,) frozen Q values (the agent's: mean over its online critics).
CriticFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # target critic polyak rate
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # policy flow (and behaviour flow with "div")
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    flow_critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    q_agg: str = "mean"  # aggregation of the target critics in the TD target: "mean" or "min"
    variant: str = "div"  # "dir": direction-oriented, "div": divergence-oriented
    alpha: float = 10.0  # behaviour regularisation weight (flow matching for "dir", divergence for "div")
    flow_steps: int = 10  # T: decisions per action (Euler steps)


PRESETS = {
    "paper": Config(),
    "cpu": Config(actor_hidden=(256, 256), critic_hidden=(256, 256), flow_critic_hidden=(256, 256)),
}

# DF's per-task values are not public. alpha plays FQL's alpha's role with the same units (a velocity penalty,
# mean over dims, against Q), so FQL's per-task alpha / q_agg / discount are the best available values.
TASK_VALUES = fql.TASK_VALUES
PER_TASK_FIELDS = ("alpha",)


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """FQL's per-task alpha / q_agg / discount (see TASK_VALUES), in both presets."""
    check_preset(PRESETS, preset)
    return with_task_values(config, task_name, TASK_VALUES)


BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "masks", "next_observations"))


def _validate(config: Config) -> None:
    if config.variant not in VARIANTS:
        raise FluxrlError(f"dflow config field variant is '{config.variant}'; it must be one of {', '.join(VARIANTS)}.")
    if config.q_agg not in Q_AGGS:
        raise FluxrlError(f"dflow config field q_agg is '{config.q_agg}'; it must be one of {', '.join(Q_AGGS)}.")
    if config.flow_steps < 2:
        raise FluxrlError(f"dflow config field flow_steps is {config.flow_steps}; the flow MDP needs at least 2.")


def _critic(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=NUM_CRITICS)


def _flow_critic(config: Config) -> Value:
    return Value(config.flow_critic_hidden, layer_norm=True, num_ensembles=1)


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    _validate(config)
    obs, actions, action_dim = example_dims(example_batch)
    critic_key, policy_key, flow_critic_key, bc_key = jax.random.split(key, 4)
    times = actions[:, :1]
    params = {
        "critic": _critic(config).init(critic_key, obs, actions)["params"],
        "actor_flow": flow_network(config).init(policy_key, obs, actions, times)["params"],
        "flow_critic": _flow_critic(config).init(flow_critic_key, obs, jnp.concatenate([actions, times], -1))["params"],
    }
    if config.variant == "div":
        params["actor_bc_flow"] = flow_network(config).init(bc_key, obs, actions, times)["params"]
    return create_state(params, {"critic": copy_tree(params["critic"])}, config, action_dim)


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    """Q_i(s, a) of every ensemble member, shape (NUM_CRITICS, batch)."""
    return _critic(config).apply({"params": critic_params}, observations, actions)


def flow_values(flow_critic_params, observations, x, times, config: Config) -> jax.Array:
    """V_f(s, x, t) (the flow critic), shape x.shape[:-1]; `times` broadcasts against x[..., :1]."""
    t = jnp.broadcast_to(jnp.asarray(times, x.dtype), (*x.shape[:-1], 1))
    return _flow_critic(config).apply({"params": flow_critic_params}, observations, jnp.concatenate([x, t], -1))


def velocities(flow_params, observations, x, times, config: Config) -> jax.Array:
    """u(s, x, t) of a flow network (the policy or the behaviour flow)."""
    return flow_network(config).apply({"params": flow_params}, observations, x, times)


def critic_loss(critic_params, target_critic_params, policy_params, batch, key, config: Config):
    """TD regression; `target_critic_params` and `policy_params` must come stop-gradiented."""
    next_obs = batch["next_observations"]
    noises = jax.random.normal(key, batch["actions"].shape)
    next_actions = sample_flow(policy_params, next_obs, noises, config)  # clipped
    next_qs = critic_values(target_critic_params, next_obs, next_actions, config)
    next_q = next_qs.min(axis=0) if config.q_agg == "min" else next_qs.mean(axis=0)
    target_q = jax.lax.stop_gradient(batch["rewards"] + config.discount * batch["masks"] * next_q)
    q = critic_values(critic_params, batch["observations"], batch["actions"], config)
    loss = jnp.mean((q - target_q) ** 2)
    return loss, {"critic_loss": loss, "q_mean": q.mean(), "q_max": q.max(), "q_min": q.min()}


def divergences(policy_velocities, behaviour_velocities, config: Config) -> jax.Array:
    """D_k = dt * mean over dims of (u - v_beta)², shape (*leading)."""
    return jnp.mean((policy_velocities - behaviour_velocities) ** 2, axis=-1) / config.flow_steps


def actor_loss(policy_params, flow_critic_params, bc_params, critic_fn: CriticFn, batch, key, config: Config):
    """L_V + L_pi (+ L_FM of the behaviour flow with "div").

    policy_params, flow_critic_params, bc_params: trained here (bc_params is None for "dir"); the flow critic
    inside the policy term, the behaviour flow inside D_k and `critic_fn` are frozen here."""
    obs = batch["observations"]
    n, dt = config.flow_steps, 1.0 / config.flow_steps
    noise_key, fm_key = jax.random.split(key)
    times = jnp.arange(n, dtype=jnp.float32) / n
    frozen_policy = jax.lax.stop_gradient(policy_params)
    frozen_bc = jax.lax.stop_gradient(bc_params)

    def rollout_step(x, t):
        return x + dt * velocities(frozen_policy, obs, x, t, config), x

    x_final, xs = jax.lax.scan(rollout_step, jax.random.normal(noise_key, batch["actions"].shape), times)
    terminal_value = jax.lax.stop_gradient(critic_fn(obs, jnp.clip(x_final, -1.0, 1.0)))  # R, shape (batch,)

    stacked_obs = jnp.broadcast_to(obs, (n, *obs.shape))
    t = times[:, None, None]
    policy_v = velocities(policy_params, stacked_obs, xs, t, config)  # (T, batch, dims), differentiated
    if config.variant == "div":
        step_divergences = divergences(policy_v, velocities(frozen_bc, stacked_obs, xs, t, config), config)
        # G_k = R - alpha * sum_{j >= k} D_j (reverse cumulative sum over the flow steps) for the rollout's D_j.
        costs = jax.lax.stop_gradient(step_divergences)
        returns = terminal_value - config.alpha * jnp.cumsum(costs[::-1], axis=0)[::-1]
    else:
        returns = jnp.broadcast_to(terminal_value, xs.shape[:-1])

    # Flow critic on the intermediate states x_1 .. x_{T-1} (x_T is valued by Q itself).
    v_pred = flow_values(flow_critic_params, stacked_obs[1:], xs[1:], t[1:], config)
    flow_critic_loss = jnp.mean((v_pred - returns[1:]) ** 2)

    # One decision per flow step, valued by the frozen flow critic (or Q after the last step).
    next_x = xs + dt * policy_v
    frozen_flow_critic = jax.lax.stop_gradient(flow_critic_params)
    step_values = flow_values(frozen_flow_critic, stacked_obs[:-1], next_x[:-1], t[1:], config)
    last_values = critic_fn(obs, jnp.clip(next_x[-1], -1.0, 1.0))
    value_term = jnp.mean(step_values.sum(axis=0) + last_values)

    metrics = {"flow_critic_loss": flow_critic_loss, "value": terminal_value.mean()}
    if config.variant == "div":
        penalty = jnp.mean(step_divergences.sum(axis=0))
        policy_loss = config.alpha * penalty - value_term
        bc_loss = bc_flow_loss(bc_params, batch, fm_key, config)
        loss = flow_critic_loss + policy_loss + bc_loss
        metrics["divergence"] = penalty
    else:
        bc_loss = bc_flow_loss(policy_params, batch, fm_key, config)
        policy_loss = config.alpha * bc_loss - value_term
        loss = flow_critic_loss + policy_loss
    return loss, metrics | {"bc_flow_loss": bc_loss, "policy_loss": policy_loss, "actor_loss": loss}


def total_loss(params, state: AgentState, batch, key):
    """L_Q + L_V + L_pi at `params` (the differentiated tree); targets and frozen copies via stop_gradient."""
    config = state.config
    critic_key, actor_key = jax.random.split(key)
    frozen = jax.lax.stop_gradient(params)
    target = jax.lax.stop_gradient(state.target_params)
    c_loss, c_info = critic_loss(params["critic"], target["critic"], frozen["actor_flow"], batch, critic_key, config)

    def frozen_critic(obs, actions):
        return critic_values(frozen["critic"], obs, actions, config).mean(axis=0)

    a_loss, a_info = actor_loss(
        params["actor_flow"], params["flow_critic"], params.get("actor_bc_flow"), frozen_critic, batch, actor_key,
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
    return sample_flow(state.params["actor_flow"], observations, noises, state.config)
