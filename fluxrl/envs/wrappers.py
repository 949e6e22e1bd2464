"""Observation wrappers that agents may ask for through their batch spec (fluxrl.agents.base.BatchSpec)."""

from __future__ import annotations

import gymnasium
import numpy as np


class PreviousActionObservation(gymnasium.Wrapper):
    """Observations with the last executed action appended: concat(obs, a_prev), a_prev = 0 after a reset.

    This is the layout fluxrl.data.sampler.with_previous_actions gives a dataset, so an agent conditioned on the
    previous action (Streaming Flow Policy integrates its action flow from it) sees the same inputs in training
    and in the env. The appended action is the one the env received, clipped to [-1, 1]."""

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self.action_dim = int(np.prod(env.action_space.shape))
        inner = env.observation_space
        if len(inner.shape) != 1:
            raise ValueError(f"PreviousActionObservation needs flat observations, got shape {inner.shape}.")
        self.observation_space = gymnasium.spaces.Box(
            np.concatenate([np.broadcast_to(inner.low, inner.shape), -np.ones(self.action_dim)]).astype(np.float32),
            np.concatenate([np.broadcast_to(inner.high, inner.shape), np.ones(self.action_dim)]).astype(np.float32),
            dtype=np.float32,
        )

    @property
    def task_name(self):
        return getattr(self.env, "task_name", None)

    def _with(self, obs, action) -> np.ndarray:
        return np.concatenate([np.asarray(obs, np.float32), np.asarray(action, np.float32)])

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._with(obs, np.zeros(self.action_dim)), info

    def step(self, action):
        action = np.clip(np.asarray(action, np.float32).reshape(-1), -1.0, 1.0)
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._with(obs, action), reward, terminated, truncated, info

    def render(self):
        return self.env.render()
