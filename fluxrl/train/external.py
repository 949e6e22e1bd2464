"""The engine's seams to the rest of fluxrl: environments, evaluation and dataset reading.

Every call the engine makes into fluxrl.envs and fluxrl.data.{io,relabel} goes through this module, so tests (and
users with their own environments) can replace one function here instead of patching the engine.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def make_env(task: str, seed: int | None = None, render_size: int | None = None):
    """A gymnasium env for `task` with actions in [-1, 1] (fluxrl.envs.make_env)."""
    from fluxrl.envs import make_env as _make_env

    return _make_env(task, seed=seed, render_size=render_size)


def with_previous_action(env):
    """`env` with the last executed action appended to its observations (fluxrl.envs.wrappers)."""
    from fluxrl.envs.wrappers import PreviousActionObservation

    return PreviousActionObservation(env)


def evaluate(task: str, act_fn: Callable, episodes: int, seed: int, video_path: str | None = None,
             video_episodes: int = 0, row_act_fn: Callable | None = None,
             previous_action: bool = False) -> dict[str, float]:
    """Mean return / success / length of `episodes` episodes of the batched actor `act_fn(observations, key)`
    in fresh envs of `task` (fluxrl.envs.evaluate; depends only on `seed`); writes a video of the first
    `video_episodes` episodes to `video_path` if given. With `row_act_fn` (see fluxrl.envs.evaluate.jax_policy)
    the episodes run side by side, one policy call per step. previous_action: the envs' observations carry
    the last executed action (with_previous_action)."""
    from fluxrl.envs.evaluate import evaluate as _evaluate, jax_policy

    def env_fn(render_size=None):
        env = make_env(task, render_size=render_size)
        return with_previous_action(env) if previous_action else env

    result = _evaluate(env_fn,
                       jax_policy(act_fn, row_act_fn),
                       episodes=episodes, seed=seed, video_path=video_path if video_episodes else None,
                       video_episodes=max(video_episodes, 1))
    return {"return": result.mean_return, "success": result.success_rate, "length": result.mean_length}


def load_dataset(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """(canonical dataset at `path`, its metadata), in the compact form where the file allows it (each state
    stored once: half the observation memory), else the regular form."""
    from fluxrl.data.io import load_dataset as _load_dataset
    from fluxrl.errors import FluxrlError

    try:
        return _load_dataset(path, compact=True, with_meta=True)
    except FluxrlError:  # e.g. next_observations that do not chain: only the regular form holds them
        return _load_dataset(path, compact=False, with_meta=True)


def check_compatible(data: dict, observation_shape, action_dim: int, source: str, task: str) -> None:
    """Refuse a dataset whose observation shape or action size differs from the task's env."""
    from fluxrl.data.io import check_compatible as _check_compatible

    _check_compatible(data, observation_shape, action_dim, source, task)


def relabel(data: dict[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
    """`data` with the task's rewards and masks added."""
    from fluxrl.data.relabel import relabel as _relabel

    return _relabel(data, task)
