"""Readers and writers: every format round-trips, episode boundaries and terminals/masks semantics are checked
against hand-computed expectations, and raw npz files agree with ogbench.utils.load_dataset."""

import json
import os
import stat

import h5py
import numpy as np
import ogbench.utils
import pytest

from fluxrl.data import io
from fluxrl.data.dataset import num_episodes
from fluxrl.data.info import dataset_info
from fluxrl.errors import FluxrlError


def state(e, k):
    """Observation of episode e at step k: identifiable by value."""
    return [10.0 * e + k, -(10.0 * e + k)]


def make_raw(lengths, with_info=True):
    """OGBench raw layout: episode e has lengths[e] transitions, so lengths[e] + 1 state rows."""
    obs, act, term, qpos = [], [], [], []
    for e, T in enumerate(lengths):
        for k in range(T + 1):
            obs.append(state(e, k))
            act.append([10.0 * e + k + 0.5, 1.0])
            term.append(1.0 if k == T else 0.0)
            qpos.append([e, k, 0.0])
    raw = {
        "observations": np.array(obs, np.float32),
        "actions": np.array(act, np.float32),
        "terminals": np.array(term, np.float32),
    }
    if with_info:
        raw["qpos"] = np.array(qpos, np.float32)
    return raw


def make_regular(lengths, seed=0):
    """Regular form with OGBench-singletask-like rewards (-1 or 0) and masks = 0 exactly at reward 0."""
    rng = np.random.default_rng(seed)
    data = io._to_form(make_raw(lengths), "raw", False, "test")
    n = len(data["observations"])
    data["rewards"] = -(rng.random(n) < 0.7).astype(np.float32)
    data["masks"] = (data["rewards"] < 0).astype(np.float32)
    return data


def assert_same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a[k].dtype == b[k].dtype, k


# ---------------------------------------------------------------------------------------------------- OGBench npz


def test_raw_npz_regular_and_compact_by_hand(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **make_raw([2, 3]), _meta_generator=np.array("hand made"))
    data, meta = io.load_dataset(path, with_meta=True)
    assert meta == {"generator": "hand made"}
    assert not any(k.startswith("_meta") for k in data)
    # Episode 0: s0 s1 s2, episode 1: s0..s3 -> transitions (0,0)->(0,1), (0,1)->(0,2), (1,0)->(1,1), ...
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 10, 11, 12])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 11, 12, 13])
    np.testing.assert_array_equal(data["actions"][:, 0], [0.5, 1.5, 10.5, 11.5, 12.5])
    np.testing.assert_array_equal(data["terminals"], [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(data["qpos"][:, :2], [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]])
    compact = io.load_dataset(path, compact=True)
    np.testing.assert_array_equal(compact["observations"][:, 0], [0, 1, 2, 10, 11, 12, 13])
    np.testing.assert_array_equal(compact["valids"], [1, 1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(compact["terminals"], [0, 1, 1, 0, 0, 1, 1])
    assert num_episodes(data) == num_episodes(compact) == 2


def test_raw_npz_matches_ogbench_loader(tmp_path):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **make_raw([5, 1, 7, 3]))
    for compact in (False, True):
        ours = io.load_dataset(path, compact=compact)
        theirs = ogbench.utils.load_dataset(str(path), compact_dataset=compact, add_info=True)
        assert_same(ours, theirs)


def test_written_raw_npz_is_read_by_ogbench(tmp_path):
    data = make_regular([4, 6, 2])
    path = tmp_path / "w.npz"
    io.save_dataset(path, data, meta={"note": "relabelled", "seed": 3})
    theirs = ogbench.utils.load_dataset(str(path), add_info=True)
    for k in ("observations", "actions", "next_observations", "terminals", "qpos"):
        np.testing.assert_array_equal(theirs[k], data[k], err_msg=k)
    back, meta = io.load_dataset(path, with_meta=True)
    assert_same(back, data)  # rewards and masks survive the raw layout
    assert meta == {"note": "relabelled", "seed": 3}


def test_regular_compact_raw_round_trips(tmp_path):
    data = make_regular([3, 1, 4])
    compact = io.load_dataset(_saved(tmp_path / "a.npz", data), compact=True)
    assert int(compact["valids"].sum()) == len(data["observations"])
    # compact -> raw npz -> regular gives the original back
    assert_same(io.load_dataset(_saved(tmp_path / "b.npz", compact)), data)
    # regular and compact npz (not raw) are read as stored
    np.savez(tmp_path / "reg.npz", **data)
    np.savez(tmp_path / "cmp.npz", **compact)
    assert io.read_dataset(tmp_path / "reg.npz").layout == "regular"
    assert_same(io.load_dataset(tmp_path / "reg.npz"), data)
    assert_same(io.load_dataset(tmp_path / "reg.npz", compact=True), compact)
    assert io.read_dataset(tmp_path / "cmp.npz").layout == "compact"
    assert_same(io.load_dataset(tmp_path / "cmp.npz"), data)
    assert_same(io.load_dataset(tmp_path / "cmp.npz", compact=True), compact)


def _saved(path, data, **kw):
    io.save_dataset(path, data, **kw)
    return path


def test_dtypes_are_canonicalized(tmp_path):
    raw = make_raw([3])
    raw["observations"] = raw["observations"].astype(np.float64)
    raw["terminals"] = raw["terminals"].astype(np.int64)
    np.savez(tmp_path / "d.npz", **raw)
    data = io.load_dataset(tmp_path / "d.npz")
    assert data["observations"].dtype == np.float32
    assert data["terminals"].dtype == np.float32
    pixels = make_raw([2], with_info=False)
    pixels["observations"] = np.arange(3 * 4 * 4 * 3, dtype=np.uint8).reshape(3, 4, 4, 3)
    np.savez(tmp_path / "p.npz", **pixels)
    assert io.load_dataset(tmp_path / "p.npz")["observations"].dtype == np.uint8


# ---------------------------------------------------------------------------------------------------- D4RL hdf5


def _write_h5(path, arrays, attrs=None):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


def test_d4rl_without_next_observations(tmp_path):
    # rows:   0    1    2(term) 3    4(timeout) 5    6    7(last row of the file)
    # episodes: [0 1 2] ended by termination, [3 4] by time-out, [5 6 7] cut by the file's end.
    obs = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    terminals = np.array([0, 0, 1, 0, 0, 0, 0, 0], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)
    _write_h5(tmp_path / "d.hdf5", {
        "observations": obs, "actions": obs[:, :1] + 0.5, "rewards": np.arange(8, dtype=np.float64),
        "terminals": terminals, "timeouts": timeouts, "infos/qpos": obs * 2,
        "metadata/algorithm": "SAC", "metadata/policy/fc0/weight": np.ones((3, 3)),
    })
    found = io.read_dataset(tmp_path / "d.hdf5")
    data = found.data
    assert found.format == "d4rl"
    # Timeout row 4 and the file's last row 7 have no stored successor: dropped. Terminal row 2 is kept with
    # s' = row 3 (d4rl.qlearning_dataset's convention) and masks = 0.
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 3, 5, 6])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 4, 6, 7])
    np.testing.assert_array_equal(data["rewards"], [0, 1, 2, 3, 5, 6])
    np.testing.assert_array_equal(data["masks"], [1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(data["qpos"][:, 0], [0, 2, 4, 6, 10, 12])
    assert "timeouts" not in data
    assert found.meta["metadata/algorithm"] == "SAC" and "metadata/policy/fc0/weight" not in found.meta


def test_d4rl_with_next_observations(tmp_path):
    # Episode A (rows 0-2) terminates; episode B (rows 3-4) times out; episode C (rows 5-7) has a D4RL terminal
    # at row 5 whose next row continues the trajectory (AntMaze's goal flag): masks 0, episode goes on.
    obs = np.array([0, 1, 2, 10, 11, 20, 21, 22], np.float32)[:, None]
    nxt = np.array([1, 2, 3, 11, 12, 21, 22, 23], np.float32)[:, None]
    terminals = np.array([0, 0, 1, 0, 0, 1, 0, 0], np.float32)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0, 0], np.float32)
    _write_h5(tmp_path / "d.hdf5", {"observations": obs, "next_observations": nxt, "actions": obs,
                                     "rewards": terminals, "terminals": terminals, "timeouts": timeouts})
    data = io.load_dataset(tmp_path / "d.hdf5")
    np.testing.assert_array_equal(data["observations"], obs)
    np.testing.assert_array_equal(data["next_observations"], nxt)
    np.testing.assert_array_equal(data["masks"], [1, 1, 0, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 1, 0, 0, 1])
    # Same file without timeouts (d4rl.qlearning_dataset's output): boundaries found by discontinuity alone.
    _write_h5(tmp_path / "q.hdf5", {"observations": obs, "next_observations": nxt, "actions": obs,
                                     "terminals": terminals})
    data = io.load_dataset(tmp_path / "q.hdf5", format="d4rl")
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 1, 0, 0, 1])


def test_d4rl_writer_round_trip(tmp_path):
    data = make_regular([3, 5, 2])
    # A termination inside episode 1 (row 4) and a terminated episode end (row 2) whose successor row happens
    # to start at the very same state, so only the timeouts flag can carry that boundary.
    data["masks"][:] = 1
    data["masks"][[2, 4]] = 0
    data["next_observations"][2] = data["observations"][3]
    path = _saved(tmp_path / "d.hdf5", data, format="d4rl")
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["terminals"][()], 1 - data["masks"])
        assert "infos/qpos" in f
    back = io.load_dataset(path)
    assert_same(back, data)
    assert num_episodes(back) == 3


def test_flat_hdf5_round_trip_and_infom_layout(tmp_path):
    data = make_regular([4, 4])
    assert_same(io.load_dataset(_saved(tmp_path / "f.hdf5", data, meta={"source": "x"})), data)
    assert io.load_dataset(tmp_path / "f.hdf5", with_meta=True)[1] == {"source": "x"}
    # InFOM's ExORL files: one dataset per key, no fluxrl tag; recognised by 'masks'
    infom = {k: data[k] for k in ("observations", "actions", "next_observations", "rewards", "masks", "terminals")}
    _write_h5(tmp_path / "infom.hdf5", infom)
    found = io.read_dataset(tmp_path / "infom.hdf5")
    assert (found.format, found.layout) == ("flat", "regular")
    assert_same(found.data, infom)
    compact = io.load_dataset(_saved(tmp_path / "c.hdf5", io.load_dataset(tmp_path / "f.hdf5", compact=True)))
    assert_same(compact, data)


# ---------------------------------------------------------------------------------------------------- Minari


def _minari_episode(f, k, obs, actions, rewards, terminations, truncations, infos=None):
    g = f.create_group(f"episode_{k}")
    if isinstance(obs, dict):
        for name, v in obs.items():
            g.create_dataset(f"observations/{name}", data=v)
    else:
        g.create_dataset("observations", data=obs)
    g.create_dataset("actions", data=actions)
    g.create_dataset("rewards", data=rewards)
    g.create_dataset("terminations", data=terminations)
    g.create_dataset("truncations", data=truncations)
    for name, v in (infos or {}).items():
        g.create_dataset(f"infos/{name}", data=v)


def test_minari_directory(tmp_path):
    root = tmp_path / "D4RL" / "toy" / "expert-v0"
    os.makedirs(root / "data")
    with h5py.File(root / "data" / "main_data.hdf5", "w") as f:
        # episode 0: 3 steps, terminated; episode 1: 2 steps, truncated; episode 10 sorts after 2 numerically
        _minari_episode(f, 0, np.array([[0.], [1.], [2.], [3.]]), np.ones((3, 1)), np.array([0., 0., 1.]),
                        np.array([0, 0, 1], bool), np.array([0, 0, 0], bool), {"success": np.array([0, 0, 0, 1])})
        _minari_episode(f, 1, np.array([[10.], [11.], [12.]]), 2 * np.ones((2, 1)), np.array([0., 0.]),
                        np.array([0, 0], bool), np.array([0, 1], bool), {"success": np.array([0, 0, 0])})
        _minari_episode(f, 10, np.array([[20.], [21.]]), 3 * np.ones((1, 1)), np.array([5.]),
                        np.array([0], bool), np.array([1], bool), {"success": np.array([0, 0])})
        _minari_episode(f, 2, np.array([[30.], [31.]]), 4 * np.ones((1, 1)), np.array([6.]),
                        np.array([0], bool), np.array([1], bool), {"success": np.array([0, 0])})
    (root / "data" / "metadata.json").write_text(json.dumps({"dataset_id": "D4RL/toy/expert-v0", "total_steps": 7,
                                                             "data_format": "hdf5", "eval_env_spec": {"a": 1}}))
    found = io.read_dataset(root)
    data = found.data
    assert found.format == "minari"
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 10, 11, 30, 20])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 11, 12, 31, 21])
    np.testing.assert_array_equal(data["actions"][:, 0], [1, 1, 1, 2, 2, 4, 3])
    np.testing.assert_array_equal(data["rewards"], [0, 0, 1, 0, 0, 6, 5])
    np.testing.assert_array_equal(data["masks"], [1, 1, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(data["success"], [0, 0, 0, 0, 0, 0, 0])  # infos at the state s
    assert found.meta["dataset_id"] == "D4RL/toy/expert-v0" and "eval_env_spec" not in found.meta


def test_minari_dict_observations_flatten_in_sorted_order(tmp_path):
    with h5py.File(tmp_path / "main_data.hdf5", "w") as f:
        obs = {"observation": np.arange(9.0).reshape(3, 3), "achieved_goal": np.arange(6.0).reshape(3, 2) + 100,
               "desired_goal": np.full((3, 2), -1.0)}
        _minari_episode(f, 0, obs, np.zeros((2, 2)), np.zeros(2), np.zeros(2, bool), np.array([0, 1], bool))
    found = io.read_dataset(tmp_path / "main_data.hdf5")
    np.testing.assert_array_equal(found.data["observations"][0], [100, 101, -1, -1, 0, 1, 2])
    np.testing.assert_array_equal(found.data["next_observations"][1], [104, 105, -1, -1, 6, 7, 8])
    assert found.meta["observation_layout"] == "achieved_goal[0:2], desired_goal[2:4], observation[4:7]"
    # the same order as gymnasium's flatten of the Dict space (keys given as a plain dict are sorted)
    import gymnasium

    space = gymnasium.spaces.Dict({k: gymnasium.spaces.Box(-np.inf, np.inf, v.shape[1:]) for k, v in obs.items()})
    flat = gymnasium.spaces.flatten(space, {k: v[0] for k, v in obs.items()})
    np.testing.assert_array_equal(found.data["observations"][0], flat)


def test_write_minari_round_trip(tmp_path):
    data = make_regular([3, 4, 2])
    data["masks"][:] = 1
    data["masks"][2] = 0  # episode 0 ends in a termination, the others by truncation
    io.write_minari(tmp_path / "m", data, meta={"dataset_id": "toy-v0"})
    with h5py.File(tmp_path / "m" / "data" / "main_data.hdf5") as f:
        assert sorted(f) == ["episode_0", "episode_1", "episode_2"]
        assert f["episode_1/observations"].shape == (5, 2) and f["episode_1/actions"].shape == (4, 2)
        np.testing.assert_array_equal(f["episode_0/terminations"][()], [0, 0, 1])
        np.testing.assert_array_equal(f["episode_1/truncations"][()], [0, 0, 0, 1])
    back, meta = io.load_dataset(tmp_path / "m", with_meta=True)
    assert_same(back, data)
    assert meta["dataset_id"] == "toy-v0" and meta["total_episodes"] == 3
    with pytest.raises(FluxrlError, match="already exists"):
        io.save_dataset(tmp_path / "m", data, format="minari")


# ---------------------------------------------------------------------------------------------------- ExORL


def write_exorl_episode(directory, index, observation, action, reward, discount, physics):
    rows = len(observation)
    np.savez_compressed(os.path.join(directory, f"20220120T1200{index:02d}_{index}_{rows - 1}.npz"),
                        observation=observation, action=action, reward=reward, discount=discount, physics=physics)


def test_exorl_directory(tmp_path):
    buffer = tmp_path / "walker" / "rnd" / "buffer"
    os.makedirs(buffer)
    for e, length in enumerate((3, 2)):
        rows = length + 1
        obs = np.array([state(e, k) for k in range(rows)], np.float32)
        action = np.array([[0.0]] + [[10.0 * e + k] for k in range(1, rows)], np.float32)  # row 0: dummy
        reward = np.array([[0.0]] + [[e + 0.1 * k] for k in range(1, rows)], np.float32)
        discount = np.ones((rows, 1), np.float32)
        if e == 1:
            discount[-1] = 0.0  # a true termination at the last step
        physics = np.array([[100.0 * e + k] * 3 for k in range(rows)])
        write_exorl_episode(buffer, e, obs, action, reward, discount, physics)
    found = io.read_dataset(tmp_path / "walker" / "rnd")
    data = found.data
    assert (found.format, found.layout) == ("exorl", "episodes")
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 2, 10, 11])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 3, 11, 12])
    np.testing.assert_array_equal(data["actions"][:, 0], [1, 2, 3, 11, 12])
    np.testing.assert_allclose(data["rewards"], [0.1, 0.2, 0.3, 1.1, 1.2], rtol=1e-6)
    np.testing.assert_array_equal(data["masks"], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 1, 0, 1])
    np.testing.assert_array_equal(data["physics"][:, 0], [0, 1, 2, 100, 101])
    np.testing.assert_array_equal(data["next_physics"][:, 0], [1, 2, 3, 101, 102])
    compact = io.load_dataset(buffer, compact=True)
    np.testing.assert_array_equal(compact["observations"][:, 0], [0, 1, 2, 3, 10, 11, 12])


# ---------------------------------------------------------------------------------------------------- writers


def test_save_refuses_to_overwrite_and_is_atomic(tmp_path):
    data = make_regular([3])
    path = _saved(tmp_path / "d.npz", data)
    before = path.read_bytes()
    other = make_regular([5], seed=1)
    for fmt in ("ogbench", "flat", "d4rl"):
        with pytest.raises(FluxrlError, match="already exists"):
            io.save_dataset(path, other, format=fmt)
        assert path.read_bytes() == before
    io.save_dataset(path, other, overwrite=True)
    assert_same(io.load_dataset(path), other)
    assert sorted(os.listdir(tmp_path)) == ["d.npz"]  # no temporary file left behind


def test_written_files_follow_the_umask_as_open_does(tmp_path):
    """Not mkstemp's 0600: a dataset (or a video, a table, config.json) must be readable where the umask allows."""
    previous = os.umask(0o022)
    try:
        path = _saved(tmp_path / "d.npz", make_regular([3]))
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644


def test_save_format_from_extension(tmp_path):
    data = make_regular([2, 2])
    assert io.read_dataset(_saved(tmp_path / "a.npz", data)).layout == "raw"
    assert io.read_dataset(_saved(tmp_path / "a.h5", data)).format == "flat"
    with pytest.raises(FluxrlError, match="Cannot tell the format"):
        io.save_dataset(tmp_path / "a.bin", data)


def test_regular_data_that_is_not_a_chain_cannot_be_written_raw(tmp_path):
    data = make_regular([4])
    data["next_observations"][1] += 5.0  # s'_1 != s_2 inside the episode
    with pytest.raises(FluxrlError, match=r"row 1 .*flat hdf5"):
        io.save_dataset(tmp_path / "d.npz", data)
    assert not (tmp_path / "d.npz").exists()
    assert_same(io.load_dataset(_saved(tmp_path / "d.hdf5", data)), data)  # flat keeps it as is


# ---------------------------------------------------------------------------------------------------- checks, info


def test_check_compatible():
    data = make_regular([3])
    io.check_compatible(data, 2, 2, "d.npz", "toy-task")
    with pytest.raises(FluxrlError, match=r"d\.npz: observations have shape \(2,\).*'cube-task' observes \(28,\)"):
        io.check_compatible(data, 28, 2, "d.npz", "cube-task")
    with pytest.raises(FluxrlError, match=r"actions have 2 dimensions but task 'cube-task' takes 5"):
        io.check_compatible(data, (2,), 5, "d.npz", "cube-task")


def test_dataset_info_report(tmp_path):
    data = make_regular([3, 3, 4])
    data["rewards"][:] = -1
    data["rewards"][[2, 3]] = 0  # success in episode 0 (row 2) and episode 1 (row 3); none in episode 2
    data["masks"] = (data["rewards"] < 0).astype(np.float32)
    report = dataset_info(_saved(tmp_path / "d.npz", data, meta={"generator": "unit test"}))
    assert "OGBench npz (raw OGBench layout" in report
    assert "transitions: 10 in 3 episodes (length min 3 / mean 3.3 / max 4)" in report
    assert "observations" in report and "(10, 2)" in report and "float32" in report
    assert "values: -1: 8, 0: 2" in report
    assert "20.00% of transitions; 66.7% of episodes reach it" in report
    assert "2 transitions end in a termination" in report
    assert "generator: unit test" in report
    assert "success" not in dataset_info(_saved(tmp_path / "f.hdf5", make_raw_regular_without_rewards()))
    data["masks"][:] = 1  # rewards in {-1, 0} but no termination at reward 0: not OGBench's single-task rewards
    assert "success" not in dataset_info(_saved(tmp_path / "g.hdf5", data))


def make_raw_regular_without_rewards():
    return io._to_form(make_raw([2]), "raw", False, "test")
