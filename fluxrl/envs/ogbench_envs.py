"""OGBench single-task environments and their scripted oracles (for evaluation and data generation).

`make_ogbench_env(spec)` is `gymnasium.make(spec.ogbench_env_id)` (its TimeLimit included: 200 steps for
cube-single, 500 cube-double/puzzle, 750 scene, 1000 point mazes) inside `OGBenchEnv`, which
- returns float32 observations and clips actions to the action space [-1, 1],
- puts `success` (0.0 / 1.0) in every info, reset included,
- on reset(seed=s) also seeds numpy's global RNG and the action space: OGBench's maze reset (start-position
  noise) and its manipulation reset (settling steps with random actions) draw from them, so a seeded reset is
  reproducible only this way. numpy's global RNG is thereby changed: `evaluate` restores it afterwards.
Single-task envs compute reward and success on the state *before* the action (ogbench>=1.2, success_timing='pre'):
reward of step t is that of s_t, and episodes end one step after the goal is reached.

`oracle_policy(env)` returns a policy `policy(obs, rng=None) -> action` (the protocol of fluxrl.envs.evaluate) that
reads the privileged state of the env it was built for.
"""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np

from fluxrl.errors import FluxrlError
from fluxrl.names import TaskSpec, parse_task


# OGBench's manipulation envs build their action Box from float64 bounds on every access (resets included), and
# gymnasium warns about the float32 cast each time: harmless, and too noisy for the CLI.
warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32.*")


def gym_make(env_id: str, **kwargs) -> gymnasium.Env:
    """gymnasium.make for an OGBench id (registering OGBench's environments first)."""
    import ogbench  # noqa: F401

    return gymnasium.make(env_id, **kwargs)


def make_ogbench_env(spec: TaskSpec | str, seed: int | None = None, render_size: int | None = None, **kwargs):
    """The OGBench single-task env of `spec` wrapped in OGBenchEnv."""
    spec = parse_task(spec) if isinstance(spec, str) else spec
    if spec.family == "dmc":
        raise FluxrlError(f"'{spec.name}' is a DMC task, not an OGBench task.")
    if render_size is not None:
        if render_size < 1:
            raise FluxrlError(f"render_size must be a positive number of pixels, got {render_size}.")
        kwargs = {"width": render_size, "height": render_size, **kwargs}
    try:
        env = gym_make(spec.ogbench_env_id, **kwargs)
    except TypeError as e:
        raise FluxrlError(f"Invalid options for OGBench env {spec.ogbench_env_id}: {e}.") from None
    return OGBenchEnv(env, spec, seed=seed)


class OGBenchEnv(gymnasium.Wrapper):
    """float32 observations, clipped actions, info['success'] always present, fully seeded resets."""

    def __init__(self, env: gymnasium.Env, spec: TaskSpec, seed: int | None = None):
        super().__init__(env)
        self.task = spec
        self.episode_index = -1  # incremented by every reset; oracles use it to notice new episodes
        self._pending_seed = seed
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)
        # Fixed here: OGBench's manipulation envs build a new float64-bounded Box on every access.
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, env.action_space.shape, np.float32)

    @property
    def task_name(self) -> str:
        return self.task.name

    def reset(self, *, seed: int | None = None, options=None):
        if seed is None and self._pending_seed is not None:
            seed, self._pending_seed = self._pending_seed, None
        if seed is not None:
            global_seed, space_seed = np.random.SeedSequence([int(seed), 7]).generate_state(2)
            np.random.seed(int(global_seed))
            self.env.unwrapped.action_space.seed(int(space_seed))
        obs, info = self.env.reset(seed=seed, options=options)
        info = dict(info)
        info["success"] = 0.0
        self.episode_index += 1
        return np.asarray(obs, np.float32), info

    def step(self, action):
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        obs, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)
        info["success"] = float(info.get("success", 0.0))
        return np.asarray(obs, np.float32), float(reward), bool(terminated), bool(truncated), info

    def render(self):
        return self.env.unwrapped.render()


# ---------------------------------------------------------------------------------------------------------------
# Oracles


def oracle_policy(env):
    """A scripted expert for an env made by make_env: `policy(obs, rng=None) -> action`.

    Manipulation: OGBench's plan oracles (noise 0) driven through the single task's goal one subtask at a time,
    each chosen from the live state when the previous plan ends (so a failed subtask is retried):
      cube: pick-and-place each misplaced cube (lowest goal first; a cube whose goal spot is occupied waits, and a
            deadlock such as a swap is broken by moving a cube to a free spot);
      puzzle: the buttons to press solve the lights-out system A x = goal - state over GF(2);
      scene: window, cube (opening the drawer first when the cube goes inside), drawer, then buttons; a locked
             drawer or window is unlocked by pressing its button first.
    Point maze: the noiseless BFS subgoal follower (unit step towards the next cell on a shortest path).
    Randomness (keyframe timing/heights of the plans) comes from numpy's global RNG, which a seeded reset seeds."""
    if not isinstance(env, OGBenchEnv):
        raise FluxrlError("oracle_policy needs an env made by fluxrl.envs.make_env for an OGBench task.")
    kind = env.task.dataset.env.split("-")[0]
    if kind == "pointmaze":
        return PointmazeOracle(env)
    return ManipulationOracle(env, kind)


class PointmazeOracle:
    def __init__(self, env: OGBenchEnv):
        self.env = env
        self.subgoals = BFSSubgoals(env.unwrapped)

    def __call__(self, obs, rng=None) -> np.ndarray:
        maze = self.env.unwrapped
        return self.subgoals.direction(maze.get_xy(), maze.cur_goal_xy).astype(np.float32)


class ManipulationOracle:
    GOAL_TOL = 0.04  # OGBench's success radius for cubes, drawer and window

    def __init__(self, env: OGBenchEnv, kind: str):
        from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
        from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
        from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
        from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

        self.env, self.kind = env, kind
        u = env.unwrapped
        self.agents = {
            "cube": CubePlanOracle(env=u, noise=0.0),
            "button": ButtonPlanOracle(env=u, noise=0.0, gripper_always_closed=kind == "puzzle"),
            "drawer": DrawerPlanOracle(env=u, noise=0.0),
            "window": WindowPlanOracle(env=u, noise=0.0),
        }
        self._agent = None
        self._episode = None

    def __call__(self, obs, rng=None) -> np.ndarray:
        u = self.env.unwrapped
        info = u.compute_ob_info()
        if self._episode != self.env.episode_index or self._agent is None or self._agent.done:
            self._episode = self.env.episode_index
            self._agent = self._next_subtask(info)
        if self._agent is None:  # everything in place: hold still
            return np.zeros(5, np.float32)
        return np.asarray(self._agent.select_action(obs, info), np.float32)

    def _next_subtask(self, info: dict):
        subtask = {"cube": self._cube_subtask, "puzzle": self._puzzle_subtask, "scene": self._scene_subtask}[
            self.kind
        ](info)
        if subtask is None:
            return None
        name, extra = subtask
        agent = self.agents[name]
        agent.reset(None, {**info, **extra})
        return agent

    # -- cubes ----------------------------------------------------------------------------------------------
    def _cube_positions(self) -> np.ndarray:
        u = self.env.unwrapped
        return np.array([u._data.joint(f"object_joint_{i}").qpos[:3] for i in range(u._num_cubes)])

    def _cube_goals(self) -> np.ndarray:
        u = self.env.unwrapped
        return np.array([u._data.mocap_pos[m] for m in u._cube_target_mocap_ids])

    def _place(self, block: int, pos: np.ndarray) -> tuple[str, dict]:
        return "cube", {
            "privileged/target_block": block,
            "privileged/target_block_pos": np.asarray(pos, np.float64),
            "privileged/target_block_yaw": np.zeros(1),
        }

    def _cube_subtask(self, info: dict):
        pos, goals = self._cube_positions(), self._cube_goals()
        misplaced = [i for i in range(len(pos)) if np.linalg.norm(pos[i] - goals[i]) > self.GOAL_TOL]
        if not misplaced:
            return None

        def covered(i):  # another cube rests on cube i
            return any(
                j != i and pos[j][2] > pos[i][2] + 0.02 and np.linalg.norm(pos[j][:2] - pos[i][:2]) < 0.03
                for j in range(len(pos))
            )

        def goal_free(i):  # no other cube occupies cube i's goal, and a goal on top of a cube has its support
            blocked = any(j != i and np.linalg.norm(pos[j] - goals[i]) < 0.03 for j in range(len(pos)))
            support_needed = goals[i][2] > 0.04
            supported = any(
                j != i
                and np.linalg.norm(pos[j][:2] - goals[i][:2]) < 0.02
                and abs(pos[j][2] + 0.04 - goals[i][2]) < 0.01
                for j in range(len(pos))
            )
            return not blocked and (supported or not support_needed)

        movable = [i for i in sorted(misplaced, key=lambda i: goals[i][2]) if not covered(i)]
        for i in movable:
            if goal_free(i):
                return self._place(i, goals[i])
        # Deadlock (e.g. a swap): park a movable cube on a free spot away from all cubes and goals.
        i = movable[0] if movable else misplaced[0]
        return self._place(i, self._free_spot(np.concatenate([pos, goals])))

    def _free_spot(self, occupied: np.ndarray) -> np.ndarray:
        lo, hi = self.env.unwrapped._object_sampling_bounds
        xs, ys = np.meshgrid(np.linspace(lo[0], hi[0], 6), np.linspace(lo[1], hi[1], 13))
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        clearance = np.min(np.linalg.norm(grid[:, None, :] - occupied[None, :, :2], axis=-1), axis=1)
        best = grid[int(np.argmax(clearance))]
        return np.array([best[0], best[1], 0.02])

    # -- puzzle ---------------------------------------------------------------------------------------------
    def _puzzle_subtask(self, info: dict):
        u = self.env.unwrapped
        presses = lights_out_solution(u._cur_button_states, u._target_button_states, u._num_rows, u._num_cols)
        if not presses.any():
            return None
        return self._press(int(np.flatnonzero(presses)[0]))

    def _press(self, button: int) -> tuple[str, dict]:
        u = self.env.unwrapped
        return "button", {
            "privileged/target_button": button,
            "privileged/target_button_top_pos": u._data.site_xpos[u._button_site_ids[button]].copy(),
        }

    # -- scene ----------------------------------------------------------------------------------------------
    def _slide(self, joint: str, target: float, handle_site: int, name: str) -> tuple[str, dict]:
        """Move the drawer/window handle to where it is when the slide joint is at `target`."""
        u = self.env.unwrapped
        d = u._data
        axis = d.xaxis[u._model.joint(joint).id]
        handle = d.site_xpos[handle_site].copy()
        return name, {f"privileged/target_{name}_handle_pos": handle + (target - d.joint(joint).qpos[0]) * axis}

    def _scene_subtask(self, info: dict):
        u = self.env.unwrapped
        d = u._data
        buttons, target_buttons = u._cur_button_states, u._target_button_states
        drawer_q, window_q = d.joint("drawer_slide").qpos[0], d.joint("window_slide").qpos[0]
        cube, goal = self._cube_positions()[0], self._cube_goals()[0]
        drawer_goal, window_goal = u._target_drawer_pos, u._target_window_pos

        def unlocked_or_press(button):
            return None if buttons[button] == 1 else self._press(button)

        if abs(window_q - window_goal) > self.GOAL_TOL:
            return unlocked_or_press(1) or self._slide("window_slide", window_goal, u._window_site_id, "window")
        drawer_axis = d.xaxis[u._model.joint("drawer_slide").id]
        # Where the cube goal is now: a goal inside the drawer moves with the drawer.
        goal_in_drawer = self._in_drawer_at(goal, drawer_goal)
        goal_now = goal + (drawer_q - drawer_goal) * drawer_axis if goal_in_drawer else goal
        if np.linalg.norm(cube - goal_now) > self.GOAL_TOL:
            if goal_in_drawer and drawer_q > -0.12:  # open the drawer before putting the cube in
                return unlocked_or_press(0) or self._slide("drawer_slide", -0.16, u._drawer_site_id, "drawer")
            return self._place(0, goal_now)
        if abs(drawer_q - drawer_goal) > self.GOAL_TOL:
            return unlocked_or_press(0) or self._slide("drawer_slide", drawer_goal, u._drawer_site_id, "drawer")
        wrong = np.flatnonzero(buttons != target_buttons)
        return self._press(int(wrong[0])) if len(wrong) else None

    def _in_drawer_at(self, pos: np.ndarray, drawer_q: float) -> bool:
        """OGBench's in-drawer box test, for the drawer at slide position `drawer_q`."""
        u = self.env.unwrapped
        d = u._data
        axis = d.xaxis[u._model.joint("drawer_slide").id]
        handle_y = d.site_xpos[u._drawer_site_id][1] + (drawer_q - d.joint("drawer_slide").qpos[0]) * axis[1]
        low = np.array([0.21, handle_y - 0.27, 0.0])
        high = np.array([0.45, handle_y - 0.07, 0.15])
        return bool(np.all(low <= pos) and np.all(pos <= high))


def lights_out_solution(state: np.ndarray, goal: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Buttons to press (0/1 per button) so that the puzzle goes from `state` to `goal`.

    Pressing button b toggles b and its 4-neighbours: the presses x solve A x = goal - state over GF(2)."""
    n = rows * cols
    a = np.zeros((n, n), np.uint8)
    for b in range(n):
        r, c = divmod(b, cols)
        for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            if 0 <= r + dr < rows and 0 <= c + dc < cols:
                a[(r + dr) * cols + c + dc, b] = 1
    aug = np.concatenate([a, ((np.asarray(goal) - np.asarray(state)) % 2).astype(np.uint8)[:, None]], axis=1)
    pivots, row = [], 0
    for col in range(n):
        hit = np.flatnonzero(aug[row:, col]) + row
        if len(hit) == 0:
            continue
        aug[[row, hit[0]]] = aug[[hit[0], row]]
        for r in np.flatnonzero(aug[:, col]):
            if r != row:
                aug[r] ^= aug[row]
        pivots.append(col)
        row += 1
        if row == n:
            break
    if aug[row:, -1].any():
        raise FluxrlError("The puzzle's goal is not reachable from its current state by button presses.")
    x = np.zeros(n, np.uint8)
    for r, col in enumerate(pivots):
        x[col] = aug[r, -1]  # free variables set to 0
    return x


def maze_cells(maze: np.ndarray) -> tuple[list, list]:
    """All free cells, and the free cells that are not straight corridor cells (OGBench's navigate goal cells)."""
    all_cells, vertex_cells = [], []
    for i in range(maze.shape[0]):
        for j in range(maze.shape[1]):
            if maze[i, j] != 0:
                continue
            all_cells.append((i, j))
            vertical = maze[i - 1, j] == 0 and maze[i + 1, j] == 0 and maze[i, j - 1] == 1 and maze[i, j + 1] == 1
            horizontal = maze[i, j - 1] == 0 and maze[i, j + 1] == 0 and maze[i - 1, j] == 1 and maze[i + 1, j] == 1
            if not (vertical or horizontal):
                vertex_cells.append((i, j))
    return all_cells, vertex_cells


class BFSSubgoals:
    """OGBench's maze oracle: the next cell on a shortest (BFS) path to the goal's cell.

    Same result as the env's `get_oracle_subgoal`, with the BFS distance map cached per goal cell (OGBench
    recomputes it at every step, which dominates a point-maze step)."""

    def __init__(self, maze_env):
        self.env = maze_env
        self._distances_to: dict[tuple, np.ndarray] = {}

    def distances(self, goal_ij: tuple) -> np.ndarray:
        if goal_ij not in self._distances_to:
            maze = self.env.maze_map
            dist = np.full(maze.shape, -1, dtype=np.int64)
            dist[goal_ij] = 0
            queue = [goal_ij]
            while queue:
                i, j = queue.pop(0)
                for ni, nj in ((i - 1, j), (i, j - 1), (i + 1, j), (i, j + 1)):
                    inside = 0 <= ni < maze.shape[0] and 0 <= nj < maze.shape[1]
                    if inside and maze[ni, nj] == 0 and dist[ni, nj] == -1:
                        dist[ni, nj] = dist[i, j] + 1
                        queue.append((ni, nj))
            self._distances_to[goal_ij] = dist
        return self._distances_to[goal_ij]

    def subgoal(self, xy, goal_xy) -> np.ndarray:
        env = self.env
        start = env.xy_to_ij(xy)
        dist = self.distances(env.xy_to_ij(goal_xy))
        best = start
        i, j = start
        for ni, nj in ((i - 1, j), (i, j - 1), (i + 1, j), (i, j + 1)):  # OGBench's order: ties go to the first
            inside = 0 <= ni < dist.shape[0] and 0 <= nj < dist.shape[1]
            if inside and env.maze_map[ni, nj] == 0 and dist[ni, nj] < dist[best]:
                best = (ni, nj)
        return np.array(env.ij_to_xy(best), dtype=np.float64)

    def direction(self, xy, goal_xy) -> np.ndarray:
        """Unit vector from xy towards the next subgoal cell's centre."""
        delta = self.subgoal(xy, goal_xy) - np.asarray(xy, np.float64)
        return delta / (np.linalg.norm(delta) + 1e-6)
