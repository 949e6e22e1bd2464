"""OGBench generation and relabelling: layout, alignment of stored states, behaviour goals, reproducibility
(also across worker processes), round trips through OGBench's own loader, rewards against the env's step()."""

import gymnasium
import numpy as np
import ogbench
import pytest

from fluxrl.data import dataset as D
from fluxrl.data import generate as G
from fluxrl.data import generate_ogbench as GO
from fluxrl.data.relabel import relabel
from fluxrl.envs.ogbench_envs import BFSSubgoals
from fluxrl.errors import FluxrlError
from fluxrl.names import MANIPULATION_ENVS, MANIPULATION_MODES, parse_dataset

SHORT = 40  # state rows per test episode (the default is the paper's 1001)
XYZ_CENTER = np.array([0.425, 0.0, 0.0])  # OGBench's observation normalisation of positions: (xyz - c) * 10


def short_job(args):
    """generate.collect's job with short episodes; module-level so spawned workers can unpickle it."""
    _, spec, seed = args
    return GO.collect_episode(spec, seed, steps=SHORT)


def cube_xyz(qpos, i=0):
    return qpos[:, 14 + 7 * i : 17 + 7 * i]


def test_defaults_are_the_papers():
    assert GO.EPISODE_STEPS == 1001
    assert GO.DEFAULT_EPISODES == {"manipulation": 1000, "pointmaze": 1000}
    assert GO.DEFAULT_VAL_EPISODES == {"manipulation": 100, "pointmaze": 100}


@pytest.mark.parametrize(
    "name", [f"{e}-{m}" for e in MANIPULATION_ENVS for m in MANIPULATION_MODES] + ["pointmaze-large-navigate"]
)
def test_episode_layout(name):
    spec = parse_dataset(name)
    ep = GO.collect_episode(spec, seed=11, steps=SHORT)
    n = SHORT
    assert ep["observations"].dtype == np.float32 and ep["observations"].shape[0] == n
    assert ep["actions"].dtype == np.float32 and ep["actions"].shape[0] == n
    assert np.all(np.abs(ep["actions"]) <= 1.0)
    assert ep["terminals"].tolist() == [0.0] * (n - 1) + [1.0]
    assert ep["qpos"].dtype == np.float32 and ep["qvel"].dtype == np.float32
    assert ep["behavior_goals"].shape == (n, GO.BEHAVIOR_GOAL_SIZE[spec.env])
    assert ep["behavior_goals"].dtype == np.float32 and ep["behavior_goal_ids"].dtype == np.int32
    has_buttons = spec.env.startswith(("scene", "puzzle"))
    assert ("button_states" in ep) == has_buttons
    D.validate(D.raw_to_regular(ep), name)
    if spec.family == "manipulation":
        # Each row's qpos is the state of that row's observation (OGBench stores info['prev_qpos']).
        if spec.env.startswith(("cube", "scene")):
            expected = (cube_xyz(ep["qpos"]) - XYZ_CENTER) * 10
            np.testing.assert_allclose(ep["observations"][:, 19:22], expected, atol=1e-4)
        if has_buttons:
            assert set(np.unique(ep["button_states"])) <= {0, 1}
    else:
        np.testing.assert_allclose(ep["observations"], ep["qpos"], atol=1e-6)  # point maze: observation = qpos


def test_same_seed_same_episode_and_no_state_leaks_between_episodes():
    spec = parse_dataset("cube-double-noisy")
    first = GO.collect_episode(spec, seed=1, steps=SHORT)
    second = GO.collect_episode(spec, seed=2, steps=SHORT)
    GO._COLLECTORS.clear()  # a fresh env and oracles, as in another worker process
    again = GO.collect_episode(spec, seed=2, steps=SHORT)
    for k in second:
        np.testing.assert_array_equal(second[k], again[k], err_msg=k)
    assert not np.array_equal(first["observations"], second["observations"])


def test_global_numpy_rng_is_left_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    GO.collect_episode(parse_dataset("pointmaze-medium-navigate"), seed=5, steps=SHORT)
    assert np.random.rand() == expected


@pytest.mark.parametrize("name", ["cube-single-play", "pointmaze-medium-navigate"])
def test_two_workers_give_identical_arrays(name):
    spec = parse_dataset(name)
    one = G.collect(spec, episodes=3, seed=4, workers=1, progress=False, collect_fn=short_job)
    two = G.collect(spec, episodes=3, seed=4, workers=2, progress=False, collect_fn=short_job)
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)
    assert len(one["observations"]) == 3 * SHORT


def test_cube_play_goals_are_the_targets_the_oracle_reaches():
    ep = GO.collect_episode(parse_dataset("cube-single-play"), seed=3, steps=400)
    ids, goals, cube = ep["behavior_goal_ids"], ep["behavior_goals"], cube_xyz(ep["qpos"])
    assert ids[0] == 0 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
    assert ids[-1] >= 3  # several targets in 400 steps (a pick-and-place plan takes ~90 steps)
    for g in range(ids[-1]):  # every finished segment
        rows = np.flatnonzero(ids == g)
        assert np.all(goals[rows] == goals[rows[0]])  # one target per segment
        np.testing.assert_array_equal(goals[rows[0], :1], [1.0])  # one-hot of the single cube
        # The play oracle put the cube on the recorded target by the end of the segment.
        assert np.linalg.norm(cube[rows[-1] + 1] - goals[rows[0], 1:]) <= 0.04


def test_pointmaze_goals_are_cells_and_change_on_arrival():
    spec = parse_dataset("pointmaze-medium-navigate")
    ep = GO.collect_episode(spec, seed=0, steps=1001)
    env = GO._COLLECTORS[(spec.env, spec.mode)].env
    n_cols = env.maze_map.shape[1]
    goals, ids, xy = ep["behavior_goals"], ep["behavior_goal_ids"], ep["qpos"]
    for goal, gid in zip(goals, ids):
        assert env.xy_to_ij(goal) == divmod(int(gid), n_cols)
    changes = np.flatnonzero(np.any(goals[1:] != goals[:-1], axis=1))
    assert len(changes) >= 2  # several intentions in one episode
    for t in changes:  # a new goal is drawn once the agent is within the success radius of the old one
        assert np.linalg.norm(xy[t + 1] - goals[t]) <= 1.0 + 1e-5


def test_cached_bfs_matches_ogbench_oracle_subgoal():
    env = gymnasium.make("pointmaze-large-v0").unwrapped
    bfs = BFSSubgoals(env)
    rng = np.random.default_rng(0)
    free = np.argwhere(env.maze_map == 0)
    for _ in range(200):
        a, b = free[rng.integers(len(free), size=2)]
        start = np.array(env.ij_to_xy(a)) + rng.uniform(-1.9, 1.9, 2)
        goal = np.array(env.ij_to_xy(b)) + rng.uniform(-1.0, 1.0, 2)
        np.testing.assert_array_equal(bfs.subgoal(start, goal), env.get_oracle_subgoal(start, goal)[0])


def test_scene_health_check():
    qpos = np.zeros((3, 25))
    qpos[:, 14:17] = [0.4, 0.0, 0.02]
    assert GO._scene_healthy(qpos)
    qpos[1, 15] = 0.3  # too far right
    assert not GO._scene_healthy(qpos)
    qpos[1, 14:17] = [0.33, -0.35, 0.066]  # far left but inside the drawer
    assert GO._scene_healthy(qpos)
    qpos[1, 16] = 0.02  # far left on the table
    assert not GO._scene_healthy(qpos)


def test_generated_files_load_through_ogbench_and_relabel_like_ogbench(tmp_path):
    path = str(tmp_path / "pointmaze-medium-navigate.npz")
    G.generate("pointmaze-medium-navigate", path, episodes=1, val_episodes=1, seed=0, progress=False)
    raw = dict(np.load(path, allow_pickle=False))
    assert len(raw["observations"]) == GO.EPISODE_STEPS
    ours = D.raw_to_regular(raw)
    theirs = ogbench.utils.load_dataset(path, add_info=True)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    compact = ogbench.utils.load_dataset(path, add_info=True, compact_dataset=True)
    ours_compact = D.raw_to_compact(raw)
    for k in compact:
        np.testing.assert_array_equal(ours_compact[k], compact[k], err_msg=k)
    # Rewards: ours equal OGBench's own single-task loader on the same file.
    for task in (1, 2):
        _, train, _ = ogbench.make_env_and_datasets(
            f"pointmaze-medium-navigate-singletask-task{task}-v0", dataset_path=path
        )
        mine = relabel(ours, f"pointmaze-medium-navigate-singletask-task{task}")
        np.testing.assert_array_equal(mine["rewards"], train["rewards"])
        np.testing.assert_array_equal(mine["masks"], train["masks"])


def test_manipulation_file_with_button_states_loads_through_ogbench(tmp_path):
    raw = G.collect(parse_dataset("puzzle-3x3-noisy"), episodes=2, seed=0, progress=False, collect_fn=short_job)
    path = str(tmp_path / "puzzle.npz")
    D.save_npz(path, raw)
    theirs = ogbench.utils.load_dataset(path, add_info=True)
    ours = D.raw_to_regular(dict(np.load(path, allow_pickle=False)))
    assert set(theirs) <= set(ours) and "button_states" in theirs
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert len(ours["observations"]) == 2 * (SHORT - 1)


def _env_step_rewards(task_id: int, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    """The single-task env's own step() reward for each state (ogbench>=1.2: computed before the action)."""
    env = gymnasium.make(f"cube-single-singletask-task{task_id}-v0")
    env.reset(seed=0)
    rewards = []
    for q, v in zip(qpos, qvel):
        env.unwrapped.set_state(q.astype(np.float64), v.astype(np.float64))
        rewards.append(env.step(np.zeros(5))[1])
    return np.array(rewards, np.float32)


@pytest.mark.parametrize("task_id", [2, 4])
def test_relabel_cube_single_matches_env_step_reward(task_id):
    ep = GO.collect_episode(parse_dataset("cube-single-play"), seed=8, steps=SHORT)
    data = D.raw_to_regular(ep)
    # Put the cube exactly on the task's goal in some rows and just outside the 4 cm radius in others.
    goal = gymnasium.make(f"cube-single-singletask-task{task_id}-v0").unwrapped.task_infos[task_id - 1]["goal_xyzs"][0]
    data["qpos"] = data["qpos"].copy()
    data["qpos"][5:10, 14:17] = goal
    data["qpos"][10:15, 14:17] = goal + [0.0, 0.05, 0.0]
    out = relabel(data, f"cube-single-play-singletask-task{task_id}")
    assert set(np.unique(out["rewards"])) == {-1.0, 0.0}
    np.testing.assert_array_equal(out["rewards"][5:10], 0.0)
    np.testing.assert_array_equal(out["rewards"][10:15], -1.0)
    np.testing.assert_array_equal(out["masks"], -out["rewards"])  # masks = 1 - success, success = 1 + reward
    np.testing.assert_array_equal(out["rewards"], _env_step_rewards(task_id, data["qpos"], data["qvel"]))
    assert out["observations"] is data["observations"]  # other fields pass through untouched


def test_relabel_compact_form_agrees_with_regular():
    raw = GO.collect_episode(parse_dataset("scene-play"), seed=2, steps=SHORT)
    regular, compact = D.raw_to_regular(raw), D.raw_to_compact(raw)
    task = "scene-play-singletask-task2"
    r, c = relabel(regular, task), relabel(compact, task)
    valid = compact["valids"] > 0.5
    np.testing.assert_array_equal(c["rewards"][valid], r["rewards"])
    np.testing.assert_array_equal(c["masks"][valid], r["masks"])
    assert r["rewards"].min() >= -6 and r["rewards"].max() <= 0  # scene: 6 subgoals


def test_relabel_errors():
    data = D.raw_to_regular(GO.collect_episode(parse_dataset("cube-single-play"), seed=0, steps=SHORT))
    no_qpos = {k: v for k, v in data.items() if k != "qpos"}
    with pytest.raises(FluxrlError, match="^mine.npz: .*'qpos'"):
        relabel(no_qpos, "cube-single-play-singletask-task1", source="mine.npz")
    with pytest.raises(FluxrlError, match="observations"):
        relabel(data, "cube-double-play-singletask-task1")  # 28-dim states, 37 expected
    with pytest.raises(FluxrlError, match="button_states"):
        relabel(data, "puzzle-3x3-play-singletask-task1")
    with pytest.raises(FluxrlError, match="Unknown task"):
        relabel(data, "cube-single-play-singletask-task9")


def test_relabel_dispatches_dmc_tasks(monkeypatch):
    relabel_dmc = pytest.importorskip("fluxrl.data.relabel_dmc")
    seen = []
    monkeypatch.setattr(relabel_dmc, "relabel_dmc", lambda data, spec: seen.append(spec) or {"done": True})
    assert relabel({"observations": np.zeros((1, 3))}, "walker-run") == {"done": True}
    assert seen[0].name == "walker-run" and seen[0].family == "dmc"


def test_oracle_demonstrations_of_a_task(tmp_path, capsys):
    """`fluxrl data demos`: noisy oracle episodes of the task's evaluation env, each ending at success (mask 0) or
    the time limit, reproducible from the seed; bad input is refused in one sentence and nothing is overwritten."""
    from fluxrl.cli import main
    from fluxrl.data.demos import collect_demos
    from fluxrl.data.io import load_dataset

    task = "cube-single-play-singletask-task2"
    out = tmp_path / "demos.npz"
    assert main(["data", "demos", task, "--out", str(out), "--episodes", "2", "--noise", "0.1", "--quiet"]) == 0
    data = load_dataset(str(out))
    assert D.num_episodes(data) == 2 and len(load_dataset(str(tmp_path / "demos-val.npz"))["actions"]) > 0
    ends = np.flatnonzero(data["terminals"] > 0.5)
    assert np.all(data["masks"][ends] == 0.0) and np.all(data["rewards"][ends] == 0.0)  # the oracle succeeds
    assert np.sum(data["masks"] == 0.0) == 2 and np.abs(data["actions"]).max() <= 1.0
    np.testing.assert_array_equal(data["next_observations"][:-1][data["terminals"][:-1] < 0.5],
                                  data["observations"][1:][data["terminals"][:-1] < 0.5])
    again = collect_demos(task, 2, noise=0.1)
    np.testing.assert_array_equal(again["actions"], data["actions"])
    assert not np.array_equal(collect_demos(task, 1, noise=0.0)["actions"], data["actions"][: ends[0] + 1])

    capsys.readouterr()
    before = out.read_bytes()
    for argv in (["data", "demos", task, "--out", str(out), "--episodes", "2"],
                 ["data", "demos", "walker-stand", "--out", str(tmp_path / "w.npz")],
                 ["data", "demos", task, "--out", str(tmp_path / "n.npz"), "--noise", "-1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert out.read_bytes() == before and not (tmp_path / "w.npz").exists() and not (tmp_path / "n.npz").exists()
