"""GFP against closed forms and the official code's formulas: the sinusoidal time embedding, TD targets for every
target_agg (flow action at s' by default, at s with the official flag), the guidance weights, gradient routing,
the bimodal bandit where the guidance moves the policy to the better mode inside the data, per-task values, bad
configs and the CLI end to end. Measured numbers are in docs/gfp.md."""

import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxrl.agents import gfp
from fluxrl.cli_train import main
from fluxrl.errors import FluxrlError
from fluxrl.flows import flow_matching_errors
from fluxrl.train import external, load_policy
from fluxrl.nn import sinusoidal_embedding

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_engine as tiny  # noqa: E402


def tiny_config(**changes):
    return dataclasses.replace(gfp.PRESETS["cpu"], actor_hidden=(8, 8), critic_hidden=(8, 8), **changes)


def random_batch(n=16, obs_dim=4, act_dim=2, seed=0):
    rng = np.random.default_rng(seed)
    batch = {
        "observations": rng.normal(size=(n, obs_dim)), "next_observations": rng.normal(size=(n, obs_dim)),
        "actions": rng.uniform(-0.9, 0.9, (n, act_dim)), "rewards": rng.normal(size=n),
        "masks": (np.arange(n) % 3 != 0).astype(float),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}


def shifted(tree, delta):
    return jax.tree_util.tree_map(lambda x: x + delta, tree)


# --- networks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [64, 7])
def test_sinusoidal_embedding_is_the_official_formula(dim):
    t = np.array([[0.0], [0.3], [1.0]], np.float32)
    half = dim // 2
    freqs = np.exp(np.arange(half) * -math.log(10000.0) / (half - 1))
    expected = np.concatenate([np.sin(t * freqs), np.cos(t * freqs)], axis=-1)
    if dim % 2:
        expected = np.concatenate([expected, np.zeros((3, 1))], axis=-1)
    np.testing.assert_allclose(sinusoidal_embedding(jnp.asarray(t), dim), expected, rtol=1e-5, atol=1e-6)


def test_vabc_flow_sees_time_only_through_the_embedding():
    """The first Dense layer's input is concat(s, x, emb(t)): obs_dim + act_dim + 64 rows."""
    config = tiny_config()
    state = gfp.init(jax.random.key(0), random_batch(), config)
    first = state.params["vabc"]["MLP_0"]["Dense_0"]["kernel"]
    assert first.shape == (4 + 2 + 64, 8)
    assert state.params["actor"]["MLP_0"]["Dense_0"]["kernel"].shape == (4 + 2, 8)  # one-step actor: no time


# --- TD targets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_agg", gfp.ACTION_AGGS)
@pytest.mark.parametrize("at_next, q_agg", [(True, "mean"), (False, "min")])
def test_td_target(target_agg, at_next, q_agg):
    """y = r + gamma mask target_agg(Qbar(s', clip(mu(s', z'))), Qbar(s', clip(Euler_K(v, s' or s, z')))),
    Qbar = q_agg over the target critics, one z' for both; recomputed from the networks' outputs."""
    config = tiny_config(target_agg=target_agg, target_flow_at_next=at_next, q_agg=q_agg, discount=0.9)
    batch = random_batch()
    state = gfp.init(jax.random.key(0), batch, config)
    target = shifted(state.params["critic"], 0.3)
    p, key = state.params, jax.random.key(1)
    loss, _ = gfp.critic_loss(p["critic"], target, p["actor"], p["vabc"], batch, key, config)

    obs, next_obs = batch["observations"], batch["next_observations"]
    z = jax.random.normal(key, batch["actions"].shape)
    actor_next = np.clip(gfp.actor_actions(p["actor"], next_obs, z, config), -1, 1)
    flow_next = gfp.flow_actions(p["vabc"], next_obs if at_next else obs, z, config)

    def qbar(actions):
        qs = np.asarray(gfp.critic_values(target, next_obs, actions, config), np.float64)
        return qs.min(0) if q_agg == "min" else qs.mean(0)

    q_actor, q_flow = qbar(actor_next), qbar(flow_next)
    agg = {"actor": q_actor, "vabc": q_flow, "min": np.minimum(q_actor, q_flow), "max": np.maximum(q_actor, q_flow),
           "mean": 0.5 * (q_actor + q_flow)}[target_agg]
    y = np.asarray(batch["rewards"]) + 0.9 * np.asarray(batch["masks"]) * agg
    q = np.asarray(gfp.critic_values(p["critic"], obs, batch["actions"], config))
    assert float(loss) == pytest.approx(float(np.mean((q - y) ** 2)), rel=1e-5)
    if target_agg != "actor":  # the flag changes the target (the flow action depends on its state)
        other = dataclasses.replace(config, target_flow_at_next=not at_next)
        assert float(gfp.critic_loss(p["critic"], target, p["actor"], p["vabc"], batch, key, other)[0]) != float(loss)


# --- guidance -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_fn", gfp.GUIDANCE_FNS)
@pytest.mark.parametrize("guidance_agg", ["actor", "min"])
def test_guidance_weights(guidance_fn, guidance_agg):
    """softmax: w = 1 / (1 + exp(kappa (Q_ref - Q_data))); advantage: exp(kappa (Q_data - Q_ref)); kappa = lam/eta;
    Q from the target critics (q_agg), Q_ref of the actor action or min with the flow action."""
    config = tiny_config(guidance_fn=guidance_fn, guidance_agg=guidance_agg, eta=0.5)
    batch = random_batch()
    state = gfp.init(jax.random.key(0), batch, config)
    target = shifted(state.params["critic"], 0.1)
    rng = np.random.default_rng(3)
    actor_acts, flow_acts = (jnp.asarray(rng.uniform(-1, 1, (16, 2)), jnp.float32) for _ in range(2))
    lam = 0.7
    weights, _ = gfp.guidance_weights(target, batch, actor_acts, flow_acts, lam, config)

    def qbar(actions):
        return np.asarray(gfp.critic_values(target, batch["observations"], actions, config), np.float64).mean(0)

    q_ref = qbar(actor_acts) if guidance_agg == "actor" else np.minimum(qbar(actor_acts), qbar(flow_acts))
    kappa = lam / 0.5
    diff = kappa * (qbar(batch["actions"]) - q_ref)
    expected = 1.0 / (1.0 + np.exp(-diff)) if guidance_fn == "softmax" else np.exp(diff)
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-6)


def test_softmax_weights_stay_finite_at_tiny_eta():
    """kappa = lam / eta reaches 1e5 and more: the logsumexp form gives 0/1 weights, never NaN."""
    config = tiny_config(eta=1e-6)
    batch = random_batch()
    state = gfp.init(jax.random.key(0), batch, config)
    weights, _ = gfp.guidance_weights(state.params["critic"], batch, batch["actions"][::-1], batch["actions"], 1.0,
                                      config)
    assert np.all(np.isfinite(weights)) and np.all((weights >= 0) & (weights <= 1))


def test_zero_eta_is_plain_flow_matching():
    """eta = 0: L_VaBC = the unweighted flow-matching loss (FQL's BC flow), same draws."""
    batch = random_batch()
    config = tiny_config(eta=0.0)
    state = gfp.init(jax.random.key(0), batch, config)
    p = state.params
    key = jax.random.key(2)
    _, info = gfp.actor_loss(p["vabc"], p["actor"], p["vabc"], p["critic"], p["critic"], batch, key, config)
    flow_key = jax.random.split(key)[1]
    errors = flow_matching_errors(
        lambda s, x, t: gfp.vabc_velocity(p["vabc"], s, x, t, config), batch["observations"], batch["actions"], flow_key
    )
    assert float(info["vabc_loss"]) == pytest.approx(float(errors.mean()), rel=1e-6)
    assert "guidance" not in info


# --- gradient routing ---------------------------------------------------------------------------------------

ROUTES = {
    "critic/critic_loss": {"critic"},  # next actions (actor and flow) are constants of the TD target
    "actor/vabc_loss": {"vabc"},  # the guidance weights are constants
    "actor/distill_loss": {"actor"},  # the flow gets nothing from distillation
    "actor/q_loss": {"actor"},  # the critic gets nothing from the actor's Q term
}


@pytest.mark.parametrize("target_agg", ["actor", "mean"])
def test_gradient_routing(target_agg):
    config = tiny_config(target_agg=target_agg, guidance_agg="min", eta=0.5)
    batch = random_batch()
    state = gfp.init(jax.random.key(0), batch, config)
    state = state.replace(target_params=shifted(state.target_params, 0.05))
    names = list(ROUTES)

    def selected(params):
        metrics = gfp.total_loss(params, state, batch, jax.random.key(1))[1]
        return jnp.stack([metrics[k] for k in names])

    jacobian = jax.jit(jax.jacrev(selected))(state.params)
    for i, metric in enumerate(names):
        for group in state.params:
            norm = sum(float(jnp.abs(g[i]).sum()) for g in jax.tree_util.tree_leaves(jacobian[group]))
            if group in ROUTES[metric]:
                assert norm > 0, f"{metric} gives no gradient to {group}"
            else:
                assert norm == 0, f"{metric} leaks gradient {norm} into {group}"


# --- analytic: a bimodal bandit -----------------------------------------------------------------------------

MODES = np.array([-0.5, 0.5], np.float32)
MODE_STD = 0.1


def bandit_q(actions):
    return 1.0 - (actions[..., 0] - 0.5) ** 2  # prefers the +0.5 mode (Q = 1 there, 0 at the other mode)


def bandit_batch(key, n=256):
    mode_key, noise_key = jax.random.split(key)
    actions = jnp.asarray(MODES)[jax.random.randint(mode_key, (n,), 0, 2)][:, None]
    actions = jnp.clip(actions + MODE_STD * jax.random.normal(noise_key, (n, 1)), -1.0, 1.0)
    obs = jnp.zeros((n, 1))
    return {"observations": obs, "next_observations": obs, "actions": actions, "rewards": bandit_q(actions),
            "masks": jnp.zeros(n)}


def train_bandit(eta, steps=1000, seed=0):
    config = dataclasses.replace(gfp.PRESETS["cpu"], actor_hidden=(32, 32), critic_hidden=(32, 32), lr=1e-3,
                                 alpha=10.0, eta=eta, time_embedding_dim=16)
    state = gfp.init(jax.random.key(seed), bandit_batch(jax.random.key(1)), config)

    def body(carry, key):
        batch_key, update_key = jax.random.split(key)
        return gfp.update(carry, bandit_batch(batch_key), update_key)

    state, metrics = jax.jit(lambda s, ks: jax.lax.scan(body, s, ks))(state, jax.random.split(jax.random.key(2), steps))
    assert all(np.all(np.isfinite(v)) for v in metrics.values())
    actions = np.asarray(jax.jit(gfp.act)(state, jnp.zeros((4000, 1)), jax.random.key(3)))[:, 0]
    near_good = float(np.mean(np.abs(actions - MODES[1]) < 3 * MODE_STD))
    near_bad = float(np.mean(np.abs(actions - MODES[0]) < 3 * MODE_STD))
    return near_good, 1.0 - near_good - near_bad


def test_guidance_moves_the_policy_to_the_better_mode_inside_the_data():
    """One state, behaviour 50/50 on N(-0.5, 0.1²) and N(0.5, 0.1²), r = Q(a) = 1 - (a - 0.5)², terminal; the
    whole agent (critic learned) with alpha = 10, eta = 1e-3 (the official default), 1000 updates. Measured over
    seeds 0-3: 98-100% of the one-step policy's samples within 3 std of the better mode and 0.1-1.9% outside
    both modes. The same agent without guidance (eta = 0, i.e. FQL with normalised Q) keeps ~30% at the better
    mode and puts ~45% between the modes (its BC flow has not separated them yet): the weights do the work."""
    near_good, outside = train_bandit(eta=1e-3)
    assert near_good > 0.8 and outside < 0.05, (near_good, outside)
    unguided_good, _ = train_bandit(eta=0.0)
    assert unguided_good < 0.6, unguided_good


# --- presets, per-task values, bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, expected",
    [
        ("cube-double-play-singletask-task2", {"alpha": 1.0, "eta": 0.01, "target_agg": "mean", "discount": 0.99}),
        ("cube-triple-play-singletask-task1", {"alpha": 1.0, "eta": 1e-5, "batch_size": 1024}),
        ("antmaze-large-navigate-singletask-task1",
         {"alpha": 0.3, "eta": 1e-4, "q_agg": "min", "guidance_agg": "min", "discount": 0.995}),
        ("humanoidmaze-large-navigate-singletask-task3", {"flow_steps": 30, "discount": 0.999, "batch_size": 1024}),
        ("puzzle-4x4-play-singletask-task4", {"alpha": 3.0, "eta": 1e-5, "target_agg": "actor"}),
        ("visual-cube-double-play-singletask-task1", {"alpha": 0.3, "eta": 0.01}),
        ("visual-cube-double-play-singletask-task3", {"alpha": 1.0, "eta": 0.01}),  # the official substring lookup
        ("antmaze-large-diverse-v2", {"alpha": 0.03, "eta": 1e-5, "q_agg": "min"}),
        ("pen-human-v1", {"alpha": 3.0, "eta": 1e-4}),
        ("mujoco/hopper/medium-v0", {"alpha": 3.0, "batch_size": 1024}),
        ("pointmaze-medium-navigate-singletask-task1", {"alpha": 1.0, "eta": 1e-3, "discount": 0.99}),  # defaults
    ],
)
def test_per_task_values(task, expected):
    config = gfp.for_task(gfp.PRESETS["paper"], task, "paper")
    assert {k: getattr(config, k) for k in expected} == expected
    cpu = gfp.for_task(gfp.PRESETS["cpu"], task, "cpu")
    assert cpu.batch_size == 256  # a compute setting: the cpu preset keeps its batch
    assert {k: getattr(cpu, k) for k in expected if k != "batch_size"} == {
        k: v for k, v in expected.items() if k != "batch_size"
    }


def test_correct_target_is_the_default():
    assert gfp.PRESETS["paper"].target_flow_at_next and gfp.PRESETS["cpu"].target_flow_at_next


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"q_agg": "max"}, "field q_agg is 'max'"),
        ({"target_agg": "flow"}, "field target_agg is 'flow'"),
        ({"guidance_agg": "best"}, "field guidance_agg is 'best'"),
        ({"guidance_fn": "exp"}, "field guidance_fn is 'exp'"),
        ({"flow_steps": 0}, "flow_steps is 0"),
        ({"eta": -1.0}, "eta is -1.0"),
        ({"eta_online": -1.0}, "eta_online is -1.0"),
        ({"time_embedding_dim": 1}, "time_embedding_dim is 1"),
    ],
)
def test_bad_config_raises_one_clear_error(changes, fragment):
    with pytest.raises(FluxrlError, match=fragment):
        gfp.init(jax.random.key(0), random_batch(4), tiny_config(**changes))


def test_online_phase_switches_eta_like_the_official_agent():
    config = tiny_config(eta=0.1)
    assert gfp.online_config(config) == config  # eta_online None: the official default keeps eta
    assert gfp.online_config(dataclasses.replace(config, eta_online=0.01)).eta == 0.01


# --- CLI end to end -----------------------------------------------------------------------------------------


def test_cli_train_export_and_load(tmp_path, monkeypatch):
    monkeypatch.setattr(external, "make_env", tiny.fake_make_env)
    dataset = tiny.write_dataset(str(tmp_path))
    run = tmp_path / "run"
    argv = ["train", "gfp", "--task", tiny.TASK, "--dataset", dataset, "--steps", "20", "--seeds", "1",
            "--preset", "cpu", "--run_dir", str(run), "--updates_per_call", "10", "--log_interval", "10",
            "--eval_interval", "20", "--eval_episodes", "1", "--save_interval", "20", "--quiet",
            "--agent.actor_hidden", "16", "16", "--agent.critic_hidden", "16", "16", "--agent.batch_size", "16",
            "--agent.flow_steps", "3"]
    assert main(argv) == 0
    record = json.loads((run / "config.json").read_text())
    # tiny.TASK is cube-single-play-singletask-task2: the official per-task values apply, flags on top.
    assert record["agent"] == "gfp" and record["agent_config"]["alpha"] == 10.0
    assert record["agent_config"]["eta"] == 0.1 and record["agent_config"]["flow_steps"] == 3
    assert "status: finished (step 20 of 20)" in (run / "summary.md").read_text()
    rows = [line.split(",") for line in (run / "train.csv").read_text().splitlines()]
    header, last = rows[0], rows[-1]
    assert np.isfinite(float(last[header.index("training/actor/vabc_loss")]))
    out = tmp_path / "policy"
    assert main(["export", str(run), "--out", str(out)]) == 0
    policy = load_policy(str(out))
    actions = np.asarray(policy(np.zeros((3, tiny.OBS_DIM), np.float32), key=jax.random.key(0),
                                deterministic=False))
    assert actions.shape == (3, tiny.ACT_DIM) and np.all(np.abs(actions) <= 1)
