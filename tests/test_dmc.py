"""DMC (ExORL task set): envs, exploration data, reward relabelling from stored physics states."""

import numpy as np
import pytest

from fluxrl.data import generate_dmc
from fluxrl.data.dataset import raw_to_compact, raw_to_regular, validate
from fluxrl.data.generate import collect, default_episodes
from fluxrl.data.relabel_dmc import relabel_dmc
from fluxrl.envs.dmc import (
    ACTION_DIM,
    EPISODE_STEPS,
    OBSERVATION_DIM,
    PHYSICS_STATE_DIM,
    TaskReward,
    make_dmc_env,
    physics_state,
)
from fluxrl.errors import FluxrlError
from fluxrl.names import DMC_TASKS, parse_dataset

DOMAINS = tuple(DMC_TASKS)
ALL_TASKS = [f"{d}-{t}" for d in DMC_TASKS for t in DMC_TASKS[d]]


def rollout(task, steps, seed=0):
    """Live rollout with exploration actions, in OGBench's raw layout, plus the env's own rewards."""
    env = make_dmc_env(task, seed=seed)
    obs, _ = env.reset()
    actions = generate_dmc.exploration_actions(np.random.default_rng(seed), steps, env.action_space.shape[0])
    observations, physics, rewards = [obs], [physics_state(env)], []
    for a in actions:
        obs, r, terminated, truncated, info = env.step(a)
        assert not terminated and "success" not in info
        observations.append(obs)
        physics.append(physics_state(env))
        rewards.append(r)
    terminals = np.zeros(steps + 1, np.float32)
    terminals[-1] = 1
    raw = {
        "observations": np.array(observations),
        "actions": np.concatenate([actions, np.zeros((1, actions.shape[1]), np.float32)]),
        "terminals": terminals,
        "physics": np.array(physics),
    }
    env.close()
    return raw, np.array(rewards)


# ---------------------------------------------------------------------------------------------- envs
@pytest.mark.parametrize("domain", DOMAINS)
def test_env_spaces_and_steps(domain):
    env = make_dmc_env(f"{domain}-{DMC_TASKS[domain][0]}", seed=0)
    assert env.observation_space.shape == (OBSERVATION_DIM[domain],)
    assert env.action_space.shape == (ACTION_DIM[domain],) and env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    with pytest.raises(FluxrlError, match="reset"):
        env.step(env.action_space.low)
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape and "success" not in info
    for a in (env.action_space.low, env.action_space.high, np.full(ACTION_DIM[domain], 7.0)):  # 7: clipped
        obs, r, terminated, truncated, info = env.step(a)
        assert np.all(np.isfinite(obs)) and np.isfinite(r) and 0.0 <= r <= 1.0
        assert terminated is False and truncated is False and "success" not in info
    assert physics_state(env).shape == (PHYSICS_STATE_DIM[domain],)
    assert env.max_episode_steps == EPISODE_STEPS[domain]
    with pytest.raises(FluxrlError, match="shape"):
        env.step(np.zeros(ACTION_DIM[domain] + 1))
    env.close()


def test_actions_map_onto_the_control_ranges():
    env = make_dmc_env("quadruped-walk", seed=0)  # ctrl ranges differ per actuator: [-1, 1], [-1, 1.1], [-.8, .8]
    low, high = env.physics.model.actuator_ctrlrange.T
    np.testing.assert_allclose(env.ctrl_from_action(-np.ones(12)), low)
    np.testing.assert_allclose(env.ctrl_from_action(np.ones(12)), high)
    np.testing.assert_allclose(env.ctrl_from_action(np.zeros(12)), (low + high) / 2)


def test_reset_seed_makes_initial_states_reproducible():
    for task in ("walker-run", "jaco-reach_bottom_left"):
        env = make_dmc_env(task)
        first, _ = env.reset(seed=5)
        env.step(env.action_space.high)
        other, _ = env.reset(seed=6)
        again, _ = env.reset(seed=5)
        assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_unknown_and_non_dmc_tasks_are_refused():
    with pytest.raises(FluxrlError):
        make_dmc_env("walker-fly")
    with pytest.raises(FluxrlError, match="not a DMC task"):
        make_dmc_env("cube-single-play-singletask-task1")


@pytest.mark.parametrize(
    "domain,task", [("walker", "walk"), ("walker", "run"), ("walker", "stand"), ("cheetah", "run"),
                    ("quadruped", "walk"), ("quadruped", "run")]
)
def test_suite_tasks_match_dm_control_suite(domain, task):
    # Same seed and actions: our shared-model env reproduces dm_control's own suite task step for step.
    from dm_control import suite  # after fluxrl.envs, which picks the GL backend dm_control reads on import

    ours = make_dmc_env(f"{domain}-{task}", seed=4)
    ref = suite.load(domain, task, task_kwargs={"random": 4}, environment_kwargs={"flat_observation": True})
    obs, _ = ours.reset()
    ts = ref.reset()
    np.testing.assert_array_equal(obs, ts.observation["observations"].astype(np.float32))
    rng = np.random.default_rng(0)
    for _ in range(30):
        a = rng.uniform(-1, 1, ACTION_DIM[domain]).astype(np.float32)
        obs, r, _, _, _ = ours.step(a)
        ts = ref.step(ours.ctrl_from_action(a))
        np.testing.assert_array_equal(obs, ts.observation["observations"].astype(np.float32))
        assert r == ts.reward


# ---------------------------------------------------------------------------------------------- rewards
def _tolerance_linear_ramp(x, target):
    """dm_control's tolerance(x, bounds=(target, inf), margin=target, value_at_margin=0, sigmoid='linear')."""
    return np.clip(x / target, 0.0, 1.0)


def test_custom_reward_formulas():
    # Analytic forms of the URLB/ExORL rewards, from physics quantities read independently of the task code.
    raw, _ = rollout("cheetah-walk", 150, seed=1)
    fn = TaskReward("cheetah-walk")
    speed = []
    for s in raw["physics"]:
        fn.restore(s)
        speed.append(fn.env.physics.named.data.sensordata["torso_subtreelinvel"][0])
    speed = np.array(speed)
    assert speed.max() > 0.2 and speed.min() < -0.2  # the check below sees both directions
    for task, target, direction in [("walk", 2, 1), ("walk_backward", 2, -1), ("run", 10, 1), ("run_backward", 10, -1)]:
        expected = _tolerance_linear_ramp(direction * speed, target)
        np.testing.assert_allclose(TaskReward(f"cheetah-{task}")(raw["physics"]), expected, atol=1e-12)

    raw, _ = rollout("walker-flip", 150, seed=2)
    fn = TaskReward("walker-flip")
    spin = []
    for s in raw["physics"]:
        fn.restore(s)
        spin.append(fn.env.physics.named.data.subtree_angmom["torso"][1])
    stand = TaskReward("walker-stand")(raw["physics"])  # the suite's stand reward is the stand term itself
    expected = stand * (5 * _tolerance_linear_ramp(np.array(spin), 5) + 1) / 6
    np.testing.assert_allclose(fn(raw["physics"]), expected, atol=1e-12)

    raw, _ = rollout("quadruped-jump", 150, seed=3)
    fn = TaskReward("quadruped-jump")
    upright, height = [], []
    for s in raw["physics"]:
        fn.restore(s)
        upright.append(fn.env.physics.named.data.xmat["torso", "zz"])
        height.append(fn.env.physics.named.data.subtree_com["torso", "z"])
    upright, height = np.array(upright), np.array(height)
    np.testing.assert_allclose(TaskReward("quadruped-stand")(raw["physics"]), (1 + upright) / 2, atol=1e-12)
    np.testing.assert_allclose(fn(raw["physics"]), (1 + upright) / 2 * np.minimum(1, (1 + height) / 2), atol=1e-12)

    raw, _ = rollout("jaco-reach_top_right", 100, seed=4)
    fn = TaskReward("jaco-reach_top_right")
    tcp = []
    for s in raw["physics"]:
        fn.restore(s)
        tcp.append(fn.env.physics.bind(fn.env.dm_env.task._hand.tool_center_point).xpos.copy())
    distance = np.linalg.norm(np.array(tcp) - [0.09, 0.09, 0.001], axis=1)
    # gaussian tolerance, value 0.1 at one margin (0.05 m) beyond the 0.05 m target radius
    expected = np.where(distance <= 0.05, 1.0, 0.1 ** (((distance - 0.05) / 0.05) ** 2))
    np.testing.assert_allclose(fn(raw["physics"]), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_relabelled_rewards_equal_live_rewards(task):
    raw, live = rollout(task, 60)
    compact = relabel_dmc(raw_to_compact(raw), task)
    valid = compact["valids"] > 0
    # compact form: every next state is stored, so the rewards are the env's to the last bit
    np.testing.assert_array_equal(compact["rewards"][valid], live.astype(np.float32))
    assert np.all(compact["rewards"][~valid] == 0) and np.all(compact["masks"] == 1)
    regular = relabel_dmc(raw_to_regular(raw), task)
    assert regular["rewards"].dtype == np.float32 and np.all(regular["masks"] == 1)
    # regular form: the episode's final state is simulated again from (s, a), equal to float tolerance
    np.testing.assert_array_equal(regular["rewards"][:-1], live[:-1].astype(np.float32))
    np.testing.assert_allclose(regular["rewards"][-1], live[-1], atol=1e-5)
    validate(regular, task)


def test_relabel_regular_with_next_physics_and_several_episodes():
    raw_a, live_a = rollout("walker-run", 40, seed=1)
    raw_b, live_b = rollout("walker-run", 30, seed=2)
    raw = {k: np.concatenate([raw_a[k], raw_b[k]]) for k in raw_a}
    regular = raw_to_regular(raw)
    regular["next_physics"] = np.concatenate([raw_a["physics"][1:], raw_b["physics"][1:]])
    out = relabel_dmc(regular, "walker-run")
    np.testing.assert_array_equal(out["rewards"], np.concatenate([live_a, live_b]).astype(np.float32))
    del regular["next_physics"]
    out = relabel_dmc(regular, "walker-run")
    np.testing.assert_allclose(out["rewards"], np.concatenate([live_a, live_b]), atol=1e-6)
    assert "rewards" not in regular  # the input is not modified


def test_simulated_step_reward_depends_only_on_its_arguments():
    raw, live = rollout("jaco-reach_bottom_right", 30, seed=5)
    fn = TaskReward("jaco-reach_bottom_right")
    first = fn.step_reward(raw["physics"][20], raw["actions"][20])
    fn.step_reward(raw["physics"][3], raw["actions"][3])
    assert fn.step_reward(raw["physics"][20], raw["actions"][20]) == first
    assert abs(first - live[20]) < 1e-5


def test_relabel_bad_inputs():
    raw, _ = rollout("walker-walk", 10)
    regular = raw_to_regular(raw)
    with pytest.raises(FluxrlError, match="'physics'"):
        relabel_dmc({k: v for k, v in regular.items() if k != "physics"}, "walker-walk")
    with pytest.raises(FluxrlError, match="18 numbers per row"):
        relabel_dmc({**regular, "physics": regular["physics"][:, :17]}, "walker-stand")
    with pytest.raises(FluxrlError, match="quadruped physics state has 57"):
        relabel_dmc(regular, "quadruped-jump")
    with pytest.raises(FluxrlError, match="cheetah dataset"):  # same physics width, different observations
        relabel_dmc(regular, "cheetah-run")
    with pytest.raises(FluxrlError, match="not a DMC task"):
        relabel_dmc(regular, "cube-single-play-singletask-task1")
    shuffled = {k: v[::-1].copy() for k, v in regular.items() if k != "next_physics"}
    shuffled["terminals"] = np.zeros_like(shuffled["terminals"])
    with pytest.raises(FluxrlError, match="not consecutive"):
        relabel_dmc(shuffled, "walker-walk")
    compact = raw_to_compact(raw)
    with pytest.raises(FluxrlError, match="truncated"):
        relabel_dmc({k: v[:-1] for k, v in compact.items()}, "walker-walk")


# ---------------------------------------------------------------------------------------------- generation
def test_exploration_actions():
    rng = np.random.default_rng(0)
    a = generate_dmc.exploration_actions(rng, 1000, 6)
    assert a.shape == (1000, 6) and a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    b = generate_dmc.exploration_actions(np.random.default_rng(0), 1000, 6)
    assert np.array_equal(a, b)
    # temporally correlated on average (i.i.d. noise would give ~0), yet spanning the whole box
    lag1 = [np.mean([np.corrcoef(x[:-1, j], x[1:, j])[0, 1] for j in range(6)])
            for x in (generate_dmc.exploration_actions(np.random.default_rng(s), 1000, 6) for s in range(10))]
    assert np.mean(lag1) > 0.3
    assert a.min() < -0.95 and a.max() > 0.95


@pytest.mark.parametrize("domain", DOMAINS)
def test_collect_episode_layout_and_determinism(domain):
    spec = parse_dataset(f"{domain}-explore")
    ep = generate_dmc.collect_episode(spec, 11)
    T = EPISODE_STEPS[domain]
    with pytest.raises(FluxrlError, match="reset"):  # the episode ran to its time limit
        generate_dmc._ENVS[domain].step(np.zeros(ACTION_DIM[domain]))
    assert ep["observations"].shape == (T + 1, OBSERVATION_DIM[domain]) and ep["observations"].dtype == np.float32
    assert ep["actions"].shape == (T + 1, ACTION_DIM[domain]) and ep["actions"].dtype == np.float32
    assert ep["physics"].shape == (T + 1, PHYSICS_STATE_DIM[domain]) and ep["physics"].dtype == np.float64
    assert np.all(np.abs(ep["actions"]) <= 1) and np.all(ep["actions"][-1] == 0)
    assert ep["terminals"][-1] == 1 and ep["terminals"][:-1].sum() == 0
    other = generate_dmc.collect_episode(spec, 12)
    generate_dmc._ENVS.clear()  # a freshly built env gives the same episode as the reused one
    again = generate_dmc.collect_episode(spec, 11)
    for k in ep:
        assert np.array_equal(ep[k], again[k]), k
    assert not np.array_equal(ep["physics"], other["physics"])


def test_stored_observations_are_those_of_the_stored_physics():
    ep = generate_dmc.collect_episode(parse_dataset("walker-explore"), 3)
    fn = TaskReward("walker-walk")
    for t in (0, 1, 500, 1000):
        physics = fn.restore(ep["physics"][t])
        obs = fn.env.dm_env.task.get_observation(physics)
        expected = np.concatenate([np.ravel(v) for v in obs.values()]).astype(np.float32)
        np.testing.assert_array_equal(ep["observations"][t], expected)


def test_generation_pool_builds_a_valid_dataset():
    spec = parse_dataset("jaco-explore")
    assert default_episodes(spec) * EPISODE_STEPS["jaco"] == 1_000_000  # as many transitions as other domains
    assert default_episodes(parse_dataset("walker-explore")) == generate_dmc.DEFAULT_EPISODES["dmc"]
    assert default_episodes(parse_dataset("jaco-explore-val")) == generate_dmc.DEFAULT_VAL_EPISODES["jaco"]
    raw = collect(spec, 2, seed=0, workers=1, progress=False)
    assert len(raw["observations"]) == 2 * (EPISODE_STEPS["jaco"] + 1)
    regular = relabel_dmc(raw_to_regular(raw), "jaco-reach_bottom_right")
    validate(regular, "jaco-explore")
    assert regular["terminals"].sum() == 2


def test_generation_does_not_depend_on_the_worker_count():
    spec = parse_dataset("cheetah-explore")
    one = collect(spec, 3, seed=1, workers=1, progress=False)
    two = collect(spec, 3, seed=1, workers=2, progress=False)
    for k in one:
        assert np.array_equal(one[k], two[k]), k


# ---------------------------------------------------------------------------------------------- rendering
def test_mujoco_gl_is_osmesa_only_where_the_library_exists():
    # With MUJOCO_GL=osmesa and no libOSMesa, `import mujoco` fails: simulation must not depend on it.
    from fluxrl.envs import default_mujoco_gl

    cases = [  # (libOSMesa found, system, environment before, MUJOCO_GL after)
        (True, "Linux", {}, "osmesa"),
        (False, "Linux", {}, "disable"),
        (False, "Linux", {"DISPLAY": ":0"}, None),
        (False, "Darwin", {}, None),
        (True, "Linux", {"MUJOCO_GL": "egl"}, "egl"),
        (False, "Linux", {"MUJOCO_GL": "egl"}, "egl"),
    ]
    for found, system, environ, expected in cases:
        default_mujoco_gl(environ, lambda name, found=found: "libOSMesa.so.8" if found and name == "OSMesa" else None,
                          system)
        assert environ.get("MUJOCO_GL") == expected, (found, system, environ)


@pytest.mark.mujoco_render
@pytest.mark.parametrize("task", ["walker-flip", "jaco-reach_top_left"])
def test_offscreen_render(task):
    env = make_dmc_env(task, seed=0, render_size=(24, 32))
    env.reset()
    frame = env.render()
    assert frame.shape == (24, 32, 3) and frame.dtype == np.uint8 and frame.std() > 1
    env.close()
    with pytest.raises(FluxrlError, match="render_size"):
        make_dmc_env(task).render()


def test_exploration_segments_label_each_step_with_its_process():
    actions, modes = generate_dmc.exploration_segments(np.random.default_rng(3), 1000, 6)
    np.testing.assert_array_equal(actions, generate_dmc.exploration_actions(np.random.default_rng(3), 1000, 6))
    assert modes.shape == (1000,) and set(np.unique(modes)) <= set(range(len(generate_dmc.MODES)))
    changes = np.flatnonzero(np.diff(modes)) + 1
    runs = np.diff(np.concatenate([[0], changes, [1000]]))
    assert runs[:-1].min() >= generate_dmc.SEGMENT_STEPS[0]  # piecewise constant over segments
    # "hold" segments repeat actions, the others almost never do.
    repeats = np.all(actions[1:] == actions[:-1], axis=1)
    hold = generate_dmc.MODES.index("hold")
    if np.any(modes[1:] == hold):
        assert repeats[modes[1:] == hold].mean() > 0.8
    assert repeats[modes[1:] != hold].mean() < 0.05


def test_intention_plot_names_the_exploration_modes_in_order():
    from fluxrl.train.intentions import EXPLORATION_MODES

    assert EXPLORATION_MODES == generate_dmc.MODES
