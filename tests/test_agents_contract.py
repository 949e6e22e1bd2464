"""The agent contract, checked on every registered agent with tiny networks: shapes, jit, vmap over seeds,
scan == sequential updates, determinism, action bounds, serialisation; plus presets and per-task values."""

import dataclasses

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxrl import agents
from fluxrl.agents.base import AgentState, BatchSpec
from fluxrl.data.sampler import KNOWN_FIELDS
from fluxrl.errors import FluxrlError

OBS_DIM, ACT_DIM, BATCH = 5, 3, 8


def tiny_config(module):
    """The cpu preset with 2x16 networks (every *_hidden field)."""
    config = module.PRESETS["cpu"]
    hidden = {f.name: (16, 16) for f in dataclasses.fields(config) if f.name.endswith("_hidden")}
    return dataclasses.replace(config, batch_size=BATCH, **hidden)


def make_batch(keys, seed=0, batch=BATCH, chunk_size=1):
    rng = np.random.default_rng(seed)
    full = {
        "actions_chunk": rng.uniform(-1, 1, (batch, chunk_size, ACT_DIM)),
        "observations": rng.normal(size=(batch, OBS_DIM)),
        "next_observations": rng.normal(size=(batch, OBS_DIM)),
        "actions": rng.uniform(-1, 1, (batch, ACT_DIM)),
        "next_actions": rng.uniform(-1, 1, (batch, ACT_DIM)),
        "rewards": rng.normal(size=batch),
        "masks": (rng.uniform(size=batch) > 0.2).astype(float),
        "terminals": np.zeros(batch),
    }
    return {k: jnp.asarray(full[k], jnp.float32) for k in keys}


def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


class Setup:
    def __init__(self, name):
        self.name = name
        self.module = agents.get(name)
        self.config = tiny_config(self.module)
        spec = self.module.batch_spec(self.config) if hasattr(self.module, "batch_spec") else self.module.BATCH_SPEC
        self.batch = make_batch(spec.keys, chunk_size=spec.chunk_size)  # exactly the declared fields
        # The rows act returns per observation: SFP streams a chunk of action_horizon actions.
        self.act_shape = (BATCH, self.config.action_horizon, ACT_DIM) if name == "sfp" else (BATCH, ACT_DIM)
        # init runs eagerly: its many small random ops compile once and are cached across agents, which is
        # cheaper than compiling each agent's whole init graph.
        self.init = self.module.init
        self.update = jax.jit(self.module.update)
        self.act = jax.jit(self.module.act)
        self.state = self.init(jax.random.key(0), self.batch, self.config)
        # K updates fused with lax.scan, as the engine runs them.
        self._scan = jax.jit(lambda s, b, ks: jax.lax.scan(lambda c, k: self.module.update(c, b, k), s, ks))

    def run(self, state, keys):
        return self._scan(state, self.batch, keys)


@pytest.fixture(scope="module", params=agents.names())
def setup(request):
    return Setup(request.param)


# --- module-level contract ---------------------------------------------------------------------------------


def test_module_declares_the_contract(setup):
    m = setup.module
    assert m.NAME == setup.name
    assert dataclasses.is_dataclass(m.Config) and m.Config.__dataclass_params__.frozen
    assert {"paper", "cpu"} <= set(m.PRESETS)
    for preset in m.PRESETS.values():
        assert isinstance(preset, m.Config)
        hash(preset)  # static argument of jit: must be hashable
        assert all(not isinstance(getattr(preset, f.name), list) for f in dataclasses.fields(preset))
    assert m.PRESETS["paper"] == m.Config()  # the paper preset is the official defaults
    assert isinstance(m.BATCH_SPEC, BatchSpec) and set(m.BATCH_SPEC.keys) <= set(KNOWN_FIELDS)
    assert {"observations", "actions"} <= set(m.BATCH_SPEC.keys)
    assert isinstance(m.EVAL_DETERMINISTIC, bool)
    assert m.for_task(m.PRESETS["paper"], "no-such-task", "paper") == m.PRESETS["paper"]
    assert m.for_task(m.PRESETS["cpu"], None, "cpu") == m.PRESETS["cpu"]
    with pytest.raises(FluxrlError, match="preset"):
        m.for_task(m.PRESETS["paper"], None, "huge")
    if hasattr(m, "PER_TASK_FIELDS"):
        assert set(m.PER_TASK_FIELDS) <= {f.name for f in dataclasses.fields(m.Config)}
        assert isinstance(m.TASK_VALUES, dict)


def test_paper_defaults_are_the_official_ones(setup):
    """The FQL-codebase defaults (FPMD, from another codebase, is checked in tests/test_fpmd.py)."""
    if setup.name in ("fpmd", "sfp"):
        pytest.skip("FPMD's and SFP's official defaults come from other codebases (tests/test_fpmd.py, test_sfp.py)")
    paper = setup.module.PRESETS["paper"]
    assert paper.lr == 3e-4 and paper.batch_size == 256
    assert paper.actor_hidden == (512, 512, 512, 512)
    if hasattr(paper, "critic_hidden"):
        assert paper.critic_hidden == (512, 512, 512, 512) and paper.critic_layer_norm
        assert paper.discount == 0.99 and paper.tau == 0.005
    assert not paper.actor_layer_norm


# --- init / update / act -----------------------------------------------------------------------------------


def test_init_update_shapes_and_finite_metrics(setup):
    state = setup.state
    assert isinstance(state, AgentState) and state.action_dim == ACT_DIM and int(state.step) == 0
    s1, metrics = setup.update(state, setup.batch, jax.random.key(1))
    s2, _ = setup.update(s1, setup.batch, jax.random.key(2))
    assert int(s2.step) == 2
    assert metrics and all(k.count("/") == 1 for k in metrics)  # namespaced like "critic/critic_loss"
    for k, v in metrics.items():
        assert v.shape == () and np.isfinite(v), k
    # The state keeps its structure, shapes and dtypes (a scan carry must).
    assert jax.tree_util.tree_structure(s2) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(s2)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # Every trained module moves within max(2, actor_freq) updates (ReBRAC's actor first moves on the second,
    # InFOM's on its actor_freq-th), or, if it is trained only online, within two online-phase updates.
    moved = s2
    for i in range(2, max(2, getattr(setup.config, "actor_freq", 1))):
        moved, _ = setup.update(moved, setup.batch, jax.random.key(i + 1))
    still = [name for name in state.params if leaves_equal(state.params[name], moved.params[name])]
    if still and hasattr(setup.module, "online_config"):  # modules trained only online (SWFP's blocks)
        online = moved.replace(config=setup.module.online_config(moved.config))
        moved, _ = setup.update(setup.update(online, setup.batch, jax.random.key(7))[0], setup.batch,
                                jax.random.key(8))
        still = [name for name in still if leaves_equal(state.params[name], moved.params[name])]
    assert not still, still


def test_init_rejects_a_batch_without_actions(setup):
    batch = {k: v for k, v in setup.batch.items() if k != "actions"}
    with pytest.raises(FluxrlError, match="actions"):
        setup.module.init(jax.random.key(0), batch, setup.config)


def test_same_key_same_result(setup):
    a, ma = setup.update(setup.state, setup.batch, jax.random.key(3))
    b, mb = setup.update(setup.state, setup.batch, jax.random.key(3))
    assert leaves_equal(a, b) and leaves_equal(ma, mb)
    again = setup.init(jax.random.key(0), setup.batch, setup.config)
    assert leaves_equal(again, setup.state)


def test_vmap_over_seeds_and_loss_metrics(setup):
    """init, update, loss_metrics and act vmapped over 3 seeds, as the engine runs them."""
    m = setup.module

    @jax.jit
    def seeds(states, step_keys, batch):
        validation = jax.vmap(m.loss_metrics, in_axes=(0, None, 0))(states, batch, step_keys)
        new, metrics = jax.vmap(m.update, in_axes=(0, None, 0))(states, batch, step_keys)
        actions = jax.vmap(m.act, in_axes=(0, None, 0, None))(new, batch["observations"], step_keys, False)
        return new, metrics, validation, actions

    init_keys, step_keys = jax.random.split(jax.random.key(5), 3), jax.random.split(jax.random.key(6), 3)
    # vmapped init runs eagerly: compiling batched random initialisers costs more than running them.
    states = jax.vmap(m.init, in_axes=(0, None, None))(init_keys, setup.batch, setup.config)
    new, metrics, validation, actions = seeds(states, step_keys, setup.batch)
    assert actions.shape == (3,) + setup.act_shape
    assert all(v.shape == (3,) and np.all(np.isfinite(v)) for v in metrics.values())
    p0, p1 = (jax.tree_util.tree_map(lambda x, i=i: x[i], new.params) for i in (0, 1))
    assert not leaves_equal(p0, p1)  # seeds differ
    # loss_metrics gives update's metrics (those of the pre-update parameters) without touching the state, plus
    # any validation-only diagnostics (InFOM's intention effect).
    assert set(metrics) <= set(validation)
    for k in metrics:
        np.testing.assert_allclose(validation[k], metrics[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # Seed 1 of the vmapped run is the unbatched run with seed 1's keys.
    seed1 = setup.init(init_keys[1], setup.batch, setup.config)
    single, single_metrics = setup.update(seed1, setup.batch, step_keys[1])
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(new)):
        np.testing.assert_allclose(a, b[1], rtol=1e-5, atol=1e-6)
    for k in metrics:
        np.testing.assert_allclose(single_metrics[k], metrics[k][1], rtol=1e-5, atol=1e-6, err_msg=k)


def test_scan_of_updates_equals_sequential_updates(setup):
    """Two scanned chunks of 2 updates (as a resumed run executes them) against 4 single updates.

    XLA may round a fused loop body differently from a stand-alone step (measured: 1 ulp in IQL's Adam moments
    after 2 steps; bit-identical for the other agents), so the comparison is to float32 precision. The scanned
    chunks themselves are deterministic, checked by running the second chunk twice."""
    keys = jax.random.split(jax.random.key(7), 4)
    state, seq_metrics = setup.state, []
    for k in keys:
        state, m = setup.update(state, setup.batch, k)
        seq_metrics.append(m)
    first, first_metrics = setup.run(setup.state, keys[:2])
    fused, second_metrics = setup.run(first, keys[2:])
    assert int(fused.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(fused)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for i, m in enumerate(seq_metrics):
        chunk = first_metrics if i < 2 else second_metrics
        for k in m:
            np.testing.assert_allclose(m[k], chunk[k][i % 2], rtol=1e-5, atol=1e-6, err_msg=k)
    again, _ = setup.run(first, keys[2:])
    assert leaves_equal(again, fused)


def test_act_shapes_bounds_and_determinism(setup):
    state, _ = setup.update(setup.state, setup.batch, jax.random.key(8))
    obs = setup.batch["observations"] * 100.0  # far outside the data: raw outputs leave [-1, 1]
    for deterministic in (False, True):
        a = setup.act(state, obs, jax.random.key(9), deterministic)
        assert a.shape == setup.act_shape and a.dtype == jnp.float32
        assert float(jnp.abs(a).max()) <= 1.0
    det = setup.act(state, setup.batch["observations"], jax.random.key(10), True)
    np.testing.assert_array_equal(det, setup.act(state, setup.batch["observations"], jax.random.key(11), True))
    sto = setup.act(state, setup.batch["observations"], jax.random.key(10), False)
    assert not np.array_equal(sto, setup.act(state, setup.batch["observations"], jax.random.key(11), False))


def test_serialisation_round_trip(setup):
    state, _ = setup.update(setup.state, setup.batch, jax.random.key(13))
    blob = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(state))
    template = setup.init(jax.random.key(99), setup.batch, setup.config)
    restored = flax.serialization.from_state_dict(template, flax.serialization.msgpack_restore(blob))
    assert leaves_equal(restored, state)
    obs = setup.batch["observations"]
    for deterministic in (False, True):
        np.testing.assert_array_equal(
            setup.act(restored, obs, jax.random.key(14), deterministic),
            setup.act(state, obs, jax.random.key(14), deterministic),
        )
    a, _ = setup.update(restored, setup.batch, jax.random.key(15))
    b, _ = setup.update(state, setup.batch, jax.random.key(15))
    assert leaves_equal(a, b)


# --- registry, presets, per-task values --------------------------------------------------------------------


def test_registry():
    assert set(agents.names()) >= {"bc", "iql", "rebrac", "flow_bc", "fql"}
    with pytest.raises(FluxrlError, match="Unknown agent 'nope'"):
        agents.get("nope")
    with pytest.raises(FluxrlError, match="no config field 'alpah'"):
        agents.make_config("fql", "cpu", alpah=3.0)
    with pytest.raises(FluxrlError, match="preset"):
        agents.make_config("fql", "tiny")
    config = agents.make_config("fql", "cpu", actor_hidden=[32, 32], alpha=3.0)
    assert config.actor_hidden == (32, 32) and config.alpha == 3.0 and config.critic_hidden == (256, 256)
    hash(config)


@pytest.mark.parametrize(
    "agent, task, expected",
    [
        ("fql", "cube-single-play-singletask-task2", {"alpha": 300.0, "q_agg": "mean", "discount": 0.99}),
        ("fql", "cube-double-play-singletask", {"alpha": 300.0}),
        ("fql", "scene-play-singletask-task1-v0", {"alpha": 300.0}),
        ("fql", "puzzle-3x3-play-singletask-task4", {"alpha": 1000.0}),
        ("fql", "puzzle-4x4-play-singletask-task1", {"alpha": 1000.0}),
        ("fql", "antmaze-large-navigate-singletask-task1", {"alpha": 10.0, "q_agg": "min", "discount": 0.99}),
        ("fql", "antmaze-giant-navigate-singletask-task3", {"alpha": 10.0, "q_agg": "min", "discount": 0.995}),
        ("fql", "humanoidmaze-medium-navigate-singletask", {"alpha": 30.0, "discount": 0.995}),
        ("fql", "visual-cube-double-play-singletask-task1", {"alpha": 100.0}),
        ("fql", "antmaze-large-play-v2", {"alpha": 3.0}),
        ("fql", "antmaze-umaze-diverse-v2", {"alpha": 10.0}),
        ("fql", "pen-expert-v1", {"alpha": 3000.0, "q_agg": "min"}),
        ("fql", "cube-double-noisy-singletask-task2", {"alpha": 10.0}),  # not in the paper: defaults
        ("fql", "walker-walk", {"alpha": 10.0, "discount": 0.99}),
        ("iql", "humanoidmaze-medium-navigate-singletask", {"alpha": 10.0, "discount": 0.995}),
        ("iql", "visual-cube-single-play-singletask-task1", {"alpha": 1.0}),
        ("rebrac", "humanoidmaze-medium-navigate-singletask", {"alpha_actor": 0.01, "alpha_critic": 0.01}),
        ("rebrac", "visual-cube-single-play-singletask-task1", {"alpha_actor": 1.0, "alpha_critic": 0.0}),
        ("rebrac", "cube-single-play-singletask-task2", {"alpha_actor": 1.0, "alpha_critic": 1.0}),
        ("rebrac", "cheetah-run-backward", {"alpha_actor": 0.1, "alpha_critic": 0.1}),
        ("rebrac", "walker-stand", {"alpha_actor": 0.0, "alpha_critic": 0.0}),  # none published: defaults
        ("iql", "cube-single-play-singletask-task5", {"alpha": 1.0}),
        ("flowq", "cube-single-play-singletask-task2", {"lam": 1.0}),  # IQL's alpha of the task
        ("flowq", "humanoidmaze-medium-navigate-singletask", {"lam": 10.0, "discount": 0.995}),
        ("flowq", "walker-stand", {"lam": 10.0}),
        ("iql", "cheetah-walk", {"alpha": 1.0}),
    ],
)
def test_per_task_paper_values(agent, task, expected):
    for preset in ("paper", "cpu"):  # alpha depends on the task's reward scale, not on network size
        config = agents.make_config(agent, preset, task)
        assert {k: getattr(config, k) for k in expected} == expected, (preset, task)


@pytest.mark.parametrize(
    "agent, task, overrides, expected",
    [
        ("rebrac", "scene-play-singletask-task2", {}, {"alpha_actor": 0.0, "alpha_critic": 0.0}),
        ("rebrac", "scene-play-singletask-task2", {"alpha_actor": 0.3}, {"alpha_critic": 0.0}),  # given: not named
        ("rebrac", "cube-single-play-singletask-task2", {}, {}),
        ("fql", "puzzle-4x4-play-singletask-task1", {}, {}),
        ("fql", "pointmaze-medium-navigate-singletask-task3", {}, {"alpha": 10.0}),
        ("fql", "cube-double-noisy-singletask-task2", {}, {"alpha": 10.0}),
        ("qam", "cube-single-play-singletask-task2", {}, {"inv_temp": 0.3}),  # QAM's domains omit cube-single
        ("gfp", "walker-run", {}, {"alpha": 1.0, "eta": 0.001}),
        ("infom", "puzzle-3x3-play-singletask-task1", {}, {"kl_weight": 0.01, "expectile": 0.9, "alpha": 10.0}),
        ("infom_gpi", "walker-stand", {}, {}),
        ("bc", "scene-play-singletask-task2", {}, {}),
    ],
)
def test_per_task_fields_left_at_the_defaults(agent, task, overrides, expected):
    from fluxrl.train.config import defaulted_task_values, preset_config

    module = agents.get(agent)
    config = dataclasses.replace(preset_config(module, "paper", task), **overrides)
    assert defaulted_task_values(module, config, "paper", task) == expected


@pytest.mark.parametrize(
    "task, offline, online",
    [
        ("humanoidmaze-medium-navigate-singletask", 30.0, 100.0),
        ("antsoccer-arena-navigate-singletask-task1", 10.0, 30.0),
        ("cube-double-play-singletask-task2", 300.0, 300.0),
        ("puzzle-4x4-play-singletask-task1", 1000.0, 1000.0),
        ("antmaze-large-play-v2", 3.0, 3.0),
        ("pen-cloned-v1", 10000.0, 1000.0),
        ("door-cloned-v1", 30000.0, 1000.0),
        ("relocate-cloned-v1", 30000.0, 10000.0),
    ],
)
def test_fql_offline_to_online_alpha_table(task, offline, online):
    """FQL's README uses other alphas for offline-to-online runs; the engine asks for them when online_steps > 0."""
    from fluxrl.train.config import preset_config

    fql = agents.get("fql")
    assert preset_config(fql, "paper", task).alpha == offline
    assert preset_config(fql, "paper", task, online=True).alpha == online
    assert preset_config(agents.get("iql"), "paper", task, online=True) == preset_config(agents.get("iql"), "paper", task)
