"""InFOM: intention-conditioned flow occupancy models (Zheng, Park, Levine & Eysenbach, ICLR 2026), following
the official code (chongyi-zheng/infom, agents/infom.py at HEAD, which includes the fixes of commits 04712b0 and
e9dcd84). Two phases: reward-free pre-training, then fine-tuning on reward-labelled data.

Networks (one Adam over all of them, as the official single TrainState):
  intention_encoder  p_e(z | s', a') = N(mu, diag sigma²)   LayerNorm MLP, log sigma unclipped (fluxrl.nn.intention)
  vf                 v(x_t, t | s, a, z) in R^obs_dim        MLP on concat(s, a, z, x_t, t), no LayerNorm; EMA target
  critic             Q_1, Q_2(s, a)  (not z-conditioned)     MLP, no LayerNorm
  reward             r(s)                                    LayerNorm MLP
  actor              pi(a | s) = N(mu(s), I)                 constant std 1, no tanh

Pre-training loss on (s, a, s', a') (mean over the batch; squared errors are means over state dims):
  z = mu + sigma * xi ~ p_e(. | s', a')                     (reparameterised)
  KL = mean_{batch, dims} [½(mu² + sigma² - 1) - log sigma] (averaged over latent dims, as the code)
  current  x = t s + (1 - t) eps_c;   L_cur = |v(x, t | s, a, z) - sg(s - eps_c)|²
  future   s_f+ = sg(Euler_10(vbar(. | s', a', sg z), eps_f))   target vf, clipped to the data range every step
           x = t s_f+ + (1 - t) eps_f  (the same eps_f: the noise coupling)
           L_fut = |v(x, t | s, a, z_fut) - sg(vbar(x, t | s', a', sg z))|²
  L_occ = mean[(1 - gamma) L_cur + gamma L_fut] + kl_weight KL
  L_pre = L_occ - mean log pi(a | s)                        (behaviour cloning of the actor)
  z_fut is sg(z) with encoder_gradient="official" (the code: the encoder learns from L_cur and KL only) and z with
  "full_elbo" (the paper's objective: the encoder also learns through the online prediction of L_fut). In both, the
  bootstrapped side of L_fut (the target samples s_f+ and the target velocity) is a TD target: no gradient reaches
  any parameter through it, z included.
Fine-tuning loss on (s, a, r, s', a'):
  L_r = mean (r(s) - r)²
  Q_hat_z(s, a) = 1/(1 - gamma) * mean_{i<N} r(s_f^(i)),  s_f^(i) = Euler_10(v(. | s, a, z), eps_i), clipped; one z
           per (s, a) shared by its N samples: z ~ N(0, I) (critic_latent_type="prior") or z ~ p_e(. | s', a')
           ("encoding"); online vf and reward, all stop-gradiented. One fused computation over B x N rows.
  L_Q = mean_{k, batch} |mu - 1(Q_hat_z < Q_k)| (Q_hat_z - Q_k)²   (expectile mu: implicit GPI, Q -> mu-expectile
           of Q_z over z; no bootstrapping, no target critic)
  L_pi = -mean q + alpha mean(-log pi(a | s)),  q = agg_k Q_k(s, clip(mu_pi(s), -1, 1)) with the critic frozen
           (agg = min by default; with normalize_q_loss, -mean q is scaled by sg(1 / mean|q|); with const_std=False
           the critic sees a clipped sample instead of the mean)
  L_ft = L_r + L_Q + L_occ + 1[actor step] L_pi
Actor steps are fine-tuning updates i = 1, 2, ... with i % actor_freq == 0 (the official `full_update`). On the
other updates L_pi is absent, yet the single Adam still moves the actor by its momentum, as in the official code.
The target vf follows the pre-update online vf (tau) after every update of both phases; begin_finetune copies the
online vf into the target (the official `target_reset` at fine-tuning step 1) and restarts the update counter.
Acting: clip(mu_pi(s), -1, 1) when deterministic (the official evaluation, temperature 0), else a clipped sample.

Flow samples are clipped to [min + 1e-5, max - 1e-5] of the current phase's (normalised) dataset: set_data_stats
stores the bounds in the state (non-trained leaves; +-inf, i.e. no clipping, until it is called). Observation
normalisation itself is the engine's job (config field obs_norm).

Deviations from the official code: the actor term is computed on every update and multiplied by 0 or 1 (the
official code skips it with a static flag), so actor metrics are logged on every update; the time input, condition
and noisy state are concatenated in a different order (same function class and init); gradient routing is written
out with stop_gradient. encoder_gradient="full_elbo" is an option the official code does not have. Terminal flags
and masks are ignored, as in the official code (the sampler never pairs (s, a) with an a' across an episode end).

This module also holds the pieces its two ablations import (fluxrl/agents/fom.py, fluxrl/agents/infom_gpi.py):
agents without an "intention_encoder" in their params use an empty latent (no encoder, no KL).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fluxrl.agents.base import (
    AgentState,
    BatchSpec,
    check_preset,
    copy_tree,
    example_dims,
    gradient_step,
    make_optimizer,
    polyak,
    task_overrides,
)
from fluxrl.errors import FluxrlError
from fluxrl.flows import euler
from fluxrl.nn import GaussianActor, Value, VectorField, vector_field_given
from fluxrl.nn.intention import IntentionEncoder, kl_to_standard_normal

NAME = "infom"
EVAL_DETERMINISTIC = True
NUM_CRITICS = 2
CLIP_MARGIN = 1e-5  # flow samples stay this far inside the data range (official value)
Q_AGGS = ("mean", "min")
OBS_NORMS = ("normal", "none")
ENCODER_GRADIENTS = ("official", "full_elbo")
CRITIC_LATENT_TYPES = ("prior", "encoding")
PAPER_HIDDEN = (512, 512, 512, 512)


@dataclasses.dataclass(frozen=True)
class OccupancyConfig:
    """Fields of every flow-occupancy agent (InFOM and its ablations); defaults are the official get_config."""

    lr: float = 3e-4
    batch_size: int = 256
    discount: float = 0.99
    tau: float = 0.005  # EMA rate of the target vector field
    actor_hidden: tuple[int, ...] = PAPER_HIDDEN
    value_hidden: tuple[int, ...] = PAPER_HIDDEN  # vector field and critic (official value_hidden_dims)
    reward_hidden: tuple[int, ...] = PAPER_HIDDEN
    value_layer_norm: bool = False  # vector field and critic (False at HEAD since commit 96af9c4)
    actor_layer_norm: bool = False
    reward_layer_norm: bool = True
    q_agg: str = "min"  # aggregation of the two critics in the actor loss: "min" or "mean"
    num_flow_goals: int = 16  # N: future samples per Monte-Carlo Q estimate
    num_flow_steps: int = 10  # Euler steps of every flow sample
    clip_flow_goals: bool = True  # clip flow samples to the data range after every Euler step
    actor_freq: int = 4  # the actor loss enters every actor_freq-th fine-tuning update
    alpha: float = 10.0  # BC weight of the fine-tuning actor loss (per domain, see TASK_VALUES)
    const_std: bool = True  # actor std fixed at 1 (False: learned state-independent log std)
    normalize_q_loss: bool = False
    obs_norm: str = "normal"  # read by the engine: "normal" (z-score with each phase's dataset stats) or "none"


@dataclasses.dataclass(frozen=True)
class IntentionConfig(OccupancyConfig):
    """Fields of the agents with an intention encoder (InFOM, InFOM + explicit GPI)."""

    encoder_hidden: tuple[int, ...] = PAPER_HIDDEN
    encoder_layer_norm: bool = True
    latent_dim: int = 512
    kl_weight: float = 0.01  # lambda; multiplies the KL averaged over latent dims
    encoder_gradient: str = "official"  # "official" or "full_elbo" (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Config(IntentionConfig):
    expectile: float = 0.9  # mu of the implicit-GPI critic loss
    critic_latent_type: str = "prior"  # z of Q_hat_z: "prior" (N(0, I)) or "encoding" (p_e(. | s', a'))


CPU_SIZES = dict(
    actor_hidden=(256, 256),
    value_hidden=(256, 256),
    reward_hidden=(256, 256),
    encoder_hidden=(256, 256),
    latent_dim=32,
    num_flow_goals=8,
)
PRESETS = {"paper": Config(), "cpu": Config(**CPU_SIZES)}

# Per-domain values of the official README ("full list", from the paper's appendix tables 2-3). Keys are dataset
# names or DMC domains; a task matches the longest key it starts with. The OGBench noisy datasets keep the defaults.
TASK_VALUES = {
    "cube-single-play": {"latent_dim": 512, "kl_weight": 0.05, "expectile": 0.95, "alpha": 30.0},
    "cube-double-play": {"latent_dim": 128, "kl_weight": 0.025, "expectile": 0.9, "alpha": 30.0},
    "scene-play": {"latent_dim": 128, "kl_weight": 0.2, "expectile": 0.99, "alpha": 300.0},
    "puzzle-4x4-play": {"latent_dim": 128, "kl_weight": 0.1, "expectile": 0.95, "alpha": 300.0},
    "cheetah": {"latent_dim": 128, "kl_weight": 0.05, "expectile": 0.9, "alpha": 0.3},
    "walker": {"latent_dim": 512, "kl_weight": 0.1, "expectile": 0.9, "alpha": 0.3},
    "quadruped": {"latent_dim": 512, "kl_weight": 0.005, "expectile": 0.9, "alpha": 0.3},
    "jaco": {"latent_dim": 512, "kl_weight": 0.2, "expectile": 0.9, "alpha": 0.1},
    # No official values: our choice, by analogy with cube-single (same {-1, 0} success reward, so the same
    # |Q| scale and alpha), with the smaller latent of the other OGBench domains for 2-D states. Untested.
    "pointmaze": {"latent_dim": 128, "kl_weight": 0.05, "expectile": 0.95, "alpha": 30.0},
}
SIZE_FIELDS = ("latent_dim",)  # network sizes: the cpu preset keeps its own
PER_TASK_FIELDS = ("kl_weight", "expectile", "alpha")


def task_config(config, task_name: str | None, preset: str, presets: dict):
    """`config` with the task's per-domain values among the fields `config` has; the cpu preset keeps its sizes."""
    check_preset(presets, preset)
    fields = {f.name for f in dataclasses.fields(config)}
    values = {
        k: v
        for k, v in task_overrides(task_name, TASK_VALUES).items()
        if k in fields and not (preset == "cpu" and k in SIZE_FIELDS)
    }
    return dataclasses.replace(config, **values)


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    return task_config(config, task_name, preset, PRESETS)


PRETRAIN_BATCH_SPEC = BatchSpec(keys=("observations", "actions", "next_observations", "next_actions"))
BATCH_SPEC = BatchSpec(keys=("observations", "actions", "rewards", "next_observations", "next_actions"))


class State(AgentState):
    """AgentState plus the clipping bounds of flow samples (set by set_data_stats; not trained)."""

    flow_low: jax.Array  # (obs_dim,): data min + CLIP_MARGIN
    flow_high: jax.Array  # (obs_dim,): data max - CLIP_MARGIN


# --- configuration checks ----------------------------------------------------------------------------------------


def _require(ok: bool, agent: str, field: str, value: Any, rule: str) -> None:
    if not ok:
        raise FluxrlError(f"{agent} config field {field} is {value!r}; it must be {rule}.")


def validate(config, agent: str) -> None:
    """Raise FluxrlError on the first config value outside its range (any of the three agents' configs)."""
    _require(0.0 <= config.discount < 1.0, agent, "discount", config.discount, "in [0, 1)")
    _require(0.0 < config.tau <= 1.0, agent, "tau", config.tau, "in (0, 1]")
    _require(config.q_agg in Q_AGGS, agent, "q_agg", config.q_agg, f"one of {', '.join(Q_AGGS)}")
    _require(config.obs_norm in OBS_NORMS, agent, "obs_norm", config.obs_norm, f"one of {', '.join(OBS_NORMS)}")
    for field in ("num_flow_goals", "num_flow_steps", "actor_freq"):
        _require(getattr(config, field) >= 1, agent, field, getattr(config, field), "at least 1")
    if isinstance(config, IntentionConfig):
        _require(config.latent_dim >= 1, agent, "latent_dim", config.latent_dim, "at least 1")
        _require(config.kl_weight >= 0.0, agent, "kl_weight", config.kl_weight, "non-negative")
        _require(
            config.encoder_gradient in ENCODER_GRADIENTS,
            agent,
            "encoder_gradient",
            config.encoder_gradient,
            f"one of {', '.join(ENCODER_GRADIENTS)}",
        )
    if hasattr(config, "expectile"):
        _require(0.0 < config.expectile < 1.0, agent, "expectile", config.expectile, "in (0, 1)")
    if hasattr(config, "critic_latent_type"):
        _require(
            config.critic_latent_type in CRITIC_LATENT_TYPES,
            agent,
            "critic_latent_type",
            config.critic_latent_type,
            f"one of {', '.join(CRITIC_LATENT_TYPES)}",
        )


# --- networks ----------------------------------------------------------------------------------------------------


def vector_field(config) -> VectorField:
    return VectorField(config.value_hidden, layer_norm=config.value_layer_norm)


def critic_network(config) -> Value:
    return Value(config.value_hidden, layer_norm=config.value_layer_norm, num_ensembles=NUM_CRITICS)


def reward_network(config) -> Value:
    return Value(config.reward_hidden, layer_norm=config.reward_layer_norm, num_ensembles=1)


def actor_network(config, action_dim: int) -> GaussianActor:
    return GaussianActor(
        config.actor_hidden,
        action_dim,
        layer_norm=config.actor_layer_norm,
        tanh_squash=False,
        state_dependent_std=False,
        const_std=config.const_std,
    )


def intention_encoder(config) -> IntentionEncoder:
    return IntentionEncoder(config.encoder_hidden, config.latent_dim, layer_norm=config.encoder_layer_norm)


def has_intentions(params: dict) -> bool:
    return "intention_encoder" in params


def init_state(key: jax.Array, example_batch: dict, config, agent: str, intentions: bool) -> State:
    """A fresh state of an occupancy agent (with an intention encoder when `intentions`)."""
    validate(config, agent)
    obs, actions, action_dim = example_dims(example_batch)
    vf_key, critic_key, reward_key, actor_key, encoder_key = jax.random.split(key, 5)
    latents = jnp.zeros((obs.shape[0], config.latent_dim if intentions else 0), obs.dtype)
    params = {
        "vf": vector_field(config).init(vf_key, condition(obs, actions, latents), obs, obs[:, :1])["params"],
        "critic": critic_network(config).init(critic_key, obs, actions)["params"],
        "reward": reward_network(config).init(reward_key, obs)["params"],
        "actor": actor_network(config, action_dim).init(actor_key, obs)["params"],
    }
    if intentions:
        params["intention_encoder"] = intention_encoder(config).init(encoder_key, obs, actions)["params"]
    obs_dim = obs.shape[-1]
    return State(
        params=params,
        target_params={"vf": copy_tree(params["vf"])},
        opt_state=make_optimizer(config).init(params),
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=int(action_dim),
        flow_low=jnp.full((obs_dim,), -jnp.inf, jnp.float32),
        flow_high=jnp.full((obs_dim,), jnp.inf, jnp.float32),
    )


def init(key: jax.Array, example_batch: dict, config: Config) -> State:
    return init_state(key, example_batch, config, NAME, intentions=True)


# --- flows -------------------------------------------------------------------------------------------------------


def condition(observations, actions, latents) -> jax.Array:
    """The vector field's condition concat(s, a, z); latents may have zero width (agents without intentions)."""
    return jnp.concatenate([observations, actions, latents], axis=-1)


def velocity(vf_params, cond, x, t, config) -> jax.Array:
    return vector_field(config).apply({"params": vf_params}, cond, x, t)


def flow_samples(vf_params, cond, noises, state: State) -> jax.Array:
    """num_flow_steps Euler steps of v(. | cond) from `noises` (any leading shape; cond need only broadcast against
    it), clipped to the data range after every step when clip_flow_goals (official compute_fwd_flow_goals). The
    condition's share of the vf's first layer is computed once, not at every step."""
    config = state.config
    clip = (state.flow_low, state.flow_high) if config.clip_flow_goals else None
    return euler(
        vector_field_given(vector_field(config), vf_params, cond),
        noises,
        config.num_flow_steps,
        clip=clip,
        clip_every_step=True,
    )


def q_estimates(vf_params, reward_params, observations, actions, latents, key, state: State) -> jax.Array:
    """Monte-Carlo Q_hat_z(s, a) = 1/(1 - gamma) mean_{i<N} r(s_f^(i)), s_f^(i) ~ q(. | s, a, z) (the vf given).

    observations (B, obs_dim), actions (B, action_dim), latents (B, *G, L): one estimate per latent, each from its
    own N = num_flow_goals samples; returns (B, *G). All B x G x N flows run as one batch in one Euler scan, and
    the condition (s, a, z) enters the vf's first layer once per estimate, not once per sample and step.
    Differentiable in its inputs: callers stop gradients."""
    config = state.config
    groups = latents.shape[:-1]
    n = config.num_flow_goals

    def spread(x):  # (B, d) -> (*groups, d)
        x = x.reshape((x.shape[0],) + (1,) * (len(groups) - 1) + (x.shape[-1],))
        return jnp.broadcast_to(x, (*groups, x.shape[-1]))

    cond = condition(spread(observations), spread(actions), latents)[..., None, :]  # (*groups, 1, d): one for all N
    noises = jax.random.normal(key, (*groups, n, observations.shape[-1]), observations.dtype)
    goals = flow_samples(vf_params, cond, noises, state)
    rewards = reward_network(config).apply({"params": reward_params}, goals)
    return rewards.mean(axis=-1) / (1.0 - config.discount)


# --- losses (each takes the whole differentiated params tree and stops gradients itself) ------------------------


def encode(encoder_params, observations, actions, config):
    return intention_encoder(config).apply({"params": encoder_params}, observations, actions)


def intentions(state: State, observations, actions) -> jax.Array:
    """Posterior means E[z | s', a'] (rows, latent_dim); only agents with an intention encoder define it."""
    return encode(state.params["intention_encoder"], observations, actions, state.config).loc


def occupancy_loss(params, state: State, batch, key):
    """The SARSA flow occupancy loss plus kl_weight * KL (the negative ELBO); see the module docstring."""
    config = state.config
    obs, actions = batch["observations"], batch["actions"]
    next_obs, next_actions = batch["next_observations"], batch["next_actions"]
    latent_key, time_key, current_key, future_key = jax.random.split(key, 4)
    info = {}
    if has_intentions(params):
        dist = encode(params["intention_encoder"], next_obs, next_actions, config)
        latents = dist.sample(latent_key)
        kl = kl_to_standard_normal(dist).mean()
        future_pred_latents = latents if config.encoder_gradient == "full_elbo" else jax.lax.stop_gradient(latents)
        info["kl_loss"] = kl
    else:
        latents = future_pred_latents = jnp.zeros((obs.shape[0], 0), obs.dtype)
        kl = 0.0
    frozen_obs = jax.lax.stop_gradient(obs)

    t = jax.random.uniform(time_key, (obs.shape[0], 1), obs.dtype)
    current_noises = jax.random.normal(current_key, obs.shape, obs.dtype)
    current_pred = velocity(
        params["vf"], condition(frozen_obs, actions, latents), t * obs + (1 - t) * current_noises, t, config
    )
    current_errors = jnp.mean((current_pred - jax.lax.stop_gradient(obs - current_noises)) ** 2, axis=-1)

    # Bootstrap from the target vf at (s', a', z), coupled through the same future noise.
    target_vf = jax.lax.stop_gradient(state.target_params["vf"])
    target_cond = jax.lax.stop_gradient(condition(next_obs, next_actions, latents))
    future_noises = jax.random.normal(future_key, obs.shape, obs.dtype)
    future_obs = jax.lax.stop_gradient(flow_samples(target_vf, target_cond, future_noises, state))
    future_x = t * future_obs + (1 - t) * future_noises
    future_target = jax.lax.stop_gradient(velocity(target_vf, target_cond, future_x, t, config))
    future_pred = velocity(params["vf"], condition(frozen_obs, actions, future_pred_latents), future_x, t, config)
    future_errors = jnp.mean((future_pred - future_target) ** 2, axis=-1)

    flow_loss = jnp.mean((1 - config.discount) * current_errors + config.discount * future_errors)
    loss = flow_loss + (config.kl_weight * kl if has_intentions(params) else 0.0)
    info |= {
        "neg_elbo_loss": loss,
        "flow_matching_loss": flow_loss,
        "current_flow_matching_loss": current_errors.mean(),
        "future_flow_matching_loss": future_errors.mean(),
        "flow_future_obs_max": future_obs.max(),
        "flow_future_obs_min": future_obs.min(),
    }
    return loss, info


def behavioral_cloning_loss(params, state: State, batch):
    """-mean log pi(a | s): the actor's pre-training loss."""
    dist = actor_network(state.config, state.action_dim).apply({"params": params["actor"]}, batch["observations"])
    log_prob = dist.log_prob(batch["actions"])
    loss = -log_prob.mean()
    return loss, {
        "bc_loss": loss,
        "bc_log_prob": log_prob.mean(),
        "mse": jnp.mean((dist.mode() - batch["actions"]) ** 2),
        "std": jnp.mean(dist.scale),
    }


def reward_loss(params, state: State, batch):
    preds = reward_network(state.config).apply({"params": params["reward"]}, batch["observations"])
    loss = jnp.mean((preds - batch["rewards"]) ** 2)
    return loss, {"reward_loss": loss}


def critic_values(critic_params, observations, actions, config) -> jax.Array:
    """Q_k(s, a) of both critics, shape (NUM_CRITICS, batch)."""
    return critic_network(config).apply({"params": critic_params}, observations, actions)


def aggregate(qs, config) -> jax.Array:
    return qs.min(axis=0) if config.q_agg == "min" else qs.mean(axis=0)


def expectile_loss(diff, expectile) -> jax.Array:
    """|expectile - 1(diff < 0)| diff², diff = target - prediction (official expectile_loss)."""
    return jnp.where(diff >= 0, expectile, 1.0 - expectile) * diff**2


def fit_critic(params, state: State, batch, target_q, expectile: float | None):
    """Both critics regressed on target_q (B,): expectile loss, or plain squared error when expectile is None."""
    target_q = jax.lax.stop_gradient(target_q)
    qs = critic_values(params["critic"], batch["observations"], batch["actions"], state.config)
    diff = target_q - qs
    loss = jnp.mean(diff**2 if expectile is None else expectile_loss(diff, expectile))
    q = aggregate(qs, state.config)
    return loss, {
        "critic_loss": loss,
        "q_mean": q.mean(),
        "q_max": q.max(),
        "q_min": q.min(),
        "target_q_mean": target_q.mean(),
    }


def critic_loss(params, state: State, batch, key):
    """Implicit GPI: both critics regressed with the expectile loss on Q_hat_z, one z per (s, a)."""
    config = state.config
    frozen = jax.lax.stop_gradient(params)
    latent_key, flow_key = jax.random.split(key)
    obs = batch["observations"]
    if config.critic_latent_type == "prior":
        latents = jax.random.normal(latent_key, (obs.shape[0], config.latent_dim), obs.dtype)
    else:
        latents = encode(
            frozen["intention_encoder"], batch["next_observations"], batch["next_actions"], config
        ).sample(latent_key)
    target_q = q_estimates(frozen["vf"], frozen["reward"], obs, batch["actions"], latents, flow_key, state)
    return fit_critic(params, state, batch, target_q, config.expectile)


def actor_loss(params, state: State, batch, key):
    """DDPG + BC: -mean agg_k Q_k(s, clip(mu(s))) + alpha * mean(-log pi(a | s)), the critic frozen."""
    config = state.config
    obs, actions = batch["observations"], batch["actions"]
    dist = actor_network(config, state.action_dim).apply({"params": params["actor"]}, obs)
    q_actions = jnp.clip(dist.mode() if config.const_std else dist.sample(key), -1.0, 1.0)
    q = aggregate(critic_values(jax.lax.stop_gradient(params["critic"]), obs, q_actions, config), config)
    q_loss = -q.mean()
    if config.normalize_q_loss:
        q_loss = jax.lax.stop_gradient(1.0 / jnp.abs(q).mean()) * q_loss
    log_prob = dist.log_prob(actions)
    bc_loss = -(config.alpha * log_prob).mean()
    loss = q_loss + bc_loss
    return loss, {
        "actor_loss": loss,
        "q_loss": q_loss,
        "bc_loss": bc_loss,
        "q_mean": q.mean(),
        "q_abs_mean": jnp.abs(q).mean(),
        "bc_log_prob": log_prob.mean(),
        "mse": jnp.mean((dist.mode() - actions) ** 2),
        "std": jnp.mean(dist.scale),
    }


def prefixed(prefix: str, info: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in info.items()}


def pretrain_total_loss(params, state: State, batch, key):
    """L_occ + BC (reward-free pre-training)."""
    occ_loss, occ_info = occupancy_loss(params, state, batch, key)
    bc_loss, bc_info = behavioral_cloning_loss(params, state, batch)
    return occ_loss + bc_loss, prefixed("flow_occupancy", occ_info) | prefixed("bc", bc_info)


def is_actor_step(step: jax.Array, config) -> jax.Array:
    """Whether the fine-tuning update after `step` completed ones is an actor update (official i % actor_freq
    == 0 with i counted from 1)."""
    return (step + 1) % config.actor_freq == 0


CriticLossFn = Callable[[dict, State, dict, jax.Array], tuple[jax.Array, dict]]


def finetune_total_loss(params, state: State, batch, key, critic_loss_fn: CriticLossFn):
    """L_r + L_Q + L_occ + 1[actor step] L_pi; the agents differ only in critic_loss_fn."""
    critic_key, occ_key, actor_key = jax.random.split(key, 3)
    r_loss, r_info = reward_loss(params, state, batch)
    c_loss, c_info = critic_loss_fn(params, state, batch, critic_key)
    occ_loss, occ_info = occupancy_loss(params, state, batch, occ_key)
    a_loss, a_info = actor_loss(params, state, batch, actor_key)
    actor_weight = is_actor_step(state.step, state.config).astype(a_loss.dtype)
    metrics = (
        prefixed("reward", r_info)
        | prefixed("critic", c_info)
        | prefixed("flow_occupancy", occ_info)
        | prefixed("actor", a_info)
    )
    return r_loss + c_loss + occ_loss + actor_weight * a_loss, metrics


def total_loss(params, state: State, batch, key):
    """The fine-tuning loss (the differentiated function of `update`)."""
    return finetune_total_loss(params, state, batch, key, critic_loss)


# --- updates -----------------------------------------------------------------------------------------------------


def apply_step(state: State, loss_fn: Callable[[dict], tuple[jax.Array, dict]]):
    """One Adam step on loss_fn, then the target vf moves toward the pre-update online vf (official order)."""
    params, opt_state, metrics = gradient_step(state, loss_fn)
    target = {"vf": polyak(state.params["vf"], state.target_params["vf"], state.config.tau)}
    new_state = state.replace(params=params, target_params=target, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def pretrain_update(state: State, batch, key):
    return apply_step(state, lambda p: pretrain_total_loss(p, state, batch, key))


def intention_effect(state: State, batch, key) -> dict:
    """Does the occupancy model use its intentions? Future states s_f ~ q(. | s, a, z) from the same noise with
    each row's own z ~ p_e(z | s', a') and with another row's: z_effect = mean ||s_f(z) - s_f(z_other)||²,
    relative to noise_effect = mean ||s_f(z) - s_f(z)'||² under fresh noise. A ratio near 0 means the model (and
    so every Q_z estimate) ignores z: InFOM then behaves like FOM. Validation metric only (not in the update)."""
    params, config = state.params, state.config
    latent_key, noise_key, other_noise_key = jax.random.split(key, 3)
    obs, actions = batch["observations"], batch["actions"]
    latents = encode(params["intention_encoder"], batch["next_observations"], batch["next_actions"],
                     config).sample(latent_key)
    noises = jax.random.normal(noise_key, obs.shape, obs.dtype)

    def samples(z, eps):
        return flow_samples(params["vf"], condition(obs, actions, z), eps, state)

    own = samples(latents, noises)
    z_effect = jnp.mean(jnp.sum((own - samples(jnp.roll(latents, 1, axis=0), noises)) ** 2, axis=-1))
    noise_effect = jnp.mean(jnp.sum(
        (own - samples(latents, jax.random.normal(other_noise_key, obs.shape, obs.dtype))) ** 2, axis=-1))
    return {"flow_occupancy/z_effect": z_effect, "flow_occupancy/z_to_noise_effect": z_effect / noise_effect}


def with_intention_effect(metrics: dict, state: State, batch, key) -> dict:
    if not has_intentions(state.params):
        return metrics
    return metrics | intention_effect(state, batch, jax.random.fold_in(key, 1))


def pretrain_loss_metrics(state: State, batch, key):
    return with_intention_effect(pretrain_total_loss(state.params, state, batch, key)[1], state, batch, key)


def finetune_update(state: State, batch, key, total_loss_fn):
    return apply_step(state, lambda p: total_loss_fn(p, state, batch, key))


def update(state: State, batch, key):
    return finetune_update(state, batch, key, total_loss)


def loss_metrics(state: State, batch, key):
    return with_intention_effect(total_loss(state.params, state, batch, key)[1], state, batch, key)


def begin_finetune(state: State) -> State:
    """Target vf <- online vf (official target_reset at fine-tuning step 1); the update counter restarts at 0, so
    actor updates fall on fine-tuning updates actor_freq, 2 actor_freq, ..."""
    return state.replace(target_params={"vf": copy_tree(state.params["vf"])}, step=jnp.zeros_like(state.step))


def set_data_stats(state: State, stats: dict) -> State:
    """Store the clipping bounds [min + 1e-5, max - 1e-5] of flow samples from `stats` (observation_stats of the
    current phase's normalised dataset: 'min', 'max', (obs_dim,) each). Works on a state with a leading seed axis."""
    for field in ("min", "max"):
        if field not in stats:
            raise FluxrlError(f"The data stats given to set_data_stats have no '{field}' field.")
    obs_dim = state.flow_low.shape[-1]
    low = jnp.asarray(stats["min"], jnp.float32) + CLIP_MARGIN
    high = jnp.asarray(stats["max"], jnp.float32) - CLIP_MARGIN
    for field, value in (("min", low), ("max", high)):
        if value.ndim < 1 or value.shape[-1] != obs_dim:
            raise FluxrlError(
                f"The data stats field '{field}' has shape {tuple(value.shape)}, but the agent's observations have "
                f"{obs_dim} dimensions."
            )
    return state.replace(
        flow_low=jnp.broadcast_to(low, state.flow_low.shape), flow_high=jnp.broadcast_to(high, state.flow_high.shape)
    )


def act(state: State, observations, key, deterministic=False):
    dist = actor_network(state.config, state.action_dim).apply({"params": state.params["actor"]}, observations)
    actions = jnp.where(deterministic, dist.mode(), dist.sample(key))
    return jnp.clip(actions, -1.0, 1.0)
