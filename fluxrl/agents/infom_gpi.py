"""InFOM + explicit GPI: the InFOM paper's ablation that replaces implicit GPI (the expectile critic) by a max
over a finite set of sampled intentions (section "policy extraction"; not in the official repository, so the
exact form below is our choice).

What changes against InFOM (fluxrl/agents/infom.py; every other piece is imported from there):
- Critic target: for each (s, a) of the batch, K = num_gpi_latents intentions z_1..z_K ~ N(0, I), drawn
  independently per (s, a); Q_hat_{z_k}(s, a) from N = num_flow_goals flow samples each (InFOM's Monte-Carlo
  estimate, all B x K x N flows in one batch), and
      L_Q = mean_{j, batch} (max_k Q_hat_{z_k}(s, a) - Q_j(s, a))²        (plain squared error)
  The regression makes Q(s, a) the expectation over the random set of E[max_k Q_{z_k}(s, a)]: the GPI value of K
  random intentions. Drawing one set per (s, a) instead of one set shared by the batch has the same expectation
  (each (s, a)'s target only depends on its own set) and gives a lower-variance gradient.
- No expectile and no critic_latent_type (the intentions come from the prior).
Cost: K times InFOM's Monte-Carlo estimate per update.
Pre-training, the occupancy model, the intention encoder, the actor, the reward model and acting are InFOM's.
"""

from __future__ import annotations

import dataclasses

import jax

from fluxrl.agents import infom
from fluxrl.agents.infom import (  # noqa: F401  (re-exported: the agent contract)
    BATCH_SPEC,
    CPU_SIZES,
    EVAL_DETERMINISTIC,
    PRETRAIN_BATCH_SPEC,
    State,
    act,
    begin_finetune,
    intentions,
    pretrain_loss_metrics,
    pretrain_update,
    set_data_stats,
)
from fluxrl.errors import FluxrlError

NAME = "infom_gpi"


@dataclasses.dataclass(frozen=True)
class Config(infom.IntentionConfig):
    num_gpi_latents: int = 8  # K: intentions per (s, a) in the max


PRESETS = {"paper": Config(), "cpu": Config(**CPU_SIZES, num_gpi_latents=4)}

TASK_VALUES = infom.TASK_VALUES
PER_TASK_FIELDS = ("kl_weight", "alpha")


def for_task(config: Config, task_name: str | None, preset: str) -> Config:
    """InFOM's per-domain latent_dim, kl_weight and alpha (not its expectile)."""
    return infom.task_config(config, task_name, preset, PRESETS)


def init(key: jax.Array, example_batch: dict, config: Config) -> State:
    if config.num_gpi_latents < 1:
        raise FluxrlError(f"{NAME} config field num_gpi_latents is {config.num_gpi_latents}; it must be at least 1.")
    return infom.init_state(key, example_batch, config, NAME, intentions=True)


def critic_loss(params, state: State, batch, key):
    """MSE regression of both critics on max_k Q_hat_{z_k}(s, a), z_k ~ N(0, I)."""
    config = state.config
    frozen = jax.lax.stop_gradient(params)
    latent_key, flow_key = jax.random.split(key)
    obs = batch["observations"]
    latents = jax.random.normal(latent_key, (obs.shape[0], config.num_gpi_latents, config.latent_dim), obs.dtype)
    q_z = infom.q_estimates(frozen["vf"], frozen["reward"], obs, batch["actions"], latents, flow_key, state)
    loss, info = infom.fit_critic(params, state, batch, q_z.max(axis=1), expectile=None)
    return loss, info | {"q_z_mean": q_z.mean(), "gpi_gap": (q_z.max(axis=1) - q_z.mean(axis=1)).mean()}


def total_loss(params, state: State, batch, key):
    return infom.finetune_total_loss(params, state, batch, key, critic_loss)


def update(state: State, batch, key):
    return infom.finetune_update(state, batch, key, total_loss)


def loss_metrics(state: State, batch, key):
    return infom.with_intention_effect(total_loss(state.params, state, batch, key)[1], state, batch, key)
