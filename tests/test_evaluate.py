"""evaluate(): exact returns/successes/lengths on a toy env, action chunks executed open loop, determinism under a
seed, the JAX adapter, videos."""

import os
import warnings

import gymnasium
import imageio.v2 as imageio
import numpy as np
import pytest

from fluxrl.envs.evaluate import EvalResult, evaluate, jax_policy
from fluxrl.envs.video import compose, write_video
from fluxrl.errors import FluxrlError

LIMIT = 10


class Countdown(gymnasium.Env):
    """Starts at n ~ U{3..7} (from the reset seed); a positive action counts down by one and earns reward 1;
    reaching 0 terminates with success. Time limit LIMIT. Frames are 6x8 images whose value is 20 * n."""

    observation_space = gymnasium.spaces.Box(0, 10, (1,), np.float32)
    action_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.n, self.t = int(self.np_random.integers(3, 8)), 0
        return np.array([self.n], np.float32), {"success": 0.0}

    def step(self, action):
        self.t += 1
        reward = 0.0
        if action[0] > 0:
            self.n, reward = self.n - 1, 1.0
        success = float(self.n == 0)
        return np.array([self.n], np.float32), reward, bool(success), self.t >= LIMIT, {"success": success}

    def render(self):
        return np.full((6, 8, 3), 20 * self.n, np.uint8)


def countdown(render_size=None):
    return Countdown()


def starts(seed, episodes):
    """The start counts evaluate's reset seeds produce (probed through the env itself)."""
    out = []
    for k in range(episodes):
        env_seed = int(np.random.SeedSequence([seed, k]).generate_state(2)[0])
        out.append(int(Countdown().reset(seed=env_seed)[0][0]))
    return out


def test_exact_statistics():
    result = evaluate(countdown, lambda obs, rng: np.ones(1), episodes=6, seed=3)
    n = starts(3, 6)
    assert result.lengths == n and result.returns == [float(x) for x in n] and result.successes == [1.0] * 6
    assert result.mean_return == pytest.approx(np.mean(n)) and result.success_rate == 1.0
    lazy = evaluate(countdown, lambda obs, rng: -np.ones(1), episodes=2, seed=3)
    assert lazy.lengths == [LIMIT, LIMIT] and lazy.returns == [0.0, 0.0] and lazy.success_rate == 0.0
    capped = evaluate(countdown, lambda obs, rng: np.ones(1), episodes=2, seed=3, max_steps=2)
    assert capped.lengths == [2, 2] and capped.successes == [0.0, 0.0]
    d = result.to_dict()
    assert d["episodes"] == 6 and d["success_rate"] == 1.0 and "success 1.00" in result.summary()


class Recording(Countdown):
    """Countdown that records every action it executes (the episode's steps)."""

    executed: list = []

    def step(self, action):
        Recording.executed.append(float(np.asarray(action)[0]))
        return super().step(action)


def test_chunks_run_open_loop_and_stop_at_the_episode_end():
    """A policy returning (3, 1) chunks [+1, -1, +1]: each chunk is executed row by row without querying the
    policy, the policy is asked again at the observation after the chunk, and the episode ends mid-chunk exactly
    when the count reaches 0 (no step after it: the length is the number of executed actions)."""
    chunk = np.array([[1.0], [-1.0], [1.0]])
    queried = []

    def policy(obs, rng):
        queried.append(int(obs[0]))
        return chunk

    Recording.executed = []
    result = evaluate(lambda render_size=None: Recording(), policy, episodes=5, seed=3)
    n = starts(3, 5)
    for k, start in enumerate(n):
        # Each chunk counts down by 2 in 3 steps; the last chunk stops after its first row (count 1) or its
        # third (count 2).
        chunks = (start + 1) // 2
        length = 3 * (chunks - 1) + (1 if start % 2 else 3)
        assert result.lengths[k] == length and result.returns[k] == start and result.successes[k] == 1.0, (k, start)
    assert len(Recording.executed) == sum(result.lengths)
    expected_actions = [a for length in result.lengths for a in np.resize(chunk[:, 0], length)]
    assert Recording.executed == expected_actions
    # Queried at the start and after every 3 steps: the count falls by 2 between queries.
    expected_queries = [c for start in n for c in range(start, 0, -2)]
    assert queried == expected_queries
    # max_steps cuts inside a chunk too.
    capped = evaluate(countdown, lambda obs, rng: np.ones((3, 1)), episodes=2, seed=3, max_steps=4)
    assert capped.lengths == [min(4, x) for x in n[:2]]


def test_chunks_through_the_jax_adapter():
    """A batched actor returning (B, H, action_dim) becomes a policy returning (H, action_dim) chunks."""
    import jax.numpy as jnp

    policy = jax_policy(lambda observations, key: jnp.ones((observations.shape[0], 4, 1)))
    assert np.asarray(policy(np.zeros(1, np.float32), np.random.default_rng(0))).shape == (4, 1)
    result = evaluate(countdown, policy, episodes=3, seed=0)
    assert result.lengths == starts(0, 3) and result.success_rate == 1.0


def random_policy(obs, rng):
    return rng.uniform(-1, 1, size=1)


def test_deterministic_under_a_seed():
    a = evaluate(countdown, random_policy, episodes=5, seed=7)
    b = evaluate(countdown, random_policy, episodes=5, seed=7)
    c = evaluate(countdown, random_policy, episodes=5, seed=8)
    assert (a.returns, a.lengths) == (b.returns, b.lengths)
    assert (a.returns, a.lengths) != (c.returns, c.lengths)
    # Episode k depends on (seed, k) only, not on how many episodes run.
    assert evaluate(countdown, random_policy, episodes=3, seed=7).returns == a.returns[:3]


def test_ogbench_task_by_name_is_deterministic_and_restores_numpy_rng():
    np.random.seed(0)
    expected = np.random.rand()

    def noisy(obs, rng):
        return rng.normal(size=2)

    np.random.seed(0)
    a = evaluate("pointmaze-medium-navigate-singletask-task1", noisy, episodes=2, seed=1, max_steps=30)
    assert np.random.rand() == expected
    b = evaluate("pointmaze-medium-navigate-singletask-task1", noisy, episodes=2, seed=1, max_steps=30)
    assert isinstance(a, EvalResult) and a.task == "pointmaze-medium-navigate-singletask-task1"
    assert a.returns == b.returns == [-30.0, -30.0] and a.lengths == [30, 30]


def test_jax_policy_adapter():
    import jax
    import jax.numpy as jnp

    calls = []

    def act(observations, key):
        calls.append(observations.shape)
        return jnp.ones_like(observations) * jax.random.uniform(key, (observations.shape[0], 1))

    policy = jax_policy(act)
    a = evaluate(countdown, policy, episodes=3, seed=0)
    b = evaluate(countdown, policy, episodes=3, seed=0)
    assert calls[0] == (1, 1)  # batched with a leading axis of 1
    assert a.returns == b.returns and a.success_rate == 1.0  # uniform(0, 1) actions are positive


def test_bad_arguments():
    with pytest.raises(FluxrlError, match="episodes"):
        evaluate(countdown, random_policy, episodes=0)
    with pytest.raises(FluxrlError, match=".mp4 or .gif"):
        evaluate(countdown, random_policy, episodes=1, video_path="out.avi")
    with pytest.raises(FluxrlError, match="max_steps"):
        evaluate(countdown, random_policy, episodes=1, max_steps=0)
    with pytest.raises(FluxrlError, match=r"shape \(1, 3, 1\)"):
        evaluate(countdown, lambda obs, rng: np.ones((1, 3, 1)), episodes=1)
    with pytest.raises(FluxrlError, match="H >= 1"):
        evaluate(countdown, lambda obs, rng: np.ones((0, 1)), episodes=1)


def test_compose_layouts():
    ep1 = [np.full((2, 3, 3), v, np.uint8) for v in (1, 2, 3)]
    ep2 = [np.full((2, 3, 3), v, np.uint8) for v in (7, 8)]
    seq = compose([ep1, ep2], "sequential")
    assert [int(f[0, 0, 0]) for f in seq] == [1, 2, 3, 7, 8]
    tiles = compose([ep1, ep2], "tile")
    assert len(tiles) == 3 and tiles[0].shape == (2, 6, 3)
    assert [int(f[0, 3, 0]) for f in tiles] == [7, 8, 8]  # a finished episode holds its last frame
    three = compose([ep1, ep2, ep1], "tile")
    assert three[0].shape == (4, 6, 3)  # 2 x 2 grid, one empty tile
    with pytest.raises(FluxrlError, match="layout"):
        compose([ep1], "mosaic")


@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_video_from_toy_env(tmp_path, ext):
    path = str(tmp_path / f"toy{ext}")
    result = evaluate(countdown, lambda o, r: np.ones(1), episodes=3, seed=3, video_path=path, video_episodes=2)
    frames = imageio.mimread(path)
    assert result.video_path == path and os.path.getsize(path) > 0
    assert len(frames) == max(result.lengths[:2]) + 1  # reset frame + one per step, tiles side by side
    assert frames[0].shape[:2] == (6, 16)  # 1 x 2 grid of 6x8 tiles
    if ext == ".gif":  # lossless: first tile shows 20 * n at reset
        assert int(frames[0][0, 0, 0]) == 20 * result.lengths[0]


def test_render_failure_is_one_clear_error(tmp_path):
    class Broken(Countdown):
        def render(self):
            raise RuntimeError("no GL context")

    with pytest.raises(FluxrlError, match="Offscreen rendering failed"):
        evaluate(lambda render_size=None: Broken(), random_policy, episodes=1, video_path=str(tmp_path / "x.gif"))
    assert not os.path.exists(tmp_path / "x.gif")


def test_write_video_pads_odd_sizes_for_mp4(tmp_path):
    import jax

    jax.numpy.zeros(1).block_until_ready()  # a live backend: JAX now warns at every fork, which writing must hide
    frames = [np.full((5, 7, 3), 100, np.uint8)] * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_video(str(tmp_path / "odd.mp4"), frames, fps=10)
    assert not [w for w in caught if "fork" in str(w.message)]
    back = imageio.mimread(str(tmp_path / "odd.mp4"))
    assert len(back) == 4 and back[0].shape == (6, 8, 3)


@pytest.mark.mujoco_render
@pytest.mark.parametrize("ext", [".gif", ".mp4"])
def test_mujoco_video(tmp_path, ext):
    path = str(tmp_path / f"maze{ext}")
    result = evaluate(
        "pointmaze-medium-navigate-singletask-task1", lambda o, r: np.ones(2), episodes=2, seed=0,
        video_path=path, video_episodes=2, max_steps=3, render_size=32,
    )
    frames = imageio.mimread(path)
    assert len(frames) == 4 and frames[0].shape[:2] == (32, 64)
    assert np.asarray(frames[0]).std() > 0  # a real picture, not a blank canvas
    assert result.lengths == [3, 3]


# --- lockstep evaluation (policy.batched) ----------------------------------------------------------------------


def with_batched(policy, calls=None):
    """policy plus the lockstep protocol, answered row by row (dropped rows get a placeholder, drawing nothing)."""

    def batched(observations, rngs):
        if calls is not None:
            calls.append(sum(r is not None for r in rngs))
        answers = [policy(o, r) if r is not None else None for o, r in zip(observations, rngs)]
        shape = next(np.shape(a) for a in answers if a is not None)
        return np.stack([np.asarray(a, np.float64) if a is not None else np.zeros(shape) for a in answers])

    def wrapped(obs, rng):
        return policy(obs, rng)

    wrapped.batched = batched
    return wrapped


def chunky_random_policy(obs, rng):
    return rng.uniform(-1, 1, size=(3, 1))


@pytest.mark.parametrize("policy", [random_policy, chunky_random_policy])
def test_lockstep_equals_one_episode_at_a_time(policy):
    """Episodes side by side give exactly the per-episode results of the sequential loop (same reset seeds, same
    draws from each episode's Generator, chunks queued per episode), with max_steps and uneven lengths."""
    calls = []
    for max_steps in (None, 6):
        sequential = evaluate(countdown, policy, episodes=7, seed=5, max_steps=max_steps)
        lockstep = evaluate(countdown, with_batched(policy, calls), episodes=7, seed=5, max_steps=max_steps)
        assert (lockstep.returns, lockstep.successes, lockstep.lengths) == (
            sequential.returns, sequential.successes, sequential.lengths)
        assert len(set(sequential.lengths)) > 1  # the episodes really end at different steps
    assert calls and max(calls) == 7 and min(calls) < 7  # one call per step; finished episodes stop asking


def test_lockstep_on_an_ogbench_task_restores_numpy_rng():
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)

    def noisy(obs, rng):
        return rng.normal(size=2)

    lockstep = evaluate("pointmaze-medium-navigate-singletask-task1", with_batched(noisy), episodes=3, seed=1,
                        max_steps=20)
    assert np.random.rand() == expected
    sequential = evaluate("pointmaze-medium-navigate-singletask-task1", noisy, episodes=3, seed=1, max_steps=20)
    assert lockstep.returns == sequential.returns and lockstep.lengths == sequential.lengths == [20, 20, 20]


def test_jax_policy_rows_use_the_keys_of_the_sequential_policy():
    """jax_policy's batched rows equal its one-observation answers for the same Generators, through the engine's
    row actor (a real agent's act vmapped over rows), and key_data_of_seeds is jax.random.key's data."""
    import jax
    import jax.numpy as jnp

    from fluxrl.envs.evaluate import key_data_of_seeds

    seeds = np.array([0, 1, 12345, 2**31 - 2], np.uint32)
    expected = np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s)))) for s in seeds])
    assert np.array_equal(key_data_of_seeds(seeds), expected)

    def act(observations, key):  # noise of the batch's shape: rows must get their own keys
        return jnp.tanh(observations[:, :2] + jax.random.normal(key, (observations.shape[0], 2)))

    def row_act(observations, key_data):
        keys = jax.random.wrap_key_data(key_data)
        return jax.vmap(lambda o, k: act(o[None], k)[0])(observations, keys)

    policy = jax_policy(jax.jit(act), jax.jit(row_act))
    observations = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    rows = policy.batched(observations, [np.random.default_rng(i) for i in range(3)] + [None])
    for i in range(3):
        single = policy(observations[i], np.random.default_rng(i))
        np.testing.assert_allclose(rows[i], single, rtol=1e-6, atol=1e-6)
    assert not np.allclose(rows[0], rows[1])
