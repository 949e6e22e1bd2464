"""Task rewards for DMC datasets, recomputed from the stored MuJoCo states (as ExORL relabels its data).

Convention: the reward of transition i is the task reward at s'_i, the state reached by the step (dm_control
computes a step's reward after the physics step; ExORL stores r(s_{t+1}) with s_t). So a relabelled dataset
gives exactly the rewards the live env returned. masks = 1 everywhere: DMC episodes only end by time-out.

Where the next state's physics comes from:
- compact form: row i + 1 (every valid row's successor is stored, including each episode's final state);
  invalid rows (an episode's last state, no transition) get reward 0;
- regular form with `next_physics`: that field;
- regular form without it (OGBench's loader drops each episode's final state): row i + 1 inside an episode,
  and for the last transition of each episode one simulated step from (physics[i], actions[i]). That step
  reproduces the recorded one to ~1e-15 for walker/cheetah/quadruped and ~1e-7 for jaco (the constraint solver's
  warm start is not part of the stored state), so those rewards match to float tolerance, the others exactly.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fluxrl.data.dataset import is_compact
from fluxrl.envs.dmc import OBSERVATION_DIM, PHYSICS_STATE_DIM, TaskReward, as_dmc_task
from fluxrl.errors import FluxrlError


def _check(data: Mapping[str, np.ndarray], domain: str, name: str) -> None:
    for key in ("physics",) + (("next_physics",) if "next_physics" in data else ()):
        if key not in data:
            raise FluxrlError(
                f"Cannot relabel for {name}: the dataset has no '{key}' field (DMC rewards are recomputed from the "
                f"MuJoCo states that fluxrl's DMC generator stores per row)."
            )
        value = np.asarray(data[key])
        if value.ndim != 2 or value.shape[1] != PHYSICS_STATE_DIM[domain]:
            raise FluxrlError(
                f"Cannot relabel for {name}: field '{key}' has shape {value.shape}, but a {domain} physics state "
                f"has {PHYSICS_STATE_DIM[domain]} numbers per row."
            )
        if len(value) != len(data["observations"]):
            raise FluxrlError(f"Cannot relabel for {name}: field '{key}' has {len(value)} rows, observations "
                              f"{len(data['observations'])}.")
    obs = np.asarray(data["observations"])
    if obs.ndim != 2 or obs.shape[1] != OBSERVATION_DIM[domain]:
        raise FluxrlError(
            f"Cannot relabel for {name}: 'observations' has shape {obs.shape}, but {domain} observations have "
            f"{OBSERVATION_DIM[domain]} features; is this a {domain} dataset?"
        )


def relabel_dmc(data: Mapping[str, np.ndarray], task_spec) -> dict[str, np.ndarray]:
    """Return a copy of `data` (regular or compact form) with float32 `rewards` of task `task_spec` (a name like
    'walker-run' or a TaskSpec) and `masks` = 1. Raises FluxrlError if `physics` is missing or does not fit."""
    spec = as_dmc_task(task_spec)
    domain = spec.dataset.env
    _check(data, domain, spec.name)
    physics = np.asarray(data["physics"], np.float64)
    n = len(physics)
    rewards = np.zeros(n, np.float64)
    fn = TaskReward(spec)
    try:
        if is_compact(data):
            valid = np.asarray(data["valids"]) > 0.5
            if n and valid[-1]:
                raise FluxrlError(
                    f"Cannot relabel for {spec.name}: the last row is a valid transition but its next state "
                    f"(row {n}) is missing; the compact dataset is truncated."
                )
            rows = np.flatnonzero(valid)
            rewards[rows] = fn(physics[rows + 1])
        elif "next_physics" in data:
            rewards[:] = fn(np.asarray(data["next_physics"], np.float64))
        else:
            ends = np.asarray(data["terminals"]) > 0.5
            if n:
                ends[-1] = True
            inside = np.flatnonzero(~ends)
            if not np.array_equal(
                np.asarray(data["next_observations"])[inside], np.asarray(data["observations"])[inside + 1]
            ):
                raise FluxrlError(
                    f"Cannot relabel for {spec.name}: rows are not consecutive transitions (next_observations[i] "
                    f"!= observations[i + 1] inside an episode), so row i + 1 does not hold s'_i's physics; "
                    f"relabel before shuffling or provide 'next_physics'."
                )
            rewards[inside] = fn(physics[inside + 1])
            actions = np.asarray(data["actions"])
            for i in np.flatnonzero(ends):
                rewards[i] = fn.step_reward(physics[i], actions[i])
    finally:
        fn.close()
    out = dict(data)
    out["rewards"] = rewards.astype(np.float32)
    out["masks"] = np.ones(n, np.float32)
    return out
