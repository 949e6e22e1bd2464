"""Streaming Flow Policy (SFP): the action trajectory is the flow trajectory (arXiv 2505.21851, CoRL 2025;
official code github.com/siddancha/streaming-flow-policy at 80c4d73, Push-T `sfpd.py` / `sfps.py`).

A chunk of T demonstrated actions becomes a trajectory ξ: [0, 1] -> A, the first-order hold through the knots
ξ(j / (T-1)), j = 0..T-1. The first knot is the action already executed (the official code overwrites it with the
current position; here a_{i-1}, which the engine appends to every observation: BatchSpec.previous_action), the
others the chunk a_i .. a_{i+T-2}. Flow time is execution time: integrating the learned velocity from the last
executed action traces the next actions, which can be streamed as they are reached.

Conditional flows (gain k >= 0 pulls samples back onto the demonstration; the Push-T code runs k = 0):
  deterministic (SFP-A):  a(t) = ξ(t) + (a_0 - ξ(0)) e^{-kt},  a_0 ~ N(ξ(0), σ0²)
                          v_a  = ξ'(t) - k (a - ξ(t))
  stochastic (SFP-S):     a(t) = ξ(t) + (a_0 - ξ(0)) e^{-kt} + σ_r t z_0,   z(t) = (1 - (1 - σ1) t) z_0 + t ξ(t)
                          a_0 ~ N(ξ(0), σ0²), z_0 ~ N(0, I), σ_r = sqrt(σ1² - σ0² e^{-2k})
                          v_a = ξ'(t) - k (a - ξ(t)) + σ_r (1 + kt) z_0,   v_z = ξ(t) + t ξ'(t) - (1 - σ1) z_0
  L = E_{t ~ U[0, 1]} || v_θ(s, x(t), t) - v(x(t), t) ||²  (mean over batch and dims), x = a or (a, z).
The marginal velocity the network regresses onto is the posterior mix of these (tests/test_sfp.py checks a trained
field against it on a toy demonstration set).

Acting: from a(0) = the previous action (SFP-S: with z(0) ~ N(0, I); deterministic=True takes z(0) = 0; SFP-A
with deterministic=False starts at a ~ N(a_prev, σ0²)), `steps_per_action` Euler steps per knot interval up to
t = n / (T-1); the actions at t = 1/(T-1) .. n/(T-1), clipped to [-1, 1], are the chunk (n = action_horizon) the
env executes open loop. The knot at t = 0 is the action already executed, so it is not sent again.
The EMA of the velocity network's weights acts (diffusers 0.11.1 EMAModel with power 0.75, the official pin).

Deviations from the official code (docs/sfp.md): an MLP on concat(s, x, sinusoidal t-embedding) instead of DP's
ConditionalUnet1D; one observation instead of a history of two (the previous action carries the recent past);
fixed-step Euler instead of dopri5 (atol = rtol = 1e-4); the cosine decay length is a config field (the official
schedule decays over the run's length: set decay_steps to --steps).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from fluxrl.agents.base import AgentState, BatchSpec, check_preset, copy_tree, example_dims
from fluxrl.errors import FluxrlError
from fluxrl.flows import integrate
from fluxrl.nn import EmbeddedTimeVectorField

NAME = "sfp"
EVAL_DETERMINISTIC = False  # the official evaluation samples z(0) (SFP-S)
VARIANTS = ("stochastic", "deterministic")
EMA_MAX_DECAY = 0.9999  # diffusers EMAModel's default `decay`


@dataclasses.dataclass(frozen=True)
class Config:
    variant: str = "stochastic"  # SFP-S (latent z picks the mode) or "deterministic" (SFP-A)
    pred_horizon: int = 16  # T knots per trajectory, the first being the previous action
    action_horizon: int = 8  # n actions executed per query
    gain: float = 0.0  # k, stabilising gain
    sigma0: float = 0.1  # tube width at t = 0
    sigma1: float = 0.1  # SFP-S: width of a's marginal at t = 1 (>= sigma0 e^{-k})
    steps_per_action: int = 6  # Euler steps between consecutive actions at inference
    lr: float = 1e-4
    weight_decay: float = 1e-6  # AdamW
    warmup_steps: int = 500  # linear warm-up of the learning rate
    decay_steps: int = 0  # cosine decay to 0 over this many steps (warm-up included); 0: constant after warm-up
    ema_power: float = 0.75
    batch_size: int = 1024
    velocity_hidden: tuple[int, ...] = (512, 512, 512, 512)
    time_embedding_dim: int = 256  # DP's diffusion_step_embed_dim
    time_embedding_scale: float = 100.0  # sin_embedding_scale of the official sfpd training


PRESETS = {
    "paper": Config(),
    "cpu": Config(batch_size=256, velocity_hidden=(256, 256), time_embedding_dim=32, warmup_steps=100),
}


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """Imitation has no per-task values here (the official code tunes Push-T only)."""
    check_preset(PRESETS, preset)
    return config


def batch_spec(config: Config) -> BatchSpec:
    """a_{i-1} (the observation's last action_dim entries) and the T - 1 actions a_i .. a_{i+T-2}."""
    return BatchSpec(keys=("observations", "actions", "actions_chunk"), chunk_size=config.pred_horizon - 1,
                     previous_action=True)


BATCH_SPEC = batch_spec(Config())


def velocity_network(config: Config) -> EmbeddedTimeVectorField:
    """v(s, x, t): an MLP on concat(s, x, sinusoidal embedding of time_embedding_scale * t), x's size out."""
    return EmbeddedTimeVectorField(config.velocity_hidden, config.time_embedding_dim,
                                   time_scale=config.time_embedding_scale)


def optimizer(config: Config) -> optax.GradientTransformation:
    """AdamW with a linear warm-up from 0, then cosine decay to 0 at decay_steps (diffusers' 'cosine' schedule)
    or a constant rate."""
    if config.decay_steps:
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.decay_steps)
    else:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, config.lr, max(config.warmup_steps, 1)), optax.constant_schedule(config.lr)],
            [max(config.warmup_steps, 1)])
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def ema_decay(updates_done: jax.Array, power: float) -> jax.Array:
    """diffusers 0.11.1 EMAModel.get_decay after `updates_done` optimizer steps: 0 at the first, then
    1 - (1 + s)^-power for s = updates_done - 1, at most 0.9999."""
    s = jnp.asarray(updates_done, jnp.float32) - 1.0
    decay = jnp.minimum(1.0 - (1.0 + s) ** -power, EMA_MAX_DECAY)
    return jnp.where(s <= 0, 0.0, decay)


def check_config(config: Config) -> None:
    if config.variant not in VARIANTS:
        raise FluxrlError(f"sfp variant must be one of {', '.join(VARIANTS)}, got '{config.variant}'.")
    if config.pred_horizon < 2:
        raise FluxrlError(f"sfp pred_horizon is {config.pred_horizon}; a trajectory needs at least 2 knots.")
    if not 1 <= config.action_horizon <= config.pred_horizon - 1:
        raise FluxrlError(f"sfp action_horizon is {config.action_horizon}; it must be between 1 and "
                          f"pred_horizon - 1 = {config.pred_horizon - 1}.")
    if config.steps_per_action < 1:
        raise FluxrlError(f"sfp steps_per_action is {config.steps_per_action}; it must be at least 1.")
    if config.gain < 0 or config.sigma0 < 0:
        raise FluxrlError(f"sfp gain and sigma0 must be >= 0, got {config.gain} and {config.sigma0}.")
    if config.variant == "stochastic" and config.sigma1 ** 2 < config.sigma0 ** 2 * math.exp(-2 * config.gain):
        raise FluxrlError(f"sfp sigma1 = {config.sigma1} is below sigma0 e^-gain = "
                          f"{config.sigma0 * math.exp(-config.gain):.4g}; the latent flow needs sigma1 >= that.")


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    check_config(config)
    obs, actions, action_dim = example_dims(example_batch)
    if obs.shape[-1] < action_dim:
        raise FluxrlError(f"sfp reads the previous action from the observations' last {action_dim} entries, but "
                          f"they have {obs.shape[-1]}.")
    x = jnp.zeros((obs.shape[0], state_dim(config, action_dim)), obs.dtype)
    params = {"velocity": velocity_network(config).init(key, obs, x, jnp.zeros((obs.shape[0], 1)))["params"]}
    return AgentState(params=params, target_params={"velocity": copy_tree(params["velocity"])},
                      opt_state=optimizer(config).init(params), step=jnp.zeros((), jnp.int32), config=config,
                      action_dim=int(action_dim))


def state_dim(config: Config, action_dim: int) -> int:
    return 2 * action_dim if config.variant == "stochastic" else action_dim


def previous_actions(observations: jax.Array, action_dim: int) -> jax.Array:
    return observations[..., -action_dim:]


def demonstration(knots: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(ξ(t), ξ'(t)) of the first-order hold through knots[..., j, :] at times j / (T-1); t has knots' batch
    shape."""
    segments = knots.shape[-2] - 1
    position = t * segments
    j = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, segments - 1)
    take = lambda i: jnp.take_along_axis(knots, i[..., None, None], axis=-2)[..., 0, :]  # noqa: E731
    start, end = take(j), take(j + 1)
    frac = (position - j)[..., None]
    return start + frac * (end - start), segments * (end - start)


def conditional_flow(knots: jax.Array, t: jax.Array, eps: jax.Array, z0: jax.Array, config: Config):
    """(x(t), v(x(t), t)) of the conditional flow of the demonstrations `knots` (…, T, A) at times t (…,), for the
    start noise eps (a_0 = ξ(0) + σ0 eps) and, for SFP-S, the latent start z0; x = a or concat(a, z)."""
    xi, xi_dot = demonstration(knots, t)
    k, tt = config.gain, t[..., None]
    tube = config.sigma0 * jnp.exp(-k * tt) * eps
    if config.variant == "deterministic":
        a = xi + tube
        return a, xi_dot - k * (a - xi)
    sigma_r = math.sqrt(max(config.sigma1 ** 2 - config.sigma0 ** 2 * math.exp(-2 * k), 0.0))
    a = xi + tube + sigma_r * tt * z0
    z = (1.0 - (1.0 - config.sigma1) * tt) * z0 + tt * xi
    v_a = xi_dot - k * (a - xi) + sigma_r * (1.0 + k * tt) * z0
    v_z = xi + tt * xi_dot - (1.0 - config.sigma1) * z0
    return jnp.concatenate([a, z], axis=-1), jnp.concatenate([v_a, v_z], axis=-1)


def trajectory_knots(batch: dict, action_dim: int) -> jax.Array:
    """(B, T, A): the previous action, then the batch's actions_chunk."""
    return jnp.concatenate([previous_actions(batch["observations"], action_dim)[:, None], batch["actions_chunk"]],
                           axis=1)


def flow_loss(velocity_params, batch, key, config: Config, action_dim: int) -> jax.Array:
    knots = trajectory_knots(batch, action_dim)
    batch_size = knots.shape[0]
    key_t, key_eps, key_z = jax.random.split(key, 3)
    t = jax.random.uniform(key_t, (batch_size,))
    eps = jax.random.normal(key_eps, (batch_size, action_dim))
    z0 = jax.random.normal(key_z, (batch_size, action_dim))
    x, target = conditional_flow(knots, t, eps, z0, config)
    predicted = velocity_network(config).apply({"params": velocity_params}, batch["observations"], x, t[:, None])
    return jnp.mean((predicted - jax.lax.stop_gradient(target)) ** 2)


def total_loss(params, state: AgentState, batch, key):
    loss = flow_loss(params["velocity"], batch, key, state.config, state.action_dim)
    return loss, {"actor/flow_loss": loss}


def update(state: AgentState, batch, key):
    config = state.config
    grads, metrics = jax.grad(lambda p: total_loss(p, state, batch, key), has_aux=True)(state.params)
    updates, opt_state = optimizer(config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step + 1, config.ema_power)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.target_params["velocity"],
                                 params["velocity"])
    return state.replace(params=params, target_params={"velocity": ema}, opt_state=opt_state,
                         step=state.step + 1), metrics


def loss_metrics(state: AgentState, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def stream(velocity_params, observations, x0, config: Config) -> jax.Array:
    """The flow states at t = j / (T-1), j = 1..action_horizon, from x0 at t = 0: (…, n, dim x)."""
    segments = config.pred_horizon - 1

    def velocity(x, t):
        return velocity_network(config).apply({"params": velocity_params}, observations, x, t)

    def interval(x, j):
        x = integrate(velocity, x, config.steps_per_action, t0=j / segments, t1=(j + 1) / segments)
        return x, x

    _, states = jax.lax.scan(interval, x0, jnp.arange(config.action_horizon, dtype=x0.dtype))
    return jnp.moveaxis(states, 0, -2)


def act(state: AgentState, observations, key, deterministic=False):
    config, action_dim = state.config, state.action_dim
    a0 = jnp.clip(previous_actions(observations, action_dim), -1.0, 1.0)
    noise = jax.random.normal(key, a0.shape[:-1] + (state_dim(config, action_dim),))
    noise = jnp.where(deterministic, jnp.zeros_like(noise), noise)
    if config.variant == "stochastic":
        x0 = jnp.concatenate([a0, noise[..., action_dim:]], axis=-1)
    else:
        x0 = a0 + config.sigma0 * noise
    states = stream(state.target_params["velocity"], observations, x0, config)
    return jnp.clip(states[..., :action_dim], -1.0, 1.0)
