"""SWFP: stepwise flow policy (Sun, Ding, Zhang & Wang, "Iterative Refinement of Flow Policies in Probability Space
for Online Reinforcement Learning", arXiv 2510.15388). No official code is public and only the abstract could be
read, so this is a RECONSTRUCTION of the stated method (docs/swfp.md lists every choice made here): a BC flow
policy pre-trained offline is fine-tuned online by a cascade of small flow blocks, each one JKO step

    rho_{k+1} = argmin_rho  -E_rho[Q(s, a)] - beta H(rho) + W_2^2(rho, rho_k) / (2 h),

taken by operator splitting: a learned transport step for the potential -Q with the W_2 trust region, then the
entropy's exact heat step (Gaussian noise). Train it offline-to-online: `--steps N --online_steps M`.

Networks: critic Q (2-member ensemble, LayerNorm; FQL's) and its target; base BC flow v(s, x, t) (FQL's
actor_bc_flow, 10 Euler steps); num_blocks residual blocks g_k(s, a) (small MLPs, zero-initialised output), stacked
along a leading axis, each with its own Adam state.

Offline phase (config.phase "offline", the first --steps updates):
  BC flow   L_BC = mean ||v(s, x_t, t) - (a - x_0)||^2 (flow_bc's loss)
  critic    a' ~ pi(s') (the base flow: no block is active yet), y = r + gamma mask agg_i Qbar_i(s', a'),
            L_Q = mean (Q_i(s, a) - y)^2: Q of the BC policy, the first iterate's critic
Online phase (phase "online", set by the engine through online_config): the base flow is frozen; update n works
on stage k = min(n // block_steps, num_blocks - 1), blocks 0..k-1 frozen, blocks > k inactive (identity):
  critic    as offline, a' from the whole active cascade (blocks 0..k, with their noise)
  block k   a_k ~ pi_k(s) = blocks 0..k-1 applied to the base flow's sample (no gradient), T_k(a) = a + h g_k(s, a);
            L_JKO = mean_batch [ -lambda min_i Q_i(s, clip(T_k(a_k))) + (h / 2) ||g_k(s, a_k)||^2 ]
            (frozen online critic; lambda = stop_grad(1 / mean |Q|) with normalize_q, else 1). Its minimiser is
            the backward-Euler (proximal) step of the potential: for Q = -(a - mu)' A (a - mu) / 2,
            g* = -(I + h A)^{-1} A (a - mu) (tests/test_swfp.py).
  acting    a_{j+1} = clip(a_j + h g_j(s, a_j) + sqrt(2 beta h) xi_j), xi_j ~ N(0, I), for every active block: the
            heat step that realises -beta H in the splitting; a long cascade on a fixed Q tends to the Gibbs
            policy exp(Q / beta) (with lambda = 1).
Target critic: polyak(tau) toward the pre-update critic, every update (FQL's order).
Acting: EVAL_DETERMINISTIC = False (sampled, as FQL and flow BC evaluate); deterministic=True starts the base flow
at z = 0 and drops the blocks' noise.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fluxrl.agents.base import (
    PAPER_DISCOUNTS,
    AgentState,
    BatchSpec,
    check_preset,
    copy_tree,
    example_dims,
    optimizer_step,
    polyak,
    with_task_values,
)
from fluxrl.agents.flow_bc import bc_flow_loss, flow_network, sample_flow
from fluxrl.errors import FluxrlError
from fluxrl.nn import Value
from fluxrl.nn.mlp import MLP

NAME = "swfp"
EVAL_DETERMINISTIC = False
NUM_CRITICS = 2
Q_AGGS = ("mean", "min")
PHASES = ("offline", "online")


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4  # critic and base flow
    block_lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005
    actor_hidden: tuple[int, ...] = (512, 512, 512, 512)  # the base BC flow (FQL's)
    critic_hidden: tuple[int, ...] = (512, 512, 512, 512)
    block_hidden: tuple[int, ...] = (256, 256)  # each flow block: "small"
    critic_layer_norm: bool = True
    actor_layer_norm: bool = False
    q_agg: str = "min"  # the TD target's aggregation of the target critics
    flow_steps: int = 10  # Euler steps of the base flow
    num_blocks: int = 10
    block_steps: int = 100_000  # online updates per block: 10 blocks over FQL's 1M online steps
    # h: the JKO step (the W_2 trust region's scale; with normalize_q a block moves actions by about h grad(Q/|Q|)).
    # Our choice, from {0.1, 1, 3} on a cpu-preset walker-stand check (docs/results.md): 0.1 barely moved the actions.
    step_size: float = 1.0
    temperature: float = 0.005  # beta: each active block adds N(0, 2 beta h) noise
    normalize_q: bool = True  # -Q / mean|Q| in the block loss (FQL's normalize_q_loss), so h is scale-free
    phase: str = "offline"  # "online" in the online phase (online_config); set by the engine, not by hand


PRESETS = {
    "paper": Config(),
    # 2x256 networks; 10 blocks of 2,000 online updates: a 20k-step online phase fits a CPU session.
    "cpu": Config(actor_hidden=(256, 256), critic_hidden=(256, 256), block_hidden=(128, 128), block_steps=2_000),
}


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """No per-task values are known; only the discount of FQL's long-horizon environments (its protocol)."""
    check_preset(PRESETS, preset)
    return with_task_values(config, task_name, PAPER_DISCOUNTS)


def online_config(config: Config) -> Config:
    """The online phase trains the blocks instead of the base flow."""
    return dataclasses.replace(config, phase="online")


BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "masks", "next_observations"))


class State(AgentState):
    """AgentState plus the count of online updates (it fixes the stage: which block trains)."""

    online_step: jax.Array  # int32


def _validate(config: Config) -> None:
    if config.q_agg not in Q_AGGS:
        raise FluxrlError(f"swfp config field q_agg is '{config.q_agg}'; it must be one of {', '.join(Q_AGGS)}.")
    if config.phase not in PHASES:
        raise FluxrlError(f"swfp config field phase is '{config.phase}'; it must be one of {', '.join(PHASES)}.")
    for field in ("flow_steps", "num_blocks", "block_steps"):
        if getattr(config, field) < 1:
            raise FluxrlError(f"swfp config field {field} is {getattr(config, field)}; it must be at least 1.")
    for field in ("step_size", "block_lr"):
        if getattr(config, field) <= 0:
            raise FluxrlError(f"swfp config field {field} is {getattr(config, field)}; it must be positive.")
    if config.temperature < 0:
        raise FluxrlError(f"swfp config field temperature is {config.temperature}; it must be at least 0.")


# --- networks ------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """g(s, a): an MLP on concat(s, a) whose output layer starts at zero, so a new block is the identity transport
    (the JKO step's starting point rho_{k+1} = rho_k)."""

    hidden_dims: Sequence[int]

    @nn.compact
    def __call__(self, observations, actions):
        x = MLP(tuple(self.hidden_dims), activate_final=True)(jnp.concatenate([observations, actions], axis=-1))
        return nn.Dense(actions.shape[-1], kernel_init=nn.initializers.zeros)(x)


def _critic(config: Config) -> Value:
    return Value(config.critic_hidden, layer_norm=config.critic_layer_norm, num_ensembles=NUM_CRITICS)


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    """Q_i(s, a) of every ensemble member: (NUM_CRITICS, batch)."""
    return _critic(config).apply({"params": critic_params}, observations, actions)


def block_drift(block_params, observations, actions, config: Config) -> jax.Array:
    """g_k(s, a) of one block's parameters."""
    return Block(config.block_hidden).apply({"params": block_params}, observations, actions)


def block_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.adam(config.block_lr)


def init(key: jax.Array, example_batch: dict, config: Config) -> State:
    _validate(config)
    obs, actions, action_dim = example_dims(example_batch)
    critic_key, flow_key, block_key = jax.random.split(key, 3)
    blocks = jax.vmap(lambda k: Block(config.block_hidden).init(k, obs, actions)["params"])(
        jax.random.split(block_key, config.num_blocks))
    params = {
        "critic": _critic(config).init(critic_key, obs, actions)["params"],
        "actor_bc_flow": flow_network(config).init(flow_key, obs, actions, actions[:, :1])["params"],
        "blocks": blocks,
    }
    return State(
        params=params,
        target_params={"critic": copy_tree(params["critic"])},
        # Adam is element-wise, so one Adam per module equals FQL's one Adam over disjoint losses; each block has
        # its own (own step count): a block starting at stage k begins a fresh optimisation.
        opt_state={"critic": optax.adam(config.lr).init(params["critic"]),
                   "actor_bc_flow": optax.adam(config.lr).init(params["actor_bc_flow"]),
                   "blocks": jax.vmap(block_optimizer(config).init)(blocks)},
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=int(action_dim),
        online_step=jnp.zeros((), jnp.int32),
    )


# --- the cascade -----------------------------------------------------------------------------------------------------


def stage(state: State) -> jax.Array:
    """The block the next online update trains."""
    return jnp.minimum(state.online_step // state.config.block_steps, state.config.num_blocks - 1)


def active_blocks(state: State) -> jax.Array:
    """How many blocks act: none offline (a Python 0: no block is evaluated); blocks 0..stage online."""
    return stage(state) + 1 if state.config.phase == "online" else 0


def apply_blocks(blocks, observations, actions, noises, count, config: Config) -> jax.Array:
    """Blocks 0..count-1 in order: a <- clip(a + h g_j(s, a) + sqrt(2 beta h) xi_j), noises (num_blocks, *a.shape)
    the xi_j (zeros: noise-free); blocks from `count` on leave a unchanged. `count` may be traced."""
    if isinstance(count, int) and count == 0:
        return actions
    h = config.step_size
    noise_scale = jnp.sqrt(2.0 * config.temperature * h)

    def step(a, inputs):
        index, params, xi = inputs
        moved = jnp.clip(a + h * block_drift(params, observations, a, config) + noise_scale * xi, -1.0, 1.0)
        return jnp.where(index < count, moved, a), None

    indices = jnp.arange(config.num_blocks)
    return jax.lax.scan(step, actions, (indices, blocks, noises))[0]


def cascade_noises(key, observations, action_dim: int, config: Config, deterministic=False):
    """(z, xi): the base flow's N(0, I) start and the blocks' N(0, I) noises; zeros when deterministic."""
    z_key, xi_key = jax.random.split(key)
    z = jax.random.normal(z_key, (*observations.shape[:-1], action_dim))
    xi = jax.random.normal(xi_key, (config.num_blocks, *z.shape))
    return jnp.where(deterministic, 0.0, z), jnp.where(deterministic, 0.0, xi)


def sample_policy(params, observations, key, count, action_dim: int, config: Config, deterministic=False):
    """a ~ pi: the base flow from z, then blocks 0..count-1."""
    z, xi = cascade_noises(key, observations, action_dim, config, deterministic)
    base = sample_flow(params["actor_bc_flow"], observations, z, config)
    return apply_blocks(params["blocks"], observations, base, xi, count, config)


# --- losses ----------------------------------------------------------------------------------------------------------


def aggregate(qs: jax.Array, how: str) -> jax.Array:
    return qs.min(axis=0) if how == "min" else qs.mean(axis=0)


def critic_loss(critic_params, target_critic_params, next_actions, batch, config: Config):
    """TD regression on a' ~ pi(s'); `target_critic_params` and `next_actions` come stop-gradiented."""
    next_q = aggregate(critic_values(target_critic_params, batch["next_observations"], next_actions, config),
                       config.q_agg)
    target_q = jax.lax.stop_gradient(batch["rewards"] + config.discount * batch["masks"] * next_q)
    q = critic_values(critic_params, batch["observations"], batch["actions"], config)
    loss = jnp.mean((q - target_q) ** 2)
    return loss, {"critic_loss": loss, "q_mean": q.mean(), "q_max": q.max(), "q_min": q.min()}


def jko_block_loss(block_params, observations, block_inputs, critic_fn: Callable[[jax.Array, jax.Array], jax.Array],
                   config: Config):
    """L_JKO of one block on its input actions a_k ~ rho_k (stop-gradiented by the caller). critic_fn(obs, actions)
    -> (members, batch) Q values of a frozen critic (tests pass a known function)."""
    drift = block_drift(block_params, observations, block_inputs, config)
    q = critic_fn(observations, jnp.clip(block_inputs + config.step_size * drift, -1.0, 1.0)).min(axis=0)
    scale = jax.lax.stop_gradient(1.0 / jnp.maximum(jnp.abs(q).mean(), 1e-6)) if config.normalize_q else 1.0
    transport = 0.5 * config.step_size * jnp.sum(drift**2, axis=-1)  # W_2^2 / (2h) of the map a -> a + h g
    loss = jnp.mean(-scale * q + transport)
    return loss, {"jko_loss": loss, "q": q.mean(), "transport_cost": transport.mean(),
                  "drift_norm": jnp.sqrt(jnp.sum(drift**2, axis=-1)).mean()}


def _take(tree, index):
    return jax.tree_util.tree_map(lambda x: x[index], tree)


def _put(tree, index, values):
    return jax.tree_util.tree_map(lambda x, v: x.at[index].set(v), tree, values)


def total_loss(params, state: State, batch, key):
    """The phase's differentiated loss at `params`: L_Q + L_BC offline; L_Q + L_JKO of the stage's block online
    (the stage's block parameters are params["blocks"] sliced at stage(state)). Only the phase's parameters are
    stepped by `update`, so the other phase's terms are diagnostics."""
    config = state.config
    next_key, flow_key, input_key = jax.random.split(key, 3)
    frozen = jax.lax.stop_gradient(params)
    next_actions = jax.lax.stop_gradient(sample_policy(
        frozen, batch["next_observations"], next_key, active_blocks(state), state.action_dim, config))
    target = jax.lax.stop_gradient(state.target_params)
    c_loss, c_info = critic_loss(params["critic"], target["critic"], next_actions, batch, config)
    flow_params = params if config.phase == "offline" else frozen  # the base flow is frozen online
    bc_loss = bc_flow_loss(flow_params["actor_bc_flow"], batch, flow_key, config)

    def frozen_critic(obs, actions):
        return critic_values(frozen["critic"], obs, actions, config)

    if config.phase == "offline":  # block 0's loss on the base flow's actions, logged only
        k = jnp.zeros((), jnp.int32)
        j_loss, j_info = jko_block_loss(_take(frozen["blocks"], k), batch["next_observations"], next_actions,
                                        frozen_critic, config)
        loss = c_loss + bc_loss
    else:
        k = stage(state)
        inputs = jax.lax.stop_gradient(
            sample_policy(frozen, batch["observations"], input_key, k, state.action_dim, config))
        j_loss, j_info = jko_block_loss(_take(params["blocks"], k), batch["observations"], inputs, frozen_critic,
                                        config)
        loss = c_loss + j_loss
    # Both phases log the same keys: the engine accumulates one metrics pytree across the run.
    metrics = ({f"critic/{n}": v for n, v in c_info.items()} | {"actor/bc_flow_loss": bc_loss}
               | {f"block/{n}": v for n, v in j_info.items()} | {"block/stage": k.astype(jnp.float32)})
    return loss, metrics


def update(state: State, batch, key):
    config = state.config
    grads, metrics = jax.grad(total_loss, has_aux=True)(state.params, state, batch, key)
    params, opt_state = dict(state.params), dict(state.opt_state)
    params["critic"], opt_state["critic"] = optimizer_step(optax.adam(config.lr), state.params["critic"],
                                                           grads["critic"], state.opt_state["critic"])
    if config.phase == "offline":
        params["actor_bc_flow"], opt_state["actor_bc_flow"] = optimizer_step(
            optax.adam(config.lr), state.params["actor_bc_flow"], grads["actor_bc_flow"],
            state.opt_state["actor_bc_flow"])
    else:  # the base flow is frozen; only the stage's block moves
        k = stage(state)
        block, block_opt = optimizer_step(block_optimizer(config), _take(state.params["blocks"], k),
                                          _take(grads["blocks"], k), _take(state.opt_state["blocks"], k))
        params["blocks"] = _put(state.params["blocks"], k, block)
        opt_state["blocks"] = _put(state.opt_state["blocks"], k, block_opt)
    target = polyak({"critic": state.params["critic"]}, state.target_params, config.tau)
    return state.replace(params=params, target_params=target, opt_state=opt_state, step=state.step + 1,
                         online_step=state.online_step + int(config.phase == "online")), metrics


def loss_metrics(state: State, batch, key):
    return total_loss(state.params, state, batch, key)[1]


def act(state: State, observations, key, deterministic=False):
    return sample_policy(state.params, observations, key, active_blocks(state), state.action_dim, state.config,
                         deterministic)
