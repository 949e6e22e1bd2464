"""FlowQ: energy-guided flow policies (Alles, Chen, van der Smagt & Cseke, arXiv 2505.14139), as derived in
docs/flowq.md. No official code is public and the paper's method section could not be read, so the guided path
below is this project's derivation, checked against closed-form tilted Gaussians in tests/test_flowq.py.

Target policy: pi(a|s) ∝ pi_beta(a|s) exp(lam Q(s, a)). The velocity field is trained on the energy-guided path
p_t(x|s) exp(lam(t) Q(s, x)) (p_t = the linear path from N(0, I) to pi_beta; lam(0) = 0, lam(1) = lam), computed
in closed form for a Gaussian approximation N(m(s), S(s)) of the behaviour and a first-order (linear) expansion of
Q at the data action: the guided path is the unguided one translated by
    d(t) = lam(t) (t² S(s) + (1 - t)² I) g,   g = grad_a Q(s, a_1)  (a_1 = the data action).
Each data sample gets the Gaussian conditional path (simulation-free: no policy sampling, training cost
independent of the number of flow steps)
    x_t = (1 - t) x_0 + t a_1 + d(t),   target velocity u_t = a_1 - x_0 + d'(t),   x_0 ~ N(0, I), t ~ U[0, 1],
whose end point a_1 + lam S(s) g is exact for Gaussian behaviour and linear Q (pi_beta shifted by lam S w) and
first-order exact for quadratic Q.
Schedules lam(t) / lam (config.schedule):
  straight     the matrix lam t S (t² S + (1-t)² I)^-1, for which d(t) = lam t S g: the guided path is the straight
               line to the shifted action (Euler-exact); the default, the most accurate in the analytic tests
  t, t2        the scalar schedules t and t² of the paper's figure
  learnable    a monotone piecewise-linear beta(t) from 0 to 1, trained to minimise the path's kinetic energy
  t2_over_1mt  t²/(1-t): lam(t) diverges at t = 1, so it is only admissible with behavior_term=False
behavior_term=False drops t² S(s) (the research notes' conditional-only tilt): the shift lam(t) (1 - t)² g
vanishes at t = 1, so the exact end point is pi_beta again (kept as the ablation that shows it).

Networks and losses (one Adam; disjoint parameters; mean over batch and, for squared errors, over dims):
  critic (IQL, in-sample; fluxrl.agents.iql's losses)
            L_V = mean L2_tau(min_i Qbar_i(s, a) - V(s)),  y = r + gamma mask V(s'),  L_Q = mean_batch sum_i (Q_i - y)²
  behaviour m(s), S(s) = M(s) M(s)^T (a moment regression, used only inside the guidance)
            L_B = mean ||m(s) - a||² + mean ||S(s) - stop_grad((a - m(s))(a - m(s))^T)||²
  flow      L_F = mean ||v(s, x_t, t) - u_t||²   (g and S stop-gradiented; g from the online critics' mean)
  learnable schedule (only then): its own loss, the kinetic energy mean ||u_t||² (the flow term sees it frozen)
  total     L_V + L_Q + L_B + L_F (+ kinetic energy)
After the Adam step the target critic moves toward the critic's pre-update parameters (as fluxrl.agents.iql).
Acting: flow_steps Euler steps of v from z ~ N(0, I), clipped to [-1, 1] (no guidance at inference);
deterministic=True starts from z = 0.

Choices the paper leaves open (docs/flowq.md gives the reasons): the IQL critic (expectile 0.9, as the FQL
repository's IQL), g from the mean of the two online critics, lam = 10 and IQL's per-task values (IQL's AWR
inverse temperature, whose optimal policy is the same tilt), 10 Euler steps at inference (as FQL), 4x512 networks,
the moment-regression behaviour model, the straight schedule and the learnable schedule's objective.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fluxrl.agents import iql
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
from fluxrl.errors import FluxrlError
from fluxrl.flows import euler
from fluxrl.nn import MLP, Value, VectorField

NAME = "flowq"
EVAL_DETERMINISTIC = False  # a flow policy is evaluated by sampling
NUM_CRITICS = 2
SCHEDULES = ("straight", "t", "t2", "learnable", "t2_over_1mt")
LEARNABLE_BINS = 8  # pieces of the learnable (piecewise-linear, monotone) schedule


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # target critic polyak rate
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # the velocity field
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)  # value and critic
    behavior_hidden: tuple[int, ...] = (512, 512, 512, 512)  # behaviour mean / covariance model
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    expectile: float = 0.9  # IQL value expectile
    lam: float = 10.0  # inverse temperature of the target pi_beta exp(lam Q)
    schedule: str = "straight"  # lam(t) / lam: "straight", "t", "t2", "learnable" or "t2_over_1mt"
    behavior_term: bool = True  # include t² S(s) in the guided path (False: the notes' conditional-only tilt)
    flow_steps: int = 10  # Euler steps at inference (training never integrates the flow)


PRESETS = {
    "paper": Config(),
    "cpu": Config(actor_hidden=(256, 256), critic_hidden=(256, 256), behavior_hidden=(256, 256)),
}

# No per-task values are published for FlowQ (its experiments are on D4RL; no code). lam is IQL's per-task AWR
# inverse temperature (the same tilted target; 1 on cube-single, where lam = 1 beat lam = 10, docs/results.md),
# and the long-horizon OGBench environments get the discount every other agent here uses there (FQL README).
TASK_VALUES = merge_tables(
    PAPER_DISCOUNTS, {key: {"lam": values["alpha"]} for key, values in iql.TASK_VALUES.items() if "alpha" in values})
PER_TASK_FIELDS = ("lam",)


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    check_preset(PRESETS, preset)
    return with_task_values(config, task_name, TASK_VALUES)


BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "masks", "next_observations"))


def _validate(config: Config) -> None:
    if config.schedule not in SCHEDULES:
        raise FluxrlError(
            f"flowq config field schedule is '{config.schedule}'; it must be one of {', '.join(SCHEDULES)}."
        )
    if config.schedule == "t2_over_1mt" and config.behavior_term:
        raise FluxrlError(
            "flowq config field schedule 't2_over_1mt' makes lam(t) diverge at t = 1, which the behaviour term "
            "of the guided path cannot take; use it only with behavior_term=False."
        )
    if config.schedule == "straight" and not config.behavior_term:
        raise FluxrlError(
            "flowq config field schedule 'straight' shifts along S(s) g only, so it needs behavior_term=True."
        )
    if config.flow_steps < 1:
        raise FluxrlError(f"flowq config field flow_steps is {config.flow_steps}; it must be at least 1.")
    if not 0.0 < config.expectile < 1.0:
        raise FluxrlError(f"flowq config field expectile is {config.expectile}; it must lie strictly between 0 and 1.")


# --- networks -----------------------------------------------------------------------------------------------


class BehaviorModel(nn.Module):
    """(m(s), S(s)): the behaviour's mean and a PSD covariance S = M M^T, both from one MLP."""

    hidden_dims: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, observations: jax.Array) -> tuple[jax.Array, jax.Array]:
        d = self.action_dim
        out = MLP((*self.hidden_dims, d + d * d))(observations)
        factor = out[..., d:].reshape(*out.shape[:-1], d, d)
        return out[..., :d], factor @ jnp.swapaxes(factor, -1, -2)


def _velocity_field(config: Config) -> VectorField:
    return VectorField(config.actor_hidden, layer_norm=config.actor_layer_norm)


def _critic(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=NUM_CRITICS)


def _value(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=1)


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    _validate(config)
    obs, actions, action_dim = example_dims(example_batch)
    value_key, critic_key, flow_key, behavior_key = jax.random.split(key, 4)
    params = {
        "value": _value(config).init(value_key, obs)["params"],
        "critic": _critic(config).init(critic_key, obs, actions)["params"],
        "actor_flow": _velocity_field(config).init(flow_key, obs, actions, actions[:, :1])["params"],
    }
    if config.behavior_term:
        params["behavior"] = BehaviorModel(config.behavior_hidden, action_dim).init(behavior_key, obs)["params"]
    if config.schedule == "learnable":
        params["schedule"] = {"logits": jnp.zeros((LEARNABLE_BINS,), jnp.float32)}  # starts as lam(t) = lam t
    return create_state(params, {"critic": copy_tree(params["critic"])}, config, action_dim)


def behavior_moments(behavior_params, observations, action_dim: int, config: Config):
    """(m(s), S(s)) of the behaviour model: shapes (B, d) and (B, d, d)."""
    return BehaviorModel(config.behavior_hidden, action_dim).apply({"params": behavior_params}, observations)


def velocity(flow_params, observations, x, t, config: Config) -> jax.Array:
    return _velocity_field(config).apply({"params": flow_params}, observations, x, t)


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    """Q_i(s, a) of every ensemble member, shape (NUM_CRITICS, batch)."""
    return _critic(config).apply({"params": critic_params}, observations, actions)


# --- the guided path ----------------------------------------------------------------------------------------


def schedule_coefficients(t, config: Config, schedule_params=None):
    """(b, b', c, c'): the guided path's shift is d(t) = lam (b S g + c g), d'(t) = lam (b' S g + c' g).

    Scalar schedules lam(t) = lam beta(t) give b = beta t², c = beta (1 - t)²; the straight one b = t, c = 0.
    t has shape (B, 1)."""
    name = config.schedule
    one_minus = 1.0 - t
    if name == "straight":  # lam(t) = lam t S (t² S + (1-t)² I)^-1 (a matrix): d(t) = lam t S g
        return t, jnp.ones_like(t), jnp.zeros_like(t), jnp.zeros_like(t)
    if name == "t2_over_1mt":  # beta = t²/(1-t): only c is finite; written without the removable 0 * inf
        zeros = jnp.zeros_like(t)
        return zeros, zeros, t**2 * one_minus, 2.0 * t - 3.0 * t**2
    if name == "t":
        beta, dbeta = t, jnp.ones_like(t)
    elif name == "t2":
        beta, dbeta = t**2, 2.0 * t
    else:  # learnable: monotone piecewise-linear from 0 to 1, increments softmax(logits) per bin
        increments = jax.nn.softmax(schedule_params["logits"])
        bins = increments.shape[0]
        position = t * bins
        beta = jnp.sum(increments * jnp.clip(position - jnp.arange(bins), 0.0, 1.0), axis=-1, keepdims=True)
        index = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, bins - 1)
        dbeta = bins * increments[index[..., 0]][..., None]
    b, db = beta * t**2, dbeta * t**2 + 2.0 * beta * t
    c, dc = beta * one_minus**2, dbeta * one_minus**2 - 2.0 * beta * one_minus
    return b, db, c, dc


def guided_path(x0, a1, t, grad_q, cov, config: Config, schedule_params=None):
    """(x_t, u_t) of the energy-guided Gaussian path for data actions a1, noise x0, times t (B, 1), critic
    gradients grad_q = grad_a Q(s, a1) and behaviour covariances cov (B, d, d) (ignored without behavior_term)."""
    b, db, c, dc = schedule_coefficients(t, config, schedule_params)
    shift, dshift = c * grad_q, dc * grad_q
    if config.behavior_term:
        preconditioned = jnp.einsum("...ij,...j->...i", cov, grad_q)
        shift, dshift = shift + b * preconditioned, dshift + db * preconditioned
    x_t = (1.0 - t) * x0 + t * a1 + config.lam * shift
    return x_t, a1 - x0 + config.lam * dshift


def action_gradients(critic_params, observations, actions, config: Config) -> jax.Array:
    """grad_a of mean_i Q_i(s, a) at the given actions (each row's own gradient)."""

    def total_q(a):
        return critic_values(critic_params, observations, a, config).mean(axis=0).sum()

    return jax.grad(total_q)(actions)


# --- losses -------------------------------------------------------------------------------------------------


def behavior_loss(behavior_params, batch, action_dim: int, config: Config):
    mean, cov = behavior_moments(behavior_params, batch["observations"], action_dim, config)
    residual = jax.lax.stop_gradient(batch["actions"] - mean)
    outer = residual[..., :, None] * residual[..., None, :]
    mean_loss = jnp.mean((mean - batch["actions"]) ** 2)
    cov_loss = jnp.mean((cov - outer) ** 2)
    loss = mean_loss + cov_loss
    trace = jnp.trace(cov, axis1=-2, axis2=-1).mean()
    return loss, {"behavior_loss": loss, "mean_loss": mean_loss, "cov_loss": cov_loss, "cov_trace": trace}


def flow_loss(flow_params, schedule_params, grad_q, cov, batch, key, config: Config):
    """Flow matching on the guided path; grad_q and cov must come stop-gradiented. With the learnable schedule,
    the schedule gets the kinetic energy mean ||u_t||² only (the flow term sees it stop-gradiented)."""
    obs, actions = batch["observations"], batch["actions"]
    x_key, t_key = jax.random.split(key)
    x0 = jax.random.normal(x_key, actions.shape, actions.dtype)
    t = jax.random.uniform(t_key, (*actions.shape[:-1], 1), actions.dtype)
    frozen_schedule = jax.lax.stop_gradient(schedule_params)
    x_t, target = guided_path(x0, actions, t, grad_q, cov, config, frozen_schedule)
    fm_loss = jnp.mean((velocity(flow_params, obs, x_t, t, config) - target) ** 2)
    metrics = {"flow_loss": fm_loss, "guidance_norm": jnp.linalg.norm(grad_q, axis=-1).mean()}
    loss = fm_loss
    if config.schedule == "learnable":
        _, free_target = guided_path(x0, actions, t, grad_q, cov, config, schedule_params)
        kinetic = jnp.mean(free_target**2)
        loss = loss + kinetic
        metrics["kinetic_energy"] = kinetic
    return loss, metrics


def total_loss(params, state: AgentState, batch, key):
    config = state.config
    obs, actions = batch["observations"], batch["actions"]
    frozen = jax.lax.stop_gradient(params)
    target_critic = jax.lax.stop_gradient(state.target_params["critic"])

    v = iql.values(params["value"], obs, config)
    v_loss, v_info = iql.value_loss(v, iql.min_q(target_critic, obs, actions, config), config)
    next_v = iql.values(frozen["value"], batch["next_observations"], config)
    qs = critic_values(params["critic"], obs, actions, config)
    c_loss, c_info = iql.critic_loss(qs, next_v, batch, config)

    grad_q = jax.lax.stop_gradient(action_gradients(frozen["critic"], obs, actions, config))
    loss = v_loss + c_loss
    metrics = {f"value/{k}": x for k, x in v_info.items()} | {f"critic/{k}": x for k, x in c_info.items()}
    cov = None
    if config.behavior_term:
        b_loss, b_info = behavior_loss(params["behavior"], batch, state.action_dim, config)
        cov = jax.lax.stop_gradient(behavior_moments(frozen["behavior"], obs, state.action_dim, config)[1])
        loss = loss + b_loss
        metrics |= {f"behavior/{k}": x for k, x in b_info.items()}
    f_loss, f_info = flow_loss(params["actor_flow"], params.get("schedule"), grad_q, cov, batch, key, config)
    metrics |= {f"actor/{k}": x for k, x in f_info.items()}
    return loss + f_loss, metrics


def update(state: AgentState, batch, key):
    # Official order: the target critic follows the parameters the gradient was taken at (pre-update).
    return step_with_targets(state, lambda p: total_loss(p, state, batch, key))


def loss_metrics(state: AgentState, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def sample_actions(flow_params, observations, noises, config: Config) -> jax.Array:
    """flow_steps Euler steps of the learned field from `noises`, clipped to [-1, 1]."""

    def field(x, t):
        return velocity(flow_params, observations, x, t, config)

    return euler(field, noises, config.flow_steps, clip=(-1.0, 1.0))


def act(state: AgentState, observations, key, deterministic=False):
    noises = policy_noise(key, observations, state.action_dim, deterministic)
    return sample_actions(state.params["actor_flow"], observations, noises, state.config)
