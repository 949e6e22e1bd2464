"""Policy evaluation: returns, successes, lengths; optional videos.

The policy protocol: `policy(obs, rng) -> action`
    obs:    one observation as the env returns it (float32 numpy array, unbatched),
    rng:    a numpy.random.Generator owned by evaluate (seeded per episode) for any sampling the policy does,
    action: array-like of the env's action shape (action_dim,), or an action chunk (H, action_dim): the chunk
            is executed open loop, one env step per row, and the policy is queried again after its last row or at
            the episode's end (the rest of the chunk is dropped), as the official Q-chunking evaluation.
A batched JAX actor (`act(observations[B, ...], key) -> actions[B, ...]`, e.g. `functools.partial(agent.act,
state, deterministic=True)`) becomes such a policy through `jax_policy`.

Determinism: episode k is reset with a seed derived from (seed, k) and the policy gets a Generator seeded from
(seed, k), so the result depends only on `seed` (and the policy). OGBench envs also draw from numpy's global
RNG; it is seeded on each reset and restored to its previous state when evaluate returns.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from fluxrl.errors import FluxrlError

Policy = Callable[[np.ndarray, np.random.Generator], np.ndarray]
DEFAULT_RENDER_SIZE = 128


@dataclasses.dataclass
class EvalResult:
    task: str
    seed: int
    returns: list[float]
    successes: list[float]  # 1.0 when the episode's last step reports success (OGBench's convention)
    lengths: list[int]
    video_path: str | None = None

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.successes))

    @property
    def mean_length(self) -> float:
        return float(np.mean(self.lengths))

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "episodes": len(self.returns),
            "mean_return": self.mean_return,
            "success_rate": self.success_rate,
            "mean_length": self.mean_length,
        }

    def summary(self) -> str:
        text = (
            f"{self.task}: {len(self.returns)} episodes (seed {self.seed}), return {self.mean_return:.2f} "
            f"± {float(np.std(self.returns)):.2f}, success {self.success_rate:.2f}, length {self.mean_length:.1f}"
        )
        return text + (f"; video {self.video_path}" if self.video_path else "")


def evaluate(
    task_name_or_env_fn: str | Callable,
    policy: Policy,
    episodes: int,
    seed: int = 0,
    video_path: str | None = None,
    video_episodes: int = 1,
    max_steps: int | None = None,
    render_size: int = DEFAULT_RENDER_SIZE,
    video_layout: str = "tile",
    fps: float = 20.0,
) -> EvalResult:
    """Run `episodes` episodes of `policy` and report return, success and length (mean and per episode).

    task_name_or_env_fn: a task name for fluxrl.envs.make_env, or `env_fn(render_size=None) -> gymnasium.Env`.
    max_steps: cut episodes after this many steps (on top of the env's own time limit).
    video_path: write the first `video_episodes` episodes to this .mp4/.gif, `video_layout` 'tile' or
        'sequential', frames of render_size x render_size pixels."""
    from fluxrl.envs import make_env
    from fluxrl.envs.video import check_video_path, compose, render_frame, write_video

    if episodes < 1:
        raise FluxrlError(f"episodes must be at least 1, got {episodes}.")
    if max_steps is not None and max_steps < 1:
        raise FluxrlError(f"max_steps must be at least 1, got {max_steps}.")
    n_video = min(video_episodes, episodes) if video_path else 0
    if video_path:
        check_video_path(video_path)
        if video_episodes < 1:
            raise FluxrlError(f"video_episodes must be at least 1, got {video_episodes}.")
    size = render_size if video_path else None
    if isinstance(task_name_or_env_fn, str):
        task, env = task_name_or_env_fn, make_env(task_name_or_env_fn, render_size=size)
    else:
        env = task_name_or_env_fn(render_size=size)
        task = getattr(env, "task_name", None) or (env.spec.id if env.spec else type(env.unwrapped).__name__)

    global_state = np.random.get_state()
    returns, successes, lengths, videos = [], [], [], []
    try:
        for k in range(episodes):
            env_seed, policy_seed = np.random.SeedSequence([seed, k]).generate_state(2)
            rng = np.random.default_rng(int(policy_seed))
            obs, info = env.reset(seed=int(env_seed))
            frames = [render_frame(env)] if k < n_video else None
            total, success, steps, done = 0.0, float(info.get("success", 0.0)), 0, False
            while not done:
                for action in _action_rows(policy(obs, rng)):
                    obs, reward, terminated, truncated, info = env.step(action)
                    total += float(reward)
                    success = float(info.get("success", 0.0))
                    steps += 1
                    done = terminated or truncated or (max_steps is not None and steps >= max_steps)
                    if frames is not None:
                        frames.append(render_frame(env))
                    if done:
                        break
            returns.append(total)
            successes.append(success)
            lengths.append(steps)
            if frames is not None:
                videos.append(frames)
    finally:
        np.random.set_state(global_state)
        env.close()
    if video_path:
        write_video(video_path, compose(videos, video_layout), fps=fps)
    return EvalResult(task, seed, returns, successes, lengths, video_path)


def _action_rows(action) -> np.ndarray:
    """The env steps of one policy answer: a single action (0-D or 1-D) or the rows of a chunk (2-D)."""
    action = np.asarray(action)
    if action.ndim > 2 or (action.ndim == 2 and len(action) == 0):
        raise FluxrlError(f"The policy returned an action of shape {action.shape}; expected one action "
                          f"(action_dim,) or a chunk (H, action_dim) with H >= 1.")
    return action if action.ndim == 2 else action[None]


def jax_policy(act_fn: Callable) -> Policy:
    """Adapt a batched JAX actor `act_fn(observations[B, ...], key) -> actions[B, ...]` to `policy(obs, rng)`
    (an actor of action chunks, actions[B, H, action_dim], gives chunks that evaluate executes open loop).

    Each call draws a fresh JAX key from the episode's Generator, so evaluation stays deterministic."""
    import jax
    import jax.numpy as jnp

    def policy(obs, rng: np.random.Generator):
        key = jax.random.key(int(rng.integers(0, 2**31 - 1)))
        return np.asarray(act_fn(jnp.asarray(obs)[None], key))[0]

    return policy
