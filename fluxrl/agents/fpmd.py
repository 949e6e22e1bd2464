"""FPMD: one-step flow policy mirror descent (Chen, Ma, Li, Wang & Dai, arXiv 2507.23675), the rectified-flow
variant FPMD-R, following the official code (tianyyiii/rectified_flow_policy: relax/algorithm/rf.py,
relax/network/rf.py, relax/utils/flow.py; defaults of scripts/train_mujoco.py). An online off-policy algorithm:
train it with `--steps 0 --online_steps N` (docs/fpmd.md).

Policy mirror descent with a KL proximity term: pi_{k+1}(a|s) ∝ pi_k(a|s) exp(Q(s, a) / lambda). The flow policy
regresses onto pi_{k+1} by weighting the flow-matching loss of actions drawn from pi_k with exp(Q / lambda).

Networks: twin critics Q_1, Q_2 (3x256, mish) with targets; velocity v(s, x, t) (3x256, mish, sinusoidal time
embedding) with an EMA copy that acts; log alpha, the exploration-noise scale.

Per batch (s, a, r, s', mask):
  a'        best-of-N: N = num_particles flows integrated with flow_steps Euler steps from x_0 = 0.5 N(0, I), each
            scored by min_i Q_i(s', .) before clipping; the best one, clipped to [-1, 1], plus
            N(0, (noise_scale alpha)^2 I) noise (not clipped again). Online velocity and critics, no gradient.
  critic    y = reward_scale r + gamma mask min_i Qbar_i(s', a');  L_Q = sum_i mean_batch (Q_i(s, a) - y)^2.
            Adam step on each Q (twice with the same gradient when critic_double_step, as the official code).
  policy    q = min_i Q_i(s', a') with the critics after their first Adam step; w = exp(q / (sigma_q T)),
            sigma_q an EMA (rate q_std_rate, starting at 1) of the batch std of q; no normalisation over the batch.
            L_pi = mean w ||v(s', x_t, t) - (a' - eps)||^2, x_t = t a' + (1 - t) eps, eps ~ N(0, I), t ~ U[0, 1]
            (mean over batch and action dims). Applied every policy_freq-th update (step % policy_freq == 0); the
            policy learning rate decays linearly from lr to lr_end over lr_decay_steps policy steps, starting
            after lr_decay_begin of them.
  alpha     every alpha_interval-th update: one Adam step on -log alpha (target_entropy - H(alpha)), where
            H(alpha) = 0.5 |A| log(2 pi e (0.1 alpha)^2) is the entropy of the exploration noise and target_entropy
            = -target_entropy_scale |A|: alpha tends to 10 exp(-target_entropy_scale) / sqrt(2 pi e) (0.54).
  targets   every policy_freq-th update, after the steps: Qbar <- polyak(Q, tau), EMA velocity <- polyak(v, tau)
            (post-update parameters, as the official code).

Acting (the EMA velocity, the current critics): deterministic=False is the official exploration action (a' above);
deterministic=True the official evaluation (`get_deterministic_action`: best-of-N without the noise, with
particles drawn from a fixed key, so the action depends on the observations alone). EVAL_DETERMINISTIC = True.

Deviations from the official code (docs/fpmd.md): act clips its output to [-1, 1] (the official action leaves the
box by the exploration noise; the env clips it); terminations come from the batch's masks (the official `done`);
the engine's online loop makes one update per environment step (the official script: 5 envs, one update per 5
transitions); the unused running mean of q is not kept.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fluxrl.agents.base import (
    AgentState,
    BatchSpec,
    check_preset,
    copy_tree,
    example_dims,
    optimizer_step,
    polyak,
)
from fluxrl.errors import FluxrlError
from fluxrl.nn.mlp import MLP, ensemblize

NAME = "fpmd"
EVAL_DETERMINISTIC = True
NUM_CRITICS = 2
INITIAL_ALPHA = 5.0  # official: log alpha starts at log 5
DETERMINISTIC_KEY = 0  # particles of deterministic acting come from jax.random.key(0)


@dataclasses.dataclass(frozen=True)
class Config:
    lr: float = 3e-4  # critics; the policy's initial rate
    lr_end: float = 3e-5  # the policy's final rate
    lr_decay_begin: int = 25_000  # policy optimizer steps before the linear decay starts
    lr_decay_steps: int = 50_000  # policy optimizer steps the decay takes
    alpha_lr: float = 7e-3
    alpha_interval: int = 250  # updates between alpha steps (official delay_alpha_update)
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # polyak rate of the target critics and the EMA policy
    policy_freq: int = 2  # policy and target updates every policy_freq-th update (official delay_update)
    reward_scale: float = 0.2
    critic_hidden: tuple[int, ...] = (256, 256, 256)
    actor_hidden: tuple[int, ...] = (256, 256, 256)
    time_dim: int = 16  # sinusoidal time embedding size
    flow_steps: int = 20  # Euler steps of every sample (official diffusion_steps)
    num_particles: int = 32  # best-of-N
    sample_noise_scale: float = 0.5  # x_0 = sample_noise_scale * N(0, I) when sampling (training noise: N(0, I))
    noise_scale: float = 0.1  # exploration noise std = noise_scale * alpha
    target_entropy_scale: float = 1.5
    temperature: float = 3.0  # T in w = exp(q / (sigma_q T))
    q_std_rate: float = 0.001  # EMA rate of sigma_q
    critic_double_step: bool = True  # the official code applies each critic gradient twice
    actor_layer_norm: bool = False  # no LayerNorm anywhere (official)
    critic_layer_norm: bool = False


PRESETS = {
    "paper": Config(),
    # Best-of-8 with 10 Euler steps on 2x256 networks: a 2-core CPU affords ~10x fewer flow evaluations per update.
    "cpu": Config(critic_hidden=(256, 256), actor_hidden=(256, 256), flow_steps=10, num_particles=8),
}


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """FPMD's defaults serve every task (the official scripts set no per-task values)."""
    check_preset(PRESETS, preset)
    return config


BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "masks", "next_observations"))


class State(AgentState):
    """AgentState plus the exploration temperature and the EMA of q's batch std (neither is a network)."""

    log_alpha: jax.Array  # ()
    q_std: jax.Array  # (): sigma_q


def _validate(config: Config) -> None:
    positive = ("flow_steps", "num_particles", "policy_freq", "alpha_interval", "time_dim")
    for field in positive:
        if getattr(config, field) < 1:
            raise FluxrlError(f"fpmd config field {field} is {getattr(config, field)}; it must be at least 1.")
    if config.time_dim % 2:
        raise FluxrlError(f"fpmd config field time_dim is {config.time_dim}; it must be even (sin and cos halves).")
    if config.temperature <= 0:
        raise FluxrlError(f"fpmd config field temperature is {config.temperature}; it must be positive.")


# --- networks ------------------------------------------------------------------------------------------------------


def haiku_linear_init(key, shape, dtype=jnp.float32):
    """Haiku's default Linear initialiser (the official networks are Haiku): N(0, 1/fan_in) truncated at ±2 std,
    without rescaling for the truncation."""
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) / math.sqrt(shape[0])


def sinusoidal_embedding(times: jax.Array, dim: int) -> jax.Array:
    """[sin(t f_j), cos(t f_j)] / sqrt(dim), f_j = 10000^(-j / (dim/2)) for j < dim/2 (official)."""
    freqs = 10000.0 ** -(jnp.arange(dim // 2) / (dim // 2))
    angles = times[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1) / math.sqrt(dim)


class Critics(nn.Module):
    """Twin Q(s, a): (NUM_CRITICS, *batch); observations broadcast against the actions' leading axes."""

    hidden_dims: Sequence[int]

    @nn.compact
    def __call__(self, observations, actions):
        mlps = ensemblize(MLP, NUM_CRITICS)((*self.hidden_dims, 1), activation=jax.nn.mish,
                                            kernel_init=haiku_linear_init)
        observations = jnp.broadcast_to(observations, (*actions.shape[:-1], observations.shape[-1]))
        return mlps(jnp.concatenate([observations, actions], axis=-1))[..., 0]


class Velocity(nn.Module):
    """v(s, x, t) on concat(s, x, e(t)), e(t) = Linear(dim) o mish o Linear(2 dim) of the sinusoidal embedding."""

    hidden_dims: Sequence[int]
    time_dim: int

    @nn.compact
    def __call__(self, observations, x, times):
        times = jnp.broadcast_to(jnp.asarray(times, x.dtype), x.shape[:-1])
        embedding = sinusoidal_embedding(times, self.time_dim)
        embedding = MLP((2 * self.time_dim, self.time_dim), activation=jax.nn.mish,
                        kernel_init=haiku_linear_init)(embedding)
        inputs = jnp.concatenate([jnp.broadcast_to(observations, (*x.shape[:-1], observations.shape[-1])), x,
                                  embedding], axis=-1)
        return MLP((*self.hidden_dims, x.shape[-1]), activation=jax.nn.mish, kernel_init=haiku_linear_init)(inputs)


def critic_values(critic_params, observations, actions, config: Config) -> jax.Array:
    return Critics(config.critic_hidden).apply({"params": critic_params}, observations, actions)


def velocity(actor_params, observations, x, times, config: Config) -> jax.Array:
    return Velocity(config.actor_hidden, config.time_dim).apply({"params": actor_params}, observations, x, times)


# --- optimizers ----------------------------------------------------------------------------------------------------


def critic_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.adam(config.lr)


def actor_optimizer(config: Config) -> optax.GradientTransformation:
    schedule = optax.schedules.linear_schedule(config.lr, config.lr_end, transition_steps=config.lr_decay_steps,
                                               transition_begin=config.lr_decay_begin)
    return optax.adam(schedule)


def alpha_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.adam(config.alpha_lr)


def init(key: jax.Array, example_batch: dict, config: Config) -> State:
    _validate(config)
    obs, actions, action_dim = example_dims(example_batch)
    critic_key, actor_key = jax.random.split(key)
    params = {
        "critic": Critics(config.critic_hidden).init(critic_key, obs, actions)["params"],
        "actor": Velocity(config.actor_hidden, config.time_dim).init(actor_key, obs, actions, 0.0)["params"],
    }
    log_alpha = jnp.asarray(math.log(INITIAL_ALPHA), jnp.float32)
    return State(
        params=params,
        target_params=copy_tree(params),  # target critics and the EMA policy
        opt_state={"critic": critic_optimizer(config).init(params["critic"]),
                   "actor": actor_optimizer(config).init(params["actor"]),
                   "log_alpha": alpha_optimizer(config).init(log_alpha)},
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=int(action_dim),
        log_alpha=log_alpha,
        q_std=jnp.ones((), jnp.float32),
    )


# --- sampling --------------------------------------------------------------------------------------------------------


def sample_flow(actor_params, observations, x0, config: Config) -> jax.Array:
    """Euler integration of v from x0 over t in [0, 1] with flow_steps steps; observations broadcast against x0's
    leading axes."""
    dt = 1.0 / config.flow_steps

    def step(x, i):
        return x + velocity(actor_params, observations, x, i * dt, config) * dt, None

    return jax.lax.scan(step, x0, jnp.arange(config.flow_steps, dtype=jnp.float32))[0]


def best_of_n(actor_params, critic_params, observations, action_dim: int, key, config: Config) -> jax.Array:
    """Of num_particles flow samples per observation, the one min_i Q_i scores highest, clipped to [-1, 1]:
    (*batch, A). As the official code, the critics score each particle before it is clipped."""
    x0 = config.sample_noise_scale * jax.random.normal(
        key, (config.num_particles, *observations.shape[:-1], action_dim))
    particles = sample_flow(actor_params, observations, x0, config)
    scores = critic_values(critic_params, observations, particles, config).min(axis=0)  # (N, *batch)
    best = jnp.argmax(scores, axis=0)
    return jnp.clip(jnp.take_along_axis(particles, best[None, ..., None], axis=0)[0], -1.0, 1.0)


def explore(actions, log_alpha, key, config: Config) -> jax.Array:
    return actions + jax.random.normal(key, actions.shape) * jnp.exp(log_alpha) * config.noise_scale


def sample_actions(actor_params, critic_params, log_alpha, observations, action_dim: int, key,
                   config: Config) -> jax.Array:
    """The official get_action: best-of-N plus exploration noise."""
    particle_key, noise_key = jax.random.split(key)
    best = best_of_n(actor_params, critic_params, observations, action_dim, particle_key, config)
    return explore(best, log_alpha, noise_key, config)


# --- losses ----------------------------------------------------------------------------------------------------------


def pmd_weights(q: jax.Array, q_std: jax.Array, temperature: float) -> jax.Array:
    """exp(q / (sigma_q T)): the mirror-descent step's density ratio pi_{k+1} / pi_k up to a per-state constant."""
    return jnp.exp(q / (q_std * temperature))


def weighted_flow_loss(actor_params, observations, actions, weights, key, config: Config) -> jax.Array:
    """mean over batch and action dims of w ||v(s, x_t, t) - (a - eps)||^2, x_t = t a + (1 - t) eps."""
    time_key, noise_key = jax.random.split(key)
    times = jax.random.uniform(time_key, actions.shape[:-1])
    eps = jax.random.normal(noise_key, actions.shape)
    x_t = times[..., None] * actions + (1.0 - times[..., None]) * eps
    error = (velocity(actor_params, observations, x_t, times, config) - (actions - eps)) ** 2
    return jnp.mean(weights[..., None] * error)


def noise_entropy(log_alpha: jax.Array, action_dim: int) -> jax.Array:
    """Entropy of the exploration noise N(0, (0.1 alpha)^2 I) in |A| dims (the official code's 0.1, not
    noise_scale)."""
    return 0.5 * action_dim * jnp.log(2.0 * jnp.pi * jnp.e * (0.1 * jnp.exp(log_alpha)) ** 2)


def alpha_loss(log_alpha: jax.Array, action_dim: int, config: Config) -> jax.Array:
    target = -config.target_entropy_scale * action_dim
    return -log_alpha * (target - jax.lax.stop_gradient(noise_entropy(log_alpha, action_dim)))


def critic_loss(critic_params, batch, targets, config: Config):
    q = critic_values(critic_params, batch["observations"], batch["actions"], config)
    losses = jnp.mean((q - targets) ** 2, axis=-1)  # per critic; the official code sums their gradients' effects
    return losses.sum(), {"critic_loss": losses.mean(), "q_mean": q.mean(), "q_max": q.max(), "q_min": q.min()}


def _maybe(flag, new, old):
    """`new` where the traced bool `flag` holds, else `old`, leaf by leaf."""
    return jax.tree_util.tree_map(lambda n, o: jnp.where(flag, n, o), new, old)


def update(state: State, batch, key):
    config = state.config
    next_key, policy_key = jax.random.split(key)
    params, target = state.params, jax.lax.stop_gradient(state.target_params)
    next_obs = batch["next_observations"]

    # a' ~ the current policy's best-of-N with exploration noise (pi_k's samples for both losses).
    next_actions = jax.lax.stop_gradient(sample_actions(params["actor"], params["critic"], state.log_alpha,
                                                        next_obs, state.action_dim, next_key, config))
    next_q = critic_values(target["critic"], next_obs, next_actions, config).min(axis=0)
    targets = jax.lax.stop_gradient(config.reward_scale * batch["rewards"] + config.discount * batch["masks"] * next_q)

    critic_grads, critic_info = jax.grad(critic_loss, has_aux=True)(params["critic"], batch, targets, config)
    critic, critic_opt = optimizer_step(critic_optimizer(config), params["critic"], critic_grads,
                                        state.opt_state["critic"])
    weighting_critic = jax.lax.stop_gradient(critic)  # the official policy loss reads the critics after one step
    if config.critic_double_step:
        critic, critic_opt = optimizer_step(critic_optimizer(config), critic, critic_grads, critic_opt)

    q = critic_values(weighting_critic, next_obs, next_actions, config).min(axis=0)
    weights = pmd_weights(q, state.q_std, config.temperature)
    policy_loss, actor_grads = jax.value_and_grad(weighted_flow_loss)(
        params["actor"], next_obs, next_actions, weights, policy_key, config)
    policy_turn = state.step % config.policy_freq == 0
    actor, actor_opt = _maybe(policy_turn, optimizer_step(actor_optimizer(config), params["actor"], actor_grads,
                                                          state.opt_state["actor"]),
                              (params["actor"], state.opt_state["actor"]))

    alpha_grad = jax.grad(alpha_loss)(state.log_alpha, state.action_dim, config)
    log_alpha, alpha_opt = _maybe(state.step % config.alpha_interval == 0,
                                  optimizer_step(alpha_optimizer(config), state.log_alpha, alpha_grad,
                                                 state.opt_state["log_alpha"]),
                                  (state.log_alpha, state.opt_state["log_alpha"]))

    new_params = {"critic": critic, "actor": actor}
    new_target = _maybe(policy_turn, polyak(new_params, state.target_params, config.tau), state.target_params)
    q_std = state.q_std + config.q_std_rate * (q.std() - state.q_std)
    metrics = {f"critic/{k}": v for k, v in critic_info.items()} | {
        "actor/policy_loss": policy_loss,
        "actor/weight_mean": weights.mean(),
        "actor/weight_max": weights.max(),
        "actor/q_std_ema": q_std,
        "actor/alpha": jnp.exp(log_alpha),
        "actor/noise_entropy": noise_entropy(log_alpha, state.action_dim),
    }
    new_state = state.replace(
        params=new_params, target_params=new_target, step=state.step + 1, log_alpha=log_alpha, q_std=q_std,
        opt_state={"critic": critic_opt, "actor": actor_opt, "log_alpha": alpha_opt})
    return new_state, metrics


def loss_metrics(state: State, batch, key):
    """update's metrics (the policy loss needs the critics' step, so this runs the update and drops its state)."""
    return update(state, batch, key)[1]


def act(state: State, observations, key, deterministic=False):
    config = state.config
    particle_key, noise_key = jax.random.split(key)
    # Deterministic: particles from a fixed key and no exploration noise (the official evaluation action).
    particle_key = jnp.where(deterministic, jax.random.key_data(jax.random.key(DETERMINISTIC_KEY)),
                             jax.random.key_data(particle_key))
    actions = best_of_n(state.target_params["actor"], state.params["critic"], observations, state.action_dim,
                        jax.random.wrap_key_data(particle_key), config)
    noisy = explore(actions, state.log_alpha, noise_key, config)
    return jnp.clip(jnp.where(deterministic, actions, noisy), -1.0, 1.0)
