"""Gymnasium's MuJoCo tasks (HalfCheetah-v4, Hopper-v5, ...) with fluxrl's env conventions.

`make_gym_mujoco_env(spec)` is `gymnasium.make(spec.task)` (its 1000-step TimeLimit included) inside `GymMujocoEnv`,
which
- takes actions in [-1, 1] and maps them affinely onto the env's own bounds (±0.4 for the humanoids, ±3 for
  InvertedPendulum, ±2 for Pusher, ±1 elsewhere), clipping first;
- returns float32 observations and puts `success` = 0.0 in every info (these tasks have none);
- seeds its first reset from `seed` (later resets continue the env's RNG, as gymnasium's do).
"""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np

from fluxrl.errors import FluxrlError
from fluxrl.names import TaskSpec, parse_task

# fluxrl offers the v4 tasks on purpose (FPMD's benchmark): gymnasium's "out of date" warning is noise there.
warnings.filterwarnings("ignore", message=".*is out of date. You should consider upgrading.*")


def make_gym_mujoco_env(spec: TaskSpec | str, seed: int | None = None, render_size: int | None = None):
    spec = parse_task(spec) if isinstance(spec, str) else spec
    if spec.family != "gym":
        raise FluxrlError(f"'{spec.name}' is not a Gymnasium MuJoCo task; they look like HalfCheetah-v4.")
    kwargs = {}
    if render_size is not None:
        if render_size < 1:
            raise FluxrlError(f"render_size must be a positive number of pixels, got {render_size}.")
        kwargs = {"render_mode": "rgb_array", "width": render_size, "height": render_size}
    return GymMujocoEnv(gymnasium.make(spec.task, **kwargs), spec, seed=seed)


class GymMujocoEnv(gymnasium.Wrapper):
    """Actions in [-1, 1] rescaled to the env's bounds, float32 observations, info['success'] always present."""

    def __init__(self, env: gymnasium.Env, spec: TaskSpec, seed: int | None = None):
        super().__init__(env)
        self.task = spec
        self._pending_seed = seed
        self._low = np.asarray(env.action_space.low, np.float64)
        self._high = np.asarray(env.action_space.high, np.float64)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, env.action_space.shape, np.float32)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)

    @property
    def task_name(self) -> str:
        return self.task.name

    def env_action(self, action) -> np.ndarray:
        """The env's own action for a fluxrl action in [-1, 1]."""
        action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        return self._low + (action + 1.0) * 0.5 * (self._high - self._low)

    def reset(self, *, seed: int | None = None, options=None):
        if seed is None and self._pending_seed is not None:
            seed, self._pending_seed = self._pending_seed, None
        obs, info = self.env.reset(seed=seed, options=options)
        return np.asarray(obs, np.float32), {**info, "success": 0.0}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(self.env_action(action))
        return np.asarray(obs, np.float32), float(reward), bool(terminated), bool(truncated), {**info, "success": 0.0}

    def render(self):
        if self.env.unwrapped.render_mode != "rgb_array":
            raise FluxrlError(f"{self.task.name} was made without a render size; pass render_size to make_env.")
        return self.env.render()
