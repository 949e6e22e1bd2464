"""Policy evaluation: returns, successes, lengths; optional videos.

The policy protocol: `policy(obs, rng) -> action`
    obs:    one observation as the env returns it (float32 numpy array, unbatched),
    rng:    a numpy.random.Generator owned by evaluate (seeded per episode) for any sampling the policy does,
    action: array-like of the env's action shape (action_dim,), or an action chunk (H, action_dim): the chunk
            is executed open loop, one env step per row, and the policy is queried again after its last row or at
            the episode's end (the rest of the chunk is dropped), as the official Q-chunking evaluation.
A batched JAX actor (`act(observations[B, ...], key) -> actions[B, ...]`, e.g. `functools.partial(agent.act,
state, deterministic=True)`) becomes such a policy through `jax_policy`.

Lockstep evaluation: a policy may also offer `policy.batched(observations[N, ...], rngs) -> answers[N, ...]`, row
i being exactly `policy(observations[i], rngs[i])` (rngs[i] None: row i's answer is discarded and must draw
nothing). evaluate then runs all episodes side by side in their own envs with one policy call per step, which
is what makes evaluation of a JAX actor fast (one compiled call for N episodes instead of N). The episodes, their
seeds and the policy's random draws are those of the one-at-a-time loop, so the results are the same.

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
            f"{self.task}: {len(self.returns)} episode{'' if len(self.returns) == 1 else 's'} (seed {self.seed}), "
            f"return {self.mean_return:.2f} "
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
    from fluxrl.envs.video import check_video_path, compose, write_video

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

    def new_env(render_size):
        if isinstance(task_name_or_env_fn, str):
            return make_env(task_name_or_env_fn, render_size=render_size)
        return task_name_or_env_fn(render_size=render_size)

    env = new_env(size)
    task = task_name_or_env_fn if isinstance(task_name_or_env_fn, str) else (
        getattr(env, "task_name", None) or (env.spec.id if env.spec else type(env.unwrapped).__name__))
    global_state = np.random.get_state()
    envs = [env]
    try:
        if getattr(policy, "batched", None) is not None and episodes > 1:
            envs += [new_env(size if k < n_video else None) for k in range(1, episodes)]
            returns, successes, lengths, videos = _lockstep(envs, range(episodes), policy.batched, seed, max_steps,
                                                            n_video)
        else:
            def ask_one(observations, rngs):
                return np.asarray(policy(observations[0], rngs[0]))[None]

            returns, successes, lengths, videos = [], [], [], []
            for k in range(episodes):  # one env, reset for each episode
                result = _lockstep([env], [k], ask_one, seed, max_steps, n_video)
                for total, part in zip((returns, successes, lengths, videos), result):
                    total.extend(part)
    finally:
        np.random.set_state(global_state)
        for e in envs:
            e.close()
    if video_path:
        write_video(video_path, compose(videos, video_layout), fps=fps)
    return EvalResult(task, seed, returns, successes, lengths, video_path)


def _lockstep(envs: list, episode_ids, batched: Callable, seed: int, max_steps: int | None, n_video: int):
    """Episode episode_ids[j] in envs[j], all side by side: one batched policy call per step for the episodes
    whose action queue is empty (the others' rows are computed and dropped). Episode k's env and policy seeds
    derive from (seed, k); the first n_video episodes are filmed. Returns (returns, successes, lengths, videos)."""
    from fluxrl.envs.video import render_frame

    n = len(envs)
    filmed = [k < n_video for k in episode_ids]
    rngs, observations, success = [], [], []
    for k, env in zip(episode_ids, envs):  # each reset seeds (and draws from) numpy's global RNG, so one at a time
        env_seed, policy_seed = np.random.SeedSequence([seed, k]).generate_state(2)
        rngs.append(np.random.default_rng(int(policy_seed)))
        obs, info = env.reset(seed=int(env_seed))
        observations.append(obs)
        success.append(float(info.get("success", 0.0)))
    videos = [[render_frame(envs[j])] if filmed[j] else None for j in range(n)]
    totals, steps, done = [0.0] * n, [0] * n, [False] * n
    queues = [np.zeros((0,))] * n
    while not all(done):
        asking = [not done[j] and len(queues[j]) == 0 for j in range(n)]
        if any(asking):
            answers = np.asarray(batched(np.stack(observations), [r if a else None for r, a in zip(rngs, asking)]))
            for j in range(n):
                if asking[j]:
                    queues[j] = _action_rows(answers[j])
        for j in range(n):
            if done[j]:
                continue
            action, queues[j] = queues[j][0], queues[j][1:]
            observations[j], reward, terminated, truncated, info = envs[j].step(action)
            totals[j] += float(reward)
            success[j] = float(info.get("success", 0.0))
            steps[j] += 1
            done[j] = terminated or truncated or (max_steps is not None and steps[j] >= max_steps)
            if filmed[j]:
                videos[j].append(render_frame(envs[j]))
            if done[j]:
                queues[j] = queues[j][:0]
    return totals, success, steps, [v for v in videos if v is not None]


def _action_rows(action) -> np.ndarray:
    """The env steps of one policy answer: a single action (0-D or 1-D) or the rows of a chunk (2-D)."""
    action = np.asarray(action)
    if action.ndim > 2 or (action.ndim == 2 and len(action) == 0):
        raise FluxrlError(f"The policy returned an action of shape {action.shape}; expected one action "
                          f"(action_dim,) or a chunk (H, action_dim) with H >= 1.")
    return action if action.ndim == 2 else action[None]


def jax_policy(act_fn: Callable, row_act_fn: Callable | None = None) -> Policy:
    """Adapt a batched JAX actor `act_fn(observations[B, ...], key) -> actions[B, ...]` to `policy(obs, rng)`
    (an actor of action chunks, actions[B, H, action_dim], gives chunks that evaluate executes open loop).
    row_act_fn(observations[N, ...], key_data[N, 2]) -> answers[N, ...], row i = act_fn(observations[i:i+1],
    wrapped key_data[i])[0], adds `policy.batched` (lockstep evaluation; see the module docstring).

    Each call draws a fresh JAX key from the episode's Generator, so evaluation stays deterministic."""
    import jax
    import jax.numpy as jnp

    def policy(obs, rng: np.random.Generator):
        key = jax.random.key(int(rng.integers(0, 2**31 - 1)))
        return np.asarray(act_fn(jnp.asarray(obs)[None], key))[0]

    if row_act_fn is not None:
        def batched(observations, rngs):
            # Row i's key is the one `policy` would draw from rngs[i]; dropped rows (None) draw nothing.
            seeds = np.array([int(r.integers(0, 2**31 - 1)) if r is not None else 0 for r in rngs], np.uint32)
            return np.asarray(row_act_fn(jnp.asarray(observations), key_data_of_seeds(seeds)))

        policy.batched = batched
    return policy


def key_data_of_seeds(seeds: np.ndarray) -> np.ndarray:
    """The raw data of jax.random.key(s) for each s in `seeds` (< 2**31), without one dispatch per key: threefry
    keys hold (0, s); any other default PRNG implementation falls back to building them one by one."""
    import jax

    if str(jax.random.key_impl(jax.random.key(0))) == "threefry2x32":
        return np.stack([np.zeros_like(seeds), seeds], axis=-1)
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])
