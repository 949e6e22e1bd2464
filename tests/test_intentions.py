"""Intention read-out: goal labels, the linear probe, and the files a pre-training run writes."""

import dataclasses
import json
import os

import numpy as np

from fluxrl.data.io import save_dataset
from fluxrl.train.config import TrainConfig, resolve_agent
from fluxrl.train.engine import Trainer
from fluxrl.train.intentions import goal_labels, probe_accuracy, sample_rows

TINY = dict(actor_hidden=(16, 16), value_hidden=(16, 16), reward_hidden=(16, 16), encoder_hidden=(16, 16),
            latent_dim=4, num_flow_goals=2, num_flow_steps=2, batch_size=16)


def test_probe_separates_what_is_separable_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 800)
    centres = np.eye(4) * 6.0
    separable = centres[labels] + rng.normal(size=(800, 4))
    assert probe_accuracy(separable, labels) > 0.95
    assert probe_accuracy(rng.normal(size=(800, 4)), labels) < 0.4  # chance is ~0.25


def test_labels_are_goal_cells_goal_clusters_or_exploration_modes():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, 500).astype(np.int32)
    labels, name = goal_labels({"behavior_goal_ids": ids}, "pointmaze-medium-navigate-singletask-task1")
    assert name == "goal cell" and np.array_equal(labels, ids)
    # Two well separated kinds of target: no cluster mixes them.
    kind = rng.integers(0, 2, 500)
    goals = np.where(kind[:, None] == 1, 5.0, -5.0) + 0.01 * rng.normal(size=(500, 12))
    labels, name = goal_labels({"behavior_goal_ids": ids, "behavior_goals": goals.astype(np.float32)},
                               "cube-single-play-singletask-task1")
    assert name.startswith("goal cluster") and len(np.unique(labels)) > 1
    assert not set(labels[kind == 0]) & set(labels[kind == 1])
    assert goal_labels({"observations": np.zeros((3, 2))}, "pointmaze-medium-navigate-singletask-task1") is None
    labels, name = goal_labels({"behavior_goal_ids": ids % 4}, "walker-walk")
    assert name.startswith("exploration mode (0 white") and np.array_equal(labels, ids % 4)


def test_sample_rows_keeps_valid_rows_only():
    data = {"observations": np.arange(20, dtype=np.float32)[:, None], "actions": np.zeros((20, 1), np.float32),
            "behavior_goal_ids": np.arange(20), "valids": (np.arange(20) % 2 == 0).astype(np.float32)}
    sample = sample_rows(data, "pointmaze-medium-navigate-singletask-task1", rows=50)
    assert len(sample["labels"]) == 10 and np.all(sample["observations"][:, 0] % 2 == 0)
    assert np.array_equal(sample["labels"], sample["observations"][:, 0].astype(int))


def test_pretraining_writes_the_intention_plot_and_probe(tmp_path):
    rng = np.random.default_rng(0)
    episodes, length = 6, 20
    rows = episodes * length
    goal = np.repeat(np.arange(episodes) % 3, length)  # one goal per episode; actions point at it
    directions = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]) * 0.8
    actions = (directions[goal] + 0.1 * rng.normal(size=(rows, 2))).astype(np.float32)
    obs = np.zeros((rows, 2), np.float32)
    for e in range(episodes):
        obs[e * length:(e + 1) * length] = np.cumsum(actions[e * length:(e + 1) * length], axis=0) * 0.1
    terminals = np.zeros(rows, np.float32)
    terminals[length - 1::length] = 1.0
    next_obs = np.concatenate([obs[1:], obs[-1:]])
    data = {"observations": obs, "next_observations": next_obs, "actions": actions, "terminals": terminals,
            "behavior_goal_ids": goal.astype(np.int32)}
    path = str(tmp_path / "goals.npz")
    save_dataset(path, data)
    cfg = TrainConfig(task="pointmaze-medium-navigate-singletask-task1", dataset=path, steps=20, seeds=2,
                      preset="cpu", run_dir=str(tmp_path / "pre"), eval_episodes=0, quiet=True,
                      log_interval=10, save_interval=20, updates_per_call=10)
    agent_config = dataclasses.replace(resolve_agent("fluxrl.agents.infom").PRESETS["cpu"], **TINY)
    Trainer("fluxrl.agents.infom:pretrain", cfg, agent_config).run()
    record = json.load(open(tmp_path / "pre" / "intentions.json"))
    assert record["label"] == "goal cell" and record["classes"] == 3 and record["rows"] == rows
    assert set(record["latent_probe_accuracy"]) == {"0", "1"}
    # The goal is linear in the raw actions here, so the raw-input probe must find it.
    assert record["raw_input_probe_accuracy"] > 0.9
    assert all(0.0 <= a <= 1.0 for a in record["latent_probe_accuracy"].values())
    assert os.path.getsize(tmp_path / "pre" / "intentions.png") > 10_000
