"""Demonstrations of an OGBench task by its scripted oracle: imitation data (Streaming Flow Policy, BC, flow BC).

Episode k of a split runs the task's env (fluxrl.envs.make_env, the evaluation env: the task's start and goal, its
time limit, ending at success) reset with a seed derived from (seed, split, k), and executes the oracle's action
(fluxrl.envs.ogbench_envs.oracle_policy, the one `fluxrl eval --policy oracle` runs) plus N(0, noise²) noise,
clipped to [-1, 1]. Stored in the regular form with the env's rewards, masks (0 where the episode ends at success)
and terminals (1 on each episode's last transition), written as an OGBench-layout .npz.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from fluxrl.data.generate import episode_seed, output_paths
from fluxrl.errors import FluxrlError

FIELDS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


def collect_demos(task: str, episodes: int, noise: float = 0.0, seed: int = 0, split: str = "train",
                  progress: bool = False) -> dict[str, np.ndarray]:
    """`episodes` noisy oracle episodes of `task`, concatenated (regular form)."""
    from fluxrl.envs import make_env
    from fluxrl.envs.ogbench_envs import oracle_policy
    from fluxrl.names import parse_task

    if parse_task(task).family not in ("manipulation", "pointmaze"):
        raise FluxrlError(f"Task '{task}' has no scripted oracle; demonstrations can be generated for OGBench "
                          f"tasks only (fluxrl tasks lists them).")
    if episodes < 1:
        raise FluxrlError(f"--episodes must be at least 1, got {episodes}.")
    if not noise >= 0:
        raise FluxrlError(f"--noise must be a standard deviation >= 0, got {noise}.")
    env = make_env(task)
    oracle = oracle_policy(env)
    rows = {k: [] for k in FIELDS}
    successes = 0
    try:
        for k in tqdm(range(episodes), desc=f"demos {task}", unit="ep", disable=not progress, dynamic_ncols=True):
            episode = episode_seed(seed, split, k)
            rng = np.random.default_rng([episode, 1])
            obs, _ = env.reset(seed=episode)
            done, info = False, {}
            while not done:
                action = np.asarray(oracle(obs), np.float32)
                action = np.clip(action + noise * rng.standard_normal(action.shape), -1.0, 1.0).astype(np.float32)
                next_obs, reward, terminated, truncated, info = env.step(action)
                done = terminated or truncated
                for key, value in (("observations", obs), ("actions", action), ("rewards", reward),
                                   ("masks", 0.0 if terminated else 1.0), ("terminals", float(done)),
                                   ("next_observations", next_obs)):
                    rows[key].append(value)
                obs = next_obs
            successes += float(info.get("success", 0.0)) > 0.5
    finally:
        env.close()
    data = {k: np.asarray(v, np.float32) for k, v in rows.items()}
    data["_success_rate"] = np.float32(successes / episodes)
    return data


def write_demos(task: str, out: str, episodes: int = 100, noise: float = 0.0, seed: int = 0,
                val_episodes: int | None = None, overwrite: bool = False, progress: bool = True) -> list[str]:
    """Write demonstrations of `task` to `out` and its validation split to <out>-val.npz; returns the paths.
    Nothing existing is replaced unless overwrite=True (checked before any work)."""
    from fluxrl.data.io import save_dataset

    paths = output_paths(out, overwrite)
    n_val = val_episodes if val_episodes is not None else max(1, episodes // 10)
    for split, n, path in (("train", episodes, paths[0]), ("val", n_val, paths[1])):
        data = collect_demos(task, n, noise=noise, seed=seed, split=split, progress=progress)
        success_rate = float(data.pop("_success_rate"))
        meta = {"generator": f"fluxrl demos {task} noise={noise} seed={seed} episodes={n} split={split}",
                "oracle_success_rate": f"{success_rate:.4f}"}
        save_dataset(path, data, overwrite=overwrite, meta=meta)
    return paths
