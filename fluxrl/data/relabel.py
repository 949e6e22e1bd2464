"""Task rewards for reward-free datasets: `relabel(data, task_name) -> data with rewards and masks`.

OGBench single tasks (manipulation and point maze tasks 1-5) use ogbench.relabel_utils.relabel_dataset on the
task's own env, exactly as ogbench.make_env_and_datasets does for its `-singletask` datasets:
- manipulation: reward = (number of satisfied subgoals) - (number of subgoals), in [-N, 0];
  point maze: reward = success - 1, in [-1, 0]; masks = 1 - success.
- Computed from each row's stored state (`qpos`, plus `button_states` for scene/puzzle), which is the state s of
  the row's transition (s, a, s'). This is ogbench>=1.2's convention (success_timing='pre': reward and success
  of a step are those of the state before the action); ogbench<1.2 used s'.
Works on the regular and the compact form (a compact form's invalid last rows get the reward of their state).

DMC tasks are relabelled by fluxrl.data.relabel_dmc.relabel_dmc (imported only when needed).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fluxrl.errors import FluxrlError
from fluxrl.names import TaskSpec, parse_task

_ENVS: dict = {}  # per-process cache of single-task envs (building one takes about a second)


def relabel(data: Mapping[str, np.ndarray], task_name: str, source: str = "dataset") -> dict[str, np.ndarray]:
    """A new dict: `data` plus float32 `rewards` and `masks` for task `task_name` (input arrays are not copied).

    source: how errors name the data (e.g. its file path)."""
    spec = parse_task(task_name)
    if spec.family == "gym":
        raise FluxrlError(
            f"{source} has no rewards, and fluxrl cannot compute {spec.name}'s from stored states: give a dataset "
            f"that has its rewards (D4RL and Minari files do)."
        )
    if spec.family == "dmc":
        from fluxrl.data.relabel_dmc import relabel_dmc

        return relabel_dmc(data, spec)
    return relabel_ogbench(data, spec, source)


def relabel_ogbench(data: Mapping[str, np.ndarray], spec: TaskSpec, source: str = "dataset") -> dict[str, np.ndarray]:
    import ogbench.relabel_utils

    env = _task_env(spec)
    u = env.unwrapped
    needed = ["qpos"] + (["button_states"] if hasattr(u, "_cur_button_states") else [])
    for key in needed:
        if key not in data:
            raise FluxrlError(
                f"{source}: relabelling for {spec.name} needs the stored '{key}' field, which is missing "
                f"(OGBench datasets keep it; regenerate with `fluxrl data generate {spec.dataset.name}`)."
            )
    obs_dim = env.observation_space.shape[-1]  # (builds the manipulation env's model on first access)
    nq = u.model.nq
    observations, qpos = np.asarray(data["observations"]), np.asarray(data["qpos"])
    if observations.ndim != 2 or observations.shape[1] != obs_dim:
        raise FluxrlError(
            f"{source}: field 'observations' has shape {observations.shape}, but task {spec.name} has "
            f"{obs_dim}-dimensional states: the data belongs to another environment."
        )
    if qpos.ndim != 2 or qpos.shape[1] != nq or len(qpos) != len(observations):
        expected = (len(observations), nq)
        raise FluxrlError(f"{source}: field 'qpos' has shape {qpos.shape}; task {spec.name} needs {expected}.")
    states = {k: np.asarray(data[k]) for k in needed}
    global_state = np.random.get_state()  # the env's reset draws from numpy's global RNG
    try:
        ogbench.relabel_utils.relabel_dataset(spec.ogbench_env_id, env, states)
    finally:
        np.random.set_state(global_state)
    return {**data, "rewards": states["rewards"].astype(np.float32), "masks": states["masks"].astype(np.float32)}


def _task_env(spec: TaskSpec):
    if spec.ogbench_env_id not in _ENVS:
        from fluxrl.envs.ogbench_envs import gym_make  # (importing fluxrl.envs sets MUJOCO_GL before mujoco loads)

        _ENVS[spec.ogbench_env_id] = gym_make(spec.ogbench_env_id)
    return _ENVS[spec.ogbench_env_id]
