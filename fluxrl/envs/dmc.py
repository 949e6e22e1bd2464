"""DeepMind Control environments as ExORL uses them: the URLB task set on dm_control's models.

Sixteen tasks on four domains (fluxrl.names.DMC_TASKS). Several are not in dm_control's suite; their definitions
follow URLB / ExORL / InFOM (`custom_dmc_tasks/`), written here as subclasses of the suite's own task classes on
the suite's own models:

domain     tasks                                   model, episode                              obs  act
walker     walk, run, stand (suite); flip          suite walker.xml, 1000 steps of 0.025 s      24    6
cheetah    run (suite); run_backward, walk,        suite cheetah.xml, ground drawn with         17    6
           walk_backward                           half-length 200 m (URLB), 1000 steps of 0.01 s
quadruped  walk, run (suite); stand, jump          suite quadruped (no walls/ball/terrain,      78   12
                                                   100 m floor), 1000 steps of 0.02 s
jaco       reach_top_left/top_right/bottom_left/   dm_control manipulation Jaco arm + hand,     42    9
           bottom_right                            ExORL's fixed-site reach, 250 steps of 0.04 s

Conventions (as ExORL's dmc.py): observations are the task's state features flattened in the task's order and
cast to float32 (jaco: the PERFECT_FEATURES observables, no target position, as ExORL); actions live in [-1, 1]
and are mapped linearly onto each actuator's ctrlrange; action repeat 1; episodes end by time-out only
(terminated is always False, truncated at the time limit); DMC has no success signal, so `info` has no 'success'.
The env's reward for a step is the task reward of the state *after* the step (dm_control's convention).

Deviations from URLB/ExORL, none of which changes the dynamics or a reward:
- All tasks of a domain share one model, so one dataset's physics states serve every task. URLB builds cheetah's
  custom tasks on a copy of cheetah.xml whose ground plane has half-length 200 m instead of 100 m; quadruped-run's
  floor is 100 m, walk/stand/jump's 10 m. Planes are infinite for MuJoCo's collision detection, so these sizes
  only change what is drawn; we use the larger size everywhere (built from dm_control's own XML, not a copied
  file).
- jaco: ExORL's task also adds two invisible bounding-box sites (spawn areas) that only help visualisation; we
  omit them. Its MJCF is compiled once per env rather than every episode (composer's default), as it never
  changes.

Actions outside [-1, 1] are clipped (gymnasium Box semantics), where dm_control's action_scale wrapper raises.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import gymnasium
import numpy as np
from dm_control import composer  # fluxrl.envs sets MUJOCO_GL before this module loads
from dm_control.composer import initializers
from dm_control.composer.variation import distributions
from dm_control.manipulation.shared import arenas, cameras, constants, observations, robots, workspaces
from dm_control.rl import control
from dm_control.suite import cheetah, common, quadruped, walker
from dm_control.utils import rewards

from fluxrl.errors import FluxrlError
from fluxrl.names import DMC_TASKS, TaskSpec, parse_task

# Episode length in agent steps (time limit / control timestep) and the camera URLB renders each domain with.
EPISODE_STEPS = {"walker": 1000, "cheetah": 1000, "quadruped": 1000, "jaco": 250}
RENDER_CAMERA = {"walker": 0, "cheetah": 0, "quadruped": 2, "jaco": 0}
OBSERVATION_DIM = {"walker": 24, "cheetah": 17, "quadruped": 78, "jaco": 42}
ACTION_DIM = {"walker": 6, "cheetah": 6, "quadruped": 12, "jaco": 9}
# Length of physics_state(env): qpos, qvel and actuator activations (dm_control's Physics.get_state()).
PHYSICS_STATE_DIM = {"walker": 18, "cheetah": 18, "quadruped": 57, "jaco": 18}

# Task constants (dm_control suite / URLB / ExORL values).
WALKER_TIME_LIMIT, WALKER_CONTROL_TIMESTEP = 25.0, 0.025
WALKER_STAND_HEIGHT = 1.2
WALKER_SPEED = {"stand": 0.0, "walk": 1.0, "run": 8.0}
SPIN_SPEED = 5.0  # angular momentum about y above which walker flip's spin reward is 1
CHEETAH_TIME_LIMIT = 10.0  # control timestep = physics timestep (0.01 s)
CHEETAH_GROUND_LENGTH = 200.0  # half-length of the drawn ground (URLB's cheetah.xml)
CHEETAH_MOVE = {"run": (10.0, 1.0), "run_backward": (10.0, -1.0), "walk": (2.0, 1.0), "walk_backward": (2.0, -1.0)}
QUADRUPED_TIME_LIMIT, QUADRUPED_CONTROL_TIMESTEP = 20.0, 0.02
QUADRUPED_FLOOR_SIZE = 100.0  # the suite's run floor (time limit x run speed)
QUADRUPED_SPEED = {"walk": 0.5, "run": 5.0}
QUADRUPED_JUMP_HEIGHT = 1.0
JACO_TIME_LIMIT = 10.0  # control timestep: dm_control manipulation's 0.04 s
JACO_TARGET_RADIUS = 0.05
JACO_TCP_BOX = ((-0.2, -0.2, 0.02), (0.2, 0.2, 0.4))  # ExORL's site workspace: where the hand starts
JACO_TARGETS = {
    "reach_top_left": (-0.09, 0.09, 0.001),
    "reach_top_right": (0.09, 0.09, 0.001),
    "reach_bottom_left": (-0.09, -0.09, 0.001),
    "reach_bottom_right": (0.09, -0.09, 0.001),
}


# ----------------------------------------------------------------------------------------------- custom tasks
def _walker_stand_reward(physics) -> float:
    standing = rewards.tolerance(
        physics.torso_height(), bounds=(WALKER_STAND_HEIGHT, float("inf")), margin=WALKER_STAND_HEIGHT / 2
    )
    upright = (1 + physics.torso_upright()) / 2
    return (3 * standing + upright) / 4


class WalkerFlip(walker.PlanarWalker):
    """URLB walker flip: the walk/run stand term times a reward for the torso's angular momentum about y."""

    def __init__(self, random=None):
        super().__init__(move_speed=WALKER_SPEED["run"], random=random)

    def get_reward(self, physics):
        spin = rewards.tolerance(
            physics.named.data.subtree_angmom["torso"][1],
            bounds=(SPIN_SPEED, float("inf")),
            margin=SPIN_SPEED,
            value_at_margin=0,
            sigmoid="linear",
        )
        return _walker_stand_reward(physics) * (5 * spin + 1) / 6


class CheetahMove(cheetah.Cheetah):
    """URLB/InFOM cheetah run_backward, walk, walk_backward: linear ramp to 1 at `speed` in `direction`."""

    def __init__(self, speed: float, direction: float, random=None):
        self._target_speed = speed
        self._direction = direction
        super().__init__(random=random)

    def get_reward(self, physics):
        return rewards.tolerance(
            self._direction * physics.speed(),
            bounds=(self._target_speed, float("inf")),
            margin=self._target_speed,
            value_at_margin=0,
            sigmoid="linear",
        )


def _quadruped_upright(physics) -> float:
    # 1 when the torso's z-axis points up, falling linearly to 0 upside down (the suite's deviation_angle=0 case).
    return rewards.tolerance(
        physics.torso_upright(), bounds=(1.0, float("inf")), sigmoid="linear", margin=2.0, value_at_margin=0
    )


class QuadrupedStand(quadruped.Move):
    """URLB quadruped stand: the upright term alone (same initial states as walk/run)."""

    def __init__(self, random=None):
        super().__init__(desired_speed=0.0, random=random)

    def get_reward(self, physics):
        return _quadruped_upright(physics)


class QuadrupedJump(quadruped.Move):
    """URLB quadruped jump: upright times a linear ramp on the height of the centre of mass."""

    def __init__(self, random=None):
        super().__init__(desired_speed=0.0, random=random)

    def get_reward(self, physics):
        height = physics.named.data.sensordata["center_of_mass"][2]
        jump = rewards.tolerance(
            height,
            bounds=(QUADRUPED_JUMP_HEIGHT, float("inf")),
            margin=QUADRUPED_JUMP_HEIGHT,
            value_at_margin=0.5,
            sigmoid="linear",
        )
        return _quadruped_upright(physics) * jump


class JacoReach(composer.Task):
    """ExORL's jaco reach: bring the hand's tool centre point to a fixed point on the table.

    The target is a fixed world position per task (no prop, not observed), so the physics state does not depend
    on the task and one dataset can be relabelled for all four."""

    def __init__(self, target, random=None):
        del random  # composer draws from the environment's random_state
        obs_settings = observations.PERFECT_FEATURES
        self._arena = arenas.Standard()
        self._arm = robots.make_arm(obs_settings=obs_settings)
        self._hand = robots.make_hand(obs_settings=obs_settings)
        self._arm.attach(self._hand)
        self._arena.attach_offset(self._arm, offset=robots.ARM_OFFSET)
        self.control_timestep = constants.CONTROL_TIMESTEP
        self._tcp_initializer = initializers.ToolCenterPointInitializer(
            self._hand,
            self._arm,
            position=distributions.Uniform(*JACO_TCP_BOX),
            quaternion=workspaces.DOWN_QUATERNION,
        )
        self._task_observables = cameras.add_camera_observables(self._arena, obs_settings, cameras.FRONT_CLOSE)
        self._target = np.asarray(target, np.float64)
        site = workspaces.add_target_site(
            body=self._arena.mjcf_model.worldbody,
            radius=JACO_TARGET_RADIUS,
            visible=True,
            rgba=constants.RED,
            name="target_site",
        )
        site.pos = self._target

    @property
    def root_entity(self):
        return self._arena

    @property
    def task_observables(self):
        return self._task_observables

    def initialize_episode(self, physics, random_state):
        self._hand.set_grasp(physics, close_factors=random_state.uniform())
        self._tcp_initializer(physics, random_state)

    def get_reward(self, physics):
        hand = physics.bind(self._hand.tool_center_point).xpos
        distance = np.linalg.norm(hand - self._target)
        return rewards.tolerance(distance, bounds=(0, JACO_TARGET_RADIUS), margin=JACO_TARGET_RADIUS)


# ----------------------------------------------------------------------------------------------- builders
def _cheetah_xml() -> tuple[bytes, dict]:
    xml, assets = cheetah.get_model_and_assets()
    root = ET.fromstring(xml)
    ground = root.find(".//geom[@name='ground']")
    size = ground.get("size").split()
    ground.set("size", " ".join([f"{CHEETAH_GROUND_LENGTH:g}"] + size[1:]))
    return ET.tostring(root), assets


def _build_dm_env(domain: str, task: str, random):
    """The dm_control environment of one task (control.Environment, or composer.Environment for jaco)."""
    if domain == "walker":
        physics = walker.Physics.from_xml_string(*walker.get_model_and_assets())
        if task == "flip":
            dm_task = WalkerFlip(random=random)
        else:
            dm_task = walker.PlanarWalker(WALKER_SPEED[task], random=random)
        return control.Environment(
            physics, dm_task, time_limit=WALKER_TIME_LIMIT, control_timestep=WALKER_CONTROL_TIMESTEP,
            flat_observation=True,
        )
    if domain == "cheetah":
        physics = cheetah.Physics.from_xml_string(*_cheetah_xml())
        speed, direction = CHEETAH_MOVE[task]
        dm_task = cheetah.Cheetah(random=random) if task == "run" else CheetahMove(speed, direction, random=random)
        return control.Environment(physics, dm_task, time_limit=CHEETAH_TIME_LIMIT, flat_observation=True)
    if domain == "quadruped":
        xml = quadruped.make_model(floor_size=QUADRUPED_FLOOR_SIZE)
        physics = quadruped.Physics.from_xml_string(xml, common.ASSETS)
        if task in QUADRUPED_SPEED:
            dm_task = quadruped.Move(desired_speed=QUADRUPED_SPEED[task], random=random)
        else:
            dm_task = {"stand": QuadrupedStand, "jump": QuadrupedJump}[task](random=random)
        return control.Environment(
            physics, dm_task, time_limit=QUADRUPED_TIME_LIMIT, control_timestep=QUADRUPED_CONTROL_TIMESTEP,
            flat_observation=True,
        )
    if domain == "jaco":
        # The task never changes its MJCF, so compile once instead of every episode (composer's default).
        return composer.Environment(
            JacoReach(JACO_TARGETS[task]), time_limit=JACO_TIME_LIMIT, random_state=random,
            recompile_mjcf_every_episode=False,
        )
    raise FluxrlError(f"Unknown DMC domain '{domain}'; known domains: {', '.join(DMC_TASKS)}.")


def as_dmc_task(task_spec) -> TaskSpec:
    """A DMC TaskSpec from a name ('walker-walk') or a TaskSpec; FluxrlError for anything else."""
    spec = parse_task(task_spec) if isinstance(task_spec, str) else task_spec
    if not isinstance(spec, TaskSpec) or spec.family != "dmc":
        raise FluxrlError(f"'{getattr(spec, 'name', spec)}' is not a DMC task; DMC tasks look like walker-walk.")
    return spec


class DMCEnv(gymnasium.Env):
    """A DMC task as a gymnasium env (see the module docstring for its conventions)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, task_spec, seed: int | None = None, render_size: int | tuple[int, int] | None = None):
        self.task_spec = as_dmc_task(task_spec)
        self.task_name = self.task_spec.name
        self.domain = self.task_spec.dataset.env
        self.dm_env = _build_dm_env(self.domain, self.task_spec.task, seed)
        self._episode_over = True  # dm_control would silently start a new episode if stepped now
        self.max_episode_steps = EPISODE_STEPS[self.domain]
        spec = self.dm_env.action_spec()
        self._ctrl_low = np.asarray(spec.minimum, np.float64)
        self._ctrl_high = np.asarray(spec.maximum, np.float64)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, shape=spec.shape, dtype=np.float32)
        self.observation_space = gymnasium.spaces.Box(
            -np.inf, np.inf, shape=(OBSERVATION_DIM[self.domain],), dtype=np.float32
        )
        if render_size is None:
            self.render_mode, self._render_hw = None, None
        else:
            h, w = (render_size, render_size) if np.isscalar(render_size) else render_size
            self.render_mode, self._render_hw = "rgb_array", (int(h), int(w))
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.dm_env.control_timestep())}

    @property
    def physics(self):
        # Looked up each time: composer hands out a weak proxy to a physics it may rebuild.
        return self.dm_env.physics

    def _observation(self, time_step) -> np.ndarray:
        obs = time_step.observation
        flat = obs["observations"] if "observations" in obs else np.concatenate([np.ravel(v) for v in obs.values()])
        return np.asarray(flat, np.float32)

    def ctrl_from_action(self, action) -> np.ndarray:
        """Map an action in [-1, 1] (clipped) onto the actuators' control ranges."""
        a = np.clip(np.asarray(action, np.float32), -1.0, 1.0).astype(np.float64)
        return self._ctrl_low + (a + 1.0) * 0.5 * (self._ctrl_high - self._ctrl_low)

    def reset(self, *, seed: int | None = None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            rng = self.dm_env.random_state if self.domain == "jaco" else self.dm_env.task.random
            rng.seed(seed)
        self._episode_over = False
        return self._observation(self.dm_env.reset()), {}

    def step(self, action):
        action = np.asarray(action)
        if action.shape != self.action_space.shape:
            raise FluxrlError(
                f"{self.task_spec.name}: action has shape {action.shape}, expected {self.action_space.shape}."
            )
        if self._episode_over:
            raise FluxrlError(f"{self.task_spec.name}: call reset() before step() (the episode is over or not begun).")
        time_step = self.dm_env.step(self.ctrl_from_action(action))
        self._episode_over = time_step.last()
        return self._observation(time_step), float(time_step.reward), False, bool(time_step.last()), {}

    def render(self):
        if self._render_hw is None:
            raise FluxrlError(f"{self.task_spec.name}: create the env with render_size=... to render frames.")
        h, w = self._render_hw
        return self.physics.render(height=h, width=w, camera_id=RENDER_CAMERA[self.domain])

    def close(self):
        self.physics.free()


def make_dmc_env(task_spec, seed: int | None = None, render_size: int | tuple[int, int] | None = None) -> DMCEnv:
    """Create a DMC task ('walker-walk', 'jaco-reach_top_left', or a TaskSpec) as a gymnasium env.

    seed seeds the task's initial-state distribution (reset(seed=...) reseeds it); render_size (int or (h, w))
    enables render() -> uint8 (h, w, 3) frames from the domain's URLB camera."""
    return DMCEnv(task_spec, seed=seed, render_size=render_size)


# ----------------------------------------------------------------------------------------------- physics states
def physics_state(env) -> np.ndarray:
    """The full MuJoCo state of a DMC env (qpos, qvel, act), float64: what datasets store per row as 'physics'."""
    return np.array(env.unwrapped.physics.get_state(), np.float64)


class TaskReward:
    """Recomputes one task's reward from stored physics states (as ExORL relabels its datasets).

    reward(state) restores the state, runs MuJoCo's forward pass (which recomputes every position- and
    velocity-dependent quantity, as dm_control does after each step) and evaluates the task's own reward function;
    step_reward(state, action) instead simulates one agent step from `state` and returns the reward of the state
    it reaches. (ExORL restores states inside physics.reset_context(); a plain forward pass gives the same rewards
    bit for bit and is 2x-20x faster, composer's jaco being the slow case.)"""

    def __init__(self, task_spec):
        self.env = DMCEnv(task_spec, seed=0)
        self.env.reset()
        self.domain = self.env.domain
        self._task = self.env.dm_env.task
        self._n_sub_steps = int(round(self.env.dm_env.control_timestep() / self.env.physics.model.opt.timestep))

    def restore(self, state):
        """Put the env's physics in a stored state, all derived quantities recomputed; returns the physics."""
        physics = self.env.physics
        physics.set_state(np.asarray(state, np.float64))
        physics.forward()
        return physics

    def reward(self, state) -> float:
        return float(self._task.get_reward(self.restore(state)))

    def step_reward(self, state, action) -> float:
        # Clear what the last call left behind (the solver's warm start), so the result depends only on the
        # arguments; then forward fully, as the live env is before a step.
        self.env.physics.reset()
        physics = self.restore(state)
        physics.set_control(self.env.ctrl_from_action(action))
        for _ in range(self._n_sub_steps):
            physics.step()
        return float(self._task.get_reward(physics))

    def __call__(self, states) -> np.ndarray:
        """Rewards at each row of `states` (N, state_dim), float64."""
        return np.array([self.reward(s) for s in np.asarray(states)], np.float64)

    def close(self):
        self.env.close()


def task_rewards(task_spec, states) -> np.ndarray:
    """Reward of task `task_spec` at each stored physics state (rows of `states`), float64."""
    fn = TaskReward(task_spec)
    try:
        return fn(states)
    finally:
        fn.close()
