"""Pre-training -> fine-tuning through the engine: the fine-tuning run starts from the pre-trained agent state,
with each phase's own observation normalisation, and the CLI chains pretrain -> finetune -> export -> load."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from fluxrl import cli_train
from fluxrl.data.io import save_dataset
from fluxrl.errors import FluxrlError
from fluxrl.train.config import TrainConfig, resolve_agent
from fluxrl.train.engine import Trainer
from fluxrl.train.loggers import Progress

TASK = "pointmaze-medium-navigate-singletask-task1"  # names only: eval_episodes=0 needs no environment
TINY = dict(actor_hidden=(16, 16), value_hidden=(16, 16), reward_hidden=(16, 16), encoder_hidden=(16, 16),
            latent_dim=4, num_flow_goals=2, num_flow_steps=2, batch_size=16)
TINY_FLAGS = ["--agent.actor_hidden", "16", "16", "--agent.value_hidden", "16", "16", "--agent.reward_hidden", "16",
              "16", "--agent.encoder_hidden", "16", "16", "--agent.latent_dim", "4", "--agent.num_flow_goals", "2",
              "--agent.num_flow_steps", "2", "--agent.batch_size", "16"]


def write_dataset(path, shift=0.0, seed=0, episodes=4, length=20):
    rng = np.random.default_rng(seed)
    rows = episodes * length
    terminals = np.zeros(rows, np.float32)
    terminals[length - 1 :: length] = 1.0
    obs = (np.cumsum(rng.normal(size=(rows + 1, 2)), axis=0) * 0.1 + shift).astype(np.float32)
    data = {
        "observations": obs[:-1], "next_observations": obs[1:],
        "actions": rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
        "rewards": -np.ones(rows, np.float32), "masks": np.ones(rows, np.float32), "terminals": terminals,
    }
    for e in range(episodes):  # chain within episodes so the raw npz layout holds the data exactly
        data["next_observations"][e * length : (e + 1) * length - 1] = data["observations"][e * length + 1 : (e + 1) * length]
    save_dataset(str(path), data)
    return str(path)


def config(tmp_path, name, dataset, **kw):
    return TrainConfig(task=TASK, dataset=dataset, steps=6, seeds=2, preset="cpu", run_dir=str(tmp_path / name),
                       updates_per_call=3, log_interval=3, eval_interval=6, eval_episodes=0, save_interval=6,
                       quiet=True, **kw)


def test_finetuning_starts_from_the_pretrained_state(tmp_path):
    infom = resolve_agent("fluxrl.agents.infom")
    agent_config = dataclasses.replace(infom.PRESETS["cpu"], **TINY)
    pre = Trainer("fluxrl.agents.infom:pretrain", config(tmp_path, "pre", write_dataset(tmp_path / "a.npz")),
                  agent_config)
    pre.run()
    pretrained = pre.carry.agent

    ft_cfg = config(tmp_path, "ft", write_dataset(tmp_path / "b.npz", shift=10.0),
                    init_from=str(tmp_path / "pre"))
    ft = Trainer("fluxrl.agents.infom", ft_cfg, agent_config)
    ft._setup_envs()
    ft._setup_data()
    ft.progress = Progress(ft.total_steps, 0, True)
    state = ft._pretrained_agent(ft._initial_carry().agent)
    for a, b in zip(jax.tree_util.tree_leaves(pretrained.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(state.params["vf"]), jax.tree_util.tree_leaves(state.target_params["vf"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # begin_finetune: target <- online
    assert np.all(np.asarray(state.step) == 0)
    # Each phase normalises with its own dataset's statistics (the second dataset is the first shifted by +10).
    assert pre.obs_norm is not None and ft.obs_norm is not None
    np.testing.assert_allclose(np.array(ft.obs_norm["mean"]) - np.array(pre.obs_norm["mean"]), 10.0, atol=1e-3)
    np.testing.assert_allclose(ft.obs_norm["std"], pre.obs_norm["std"], rtol=1e-4)

    ft_wrong = config(tmp_path, "ft2", ft_cfg.dataset, init_from=str(tmp_path / "pre"))
    ft_wrong = dataclasses.replace(ft_wrong, seeds=1)
    with pytest.raises(FluxrlError, match="same seeds"):
        Trainer("fluxrl.agents.infom", ft_wrong, agent_config).run()


def test_cli_pretrain_finetune_export_load(tmp_path, capsys):
    a, b = write_dataset(tmp_path / "a.npz"), write_dataset(tmp_path / "b.npz", shift=3.0, seed=1)
    common = ["--steps", "6", "--updates_per_call", "3", "--log_interval", "3", "--save_interval", "6", "--quiet"]
    pre_dir = str(tmp_path / "pre")
    assert cli_train.main(["pretrain", "fluxrl.agents.infom", "--task", TASK, "--dataset", a, "--preset", "cpu",
                           "--run_dir", pre_dir] + common + TINY_FLAGS) == 0
    record = json.load(open(os.path.join(pre_dir, "config.json")))
    assert record["agent"] == "fluxrl.agents.infom:pretrain" and record["train"]["eval_episodes"] == 0
    assert "flow_occupancy" in open(os.path.join(pre_dir, "train.csv")).readline()

    assert cli_train.main(["finetune", pre_dir, "--dataset", b, "--eval_episodes", "0"] + common) == 0
    ft_dir = os.path.join(pre_dir, "finetune")
    ft_record = json.load(open(os.path.join(ft_dir, "config.json")))
    assert ft_record["agent"] == "fluxrl.agents.infom" and ft_record["train"]["init_from"] == pre_dir
    assert ft_record["agent_config"] == record["agent_config"]
    assert "critic" in open(os.path.join(ft_dir, "train.csv")).readline()

    # Fine-tuning a run that is not a pre-training run is refused in one sentence.
    assert cli_train.main(["finetune", ft_dir, "--dataset", b]) == 2
    assert "not a pre-training run" in capsys.readouterr().err

    out = str(tmp_path / "policy")
    assert cli_train.main(["export", ft_dir, "--out", out]) == 0
    policy = json.load(open(os.path.join(out, "policy.json")))
    assert policy["obs_norm"] is not None and len(policy["obs_norm"]["mean"]) == 2
    import fluxrl

    loaded = fluxrl.load_policy(out)
    actions = np.asarray(loaded(np.zeros((3, 2), np.float32)))
    assert actions.shape == (3, 2) and np.all(np.abs(actions) <= 1.0)
