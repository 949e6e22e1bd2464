"""FOM + one-step policy improvement: the InFOM paper's ablation without intentions (section "policy extraction";
the official repository does not contain it, so this is our reading of the paper's description).

What changes against InFOM (fluxrl/agents/infom.py; every other piece is imported from there):
- No intention encoder, no KL: the occupancy model v(x_t, t | s, a) models the behaviour policy's discounted
  state occupancy q(s_f | s, a) with the same SARSA flow loss (current + coupled bootstrapped future term).
- The critic is regressed with plain squared error (no expectile, hence no GPI) on the Monte-Carlo estimate of the
  behaviour's Q: Q_hat(s, a) = 1/(1 - gamma) mean_{i<N} r(s_f^(i)), s_f^(i) ~ q(. | s, a), stop-gradiented:
      L_Q = mean_{k, batch} (Q_hat(s, a) - Q_k(s, a))²
  The DDPG + BC actor then improves once on this Q^beta: one-step policy improvement.
Pre-training (occupancy + BC), actor, reward model, targets, actor_freq and acting are InFOM's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fluxrl.agents import infom
from fluxrl.agents.infom import (  # noqa: F401  (re-exported: the agent contract)
    BATCH_SPEC,
    CPU_SIZES,
    EVAL_DETERMINISTIC,
    PRETRAIN_BATCH_SPEC,
    State,
    act,
    begin_finetune,
    pretrain_loss_metrics,
    pretrain_update,
    set_data_stats,
)

NAME = "fom"


@dataclasses.dataclass(frozen=True)
class Config(infom.OccupancyConfig):
    pass


PRESETS = {
    "paper": Config(),
    "cpu": Config(**{k: v for k, v in CPU_SIZES.items() if k in {f.name for f in dataclasses.fields(Config)}}),
}

TASK_VALUES = infom.TASK_VALUES
PER_TASK_FIELDS = ("alpha",)


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """InFOM's per-domain alpha (the only per-domain field FOM has)."""
    return infom.task_config(config, task_name, preset, PRESETS)


def init(key: jax.Array, example_batch: dict, config: Config) -> State:
    return infom.init_state(key, example_batch, config, NAME, intentions=False)


def critic_loss(params, state: State, batch, key):
    """MSE regression of both critics on the behaviour's Monte-Carlo Q_hat (no latent)."""
    frozen = jax.lax.stop_gradient(params)
    obs = batch["observations"]
    no_latent = jnp.zeros((obs.shape[0], 0), obs.dtype)
    target_q = infom.q_estimates(frozen["vf"], frozen["reward"], obs, batch["actions"], no_latent, key, state)
    return infom.fit_critic(params, state, batch, target_q, expectile=None)


def total_loss(params, state: State, batch, key):
    return infom.finetune_total_loss(params, state, batch, key, critic_loss)


def update(state: State, batch, key):
    return infom.finetune_update(state, batch, key, total_loss)


def loss_metrics(state: State, batch, key):
    return total_loss(state.params, state, batch, key)[1]
