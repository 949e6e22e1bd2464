"""OGBench datasets generated locally with OGBench's own environments and scripted oracles.

The procedure follows OGBench's official generators (data_gen_scripts/generate_manipspace.py and
generate_locomaze.py, with the flags of data_gen_scripts/commands.sh). One episode is 1001 environment steps, stored
as 1001 state rows (1000 transitions + the final state; terminals = 1 on the last row).

Manipulation (cube-single, cube-double, scene, puzzle-3x3, puzzle-4x4), env in `mode='data_collection'`,
`terminate_at_goal=False`; whenever the oracle reports done, `set_new_target()` picks a new random target.
- play:  PlanOracle (open-loop plan through keyframes) with temporally correlated plan noise 0.1, smoothing 0.5.
- noisy: MarkovOracle (closed loop, min_norm 0.4) plus Gaussian action noise xi * (1, 1, 1, 3, 10), with
         xi ~ U(0, 0.1) drawn once per episode, and a uniformly random action with probability 0.1 (cube, scene)
         or 0.2 (puzzle).
Actions are clipped to [-1, 1]. Cube stacking probability per episode: single 0, double U(0, 0.25), scene 0.5.
Scene episodes whose cube leaves the visible area (the official health check) are discarded and re-collected.

Point maze navigate: a random start cell, a random goal among the maze's non-corridor ("vertex") cells, actions =
unit direction to the next BFS subgoal cell + N(0, 0.5^2) noise, clipped; a new random vertex goal on arrival.

Stored per row (raw OGBench layout): observations, actions (float32), terminals, qpos, qvel (float32),
button_states (int64, scene/puzzle), plus the behaviour goal the oracle is pursuing when it picks that row's
action: `behavior_goals` (float32) and `behavior_goal_ids` (int32). See docs/datasets_ogbench.md for their layout.

Deviations from the official scripts (documented in docs/datasets_ogbench.md too):
- Seeding: every episode reseeds the env (reset(seed=...)) and numpy's global RNG (which OGBench's oracles and
  maze draw from), so episode k depends only on its seed; the official scripts seed once per dataset.
  numpy's global RNG state is restored after each episode.
- Random actions of the noisy datasets are drawn with numpy's global RNG, uniformly in [-1, 1]^5 (the official
  script uses action_space.sample(), the same distribution from an unseeded generator).
"""

from __future__ import annotations

import contextlib

import numpy as np

from fluxrl.envs.ogbench_envs import BFSSubgoals, gym_make, maze_cells  # importing fluxrl.envs sets MUJOCO_GL
from fluxrl.names import DatasetSpec

EPISODE_STEPS = 1001  # environment steps = state rows per episode (OGBench's max_episode_steps)
DEFAULT_EPISODES = {"manipulation": 1000, "pointmaze": 1000}
DEFAULT_VAL_EPISODES = {"manipulation": 100, "pointmaze": 100}

PLAN_NOISE = 0.1
PLAN_NOISE_SMOOTHING = 0.5
MARKOV_MIN_NORM = 0.4
MARKOV_NOISE = 0.1  # upper bound of the per-episode noise level xi
MARKOV_NOISE_SCALE = np.array([1.0, 1.0, 1.0, 3.0, 10.0])  # per action dimension (xyz, yaw, gripper)
P_RANDOM_ACTION_NOISY = {"cube": 0.1, "scene": 0.1, "puzzle": 0.2}
POINTMAZE_NOISE = 0.5
MAX_SCENE_ATTEMPTS = 100

_COLLECTORS: dict = {}  # per-process cache: building a MuJoCo env and its oracles takes about a second


@contextlib.contextmanager
def seeded_global_numpy(seed: int):
    """Seed numpy's global RNG (OGBench's oracles and mazes draw from it) and restore its state afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _sub_seeds(seed: int, *salt: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (env, numpy global) from an episode seed."""
    env_seed, np_seed = np.random.SeedSequence([int(seed), *salt]).generate_state(2)
    return int(env_seed), int(np_seed)


def collect_episode(spec: DatasetSpec, seed: int, steps: int = EPISODE_STEPS) -> dict[str, np.ndarray]:
    """Collect one episode of dataset `spec` in OGBench's raw layout (`steps` state rows; tests pass fewer)."""
    key = (spec.env, spec.mode)
    if key not in _COLLECTORS:
        _COLLECTORS[key] = (_PointmazeCollector if spec.family == "pointmaze" else _ManipulationCollector)(spec)
    return _COLLECTORS[key].collect(seed, steps)


def _finish(rows: dict[str, list], dtypes: dict) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, dtypes.get(k, np.float32)) for k, v in rows.items()}
    out["terminals"] = np.zeros(len(out["observations"]), np.float32)
    out["terminals"][-1] = 1.0
    return out


class _ManipulationCollector:
    def __init__(self, spec: DatasetSpec):
        from ogbench.manipspace.oracles.markov.button_markov import ButtonMarkovOracle
        from ogbench.manipspace.oracles.markov.cube_markov import CubeMarkovOracle
        from ogbench.manipspace.oracles.markov.drawer_markov import DrawerMarkovOracle
        from ogbench.manipspace.oracles.markov.window_markov import WindowMarkovOracle
        from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
        from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
        from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
        from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

        self.kind = spec.env.split("-")[0]  # cube | scene | puzzle
        self.env_name = spec.env
        self.markov = spec.mode == "noisy"
        self.p_random_action = P_RANDOM_ACTION_NOISY[self.kind] if self.markov else 0.0
        # The unwrapped env: no TimeLimit (episodes run EPISODE_STEPS steps) and no per-step checker overhead.
        env = gym_make(f"{spec.env}-v0", terminate_at_goal=False, mode="data_collection").unwrapped
        self.env = env
        m = dict(env=env, min_norm=MARKOV_MIN_NORM)
        p = dict(env=env, noise=PLAN_NOISE, noise_smoothing=PLAN_NOISE_SMOOTHING)
        if self.kind == "cube":
            self.agents = {"cube": CubeMarkovOracle(**m) if self.markov else CubePlanOracle(**p)}
        elif self.kind == "scene":
            if self.markov:
                self.agents = {
                    "cube": CubeMarkovOracle(max_step=100, **m),
                    "button": ButtonMarkovOracle(**m),
                    "drawer": DrawerMarkovOracle(**m),
                    "window": WindowMarkovOracle(**m),
                }
            else:
                self.agents = {
                    "cube": CubePlanOracle(**p),
                    "button": ButtonPlanOracle(**p),
                    "drawer": DrawerPlanOracle(**p),
                    "window": WindowPlanOracle(**p),
                }
        else:
            button = ButtonMarkovOracle(gripper_always_closed=True, **m) if self.markov else ButtonPlanOracle(
                gripper_always_closed=True, **p
            )
            self.agents = {"button": button}
        self.has_buttons = hasattr(env, "_cur_button_states")

    def _p_stack(self) -> float:
        if self.env_name == "cube-single":
            return 0.0
        if self.env_name == "cube-double":
            return float(np.random.uniform(0.0, 0.25))
        return 0.5  # scene (one cube: stacking never applies) and puzzle (ignored)

    def behavior_goal(self) -> np.ndarray:
        """The target the oracle currently pursues, as a fixed-size vector (layout in docs/datasets_ogbench.md)."""
        env = self.env
        if self.kind == "cube":
            onehot = np.eye(env._num_cubes)[env._target_block]
            pos = env._data.mocap_pos[env._cube_target_mocap_ids[env._target_block]]
            return np.concatenate([onehot, pos])
        if self.kind == "puzzle":
            onehot = np.eye(env._num_buttons)[env._target_button]
            return np.concatenate([onehot, [env._target_button_states[env._target_button]]])
        tasks = ("cube", "button", "drawer", "window")
        task = env._target_task
        goal = np.zeros(12)
        goal[tasks.index(task)] = 1.0
        if task == "cube":
            goal[4:7] = env._data.mocap_pos[env._cube_target_mocap_ids[env._target_block]]
        elif task == "button":
            goal[7 + env._target_button] = 1.0
            goal[9] = env._target_button_states[env._target_button]
        elif task == "drawer":
            goal[10] = env._target_drawer_pos
        else:
            goal[11] = env._target_window_pos
        return goal

    def collect(self, seed: int, steps: int) -> dict[str, np.ndarray]:
        for attempt in range(MAX_SCENE_ATTEMPTS):
            env_seed, np_seed = _sub_seeds(seed, attempt)
            with seeded_global_numpy(np_seed):
                episode = self._collect_once(env_seed, steps)
            if self.kind != "scene" or _scene_healthy(episode["qpos"]):
                return episode
        raise RuntimeError(f"{MAX_SCENE_ATTEMPTS} scene episodes in a row failed the health check (seed {seed}).")

    def _collect_once(self, env_seed: int, steps: int) -> dict[str, np.ndarray]:
        env = self.env
        ob, info = env.reset(seed=env_seed)
        p_stack = self._p_stack()
        xi = np.random.uniform(0, MARKOV_NOISE) if self.markov else 0.0
        agent = self.agents[info["privileged/target_task"]]
        agent.reset(ob, info)
        goal, goal_id = self.behavior_goal(), 0
        rows = {k: [] for k in ("observations", "actions", "qpos", "qvel", "behavior_goals", "behavior_goal_ids")}
        if self.has_buttons:
            rows["button_states"] = []
        for _ in range(steps):
            if np.random.rand() < self.p_random_action:
                action = np.random.uniform(-1.0, 1.0, size=5)
            else:
                action = np.array(agent.select_action(ob, info), dtype=np.float64)
                if self.markov:
                    action = action + np.random.normal(0, xi * MARKOV_NOISE_SCALE, action.shape)
            action = np.clip(action, -1, 1)
            next_ob, _, _, _, info = env.step(action)
            rows["observations"].append(ob)
            rows["actions"].append(action)
            rows["qpos"].append(info["prev_qpos"])
            rows["qvel"].append(info["prev_qvel"])
            if self.has_buttons:
                rows["button_states"].append(info["prev_button_states"])
            rows["behavior_goals"].append(goal)
            rows["behavior_goal_ids"].append(goal_id)
            if agent.done:
                agent_ob, agent_info = env.set_new_target(p_stack=p_stack)
                agent = self.agents[agent_info["privileged/target_task"]]
                agent.reset(agent_ob, agent_info)
                goal, goal_id = self.behavior_goal(), goal_id + 1
            ob = next_ob
        return _finish(rows, {"button_states": np.int64, "behavior_goal_ids": np.int32})


def _scene_healthy(qpos: np.ndarray) -> bool:
    """OGBench's scene check: the cube never goes too far right, nor too far left unless it is in the drawer."""
    xyz = qpos[:, 14:17]
    too_right = (xyz[:, 1] >= 0.29).any()
    too_left = ((xyz[:, 1] <= -0.3) & ((xyz[:, 2] < 0.06) | (xyz[:, 2] > 0.08))).any()
    return not (too_right or too_left)


class _PointmazeCollector:
    def __init__(self, spec: DatasetSpec):
        self.env = gym_make(f"{spec.env}-v0", terminate_at_goal=False).unwrapped
        maze = self.env.maze_map
        self.all_cells, self.vertex_cells = maze_cells(maze)
        self.subgoal = BFSSubgoals(self.env)

    def collect(self, seed: int, steps: int) -> dict[str, np.ndarray]:
        env_seed, np_seed = _sub_seeds(seed)
        with seeded_global_numpy(np_seed):
            return self._collect_once(env_seed, steps)

    def _collect_once(self, env_seed: int, steps: int) -> dict[str, np.ndarray]:
        env = self.env
        env.action_space.seed(env_seed)  # the maze's reset takes a few random settling steps
        n_cols = env.maze_map.shape[1]
        init_ij = self.all_cells[np.random.randint(len(self.all_cells))]
        goal_ij = self.vertex_cells[np.random.randint(len(self.vertex_cells))]
        ob, _ = env.reset(seed=env_seed, options=dict(task_info=dict(init_ij=init_ij, goal_ij=goal_ij)))
        rows = {k: [] for k in ("observations", "actions", "qpos", "qvel", "behavior_goals", "behavior_goal_ids")}
        for _ in range(steps):
            action = self.subgoal.direction(env.get_xy(), env.cur_goal_xy)
            action = np.clip(action + np.random.normal(0, POINTMAZE_NOISE, action.shape), -1, 1)
            rows["behavior_goals"].append(np.array(env.cur_goal_xy))
            rows["behavior_goal_ids"].append(goal_ij[0] * n_cols + goal_ij[1])
            next_ob, _, _, _, info = env.step(action)
            rows["observations"].append(ob)
            rows["actions"].append(action)
            rows["qpos"].append(info["prev_qpos"])
            rows["qvel"].append(info["prev_qvel"])
            if info["success"]:
                goal_ij = self.vertex_cells[np.random.randint(len(self.vertex_cells))]
                env.set_goal(goal_ij)
            ob = next_ob
        return _finish(rows, {"behavior_goal_ids": np.int32})


# Width of `behavior_goals` per environment (layouts in docs/datasets_ogbench.md).
BEHAVIOR_GOAL_SIZE = {
    "cube-single": 1 + 3,
    "cube-double": 2 + 3,
    "scene": 12,
    "puzzle-3x3": 9 + 1,
    "puzzle-4x4": 16 + 1,
    "pointmaze-medium": 2,
    "pointmaze-large": 2,
}
