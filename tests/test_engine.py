"""The training engine with a tiny agent (defined here, following the agent contract) and a tiny env.

This module is itself an importable agent (`test_engine`): test_checkpoint.py and test_cli_train.py train it
through the CLI, in-process and in subprocesses."""

import dataclasses
import json
import os
import types
from typing import Any

import flax.struct
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fluxrl.data.dataset import save_npz
from fluxrl.agents.base import BatchSpec
from fluxrl.data.sampler import CHUNK_FIELDS, Sampler
from fluxrl.train import TrainConfig, Trainer, TrainingDiverged, external
from fluxrl.train.checkpoint import Checkpointer
from fluxrl.train.engine import Carry, empty_accumulator, make_offline_chunk, seed_keys
from fluxrl.train.replay import ReplayBuffer, check_online_fields, mixed_sample

TASK = "cube-single-play-singletask-task2"  # a real name; the env behind it is LineEnv (install_fakes)
OBS_DIM, ACT_DIM, EPISODE_LENGTH = 3, 2, 8
TRUE_W = np.array([[0.5, -0.2], [0.1, 0.4], [-0.3, 0.2]], np.float32)

# --- the tiny agent: linear policy regressed on the data + a linear TD value (reads rewards/masks/next obs) ----

NAME = "tiny"


@dataclasses.dataclass(frozen=True)
class Config:
    batch_size: int = 16
    lr: float = 0.05
    discount: float = 0.9
    noise: float = 0.1  # input noise in the update, so the update's key matters
    nan_at_step: int = -1  # from this update on, the loss and the gradients are NaN (divergence tests)


PRESETS = {"paper": Config(), "cpu": Config(batch_size=8)}
BATCH_SPEC = types.SimpleNamespace(keys=("observations", "actions", "rewards", "masks", "next_observations"))
# Per-task fields that no task has a value for: every run of this agent states which it leaves at the defaults.
TASK_VALUES = {}
PER_TASK_FIELDS = ("lr", "noise")


def for_task(config, task_name, preset):
    return config


class State(flax.struct.PyTreeNode):
    params: dict
    opt_state: Any
    step: jax.Array
    config: Config = flax.struct.field(pytree_node=False)


def _optimizer(config):
    return optax.adam(config.lr)


def init(key, example_batch, config):
    obs_dim, act_dim = example_batch["observations"].shape[-1], example_batch["actions"].shape[-1]
    params = {"w": 0.1 * jax.random.normal(key, (obs_dim, act_dim)), "b": jnp.zeros(act_dim),
              "v": jnp.zeros(obs_dim)}
    return State(params, _optimizer(config).init(params), jnp.zeros((), jnp.int32), config)


def _loss(params, batch, key, config):
    obs = batch["observations"] + config.noise * jax.random.normal(key, batch["observations"].shape)
    actor = jnp.mean((obs @ params["w"] + params["b"] - batch["actions"]) ** 2)
    target = batch["rewards"] + config.discount * batch["masks"] * (
        batch["next_observations"] @ jax.lax.stop_gradient(params["v"]))
    critic = jnp.mean((batch["observations"] @ params["v"] - target) ** 2)
    return actor + critic, {"actor_loss": actor, "critic_loss": critic}


def update(state, batch, key):
    grads, metrics = jax.grad(_loss, has_aux=True)(state.params, batch, key, state.config)
    broken = (state.config.nan_at_step >= 0) & (state.step >= state.config.nan_at_step)
    scale = jnp.where(broken, jnp.nan, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    metrics = {k: v * scale for k, v in metrics.items()}
    updates, opt_state = _optimizer(state.config).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics


def loss_metrics(state, batch, key):
    return _loss(state.params, batch, key, state.config)[1]


def act(state, observations, key, deterministic=False):
    actions = observations @ state.params["w"] + state.params["b"]
    if not deterministic:
        actions = actions + 0.1 * jax.random.normal(key, actions.shape)
    return jnp.clip(actions, -1.0, 1.0)


# --- the tiny env and data -----------------------------------------------------------------------------------


class LineEnv(gymnasium.Env):
    """s' = 0.9 s + 0.1 [a, 0] + noise (noise from the env's seeded RNG); reward = -|a - W^T s|^2; success when
    the reward exceeds -0.01 (ends the episode); time limit EPISODE_LENGTH."""

    def __init__(self, seed=None, render_size=None):
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (ACT_DIM,), np.float32)
        self.render_size = render_size or 16
        self._first_seed = seed

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed if seed is not None else self._first_seed)
        self._first_seed, self.t = None, 0
        self.s = self.np_random.uniform(-1, 1, OBS_DIM).astype(np.float32)
        return self.s.copy(), {"success": 0.0}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float32), -1, 1)
        reward = -float(np.sum((action - self.s @ TRUE_W) ** 2))
        noise = 0.01 * self.np_random.standard_normal(OBS_DIM)
        self.s = (0.9 * self.s + 0.1 * np.concatenate([action, [0.0]]) + noise).astype(np.float32)
        self.t += 1
        success = reward > -0.01
        return self.s.copy(), reward, success, self.t >= EPISODE_LENGTH, {"success": float(success)}

    def render(self):
        return np.zeros((self.render_size, self.render_size, 3), np.uint8)


def fake_make_env(task, seed=None, render_size=None):
    return LineEnv(seed, render_size)


def install_fakes():
    """Route the engine's env seam to LineEnv (also used by subprocess tests)."""
    external.make_env = fake_make_env


def synthetic_data(episodes=20, seed=0):
    """Regular-form dataset of LineEnv rollouts of a noisy linear behaviour policy, with rewards and masks."""
    rng = np.random.default_rng(seed)
    env = LineEnv()
    rows = {k: [] for k in ("observations", "actions", "rewards", "masks", "terminals", "next_observations")}
    for e in range(episodes):
        s, _ = env.reset(seed=seed * 1000 + e)
        done = False
        while not done:
            a = np.clip(s @ TRUE_W + 0.1 * rng.standard_normal(ACT_DIM), -1, 1).astype(np.float32)
            s2, r, term, trunc, _ = env.step(a)
            done = term or trunc
            for k, v in (("observations", s), ("actions", a), ("rewards", r), ("masks", 1.0 - term),
                         ("terminals", float(done)), ("next_observations", s2)):
                rows[k].append(v)
            s = s2
    return {k: np.asarray(v, np.float32) for k, v in rows.items()}


def write_dataset(directory, name="data"):
    path = os.path.join(directory, f"{name}.npz")
    save_npz(path, synthetic_data(20, seed=0))
    save_npz(os.path.join(directory, f"{name}-val.npz"), synthetic_data(5, seed=1))
    return path


def assert_same_latest_checkpoint(run_a, run_b, step):
    """Both runs' latest checkpoints are of `step` and hold bit-identical arrays."""
    final_a, meta_a = Checkpointer(os.path.join(run_a, "checkpoints")).read_arrays()
    final_b, meta_b = Checkpointer(os.path.join(run_b, "checkpoints")).read_arrays()
    assert meta_a["step"] == meta_b["step"] == step
    assert meta_a["leaf_signature"] == meta_b["leaf_signature"]
    for k in final_a:
        np.testing.assert_array_equal(np.asarray(final_a[k]), np.asarray(final_b[k]), err_msg=k)


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(external, "make_env", fake_make_env)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("data")))


def config(tmp_path, dataset, **kw):
    base = dict(task=TASK, dataset=dataset, steps=40, seeds=1, run_dir=str(tmp_path / "run"), updates_per_call=10,
                log_interval=10, eval_interval=20, eval_episodes=2, save_interval=20, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_equal(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


# --- tests -----------------------------------------------------------------------------------------------------


def test_scan_fused_updates_equal_single_updates():
    """One compiled call of K scanned updates == K calls of one update == K plain agent.update calls."""
    agent = __import__(__name__)
    cfg = Config()
    sampler = Sampler.create(synthetic_data(10))
    fields = BATCH_SPEC.keys
    example = sampler.sample(jax.random.key(0), cfg.batch_size, fields)
    seeds = [3, 4]
    state = jax.vmap(lambda k: init(k, example, cfg))(seed_keys(seeds, 0))
    carry = Carry(agent=state, key=seed_keys(seeds, 1), acc=empty_accumulator(["actor_loss", "critic_loss"], 2))
    chunk = make_offline_chunk(agent, cfg.batch_size, fields)
    K = 12
    fresh = lambda: jax.tree_util.tree_map(jnp.copy, carry)  # noqa: E731  (the chunk donates the carry it gets)
    given = fresh()
    fused = chunk(given, sampler, jnp.int32(0), K)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(given))  # donated: updated in place, not copied
    stepped = fresh()
    for i in range(K):
        stepped = chunk(stepped, sampler, jnp.int32(i), 1)
    assert_trees_equal(fused, stepped)
    assert int(fused.acc["count"]) == K and np.all(np.asarray(fused.agent.step) == K)

    # The same K updates by hand, seed 4 alone, without scan or vmap.
    one = jax.tree_util.tree_map(lambda x: x[1], state)
    key = seed_keys([4], 1)[0]
    for _ in range(K):
        key, k_sample, k_update = jax.random.split(key, 3)
        one, _ = update(one, sampler.sample(k_sample, cfg.batch_size, fields), k_update)
    for x, y in zip(leaves(jax.tree_util.tree_map(lambda x: x[1], fused.agent)), leaves(one), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_vmapped_seeds_match_separate_runs(tmp_path, dataset, fakes):
    together = Trainer(__name__, config(tmp_path, dataset, seeds=2, seed=5, run_dir=str(tmp_path / "all")))
    together.run()
    for i, seed in ((1, 6),):
        alone = Trainer(__name__, config(tmp_path, dataset, seeds=1, seed=seed, run_dir=str(tmp_path / f"s{seed}")))
        alone.run()
        for x, y in zip(leaves(jax.tree_util.tree_map(lambda x: x[i], together.carry.agent)),
                        leaves(jax.tree_util.tree_map(lambda x: x[0], alone.carry.agent)), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        rows_all = _csv(tmp_path / "all" / "eval.csv")
        rows_one = _csv(tmp_path / f"s{seed}" / "eval.csv")
        mine = [r for r in rows_all if r["seed"] == str(seed)]
        assert [r["step"] for r in mine] == [r["step"] for r in rows_one] == ["0", "20", "40"]
        # Evaluation depends only on the seed's own state and seed value.
        np.testing.assert_allclose([float(r["evaluation/return"]) for r in mine],
                                   [float(r["evaluation/return"]) for r in rows_one], rtol=1e-4)


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_offline_run_writes_logs_checkpoints_and_summary(tmp_path, dataset, fakes):
    result = Trainer(__name__, config(tmp_path, dataset, seeds=2)).run()
    run = tmp_path / "run"
    train_rows = _csv(run / "train.csv")
    assert [(r["step"], r["seed"]) for r in train_rows] == [(str(s), str(v)) for s in (10, 20, 30, 40) for v in (0, 1)]
    for r in train_rows:
        assert float(r["training/actor_loss"]) > 0 and float(r["validation/actor_loss"]) > 0
        assert float(r["time/steps_per_second"]) > 0
    eval_rows = _csv(run / "eval.csv")
    assert [(r["step"], r["seed"]) for r in eval_rows] == [(str(s), str(v)) for s in (0, 20, 40) for v in (0, 1)]
    assert all(float(r["evaluation/length"]) > 0 for r in eval_rows)
    assert Checkpointer(str(run / "checkpoints")).all_steps() == [20, 40]
    summary = (run / "summary.md").read_text()
    for fragment in ("status: finished (step 40 of 40)", "preset paper", "seeds: 0, 1", "40 offline + 0 online",
                     dataset, "-val.npz", "| mean ± std |", "jax:", "ogbench:", '"lr": 0.05'):
        assert fragment in summary, fragment
    assert (run / "config.json").exists() and result.step == 40 and result.last_eval["step"] == 40


def test_training_mean_is_the_mean_over_the_log_interval(tmp_path, dataset, fakes):
    """The logged training metric is the device-side mean over all updates of the interval."""
    trainer = Trainer(__name__, config(tmp_path, dataset, steps=10, eval_episodes=0, updates_per_call=10))
    trainer.run()
    rows = _csv(tmp_path / "run" / "train.csv")
    # Re-run the 10 updates by hand and average their losses.
    sampler = Sampler.create(synthetic_data(20, seed=0))
    example = sampler.sample(jax.random.key(0), Config().batch_size, BATCH_SPEC.keys)
    state = init(seed_keys([0], 0)[0], example, Config())
    key, losses = seed_keys([0], 1)[0], []
    for _ in range(10):
        key, k_sample, k_update = jax.random.split(key, 3)
        state, m = update(state, sampler.sample(k_sample, Config().batch_size, BATCH_SPEC.keys), k_update)
        losses.append(float(m["actor_loss"]))
    np.testing.assert_allclose(float(rows[0]["training/actor_loss"]), np.mean(losses), rtol=1e-5)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, dataset, fakes):
    trainer = Trainer(__name__, config(tmp_path, dataset, steps=60, eval_episodes=0), Config(nan_at_step=25))
    with pytest.raises(TrainingDiverged, match=r"step 26 for seed 0 \(actor_loss, critic_loss\).*step 20\) is kept"):
        trainer.run()
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    assert checkpointer.all_steps() == [20]
    restored, meta = checkpointer.restore(trainer.carry)
    assert all(np.all(np.isfinite(x)) for x in leaves(restored.agent) if x.dtype.kind == "f")
    assert "status: diverged" in (tmp_path / "run" / "summary.md").read_text()


def test_replay_mix_proportions():
    offline = synthetic_data(10)
    sampler = Sampler.create(offline)
    buffer = ReplayBuffer.create(2, 100, (OBS_DIM,), jnp.float32, ACT_DIM)
    add = jax.jit(ReplayBuffer.add)
    for i in range(40):  # online observations are marked by a large negative first coordinate
        obs = jnp.full((2, OBS_DIM), -100.0 - i)
        transition = {"observations": obs, "next_observations": obs, "actions": jnp.zeros((2, ACT_DIM)),
                      "rewards": jnp.zeros(2), "masks": jnp.ones(2), "terminals": jnp.zeros(2)}
        buffer = add(buffer, transition)
    assert int(buffer.size) == 40 and int(buffer.pointer) == 40
    keys = seed_keys([0, 1], 9)
    fields = ("observations", "actions")
    mix = jax.jit(mixed_sample, static_argnums=(3, 4, 5, 6))
    balanced = mix(sampler, buffer, keys, 64, fields, True, ())
    assert balanced["observations"].shape == (2, 64, OBS_DIM)
    assert np.all(np.asarray(balanced["observations"][:, 32:, 0]) <= -100)  # second half online
    assert np.all(np.asarray(balanced["observations"][:, :32, 0]) > -100)
    uniform = mix(sampler, buffer, keys, 20000, fields, False, ())
    online_share = np.mean(np.asarray(uniform["observations"][..., 0]) <= -100)
    assert abs(online_share - 40 / (sampler.size + 40)) < 0.02  # uniform over offline + 40 online transitions
    scratch = mix(None, buffer, keys, 64, fields, False, ())
    assert np.all(np.asarray(scratch["observations"][..., 0]) <= -100)
    assert set(np.unique(np.asarray(scratch["observations"][..., 0]))) <= {-100.0 - i for i in range(40)}


def _reference_chunks(data, size, pointer, capacity, offset, h):
    """The chunk fields at insertion-order offset `offset`, step by step (numpy): rows offset .. offset+h-1, a step
    after an episode end or past the stored rows is invalid and repeats the last valid row."""
    oldest = (pointer - size) % capacity
    valid, rows = [], []
    for t in range(h):
        ok = offset + t < size and (t == 0 or (valid[-1] and data["terminals"][rows[-1]] < 0.5))
        valid.append(ok)
        rows.append((oldest + offset + t) % capacity if ok else rows[-1])
    return rows, np.asarray(valid, np.float32)


@pytest.mark.parametrize("wrapped", [False, True], ids=["filling", "wrapped"])
def test_replay_chunks_match_a_step_by_step_reference(wrapped):
    """Chunks from the online buffer: H stored steps from rows in insertion order (across the ring's wrap), cut at
    episode ends (valid 0 after, the last valid row repeated), never reading past the newest row."""
    h, capacity = 4, 23
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer.create(1, capacity, (OBS_DIM,), jnp.float32, ACT_DIM)
    add = jax.jit(ReplayBuffer.add)
    count = 37 if wrapped else 17
    for i in range(count):
        obs = jnp.full((1, OBS_DIM), float(i))
        buffer = add(buffer, {"observations": obs, "next_observations": obs + 0.5,
                              "actions": jnp.full((1, ACT_DIM), float(i)), "rewards": jnp.full(1, -float(i)),
                              "masks": jnp.ones(1), "terminals": jnp.full(1, float(rng.random() < 0.3))})
    fields = ("observations",) + CHUNK_FIELDS
    batch = jax.jit(buffer.sample_seed, static_argnums=(2, 3, 4))(
        jax.tree_util.tree_map(lambda x: x[0], buffer.data), jax.random.key(3), 400, fields, h)
    data = jax.tree_util.tree_map(lambda x: np.asarray(x[0]), buffer.data)
    batch = jax.tree_util.tree_map(np.asarray, batch)
    size, pointer = int(buffer.size), int(buffer.pointer)
    first_rows = {int(data["observations"][r, 0]): r for r in range(size)}
    oldest_index = count - size  # the transition index stored at insertion offset 0
    seen = set()
    for b in range(400):
        offset = int(batch["observations"][b, 0]) - oldest_index
        assert 0 <= offset <= size - h  # only rows whose h steps are all stored
        seen.add(offset)
        rows, valid = _reference_chunks(data, size, pointer, capacity, offset, h)
        assert first_rows[oldest_index + offset] == rows[0]
        np.testing.assert_array_equal(batch["valid_chunk"][b], valid)
        for f in ("actions", "rewards", "masks", "next_observations"):
            np.testing.assert_array_equal(batch[f + "_chunk"][b], data[f][rows])
    assert seen == set(range(size - h + 1))  # every eligible start is drawn (400 draws, <= 20 starts)
    assert 0 < np.mean(np.asarray(batch["valid_chunk"][:, -1])) < 1  # some chunks cross an episode end
    # Fewer stored rows than h (the first online steps): steps past the newest row are invalid.
    short = ReplayBuffer.create(1, capacity, (OBS_DIM,), jnp.float32, ACT_DIM)
    for i in range(2):
        obs = jnp.full((1, OBS_DIM), float(i))
        short = add(short, {"observations": obs, "next_observations": obs, "actions": jnp.zeros((1, ACT_DIM)),
                            "rewards": jnp.zeros(1), "masks": jnp.ones(1), "terminals": jnp.zeros(1)})
    few = short.sample_seed(jax.tree_util.tree_map(lambda x: x[0], short.data), jax.random.key(0), 8, fields, h)
    np.testing.assert_array_equal(few["valid_chunk"], np.tile([1.0, 1.0, 0.0, 0.0], (8, 1)))
    np.testing.assert_array_equal(few["next_observations_chunk"][:, :, 0], np.tile([0.0, 1.0, 1.0, 1.0], (8, 1)))


def _chunking_agent(h: int) -> types.ModuleType:
    """The tiny agent acting in chunks of h actions: row t of a chunk is (the policy's first action coordinate,
    a marker -0.9 + 0.3 t), so the replay buffer shows which chunk row each env step executed. It learns from the
    first step of each sampled chunk."""
    agent = types.ModuleType(f"chunking_agent_{h}")
    agent.__dict__.update({k: v for k, v in globals().items() if not k.startswith("__")})
    agent.BATCH_SPEC = BatchSpec(keys=("observations",) + CHUNK_FIELDS, chunk_size=h)

    def first_step(batch):
        return {"observations": batch["observations"], "actions": batch["actions_chunk"][:, 0],
                "rewards": batch["rewards_chunk"][:, 0], "masks": batch["masks_chunk"][:, 0],
                "next_observations": batch["next_observations_chunk"][:, 0]}

    agent.init = lambda key, example, config: init(key, first_step(example), config)
    agent.update = lambda state, batch, key: update(state, first_step(batch), key)
    agent.loss_metrics = lambda state, batch, key: loss_metrics(state, first_step(batch), key)

    def act_chunk(state, observations, key, deterministic=False):
        first = act(state, observations, key, deterministic)[..., :1]  # (batch, 1)
        markers = -0.9 + 0.3 * jnp.arange(h, dtype=jnp.float32)
        return jnp.stack([jnp.broadcast_to(first, first.shape[:-1] + (h,)),
                          jnp.broadcast_to(markers, first.shape[:-1] + (h,))], axis=-1)  # (batch, h, 2)

    agent.act = act_chunk
    return agent


def test_online_chunks_run_open_loop_restart_at_episode_ends_and_resume(tmp_path, dataset, fakes, monkeypatch):
    """Each seed executes its chunk row by row (markers 0, 1, 2, 0, ...) with the action chosen when the chunk was
    (one policy answer per chunk), and starts a new chunk with every episode. Stopped mid-chunk and mid-episode,
    the run resumes with its pending chunk and position and ends bit-identical to the uninterrupted run."""
    h, online_steps = 3, 30
    agent = _chunking_agent(h)
    kw = dict(seeds=2, steps=10, online_steps=online_steps, log_interval=5, save_interval=14, eval_episodes=0)
    straight = Trainer(agent, config(tmp_path, dataset, run_dir=str(tmp_path / "a"), **kw))
    straight.run()
    assert np.all(np.asarray(straight.carry.agent.step) == 10 + online_steps)  # updates from chunks of the mix
    assert straight.carry.pending_action.shape == (2, h, ACT_DIM)
    data = jax.tree_util.tree_map(np.asarray, straight.carry.buffer.data)
    for seed in range(2):
        position, chunk_first, ends = 0, None, 0
        for t in range(online_steps):
            action = data["actions"][seed, t]
            np.testing.assert_allclose(action[1], -0.9 + 0.3 * position, atol=1e-6)
            if position == 0:
                assert action[0] != chunk_first  # a fresh policy answer (noisy acting) starts every chunk
                chunk_first = action[0]
            assert action[0] == chunk_first  # open loop: the whole chunk came from one policy answer
            ended = data["terminals"][seed, t] > 0.5
            ends += ended
            position = 0 if ended or position == h - 1 else position + 1
        assert ends >= 3  # the restart at episode ends was exercised (episodes of at most 8 steps)

    resumed, killed = _run_killed_after_save_then_resume(agent, tmp_path, dataset, monkeypatch, kw, kill_step=28)
    assert any(p != 0 for p in killed["host"]["chunk_position"])  # killed mid-chunk
    assert_trees_equal(straight.carry, resumed.carry)
    assert straight.host == resumed.host


@pytest.mark.parametrize("balanced", [False, True])
def test_offline_to_online(tmp_path, dataset, fakes, balanced):
    cfg = config(tmp_path, dataset, seeds=2, steps=20, online_steps=30, balanced_sampling=balanced,
                 log_interval=10, save_interval=25)
    trainer = Trainer(__name__, cfg)
    trainer.run()
    assert np.all(np.asarray(trainer.carry.agent.step) == 50)  # one update per online step
    buffer = trainer.carry.buffer
    assert int(buffer.size) == 30
    rewards = np.asarray(buffer.data["rewards"])
    assert np.all(rewards <= 0) and np.all(rewards < 0)  # the env's rewards, stored per seed
    assert not np.array_equal(np.asarray(buffer.data["observations"][0]), np.asarray(buffer.data["observations"][1]))
    exploration = _csv(tmp_path / "run" / "exploration.csv")
    assert exploration and all(float(r["exploration/length"]) <= EPISODE_LENGTH for r in exploration)
    assert Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [25, 50]


def test_agent_online_config_rules_the_online_phase_only(tmp_path, dataset, fakes):
    """An agent's `online_config` (GFP's eta_online) takes over when the online phase starts: here it sets lr 0,
    which freezes the params online, so the offline-to-online run ends where the offline-only run ends."""
    switching = types.ModuleType("switching_agent")
    switching.__dict__.update({k: v for k, v in globals().items() if not k.startswith("__")})
    switching.online_config = lambda c: dataclasses.replace(c, lr=0.0)
    offline = Trainer(switching, config(tmp_path, dataset, run_dir=str(tmp_path / "a"), steps=10, eval_episodes=0))
    offline.run()
    o2o = Trainer(switching, config(tmp_path, dataset, run_dir=str(tmp_path / "b"), steps=10, online_steps=12,
                                    eval_episodes=0))
    o2o.run()
    assert np.all(np.asarray(o2o.carry.agent.step) == 22) and o2o.carry.agent.config.lr == 0.0
    assert_trees_equal(offline.carry.agent.params, o2o.carry.agent.params)
    record = json.loads((tmp_path / "b" / "config.json").read_text())
    assert record["agent_config"]["lr"] == 0.05 and record["agent_config_online"]["lr"] == 0.0


def test_online_from_scratch_with_warmup(tmp_path, fakes):
    cfg = config(tmp_path, None, steps=0, online_steps=30, warmup_steps=10, eval_episodes=1, eval_interval=30)
    trainer = Trainer(__name__, cfg)
    trainer.run()
    assert int(np.asarray(trainer.carry.agent.step)[0]) == 20  # no updates during the 10 warm-up steps
    assert trainer.dataset_info is None
    assert "dataset: none (online from scratch)" in (tmp_path / "run" / "summary.md").read_text()


def test_online_from_scratch_example_batch_has_the_replay_shapes(tmp_path, dataset, fakes):
    """Without a dataset the agent is initialised from a batch shaped as the online replay forms it: the same
    fields, shapes and dtypes as a dataset batch, chunk fields included."""
    agent = _chunking_agent(3)
    examples = []
    for data in (None, dataset):
        trainer = Trainer(agent, config(tmp_path, data, run_dir=str(tmp_path / str(len(examples))), steps=0 if
                                        data is None else 10, online_steps=10))
        trainer._setup_envs()
        trainer._setup_data()
        examples.append(trainer._example_batch())
    scratch, from_data = examples
    n = Config().batch_size
    assert scratch["actions_chunk"].shape == (n, 3, ACT_DIM) and scratch["valid_chunk"].shape == (n, 3)
    assert {k: (v.shape, v.dtype) for k, v in scratch.items()} == {k: (v.shape, v.dtype) for k, v in from_data.items()}


class _Killed(Exception):
    pass


def _run_killed_after_save_then_resume(agent, tmp_path, dataset, monkeypatch, kw, kill_step: int):
    """Train into tmp_path/b until the checkpoint of kill_step is written, stop there as a killed process would,
    then resume in a new Trainer to the end. Returns (the resumed Trainer, the killed checkpoint's metadata)."""
    real_save, killed = Checkpointer.save, {}

    def save_then_die(self, step, tree, meta):
        real_save(self, step, tree, meta)
        if step == kill_step:
            killed.update(meta)
            raise _Killed

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(_Killed):
        Trainer(agent, config(tmp_path, dataset, run_dir=str(tmp_path / "b"), **kw)).run()
    monkeypatch.setattr(Checkpointer, "save", real_save)
    resumed = Trainer(agent, config(tmp_path, dataset, run_dir=str(tmp_path / "b"), **kw))
    assert resumed.resuming
    resumed.run()
    return resumed, killed


def test_online_resume_is_bit_identical(tmp_path, dataset, fakes, monkeypatch):
    """An online run stopped right after a checkpoint, mid-episode, resumes by replaying the env's episode and
    ends exactly where the uninterrupted run ends."""
    kw = dict(seeds=2, steps=10, online_steps=40, log_interval=5, save_interval=13, eval_episodes=0)
    straight = Trainer(__name__, config(tmp_path, dataset, run_dir=str(tmp_path / "a"), **kw))
    straight.run()

    # killed after 16 online steps: both envs are mid-episode (length 8 unless success)
    resumed, _ = _run_killed_after_save_then_resume(__name__, tmp_path, dataset, monkeypatch, kw, kill_step=26)
    assert_trees_equal(straight.carry, resumed.carry)
    assert straight.host == resumed.host
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    for name in ("train.csv", "exploration.csv"):
        assert strip(_csv(tmp_path / "a" / name)) == strip(_csv(tmp_path / "b" / name))


def test_run_dir_with_another_config_is_refused(tmp_path, dataset, fakes):
    Trainer(__name__, config(tmp_path, dataset, steps=10, eval_episodes=0)).run()
    from fluxrl.errors import FluxrlError

    with pytest.raises(FluxrlError, match=r"different configuration \(--seed: saved 0, given 5\)"):
        Trainer(__name__, config(tmp_path, dataset, steps=10, eval_episodes=0, seed=5))
    with pytest.raises(FluxrlError, match=r"--agent.lr: saved 0.05, given 0.1"):
        Trainer(__name__, config(tmp_path, dataset, steps=10, eval_episodes=0), Config(lr=0.1))
    # An online run keeps its length.
    online = tmp_path / "online"
    Trainer(__name__, config(online, dataset, steps=10, online_steps=10, eval_episodes=0)).run()
    with pytest.raises(FluxrlError, match=r"--steps: saved 10, given 20"):
        Trainer(__name__, config(online, dataset, steps=20, online_steps=10, eval_episodes=0))
    # Runtime options may change: this resumes (and, being finished, does nothing).
    again = Trainer(__name__, config(tmp_path, dataset, steps=10, eval_episodes=0, tensorboard=True))
    assert again.resuming


def test_progress_prints_summary_lines_without_a_tty():
    import io

    from fluxrl.train.loggers import Progress

    stream = io.StringIO()
    progress = Progress(total=100, initial=0, quiet=False, stream=stream)
    progress.set_eval("eval success 0.5 @ 50")
    progress.line(50, 0.4, {"training/critic_loss": 0.25})
    progress.line(100, 0.4, {})
    progress.close()
    assert stream.getvalue() == ("step 50/100 | 0.4 steps/s | ETA 2m05s | critic_loss 0.25 | eval success 0.5 @ 50\n"
                                 "step 100/100 | 0.4 steps/s | eval success 0.5 @ 50\n")
    from fluxrl.train.loggers import _duration

    assert [_duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 3 * 3600 + 5 * 60 + 59)] == [
        "0s", "1m00s", "1m01s", "59m59s", "1h00m", "3h05m"]
    quiet = io.StringIO()
    Progress(total=100, initial=0, quiet=True, stream=quiet).line(50, 1.0, {})
    assert quiet.getvalue() == ""


def test_wandb_sink_logs_per_seed_and_mean(tmp_path, monkeypatch):
    """The W&B adapter against a stand-in module (wandb itself is an optional extra)."""
    from fluxrl.train.loggers import WandbSink

    logged, inits = [], []
    run = types.SimpleNamespace(log=lambda payload, step: logged.append((step, payload)), finish=lambda: None)
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or run, Settings=lambda **kw: kw)
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = WandbSink(str(tmp_path), "proj", "name", {"a": 1}, "id1")
    sink.write("train", 10, [{"seed": 0, "training/loss": 1.0}, {"seed": 1, "training/loss": 3.0}])
    sink.close()
    assert inits[0]["mode"] == "offline" and inits[0]["resume"] == "allow" and inits[0]["id"] == "id1"
    assert inits[0]["settings"] is None
    WandbSink(str(tmp_path), "proj", "name", {"a": 1}, "id2", quiet=True)
    assert inits[1]["settings"] == {"quiet": True}  # --quiet: no run summary from W&B either
    assert logged == [(10, {"seed_0/training/loss": 1.0, "seed_1/training/loss": 3.0, "training/loss": 2.0})]


def _registered_agents():
    import fluxrl.agents as agents

    registry = getattr(agents, "REGISTRY", None)
    return sorted(registry) if registry is not None else list(agents.names())


@pytest.mark.slow
@pytest.mark.parametrize("name", _registered_agents())
def test_registered_agent_offline_to_online_export_and_load(name, tmp_path, dataset, fakes):
    """Every registered agent (tiny networks) through the engine: offline, online, checkpoint, export, load."""
    from fluxrl.train import export_policy, load_policy
    from fluxrl.train.config import preset_config, resolve_agent
    from fluxrl.train.engine import agent_batch_spec, make_act

    agent = resolve_agent(name)
    agent_config = preset_config(agent, "cpu", TASK)
    tiny_nets = {f.name: (16, 16) for f in dataclasses.fields(agent_config)
                 if isinstance(getattr(agent_config, f.name), tuple)
                 and all(isinstance(x, int) for x in getattr(agent_config, f.name))}
    agent_config = dataclasses.replace(agent_config, batch_size=16, **tiny_nets)
    spec = agent_batch_spec(agent, agent_config)
    check_online_fields(tuple(spec.keys))  # every agent trains online (QAM: H = 5) but those conditioned on a_prev
    online_steps = 0 if spec.previous_action else 5
    if getattr(agent_config, "obs_norm", "none") != "none":
        agent_config = dataclasses.replace(agent_config, obs_norm="none")
    cfg = config(tmp_path, dataset, seeds=2, steps=10, online_steps=online_steps, log_interval=5,
                 eval_interval=10 + online_steps, eval_episodes=1, save_interval=10 + online_steps)
    trainer = Trainer(name, cfg, agent_config)
    trainer.run()
    assert np.all(np.asarray(trainer.carry.agent.step) == 10 + online_steps)
    rows = _csv(tmp_path / "run" / "train.csv")
    assert rows and all(np.isfinite(float(v)) for r in rows for k, v in r.items() if k.startswith("training/"))
    policy = load_policy(export_policy(str(tmp_path / "run"), seed=1))
    obs_dim = OBS_DIM + (ACT_DIM if spec.previous_action else 0)  # (s, a_prev) observations: SFP
    obs = np.random.default_rng(0).uniform(-1, 1, (4, obs_dim)).astype(np.float32)
    state = jax.tree_util.tree_map(lambda x: x[1], trainer.carry.agent)
    expected = make_act(agent, True)(state, jnp.asarray(obs), jax.random.key(0))
    np.testing.assert_allclose(np.asarray(policy(obs)), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(np.asarray(policy(obs))) <= 1.0)


def test_dataset_actions_are_clipped_just_inside_the_bounds(tmp_path, fakes):
    """As the official loaders: actions at ±1 would give degenerate flow/tanh targets."""
    data = synthetic_data(20)
    assert len(data["actions"]) > 20
    data["actions"][:5], data["actions"][5:10] = 1.0, -1.0
    inside = data["actions"][10:].copy()
    path = str(tmp_path / "edge.npz")
    save_npz(path, data)
    trainer = Trainer(__name__, config(tmp_path, path, eval_episodes=0))
    trainer._setup_envs()
    loaded, _ = trainer._load(path)
    edge = np.float32(1 - 1e-5)
    assert np.abs(loaded["actions"]).max() == edge
    assert np.sum(np.all(loaded["actions"] == edge, axis=1)) == 5
    assert np.sum(np.all(loaded["actions"] == -edge, axis=1)) == 5
    assert np.isin(inside, loaded["actions"]).all()  # the others are untouched
