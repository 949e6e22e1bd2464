"""Q-learning with adjoint matching (QAM; Li & Levine, ICLR 2026), following the official code
(ColinQiyangLi/qam, agents/qam.py) step by step.

Goal: fine-tune a flow policy toward pi(a|s) ∝ pi_beta(a|s) exp(inv_temp * Q(s, a)) with the critic's action
gradient, without back-propagating through the sampler.

Networks: critic ensemble Q_i (num_critics = 10, LayerNorm) and its target; base (behaviour) flow v_beta(s, x, t)
trained by flow matching, with an EMA target vbar_beta; fine-tuned flow v_theta(s, x, t), a separate,
independently initialised network. One Adam over everything, after global-norm gradient clipping at 1.0.

Action chunks (Q-chunking, `chunk_size` H; official: H = 5 on cube, scene and puzzle, 1 elsewhere): the action a
is the flattened chunk of the next H actions (dimension H * action_dim) and each batch row is an H-step piece of
one episode (the sampler's *_chunk fields): r = sum_{k<H} gamma^k valid_k r_k, mask = min_k mask_k over the chunk,
s' = the observation after the chunk's last step in the episode, valid = valid_{H-1} (the chunk does not run past
its episode's end). H = 1 is the plain transition (valid = 1).

Per batch (x_t = t x_1 + (1 - t) x_0, h = 1 / N, N = flow_steps, t_i = i / N):
  critic     a' = clip(Euler_N(v_theta, s', z')),  Qbar' = mean_i Qbar_i(s', a') - rho * std_i Qbar_i(s', a')
             y = r + gamma^H * mask * Qbar',  L_Q = mean_{i, batch} valid (Q_i(s, a) - y)²
  base flow  L_BC = mean_batch valid ||v_beta(s, x_t, t) - (a - x_0)||²  (mean over action dims)
  rollout    memoryless SDE (no gradient), x_0 ~ N(0, I), sigma_i = sqrt(2 (1 - t_i + h) / (t_i + h)):
               x_{i+1} = x_i + h (2 v_theta(s, x_i, t_i) - x_i / (t_i + h)) + sqrt(h) sigma_i eps_i,  i < N - 1
               x_N     = x_{N-1} + h vbar_beta(s, x_{N-1}, t_{N-1})         (last step: ODE with the base)
  adjoint    atilde_N = -inv_temp * grad_a mean_i Qbar_i(s, clip(x_N))   (target critic)
             atilde_i = atilde_{i+1} + h J_b(x_i)^T atilde_{i+1},  b(x) = 2 vbar_beta(s, x, t_i + h) - x / (t_i + h)
             (the "lean" adjoint: base drift only; the vector-Jacobian product comes from jax.vjp)
  matching   L_AM = mean_batch sum_{i, dims} ((2 / sigma_i) (v_theta(s, x_i, t_i) - vbar_beta(s, x_i, t_i))
                                              + sigma_i atilde_i)²
             i.e. v_theta regresses on vbar_beta - (sigma_i² / 2) atilde_i
  total      L_Q + L_BC + L_AM; clip the global gradient norm to 1; Adam; then the target critic and the target
             base flow move toward their pre-update parameters (polyak tau = 0.005).
Acting: a = clip(Euler_N(v_theta, s, z)), z ~ N(0, I) (the base flow when inv_temp = 0, as the official code); with
H > 1 `act` returns the chunk, shaped (batch, H, action_dim), which fluxrl.envs.evaluate executes open loop.
The official evaluation samples z (EVAL_DETERMINISTIC = False); deterministic=True uses z = 0.

Why the target: with the memoryless schedule sigma(t)² = 2 (1 - t) / t the SDE with drift 2 v - x / t has the
flow's marginals, and adjoint matching with terminal adjoint -inv_temp grad Q makes the fine-tuned SDE's
terminal law pi_beta exp(inv_temp Q) / Z (Domingo-Enrich et al., 2025). tests/test_qam.py checks this against
the closed form for Gaussian behaviour with linear and quadratic Q.

Deviations from the official code (see docs/qam.md):
- A dataset chunk starts at any row and repeats its episode's last row past the end (the official sampler starts
  among the first size - H + 1 rows and reads on into the next episode); either way such a chunk has valid = 0
  and drops out of L_Q and L_BC. Online, chunks run open loop through a per-seed action queue, as the official
  online phase (fluxrl/train/engine.py).
- Only plain QAM: the QAM-F (one-step distillation) and QAM-E (edit policy) variants, the `residual`
  parameterisation and best-of-n sampling (default n = 1, a no-op) are not implemented.
- Gradient routing is explicit (stop_gradient on every rollout quantity, the targets, the frozen critic).
- The rollout draws its initial noise and each step's noise from split keys (the official code reuses its key
  for the initial noise); the distribution is the same.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fluxrl.agents.base import (
    AgentState,
    BatchSpec,
    check_preset,
    copy_tree,
    example_dims,
    merge_tables,
    policy_noise,
    polyak,
    with_task_values,
)
from fluxrl.agents.flow_bc import flow_network, sample_flow
from fluxrl.errors import FluxrlError
from fluxrl.flows.losses import flow_matching_errors
from fluxrl.nn import Value

NAME = "qam"
EVAL_DETERMINISTIC = False

# velocity(observations, x, t) -> dx/dt and q_value(observations, actions) -> (*batch,) Q values: the frozen base
# flow and critic the adjoint sees (tests pass closed-form ones).
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
QValueFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # polyak rate of the target critic and the target base flow
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # base and fine-tuned flows
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    num_critics: int = 10
    rho: float = 0.5  # pessimism of the TD target: mean - rho * std over the target ensemble
    inv_temp: float = 0.3  # the temperature tau of pi_beta exp(tau Q); per domain in TASK_VALUES
    flow_steps: int = 10  # SDE steps of the adjoint rollout and Euler steps of the policy
    target_actor: bool = True  # the adjoint and the regression target use the EMA base flow
    use_target_grad: bool = True  # the terminal adjoint uses the target critic's action gradient
    clip_adj: bool = True  # ... taken at the clipped action clip(x_N, -1, 1)
    clip_grad: bool = True  # clip the global gradient norm to 1.0 before Adam
    sparse_rewards: bool = False  # r <- -1[r != 0] (the paper's sparse puzzle and scene tasks)
    chunk_size: int = 1  # H: actions per policy query, the critic scores the flattened chunk; per domain below


PRESETS = {
    "paper": Config(),
    "cpu": Config(actor_hidden=(256, 256), critic_hidden=(256, 256)),
}

# experiments/reproduce.py of the official repository (through the research notes): inv_temp per domain,
# gamma = 0.995 on the giant / humanoid mazes, rho = 0 on humanoidmaze, sparse rewards on puzzle and scene.
# Keys are dataset names; a task matches the longest key it starts with (that key's values only, so the chunk
# length is repeated on every key of its domains). Other tasks keep the defaults.
DOMAIN_VALUES = merge_tables(
    {
        "puzzle-3x3-play": {"inv_temp": 3.0, "sparse_rewards": True},
        "puzzle-4x4-play": {"inv_temp": 30.0, "sparse_rewards": True},
        "scene-play": {"inv_temp": 1.0, "sparse_rewards": True},
        "cube-double-play": {"inv_temp": 1.0},
        "cube-triple-play": {"inv_temp": 3.0},
        "cube-quadruple-play": {"inv_temp": 1.0},
        "antmaze-large-navigate": {"inv_temp": 10.0},
        "antmaze-giant-navigate": {"inv_temp": 3.0, "discount": 0.995},
        "humanoidmaze-medium-navigate": {"inv_temp": 3.0, "discount": 0.995, "rho": 0.0},
        "humanoidmaze-large-navigate": {"inv_temp": 3.0, "discount": 0.995, "rho": 0.0},
    },
)
# Q-chunking: horizon 5 on the manipulation domains, 1 (the default) on locomotion and navigation.
CHUNKED_DOMAINS, CHUNK_HORIZON = ("cube", "scene", "puzzle"), 5
TASK_VALUES = merge_tables(
    DOMAIN_VALUES,
    {key: {"chunk_size": CHUNK_HORIZON}
     for key in (*CHUNKED_DOMAINS, *DOMAIN_VALUES) if key.split("-")[0] in CHUNKED_DOMAINS},
)
PER_TASK_FIELDS = ("inv_temp",)


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """The paper's per-domain inv_temp / discount / rho / sparse rewards / chunk length; they depend on the task's
    reward scale and horizon, not on network size, so the cpu preset gets them too."""
    check_preset(PRESETS, preset)
    return with_task_values(config, task_name, TASK_VALUES)


BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "masks", "next_observations"))
CHUNK_KEYS = ("observations", "actions_chunk", "rewards_chunk", "masks_chunk", "valid_chunk", "next_observations_chunk")


def batch_spec(config: Config) -> BatchSpec:
    """The fields update() reads under `config`: single transitions (BATCH_SPEC) or chunks of chunk_size steps."""
    return BATCH_SPEC if config.chunk_size == 1 else BatchSpec(keys=CHUNK_KEYS, chunk_size=config.chunk_size)


def _validate(config: Config) -> None:
    if config.flow_steps < 1:
        raise FluxrlError(f"qam config field flow_steps is {config.flow_steps}; it must be at least 1.")
    if config.num_critics < 2:
        raise FluxrlError(f"qam config field num_critics is {config.num_critics}; the ensemble needs at least 2.")
    if config.inv_temp < 0:
        raise FluxrlError(f"qam config field inv_temp is {config.inv_temp}; it must not be negative.")
    if config.chunk_size < 1:
        raise FluxrlError(f"qam config field chunk_size is {config.chunk_size}; it must be at least 1.")


def _critic(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=config.num_critics)


def _optimizer(config: Config) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate=config.lr)
    return optax.chain(optax.clip_by_global_norm(1.0), adam) if config.clip_grad else adam


def _flat_example(example_batch: dict, config: Config) -> dict:
    """The example batch with chunk_size > 1: its observations and its chunks flattened into actions."""
    if config.chunk_size == 1:
        return example_batch
    chunk = example_batch.get("actions_chunk")
    if chunk is None or chunk.ndim != 3 or chunk.shape[1] != config.chunk_size:
        raise FluxrlError(f"qam config field chunk_size is {config.chunk_size}, so the example batch needs "
                          f"'actions_chunk' shaped (batch, {config.chunk_size}, action_dim); got "
                          f"{None if chunk is None else tuple(chunk.shape)}.")
    return {"observations": example_batch["observations"], "actions": jnp.reshape(chunk, (chunk.shape[0], -1))}


def init(key: jax.Array, example_batch: dict, config: Config) -> AgentState:
    """State for `config`; with chunk_size H > 1 the networks take flattened chunks (H * action_dim) and
    state.action_dim is the per-step dimension."""
    _validate(config)
    obs, actions, flat_dim = example_dims(_flat_example(example_batch, config))
    critic_key, slow_key, fast_key = jax.random.split(key, 3)
    times = actions[:, :1]
    params = {
        "critic": _critic(config).init(critic_key, obs, actions)["params"],
        "actor_slow": flow_network(config).init(slow_key, obs, actions, times)["params"],
        "actor_fast": flow_network(config).init(fast_key, obs, actions, times)["params"],
    }
    target = {"critic": copy_tree(params["critic"]), "actor_slow": copy_tree(params["actor_slow"])}
    return AgentState(
        params=params,
        target_params=target,
        opt_state=_optimizer(config).init(params),
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=flat_dim // config.chunk_size,
    )


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    """Q_i(s, a) of every ensemble member, shape (num_critics, batch)."""
    return _critic(config).apply({"params": critic_params}, observations, actions)


def flow_velocity(flow_params, observations, x, t, config: Config) -> jax.Array:
    """v(s, x, t) of a flow network (base or fine-tuned)."""
    return flow_network(config).apply({"params": flow_params}, observations, x, t)


def policy_flow(params, config: Config):
    """The flow the policy samples from: the fine-tuned one, or the base one when inv_temp = 0 (official)."""
    return params["actor_slow"] if config.inv_temp == 0 else params["actor_fast"]


def sigmas(times: jax.Array, config: Config) -> jax.Array:
    """The memoryless noise scale sqrt(2 (1 - t) / t), with t shifted by h = 1 / flow_steps to avoid 1/0."""
    h = 1.0 / config.flow_steps
    return jnp.sqrt(2.0 * (1.0 - times + h) / (times + h))


def _rewards(rewards, config: Config):
    return -(rewards != 0).astype(jnp.float32) if config.sparse_rewards else rewards


def chunk_terms(batch, config: Config):
    """(actions, rewards, masks, next_observations, valid) of a batch, as the official sample_sequence forms them.

    H = chunk_size = 1: the transition itself (rewards after the sparse transformation), valid None (all valid).
    H > 1, from the *_chunk fields (step k of the chunk; steps past the episode's end repeat its last row and
    have valid_k = 0): actions = the flattened chunk (batch, H * action_dim); rewards = sum_k gamma^k valid_k r_k;
    masks = min_k mask_k (the repeated rows are the last valid one, so this is the minimum over valid steps);
    next_observations = the observation after the last valid step; valid = valid_{H-1}."""
    if config.chunk_size == 1:
        return batch["actions"], _rewards(batch["rewards"], config), batch["masks"], batch["next_observations"], None
    chunk, valid = batch["actions_chunk"], batch["valid_chunk"]
    discounts = config.discount ** jnp.arange(config.chunk_size, dtype=jnp.float32)
    rewards = jnp.sum(_rewards(batch["rewards_chunk"], config) * valid * discounts, axis=-1)
    actions = jnp.reshape(chunk, (*chunk.shape[:-2], -1))
    return (actions, rewards, jnp.min(batch["masks_chunk"], axis=-1), batch["next_observations_chunk"][..., -1, :],
            valid[..., -1])


def _weighted_mean(errors, valid):
    return jnp.mean(errors) if valid is None else jnp.mean(errors * valid)


def critic_loss(critic_params, target_critic_params, policy_params, batch, key, config: Config):
    """TD regression on the pessimistic ensemble target, bootstrapped gamma^H after the chunk and weighted by the
    chunk's `valid` (`chunk_terms`); the targets and `policy_params` come stop-gradiented."""
    actions, rewards, masks, next_obs, valid = chunk_terms(batch, config)
    noises = jax.random.normal(key, actions.shape)
    next_actions = sample_flow(policy_params, next_obs, noises, config)  # clipped
    next_qs = critic_values(target_critic_params, next_obs, next_actions, config)
    next_q = next_qs.mean(axis=0) - config.rho * next_qs.std(axis=0)
    target_q = jax.lax.stop_gradient(rewards + config.discount**config.chunk_size * masks * next_q)
    q = critic_values(critic_params, batch["observations"], actions, config)
    loss = _weighted_mean((q - target_q) ** 2, valid)
    return loss, {"critic_loss": loss, "q_mean": q.mean(), "q_max": q.max(), "q_min": q.min()}


def adjoint_rollout(fine: VelocityFn, base: VelocityFn, q_value: QValueFn, observations, key, action_dim: int,
                    config: Config):
    """The memoryless-SDE rollout of the fine-tuned flow and its lean adjoint, all without gradient.

    Returns (xs, adjoints, times, info): xs[i] is the state before step i, adjoints[i] = atilde_i, both shaped
    (flow_steps, batch, action_dim); times[i] = i / flow_steps; info: sizes of the terminal adjoint."""
    n, h = config.flow_steps, 1.0 / config.flow_steps
    times = jnp.arange(n, dtype=jnp.float32) / n
    noise_key, step_key = jax.random.split(key)
    x0 = jax.random.normal(noise_key, (*observations.shape[:-1], action_dim))

    def sde_step(x, inputs):
        t, k = inputs
        drift = 2.0 * fine(observations, x, t) - x / (t + h)
        x_next = x + h * drift + math.sqrt(h) * sigmas(t, config) * jax.random.normal(k, x.shape)
        return x_next, x

    x_last, path = jax.lax.scan(sde_step, x0, (times[:-1], jax.random.split(step_key, n - 1)))
    x_final = x_last + h * base(observations, x_last, times[-1])  # the last step is an ODE step with the base
    xs = jnp.concatenate([path, x_last[None]], axis=0)

    def q_sum(actions):
        return q_value(observations, jnp.clip(actions, -1.0, 1.0) if config.clip_adj else actions).sum()

    terminal = -config.inv_temp * jax.grad(q_sum)(x_final)

    def adjoint_step(adjoint, inputs):
        x, t = inputs
        _, vjp = jax.vjp(lambda y: 2.0 * base(observations, y, t + h) - y / (t + h), x)
        adjoint = adjoint + h * vjp(adjoint)[0]
        return adjoint, adjoint

    _, adjoints = jax.lax.scan(adjoint_step, terminal, (xs, times), reverse=True)
    info = {"adj_mean": jnp.abs(terminal).mean(), "adj_max": jnp.abs(terminal).max()}
    return jax.lax.stop_gradient(xs), jax.lax.stop_gradient(adjoints), times, info


def adjoint_matching_loss(fine_params, base: VelocityFn, q_value: QValueFn, observations, key, action_dim: int,
                          config: Config, fine_apply: Callable | None = None):
    """L_AM at `fine_params` (the only differentiated argument); `base` and `q_value` must be frozen.

    fine_apply(params, observations, x, t) is the fine-tuned field's parameterisation; default: the agent's
    network (the analytic tests pass one that can represent the exact answer)."""
    apply = fine_apply or functools.partial(flow_velocity, config=config)
    fine = functools.partial(apply, jax.lax.stop_gradient(fine_params))
    xs, adjoints, times, info = adjoint_rollout(fine, base, q_value, observations, key, action_dim, config)
    n = config.flow_steps
    obs = jnp.broadcast_to(observations, (n, *observations.shape))
    t = times[:, None, None]
    sigma = sigmas(t, config)
    v_fine = apply(fine_params, obs, xs, t)
    v_base = jax.lax.stop_gradient(base(obs, xs, t))
    residual = (v_fine - v_base) * (2.0 / sigma) + sigma * adjoints
    loss = jnp.mean(jnp.sum(residual**2, axis=(0, 2)))  # sum over flow steps and dims, mean over the batch
    return loss, info


def actor_loss(slow_params, fast_params, base: VelocityFn, q_value: QValueFn, batch, key, config: Config):
    """L_BC of the base flow at `slow_params` (weighted by the chunk's valid, as the official code) + L_AM of the
    fine-tuned flow at `fast_params` (unweighted: it reads only the observations)."""
    bc_key, am_key = jax.random.split(key)
    actions, *_, valid = chunk_terms(batch, config)
    slow = functools.partial(flow_velocity, slow_params, config=config)
    bc_loss = _weighted_mean(flow_matching_errors(slow, batch["observations"], actions, bc_key), valid)
    am_loss, info = adjoint_matching_loss(fast_params, base, q_value, batch["observations"], am_key,
                                          actions.shape[-1], config)
    return bc_loss + am_loss, {"bc_flow_loss": bc_loss, "adj_loss": am_loss, **info}


def total_loss(params, state: AgentState, batch, key):
    """L_Q + L_BC + L_AM at `params` (the differentiated tree); targets and frozen copies via stop_gradient."""
    config = state.config
    critic_key, actor_key = jax.random.split(key)
    frozen = jax.lax.stop_gradient(params)
    target = jax.lax.stop_gradient(state.target_params)
    c_loss, c_info = critic_loss(params["critic"], target["critic"], policy_flow(frozen, config), batch,
                                 critic_key, config)

    base_params = target["actor_slow"] if config.target_actor else frozen["actor_slow"]
    base = functools.partial(flow_velocity, base_params, config=config)
    grad_critic = target["critic"] if config.use_target_grad else frozen["critic"]

    def q_value(obs, actions):
        return critic_values(grad_critic, obs, actions, config).mean(axis=0)

    a_loss, a_info = actor_loss(params["actor_slow"], params["actor_fast"], base, q_value, batch, actor_key, config)
    metrics = {f"critic/{k}": v for k, v in c_info.items()} | {f"actor/{k}": v for k, v in a_info.items()}
    return c_loss + a_loss, metrics


def update(state: AgentState, batch, key):
    grads, metrics = jax.grad(lambda p: total_loss(p, state, batch, key), has_aux=True)(state.params)
    updates, opt_state = _optimizer(state.config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Official order: the targets follow the parameters the gradient was taken at (pre-update).
    target = polyak(
        {"critic": state.params["critic"], "actor_slow": state.params["actor_slow"]},
        state.target_params,
        state.config.tau,
    )
    new_state = state.replace(params=params, target_params=target, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def loss_metrics(state: AgentState, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def act(state: AgentState, observations, key, deterministic=False):
    """Actions (*batch, action_dim); with chunk_size H > 1 chunks (*batch, H, action_dim) to execute in order."""
    h = state.config.chunk_size
    noises = policy_noise(key, observations, h * state.action_dim, deterministic)
    actions = sample_flow(policy_flow(state.params, state.config), observations, noises, state.config)
    return actions if h == 1 else jnp.reshape(actions, (*actions.shape[:-1], h, state.action_dim))
