"""Pieces every agent shares: the batch spec, the training-state pytree, the optimizer step, polyak averaging and
per-task hyper-parameter tables.

The agent contract (one module per algorithm, pure functions; the engine jits, scans and vmaps them):

    NAME: str
    Config: frozen dataclass, hashable; defaults are the official code's
    PRESETS: {"paper": Config(...), "cpu": Config(...)}
    for_task(config, task_name, preset) -> Config        per-task paper values; identity for unknown tasks
    BATCH_SPEC: BatchSpec                                 the batch fields update() reads
    init(key, example_batch, config) -> AgentState
    update(state, batch, key) -> (state, metrics)         one gradient step
    loss_metrics(state, batch, key) -> metrics            the same metrics, state unchanged (validation)
    act(state, observations, key, deterministic=False) -> actions in [-1, 1]
    total_loss(params, state, batch, key) -> (loss, metrics)   the differentiated function (tests use it)
    EVAL_DETERMINISTIC: bool      the `deterministic` flag the official evaluation amounts to (engine default True)
    TASK_VALUES, PER_TASK_FIELDS  optional: the per-task table for_task reads, and the fields the papers tune per
                                  task; a run on a task the table has none of them for says so (engine)
`deterministic` may be a Python or a traced bool. See docs/agents.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from fluxrl.errors import FluxrlError


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """The batch fields an agent's update reads (names as in fluxrl.data.sampler), the length h of the
    sampler's *_chunk fields when it reads them (action-chunking agents), and whether the agent's observations
    carry the previous action (previous_action: the engine appends a_{i-1} to the dataset's observations, zeros
    at an episode's start, and the same to the env's; such agents train offline)."""

    keys: tuple[str, ...]
    chunk_size: int = 1
    previous_action: bool = False


class AgentState(flax.struct.PyTreeNode):
    """Everything an agent learns, as one pytree. `config` and `action_dim` are static (not leaves), so update
    and act need no extra arguments and the engine can vmap/scan over the state."""

    params: dict
    target_params: dict  # empty when the agent has no target networks
    opt_state: Any
    step: jax.Array  # int32: number of updates done
    config: Any = flax.struct.field(pytree_node=False)
    action_dim: int = flax.struct.field(pytree_node=False)


def make_optimizer(config) -> optax.GradientTransformation:
    """One Adam over all modules, as the reference code (parameter sets of the losses are disjoint)."""
    return optax.adam(learning_rate=config.lr)


def create_state(params: dict, target_params: dict, config, action_dim: int) -> AgentState:
    return AgentState(
        params=params,
        target_params=target_params,
        opt_state=make_optimizer(config).init(params),
        step=jnp.zeros((), jnp.int32),
        config=config,
        action_dim=int(action_dim),
    )


def gradient_step(
    state: AgentState, loss_fn: Callable[[dict], tuple[jax.Array, dict]]
) -> tuple[dict, Any, dict]:
    """Differentiate loss_fn(params) -> (loss, metrics) at state.params; return (new params, new opt state,
    metrics). The metrics are those of the pre-update params, as in the reference code."""
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = make_optimizer(state.config).update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, metrics


def step_with_targets(state: AgentState, loss_fn: Callable[[dict], tuple[jax.Array, dict]], targets=("critic",)):
    """gradient_step, then the target networks named in `targets` (the keys of state.target_params) move toward
    the *pre-update* online parameters at rate config.tau, as the official FQL-codebase agents order it.
    Returns (new state, metrics)."""
    params, opt_state, metrics = gradient_step(state, loss_fn)
    target = polyak({k: state.params[k] for k in targets}, state.target_params, state.config.tau)
    new_state = state.replace(params=params, target_params=target, opt_state=opt_state, step=state.step + 1)
    return new_state, metrics


def policy_noise(key: jax.Array, observations: jax.Array, action_dim: int, deterministic) -> jax.Array:
    """N(0, I) noise of a flow/one-step policy, one row per observation; zeros when `deterministic` (a Python or
    traced bool)."""
    noises = jax.random.normal(key, (*observations.shape[:-1], action_dim))
    return jnp.where(deterministic, jnp.zeros_like(noises), noises)


def optimizer_step(optimizer: optax.GradientTransformation, params, grads, opt_state):
    """One step of `optimizer` on one module: (new params, new optimizer state)."""
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def polyak(online, target, tau: float):
    """target <- tau * online + (1 - tau) * target, leaf by leaf."""
    return jax.tree_util.tree_map(lambda p, tp: tau * p + (1.0 - tau) * tp, online, target)


def copy_tree(tree):
    """A distinct copy of a pytree of arrays (targets start equal to the online networks)."""
    return jax.tree_util.tree_map(jnp.array, tree)


def example_dims(example_batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, int]:
    """(observations, actions, action_dim) of an example batch, checked for the shapes agents need."""
    for key in ("observations", "actions"):
        if key not in example_batch:
            raise FluxrlError(f"The example batch has no '{key}' field; agents need observations and actions.")
    obs, actions = jnp.asarray(example_batch["observations"]), jnp.asarray(example_batch["actions"])
    if obs.ndim != 2 or actions.ndim != 2:
        raise FluxrlError(
            f"The example batch must hold flat rows: observations {tuple(obs.shape)} and actions "
            f"{tuple(actions.shape)} should both be (batch, dim)."
        )
    return obs, actions, int(actions.shape[-1])


# --- presets and per-task values ---------------------------------------------------------------------------


# The discount of the FQL paper's long-horizon OGBench environments (README commands; 0.99 elsewhere).
PAPER_DISCOUNTS = {
    "antmaze-giant-navigate": {"discount": 0.995},
    "humanoidmaze-medium-navigate": {"discount": 0.995},
    "humanoidmaze-large-navigate": {"discount": 0.995},
    "antsoccer-arena-navigate": {"discount": 0.995},
}


def merge_tables(*tables: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-task tables merged key by key (later tables win on a shared field)."""
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        for key, values in table.items():
            merged.setdefault(key, {}).update(values)
    return merged


def check_preset(presets: Mapping[str, Any], preset: str) -> None:
    if preset not in presets:
        raise FluxrlError(f"Unknown preset '{preset}'; known presets: {', '.join(presets)}.")


def task_overrides(task_name: str | None, table: Mapping[str, Mapping[str, Any]]) -> dict:
    """The overrides of the longest key in `table` that is the task name or a '-'-separated prefix of it
    (keys are dataset names such as 'cube-single-play' or 'antmaze-large-diverse'); {} when none matches."""
    if not task_name:
        return {}
    name = task_name.strip()
    matches = [k for k in table if name == k or name.startswith(k + "-")]
    return dict(table[max(matches, key=len)]) if matches else {}


def with_task_values(config, task_name: str | None, table: Mapping[str, Mapping[str, Any]]):
    return dataclasses.replace(config, **task_overrides(task_name, table))


def fields_without_task_values(task_name: str | None, table: Mapping[str, Mapping[str, Any]],
                               fields: tuple[str, ...]) -> tuple[str, ...]:
    """The `fields` that `table` gives no value for on `task_name`: there the agent's defaults apply."""
    overrides = task_overrides(task_name, table)
    return tuple(f for f in fields if f not in overrides)
