"""Exploratory DMC datasets (the `<domain>-explore` datasets standing in for ExORL's), one episode per call.

ExORL's datasets were collected by unsupervised RL agents (RND, APT, Proto, ...) trained online on the domain,
10M transitions each; InFOM pre-trains on the first 1M transitions of the RND data and fine-tunes on 500K more
(relabelled). Those agents cannot be run here at that scale, so the data come from a cheap, state-independent
exploration policy instead: each episode is cut into segments of 50-500 steps, and each segment draws one of four
random-action processes (three of them temporally correlated) with freshly drawn parameters:

  white  i.i.d. uniform actions in [-1, 1] (ExORL's "random" baseline data)
  ou     mean m ~ U[-0.5, 0.5]^d plus a stationary Ornstein-Uhlenbeck / AR(1) process with correlation time
         tau ~ logU[2, 100] steps and standard deviation s ~ U[0.2, 0.8]
  hold   uniform actions held for k ~ U{2..50} steps, redrawn after each hold (random action repeat)
  sine   m + A * sin(2 pi t / P + phi) per action dimension: period P ~ logU[5, 100] steps shared by all
         dimensions (a gait-like open-loop oscillator), A ~ U[0.3, 1]^d, phi ~ U[0, 2 pi)^d, m ~ U[-0.3, 0.3]^d
(all clipped to [-1, 1]). Biased and slow processes push joints to their limits and hold postures, oscillators
produce rhythmic motion that can propel cheetah and walker forwards or backwards, and white noise jitters around
the initial state. Measured against white noise alone (docs/datasets_dmc.md), the mixture widens the visited
states in every domain (e.g. 2.7x the 5-cm voxels visited by the jaco hand, twice cheetah's speed range) but
holds fewer states where the reward is for staying put (quadruped upright; jaco targets on the table just below
the hand's start box).

How this differs from ExORL, and what it implies: RND's policy is closed-loop and seeks novel states, so its data
keep expanding towards rarely seen states (walker standing and running, large quadruped jumps, the jaco hand
sweeping the whole table). Open-loop noise rarely reaches those states, so high-reward behaviour for the
harder tasks (walker run/flip, cheetah run, jaco reaches far from the start) is rarer here than in ExORL's RND
data. Returns learned from these datasets are not comparable with numbers reported on ExORL. Every episode starts
from the task's own initial-state distribution (as ExORL's), and episodes are independent given their seed.

Each episode is collected on the domain's first task in fluxrl.names.DMC_TASKS (the reward is not stored) and
stores, per state row, `physics`: the full MuJoCo state (qpos, qvel, act) in float64, from which
fluxrl.data.relabel_dmc computes the reward of any task of the domain exactly, and `behavior_goal_ids`: the index
in MODES of the exploration process that chose the row's action (what InFOM's intention plot is coloured by).
"""

from __future__ import annotations

import numpy as np

from fluxrl.envs.dmc import DMCEnv, physics_state
from fluxrl.names import DMC_TASKS, DatasetSpec

# 1M transitions per domain (InFOM's pre-training size): 1000 episodes of 1000 steps, or 4000 of jaco's 250 steps;
# validation 50K transitions = InFOM's walker/cheetah validation split.
DEFAULT_EPISODES = {"dmc": 1000, "jaco": 4000}
DEFAULT_VAL_EPISODES = {"dmc": 50, "jaco": 200}

SEGMENT_STEPS = (50, 500)
MODES = ("white", "ou", "hold", "sine")

_ENVS: dict[str, DMCEnv] = {}  # one env per domain and process: building one costs as much as ~100 steps


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _white(rng: np.random.Generator, steps: int, dim: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, (steps, dim))


def _ou(rng: np.random.Generator, steps: int, dim: int) -> np.ndarray:
    mean = rng.uniform(-0.5, 0.5, dim)
    std = rng.uniform(0.2, 0.8)
    rho = np.exp(-1.0 / _log_uniform(rng, 2.0, 100.0))
    noise = rng.standard_normal((steps, dim)) * std * np.sqrt(1.0 - rho**2)
    x = np.empty((steps, dim))
    x[0] = rng.standard_normal(dim) * std  # start in the stationary distribution
    for t in range(1, steps):
        x[t] = rho * x[t - 1] + noise[t]
    return mean + x


def _hold(rng: np.random.Generator, steps: int, dim: int) -> np.ndarray:
    out = np.empty((steps, dim))
    t = 0
    while t < steps:
        k = int(rng.integers(2, 51))
        out[t : t + k] = rng.uniform(-1.0, 1.0, dim)
        t += k
    return out


def _sine(rng: np.random.Generator, steps: int, dim: int) -> np.ndarray:
    period = _log_uniform(rng, 5.0, 100.0)
    amplitude = rng.uniform(0.3, 1.0, dim)
    phase = rng.uniform(0.0, 2 * np.pi, dim)
    mean = rng.uniform(-0.3, 0.3, dim)
    t = np.arange(steps)[:, None]
    return mean + amplitude * np.sin(2 * np.pi * t / period + phase)


_GENERATORS = {"white": _white, "ou": _ou, "hold": _hold, "sine": _sine}


def exploration_actions(rng: np.random.Generator, steps: int, action_dim: int) -> np.ndarray:
    """The open-loop action sequence of one episode: float32 (steps, action_dim) in [-1, 1]."""
    return exploration_segments(rng, steps, action_dim)[0]


def exploration_segments(rng: np.random.Generator, steps: int, action_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(actions, modes): the episode's actions and, per step, the index in MODES of the process that drew it."""
    actions = np.empty((steps, action_dim))
    modes = np.empty(steps, np.int32)
    t = 0
    while t < steps:
        length = min(steps - t, int(rng.integers(SEGMENT_STEPS[0], SEGMENT_STEPS[1] + 1)))
        mode = int(rng.integers(len(MODES)))
        actions[t : t + length] = _GENERATORS[MODES[mode]](rng, length, action_dim)
        modes[t : t + length] = mode
        t += length
    return np.clip(actions, -1.0, 1.0).astype(np.float32), modes


def _env(domain: str) -> DMCEnv:
    if domain not in _ENVS:
        _ENVS[domain] = DMCEnv(f"{domain}-{DMC_TASKS[domain][0]}")
    return _ENVS[domain]


def collect_episode(spec: DatasetSpec, seed: int) -> dict[str, np.ndarray]:
    """One exploration episode of `spec`'s domain in OGBench's raw layout (T + 1 state rows; the last row's
    action is zero and its terminal is 1), with the MuJoCo state of every row in `physics`."""
    env = _env(spec.env)
    env_seed, policy_seed = np.random.SeedSequence(seed).spawn(2)
    obs, _ = env.reset(seed=int(env_seed.generate_state(1)[0]))
    steps = env.max_episode_steps
    actions, modes = exploration_segments(np.random.default_rng(policy_seed), steps, env.action_space.shape[0])
    observations = np.empty((steps + 1,) + obs.shape, np.float32)
    physics = np.empty((steps + 1, len(physics_state(env))), np.float64)
    observations[0], physics[0] = obs, physics_state(env)
    for t in range(steps):
        obs, _, _, truncated, _ = env.step(actions[t])
        observations[t + 1], physics[t + 1] = obs, physics_state(env)
        if truncated != (t == steps - 1):
            raise RuntimeError(f"{spec.env}: episode ended after {t + 1} steps, expected {steps}.")
    terminals = np.zeros(steps + 1, np.float32)
    terminals[-1] = 1.0
    return {
        "observations": observations,
        "actions": np.concatenate([actions, np.zeros((1, actions.shape[1]), np.float32)]),
        "terminals": terminals,
        "physics": physics,
        # The behaviour "intention" of each row: the exploration process acting there (the last row repeats).
        "behavior_goal_ids": np.concatenate([modes, modes[-1:]]),
    }
