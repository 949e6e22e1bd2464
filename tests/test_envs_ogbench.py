"""OGBench task envs: make_env contract, seeded resets, the scripted oracles' success, the lights-out solver."""

import numpy as np
import pytest

from fluxrl.envs import make_env
from fluxrl.envs.evaluate import evaluate
from fluxrl.envs.ogbench_envs import lights_out_solution, oracle_policy
from fluxrl.errors import FluxrlError


@pytest.mark.parametrize(
    "task, obs_dim, act_dim, limit",
    [("cube-single-play-singletask-task2", 28, 5, 200), ("pointmaze-large-navigate-singletask-task3", 2, 2, 1000)],
)
def test_make_env_contract(task, obs_dim, act_dim, limit):
    env = make_env(task)
    assert env.observation_space.shape == (obs_dim,) and env.observation_space.dtype == np.float32
    assert env.action_space.shape == (act_dim,)
    np.testing.assert_array_equal(env.action_space.low, -1.0)
    np.testing.assert_array_equal(env.action_space.high, 1.0)
    assert env.spec.max_episode_steps == limit
    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == (obs_dim,) and info["success"] == 0.0
    obs, reward, terminated, truncated, info = env.step(np.full(act_dim, 5.0))  # out-of-range actions are clipped
    assert obs.dtype == np.float32 and info["success"] in (0.0, 1.0)
    assert -1.0 <= reward <= 0.0  # single-task rewards: (satisfied - total) subgoals, or success - 1
    env.close()


def test_seeded_resets_are_reproducible():
    task = "pointmaze-medium-navigate-singletask-task1"
    a, b = make_env(task), make_env(task)
    # The maze's start noise comes from numpy's global RNG: a seeded reset must not depend on it.
    np.random.seed(1)
    obs_a, _ = a.reset(seed=5)
    np.random.seed(2)
    obs_b, _ = b.reset(seed=5)
    np.testing.assert_array_equal(obs_a, obs_b)
    assert not np.array_equal(a.reset(seed=6)[0], obs_a)
    c = make_env(task, seed=5)  # seed of the first reset
    np.testing.assert_array_equal(c.reset()[0], obs_a)


def test_unknown_names_raise():
    with pytest.raises(FluxrlError, match="Unknown task"):
        make_env("cube-single-play-singletask-task7")
    with pytest.raises(FluxrlError, match="Unknown task"):
        make_env("no-such-task")
    with pytest.raises(FluxrlError, match="render_size"):
        make_env("cube-single-play-singletask-task1", render_size=0)


def _oracle_eval(task, episodes, seed=0):
    holder = {}

    def env_fn(render_size=None):
        env = make_env(task, render_size=render_size)
        holder["policy"] = oracle_policy(env)
        return env

    return evaluate(env_fn, lambda obs, rng: holder["policy"](obs, rng), episodes=episodes, seed=seed)


def test_oracle_solves_cube_single():
    result = _oracle_eval("cube-single-play-singletask-task2", episodes=3)
    assert result.task == "cube-single-play-singletask-task2"
    assert result.success_rate == 1.0
    assert max(result.lengths) < 200  # terminated at the goal, not by the time limit
    assert all(-r == n - 1 for r, n in zip(result.returns, result.lengths))  # -1 per step until the last


@pytest.mark.parametrize(
    "task",
    [
        "cube-double-play-singletask-task4",  # swap: needs a cube parked on a free spot first
        "puzzle-4x4-play-singletask-task1",  # lights-out with a singular system
        "scene-play-singletask-task5",  # unlock, open window, open drawer, cube into drawer, close, relock
        "pointmaze-large-navigate-singletask-task2",
    ],
)
def test_oracle_solves_harder_tasks(task):
    assert _oracle_eval(task, episodes=1).success_rate == 1.0


def test_oracle_needs_a_fluxrl_env():
    import gymnasium
    import ogbench  # noqa: F401

    with pytest.raises(FluxrlError, match="make_env"):
        oracle_policy(gymnasium.make("cube-single-singletask-task1-v0"))


def _press_matrix(rows, cols):
    n = rows * cols
    a = np.zeros((n, n), int)
    for b in range(n):
        r, c = divmod(b, cols)
        for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= r + dr < rows and 0 <= c + dc < cols:
                a[(r + dr) * cols + c + dc, b] = 1
    return a


@pytest.mark.parametrize("rows, cols", [(3, 3), (4, 4), (4, 5)])
def test_lights_out_solution_reaches_the_goal(rows, cols):
    rng = np.random.default_rng(rows * cols)
    a = _press_matrix(rows, cols)
    for _ in range(20):
        state = rng.integers(0, 2, rows * cols)
        goal = (state + a @ rng.integers(0, 2, rows * cols)) % 2  # reachable by construction
        presses = lights_out_solution(state, goal, rows, cols)
        np.testing.assert_array_equal((state + a @ presses) % 2, goal)


def test_lights_out_unreachable_goal_raises():
    # 4x4 lights out is singular: the all-zero board cannot reach a board with a single light on.
    with pytest.raises(FluxrlError, match="not reachable"):
        lights_out_solution(np.zeros(16, int), np.eye(16, dtype=int)[0], 4, 4)


def test_dmc_names_dispatch_to_the_dmc_module():
    pytest.importorskip("fluxrl.envs.dmc")
    env = make_env("walker-walk", seed=0)
    obs, _ = env.reset()
    assert obs.shape == env.observation_space.shape
    with pytest.raises(FluxrlError, match="no extra options"):
        make_env("walker-walk", width=64)
