"""Guided Flow Policy (GFP; Tiofack, Le Hellard, Schramm, Perrin-Gilbert & Carpentier, ICLR 2026), following the
official code (Inria; agents/gfp.py, config/agent/gfp.yaml, hyperparams/gfp_params.csv) step by step.

GFP is FQL with a value-weighted BC flow (VaBC) and Q normalisation always on. Networks: critic Q_phi (2 members,
LayerNorm) and its target; VaBC flow v_omega(s, x, emb(t)) with a 64-dim sinusoidal time embedding; one-step
actor mu_theta(s, z). One Adam over all three. Qbar_agg = q_agg (mean or min) over the two *target* critics.

Per batch (mean over batch and, for squared errors, over action dims):
  critic    z' ~ N(0, I); a'_mu = clip(mu(s', z')); a'_flow = clip(Euler_K(v, s', z')) (same z');
            Qbar' = target_agg of Qbar_agg(s', a'_mu) and Qbar_agg(s', a'_flow)  (actor | vabc | min | mean | max)
            y = r + gamma * mask * Qbar';  L_Q = mean_{i, batch} (Q_i(s, a) - y)²
  actor     z ~ N(0, I); a_hat = clip(Euler_K(v, s, z)) (no gradient into v); L_D = mean ||mu(s, z) - a_hat||²
            q = q_agg_i Q_i(s, clip(mu(s, z))) (online critics, frozen); lam = stop_grad(1 / mean |q|)
            L_q = -lam mean q  (normalize_q_loss; -mean q without it)
  guidance  Q_data = Qbar_agg(s, a); Q_ref = guidance_agg of Qbar_agg(s, stop_grad(clip(mu(s, z)))) and
            Qbar_agg(s, a_hat); kappa = lam / eta;
            softmax:   w = exp(kappa Q_data) / (exp(kappa Q_data) + exp(kappa Q_ref))   (via logsumexp)
            advantage: w = exp(kappa (Q_data - Q_ref))   (the paper's ablation, unbounded)
  VaBC      L_VaBC = mean_batch w * mean_dims ||v(s, x_t, t) - (a - x_0)||²   (eta = 0: plain BC, w = 1)
  total     L_Q + L_VaBC + alpha L_D + L_q
After the Adam step the target critic moves toward the critic's pre-update parameters (official order).
Acting: a = clip(mu(s, z)), z ~ N(0, I): one network call; the official evaluation samples z
(EVAL_DETERMINISTIC = False); deterministic=True uses z = 0.

Deviation (documented in docs/gfp.md): in the TD target the official code samples the VaBC action at s, not s'
(`target_use_next=False` in its config), then evaluates it at s'. The default here is the correct form, the flow
action at s' (`target_flow_at_next=True`); `target_flow_at_next=False` reproduces the official quirk. It only
matters when target_agg is not "actor" (cube, humanoidmaze-medium and visual-cube tasks use "mean").
`eta_online` is the official `eta_temperature_online`: the eta of the online phase of an offline-to-online run
(None: keep eta), applied by the engine through `online_config`. Not implemented: pixel encoders.
Gradient routing is explicit (stop_gradient on the target critic, on the frozen online critic in L_q, on the
actor and VaBC actions inside the TD target, on the distillation target and on the guidance weights).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
from fluxrl.errors import FluxrlError
from fluxrl.flows import euler, flow_matching_errors
from fluxrl.nn import EmbeddedTimeVectorField, Value, VectorField

NAME = "gfp"
EVAL_DETERMINISTIC = False
NUM_CRITICS = 2
Q_AGGS = ("mean", "min")
ACTION_AGGS = ("actor", "vabc", "min", "mean", "max")
GUIDANCE_FNS = ("softmax", "advantage")


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # target critic polyak rate
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # VaBC flow and one-step actor
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    alpha: float = 1.0  # distillation weight; tuned per task (TASK_VALUES)
    eta: float = 1e-3  # guidance temperature (official `eta_temperature`); 0 = plain BC; tuned per task
    eta_online: float | None = None  # eta of the online phase (official `eta_temperature_online`); None: eta
    q_agg: str = "mean"  # aggregation of the two critics: "mean" or "min"
    target_agg: str = "actor"  # which next action(s) the TD target uses: actor | vabc | min | mean | max
    guidance_agg: str = "actor"  # which action(s) give Q_ref: actor | vabc | min | mean | max
    guidance_fn: str = "softmax"  # "softmax" (GFP) or "advantage" (the paper's ablation)
    normalize_q_loss: bool = True
    target_flow_at_next: bool = True  # VaBC action of the TD target at s' (False: the official code's s)
    flow_steps: int = 10  # Euler steps of the VaBC flow (distillation target, TD target, Q_ref)
    time_embedding_dim: int = 64  # sinusoidal embedding of t for the VaBC flow (official encode_time_dim)


PRESETS = {
    "paper": Config(),
    "cpu": Config(actor_hidden=(256, 256), critic_hidden=(256, 256)),
}


def _row(discount, flow_steps, q_agg, target_agg, guidance_agg, alpha, eta, batch_size=256):
    return {
        "discount": discount,
        "flow_steps": flow_steps,
        "q_agg": q_agg,
        "target_agg": target_agg,
        "guidance_agg": guidance_agg,
        "alpha": alpha,
        "eta": eta,
        "batch_size": batch_size,
    }


# hyperparams/gfp_params.csv of the official code, one row per dataset. The official lookup matches a row when
# its env_name is a substring of the run's env name and takes the longest; visual rows are written for task 1, so
# visual tasks 2-5 get the state-based row of the same dataset, which the visual-* prefix keys reproduce.
_OGBENCH = {
    "antmaze-giant-navigate": _row(0.995, 10, "min", "actor", "min", 0.1, 0.1, 1024),
    "antmaze-large-explore": _row(0.995, 10, "min", "actor", "min", 0.01, 1e-6, 1024),
    "antmaze-large-navigate": _row(0.995, 10, "min", "actor", "min", 0.3, 1e-4),
    "antmaze-large-stitch": _row(0.995, 10, "min", "actor", "min", 0.3, 1e-6),
    "antsoccer-arena-navigate": _row(0.995, 10, "mean", "actor", "min", 0.1, 0.01),
    "antsoccer-arena-stitch": _row(0.995, 10, "mean", "actor", "min", 0.1, 0.01),
    "cube-double-noisy": _row(0.99, 10, "mean", "mean", "actor", 0.1, 1e-4),
    "cube-double-play": _row(0.99, 10, "mean", "mean", "actor", 1.0, 0.01),
    "cube-single-noisy": _row(0.99, 10, "mean", "mean", "actor", 10.0, 1e-3),
    "cube-single-play": _row(0.99, 10, "mean", "mean", "actor", 10.0, 0.1),
    "cube-triple-noisy": _row(0.99, 10, "mean", "mean", "actor", 0.1, 1e-5, 1024),
    "cube-triple-play": _row(0.99, 10, "mean", "mean", "actor", 1.0, 1e-5, 1024),
    "humanoidmaze-large-navigate": _row(0.999, 30, "mean", "actor", "min", 0.3, 1e-4, 1024),
    "humanoidmaze-medium-navigate": _row(0.995, 10, "mean", "mean", "min", 0.3, 1e-3),
    "humanoidmaze-medium-stitch": _row(0.999, 10, "mean", "mean", "min", 0.3, 1e-3),
    "puzzle-3x3-play": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-3),
    "puzzle-4x4-noisy": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-3),
    "puzzle-4x4-play": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-5),
    "scene-noisy": _row(0.99, 10, "mean", "actor", "actor", 1.0, 1e-4),
    "scene-play": _row(0.99, 10, "mean", "actor", "actor", 10.0, 1e-3),
}
_VISUAL_TASK1 = {
    "visual-cube-double-play-singletask-task1": _row(0.99, 10, "mean", "mean", "actor", 0.3, 0.01),
    "visual-cube-single-play-singletask-task1": _row(0.99, 10, "mean", "mean", "actor", 10.0, 0.1),
    "visual-puzzle-3x3-play-singletask-task1": _row(0.99, 10, "mean", "actor", "actor", 3.0, 0.01),
    "visual-puzzle-4x4-play-singletask-task1": _row(0.99, 10, "mean", "actor", "actor", 1.0, 1e-4),
    "visual-scene-play-singletask-task1": _row(0.99, 10, "mean", "actor", "actor", 10.0, 1e-3),
}
_VISUAL_OTHER_TASKS = {
    f"visual-{name}": _OGBENCH[name]
    for name in ("cube-double-play", "cube-single-play", "puzzle-3x3-play", "puzzle-4x4-play", "scene-play")
}
_D4RL = {
    "antmaze-large-diverse": _row(0.99, 10, "min", "actor", "actor", 0.03, 1e-5),
    "antmaze-large-play": _row(0.99, 10, "min", "actor", "actor", 0.03, 1e-5),
    "antmaze-medium-diverse": _row(0.99, 10, "min", "actor", "actor", 0.03, 1e-3),
    "antmaze-medium-play": _row(0.99, 10, "min", "actor", "actor", 0.03, 1e-3),
    "antmaze-umaze": _row(0.99, 10, "min", "actor", "actor", 0.1, 1e-3),
    "antmaze-umaze-diverse": _row(0.99, 10, "min", "actor", "actor", 0.1, 1e-3),
    "door-cloned": _row(0.99, 10, "mean", "actor", "actor", 10.0, 0.01),
    "door-expert": _row(0.99, 10, "mean", "actor", "actor", 10.0, 0.01),
    "door-human": _row(0.99, 10, "mean", "actor", "actor", 10.0, 0.01),
    "hammer-cloned": _row(0.99, 10, "mean", "actor", "actor", 10.0, 1e-5),
    "hammer-expert": _row(0.99, 10, "mean", "actor", "actor", 10.0, 0.01),
    "hammer-human": _row(0.99, 10, "mean", "actor", "actor", 10.0, 1e-5),
    "pen-cloned": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-5),
    "pen-expert": _row(0.99, 10, "mean", "actor", "actor", 1.0, 1e-3),
    "pen-human": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-4),
    "relocate-cloned": _row(0.99, 10, "mean", "actor", "actor", 10.0, 1e-4),
    "relocate-expert": _row(0.99, 10, "mean", "actor", "actor", 10.0, 1e-4),
    "relocate-human": _row(0.99, 10, "mean", "actor", "actor", 10.0, 1e-4),
}
# Minari dataset ids (the official rows D4RL_<env>_<kind>_v2 and mujoco_<env>_<kind>_v0).
_MINARI = {
    "D4RL/door/cloned": _row(0.99, 10, "mean", "actor", "actor", 0.03, 1e-6),
    "D4RL/door/expert": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-3),
    "D4RL/door/human": _row(0.99, 10, "mean", "actor", "actor", 0.01, 0.01),
    "D4RL/hammer/cloned": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-5),
    "D4RL/hammer/expert": _row(0.99, 10, "mean", "actor", "actor", 1.0, 1e-5),
    "D4RL/hammer/human": _row(0.99, 10, "mean", "actor", "actor", 1.0, 0.01),
    "D4RL/pen/cloned": _row(0.99, 10, "mean", "actor", "actor", 1.0, 1e-4),
    "D4RL/pen/expert": _row(0.99, 10, "mean", "actor", "actor", 0.3, 1e-6),
    "D4RL/pen/human": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-6),
    "D4RL/relocate/cloned": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-4),
    "D4RL/relocate/expert": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-3),
    "D4RL/relocate/human": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-5),
    "mujoco/halfcheetah/expert": _row(0.99, 10, "mean", "actor", "actor", 3.0, 0.01, 1024),
    "mujoco/halfcheetah/medium": _row(0.99, 10, "mean", "actor", "actor", 0.1, 1e-3, 1024),
    "mujoco/halfcheetah/simple": _row(0.99, 10, "mean", "actor", "actor", 0.03, 1e-6, 1024),
    "mujoco/hopper/expert": _row(0.99, 10, "mean", "actor", "actor", 3.0, 0.01, 1024),
    "mujoco/hopper/medium": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-3, 1024),
    "mujoco/hopper/simple": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-3, 1024),
    "mujoco/walker2d/expert": _row(0.99, 10, "mean", "actor", "actor", 3.0, 1e-3, 1024),
    "mujoco/walker2d/medium": _row(0.99, 10, "mean", "actor", "actor", 0.3, 0.01, 1024),
    "mujoco/walker2d/simple": _row(0.99, 10, "mean", "actor", "actor", 3.0, 0.1, 1024),
}
TASK_VALUES = _OGBENCH | _VISUAL_TASK1 | _VISUAL_OTHER_TASKS | _D4RL | _MINARI
PER_TASK_FIELDS = ("alpha", "eta")


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """The official per-task values. The batch size (1024 on some tasks) is a compute setting and is applied to
    the paper preset only; every other value applies to both presets (it depends on the task, not the size)."""
    check_preset(PRESETS, preset)
    table = TASK_VALUES
    if preset != "paper":
        table = {k: {f: x for f, x in v.items() if f != "batch_size"} for k, v in TASK_VALUES.items()}
    return with_task_values(config, task_name, table)


def online_config(config: Config) -> Config:
    """The config of the online phase: the official agent switches eta to eta_temperature_online there."""
    return config if config.eta_online is None else dataclasses.replace(config, eta=config.eta_online)


BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "masks", "next_observations"))


def _validate(config: Config) -> None:
    for field, value, allowed in (
        ("q_agg", config.q_agg, Q_AGGS),
        ("target_agg", config.target_agg, ACTION_AGGS),
        ("guidance_agg", config.guidance_agg, ACTION_AGGS),
        ("guidance_fn", config.guidance_fn, GUIDANCE_FNS),
    ):
        if value not in allowed:
            raise FluxrlError(f"gfp config field {field} is '{value}'; it must be one of {', '.join(allowed)}.")
    if config.flow_steps < 1:
        raise FluxrlError(f"gfp config field flow_steps is {config.flow_steps}; it must be at least 1.")
    for field in ("eta", "eta_online"):
        value = getattr(config, field)
        if value is not None and value < 0:
            raise FluxrlError(f"gfp config field {field} is {value}; it must be >= 0 (0 turns the guidance off).")
    if config.time_embedding_dim < 2:
        raise FluxrlError(f"gfp config field time_embedding_dim is {config.time_embedding_dim}; it must be >= 2.")


# --- networks -----------------------------------------------------------------------------------------------


def _vabc(config: Config) -> EmbeddedTimeVectorField:
    return EmbeddedTimeVectorField(config.actor_hidden, config.time_embedding_dim, config.actor_layer_norm)


def _actor(config: Config) -> VectorField:
    return VectorField(config.actor_hidden, layer_norm=config.actor_layer_norm)


def _critic(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=NUM_CRITICS)


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    _validate(config)
    obs, actions, action_dim = example_dims(example_batch)
    critic_key, vabc_key, actor_key = jax.random.split(key, 3)
    params = {
        "critic": _critic(config).init(critic_key, obs, actions)["params"],
        "vabc": _vabc(config).init(vabc_key, obs, actions, actions[:, :1])["params"],
        "actor": _actor(config).init(actor_key, obs, actions)["params"],
    }
    return create_state(params, {"critic": copy_tree(params["critic"])}, config, action_dim)


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    """Q_i(s, a) of every ensemble member, shape (NUM_CRITICS, batch)."""
    return _critic(config).apply({"params": critic_params}, observations, actions)


def aggregate_q(critic_params, observations, actions, config: Config) -> jax.Array:
    """q_agg (mean or min) over the ensemble: the official critic_eval (called with target params there)."""
    qs = critic_values(critic_params, observations, actions, config)
    return qs.min(axis=0) if config.q_agg == "min" else qs.mean(axis=0)


def actor_actions(actor_params, observations, noises, config: Config) -> jax.Array:
    """mu(s, z), unclipped."""
    return _actor(config).apply({"params": actor_params}, observations, noises)


def vabc_velocity(vabc_params, observations, x, t, config: Config) -> jax.Array:
    return _vabc(config).apply({"params": vabc_params}, observations, x, t)


def flow_actions(vabc_params, observations, noises, config: Config) -> jax.Array:
    """flow_steps Euler steps of the VaBC flow from `noises`, clipped to [-1, 1]."""

    def field(x, t):
        return vabc_velocity(vabc_params, observations, x, t, config)

    return euler(field, noises, config.flow_steps, clip=(-1.0, 1.0))


def combine(rule: str, q_actor, q_vabc):
    """The official value_with_all_options: Q of the actor action, of the VaBC action, or their min/mean/max."""
    if rule == "actor":
        return q_actor
    if rule == "vabc":
        return q_vabc
    if rule == "min":
        return jnp.minimum(q_actor, q_vabc)
    if rule == "max":
        return jnp.maximum(q_actor, q_vabc)
    return 0.5 * (q_actor + q_vabc)


# --- losses -------------------------------------------------------------------------------------------------


def critic_loss(critic_params, target_critic_params, actor_params, vabc_params, batch, key, config: Config):
    """TD regression; `target_critic_params`, `actor_params` and `vabc_params` must come stop-gradiented."""
    obs, next_obs = batch["observations"], batch["next_observations"]
    noises = jax.random.normal(key, batch["actions"].shape)  # one z' for both next actions, as the official code
    rule = config.target_agg
    q_actor = q_vabc = None
    if rule != "vabc":
        next_actor = jnp.clip(actor_actions(actor_params, next_obs, noises, config), -1.0, 1.0)
        q_actor = aggregate_q(target_critic_params, next_obs, next_actor, config)
    if rule != "actor":
        flow_obs = next_obs if config.target_flow_at_next else obs
        next_flow = flow_actions(vabc_params, flow_obs, noises, config)
        q_vabc = aggregate_q(target_critic_params, next_obs, next_flow, config)
    next_q = combine(rule, q_actor, q_vabc)
    target_q = jax.lax.stop_gradient(batch["rewards"] + config.discount * batch["masks"] * next_q)
    q = critic_values(critic_params, obs, batch["actions"], config)
    loss = jnp.mean((q - target_q) ** 2)
    return loss, {
        "critic_loss": loss,
        "q_mean": q.mean(),
        "q_max": q.max(),
        "q_min": q.min(),
        "next_q_mean": next_q.mean(),
    }


def guidance_weights(target_critic_params, batch, actor_acts, vabc_acts, lam, config: Config):
    """The VaBC weights w(s, a) (constants of the VaBC loss) from the target critics; actor_acts are the
    clipped one-step actions, vabc_acts the clipped flow actions of the same z."""
    obs = batch["observations"]
    rule = config.guidance_agg
    q_actor = aggregate_q(target_critic_params, obs, actor_acts, config) if rule != "vabc" else None
    q_vabc = aggregate_q(target_critic_params, obs, vabc_acts, config) if rule != "actor" else None
    q_ref = combine(rule, q_actor, q_vabc)
    q_data = aggregate_q(target_critic_params, obs, batch["actions"], config)
    kappa = lam / config.eta
    scaled_data, scaled_ref = kappa * q_data, kappa * q_ref
    if config.guidance_fn == "softmax":
        weights = jnp.exp(scaled_data - jnp.logaddexp(scaled_data, scaled_ref))
    else:
        weights = jnp.exp(scaled_data - scaled_ref)
    weights = jax.lax.stop_gradient(weights)
    return weights, {
        "q_data": q_data.mean(),
        "q_ref": q_ref.mean(),
        "guidance": weights.mean(),
        "guidance_above_half": jnp.mean(weights > 0.5),
    }


def actor_loss(vabc_params, actor_params, frozen_vabc_params, frozen_critic_params, target_critic_params, batch,
               key, config: Config):
    """L_VaBC + alpha L_D + L_q. frozen_* and target_critic_params must come stop-gradiented."""
    obs, actions = batch["observations"], batch["actions"]
    noise_key, flow_key = jax.random.split(key)
    noises = jax.random.normal(noise_key, actions.shape)
    target_actions = jax.lax.stop_gradient(flow_actions(frozen_vabc_params, obs, noises, config))
    policy_actions = actor_actions(actor_params, obs, noises, config)
    distill_loss = jnp.mean((policy_actions - target_actions) ** 2)

    clipped = jnp.clip(policy_actions, -1.0, 1.0)
    q = aggregate_q(frozen_critic_params, obs, clipped, config)
    lam = jax.lax.stop_gradient(1.0 / jnp.abs(q).mean())
    q_loss = -q.mean() * (lam if config.normalize_q_loss else 1.0)

    def velocity(s, x, t):
        return vabc_velocity(vabc_params, s, x, t, config)

    errors = flow_matching_errors(velocity, obs, actions, flow_key)
    info = {}
    if config.eta == 0:
        vabc_loss = errors.mean()
    else:
        weights, info = guidance_weights(
            target_critic_params, batch, jax.lax.stop_gradient(clipped), target_actions, lam, config
        )
        vabc_loss = jnp.mean(weights * errors)

    loss = vabc_loss + config.alpha * distill_loss + q_loss
    return loss, {
        "actor_loss": loss,
        "vabc_loss": vabc_loss,
        "distill_loss": distill_loss,
        "q_loss": q_loss,
        "q": q.mean(),
    } | info


def total_loss(params, state: AgentState, batch, key):
    config = state.config
    critic_key, actor_key = jax.random.split(key)
    frozen = jax.lax.stop_gradient(params)
    target = jax.lax.stop_gradient(state.target_params)
    c_loss, c_info = critic_loss(
        params["critic"], target["critic"], frozen["actor"], frozen["vabc"], batch, critic_key, config
    )
    a_loss, a_info = actor_loss(
        params["vabc"], params["actor"], frozen["vabc"], frozen["critic"], target["critic"], batch, actor_key, config
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
    return jnp.clip(actor_actions(state.params["actor"], observations, noises, state.config), -1.0, 1.0)
