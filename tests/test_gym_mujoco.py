"""Gymnasium's MuJoCo tasks behind make_env: action rescaling, seeded resets, the refusals where fluxrl has no
dataset or rewards for them, and FPMD trained online from scratch on one through the CLI."""

import csv
import json

import imageio.v2 as imageio
import numpy as np
import pytest

from fluxrl.cli_train import main
from fluxrl.data import cache
from fluxrl.data.relabel import relabel
from fluxrl.envs import make_env
from fluxrl.envs.evaluate import evaluate
from fluxrl.errors import FluxrlError


def test_actions_in_the_unit_box_map_onto_the_env_bounds():
    env = make_env("InvertedPendulum-v4", seed=0)  # the env's own bounds: ±3
    assert env.action_space.low.tolist() == [-1.0] and env.action_space.high.tolist() == [1.0]
    np.testing.assert_allclose([env.env_action([a])[0] for a in (-1.0, -0.5, 0.0, 1.0, 7.0)],
                               [-3.0, -1.5, 0.0, 3.0, 3.0])
    humanoid = make_env("Humanoid-v5")
    np.testing.assert_allclose(humanoid.env_action(np.ones(17)), 0.4)
    obs, info = env.reset()
    assert obs.dtype == np.float32 and obs.shape == env.observation_space.shape == (4,) and info["success"] == 0.0
    obs, reward, terminated, truncated, info = env.step(np.zeros(1))
    assert obs.dtype == np.float32 and isinstance(reward, float) and info["success"] == 0.0


def test_seeded_resets_repeat_the_episode():
    def rollout(seed):
        env = make_env("Hopper-v4", seed=seed)
        observations = [env.reset()[0]]
        for t in range(20):
            observations.append(env.step(np.full(3, np.sin(t)))[0])
        return np.stack(observations)

    np.testing.assert_array_equal(rollout(3), rollout(3))
    assert not np.array_equal(rollout(3), rollout(4))


def test_no_default_dataset_and_no_relabelling():
    with pytest.raises(FluxrlError, match="Hopper-v4 has no dataset fluxrl can generate: pass --dataset"):
        cache.default_dataset_path("Hopper-v4")
    data = {"observations": np.zeros((3, 11), np.float32), "actions": np.zeros((3, 3), np.float32)}
    with pytest.raises(FluxrlError, match="no rewards"):
        relabel(data, "Hopper-v4", source="hopper.npz")


@pytest.mark.mujoco_render
def test_video_of_a_gym_task(tmp_path):
    path = str(tmp_path / "pendulum.mp4")
    evaluate("InvertedPendulum-v4", lambda o, r: np.zeros(1), episodes=1, seed=0, video_path=path, max_steps=3,
             render_size=32)
    frames = imageio.mimread(path)
    assert len(frames) == 4 and np.asarray(frames[0]).std() > 0  # the reset frame and 3 steps


def test_fpmd_online_from_scratch_on_a_gym_task(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "fpmd", "--task", "InvertedPendulum-v4", "--steps", "0", "--online_steps", "30",
                 "--warmup_steps", "10", "--preset", "cpu", "--run_dir", str(run), "--log_interval", "10",
                 "--eval_interval", "30", "--eval_episodes", "2", "--save_interval", "30", "--quiet",
                 "--agent.critic_hidden", "16", "16", "--agent.actor_hidden", "16", "16", "--agent.batch_size", "8"])
    assert code == 0
    with open(run / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "30"]
    assert all(float(r["evaluation/return"]) > 0 for r in rows)  # +1 per step the pole stays up
    record = json.loads((run / "config.json").read_text())
    assert record["agent"] == "fpmd" and record["train"]["task"] == "InvertedPendulum-v4"
    with open(run / "exploration.csv") as f:
        assert sum(int(float(r["exploration/episodes"])) for r in csv.DictReader(f)) >= 1
    # The task has no success signal: the final line gives the return only.
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert "evaluation/return" in final and "success" not in final


def _d4rl_file(path, obs_dim, act_dim, episodes=3, length=40):
    """A D4RL-style hdf5 file (observations, actions, rewards, terminals, timeouts) of time-limited episodes."""
    import h5py

    rng = np.random.default_rng(0)
    n = episodes * length
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    with h5py.File(path, "w") as f:
        f.create_dataset("observations", data=rng.normal(size=(n, obs_dim)).astype(np.float32))
        f.create_dataset("actions", data=rng.uniform(-1, 1, (n, act_dim)).astype(np.float32))
        f.create_dataset("rewards", data=rng.normal(size=n).astype(np.float32))
        f.create_dataset("terminals", data=np.zeros(n, bool))
        f.create_dataset("timeouts", data=timeouts)
    return str(path)


def test_offline_training_on_a_d4rl_file_of_the_task(tmp_path, capsys):
    """A D4RL hopper-shaped file (11-dim observations, 3-dim actions) trains offline on Hopper-v4 and evaluates
    there; a file of another observation size is refused before anything is written."""
    dataset = _d4rl_file(tmp_path / "hopper.hdf5", 11, 3)
    run = tmp_path / "run"
    code = main(["train", "iql", "--task", "Hopper-v4", "--dataset", dataset, "--steps", "20", "--preset", "cpu",
                 "--run_dir", str(run), "--log_interval", "10", "--eval_interval", "20", "--eval_episodes", "1",
                 "--save_interval", "20", "--quiet", "--agent.actor_hidden", "16", "--agent.critic_hidden", "16",
                 "--agent.batch_size", "8"])
    assert code == 0
    with open(run / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "20"] and all(float(r["evaluation/length"]) >= 1 for r in rows)
    ant_shaped = _d4rl_file(tmp_path / "ant.hdf5", 111, 8)
    capsys.readouterr()
    code = main(["train", "iql", "--task", "Ant-v4", "--dataset", ant_shaped, "--steps", "20", "--preset", "cpu",
                 "--run_dir", str(tmp_path / "ant"), "--quiet"])
    err = capsys.readouterr().err
    # Gymnasium's Ant-v4 observes 27 numbers (no contact forces), D4RL's ant files 111.
    assert code == 2 and "(111,)" in err and "(27,)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ant").exists()
