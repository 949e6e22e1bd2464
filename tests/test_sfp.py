"""Streaming Flow Policy (fluxrl/agents/sfp.py): the conditional flows' velocities are their paths' derivatives, a
trained velocity field matches the exact marginal velocity of a toy demonstration set (both variants), the
stochastic variant streams either mode from one start, and the previous-action plumbing (dataset, env)."""

import dataclasses
import math

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxrl.agents import sfp
from fluxrl.data.sampler import with_previous_actions
from fluxrl.envs.wrappers import PreviousActionObservation
from fluxrl.errors import FluxrlError

# Two demonstrations from the same start (the previous action 0) that part ways: the toy set of the official
# crossing/wine-glass notebooks in spirit. Knots at t = j / 4.
DEMOS = np.array([
    [[0.0, 0.0], [0.3, 0.1], [0.6, 0.3], [0.7, 0.6], [0.6, 0.9]],
    [[0.0, 0.0], [-0.3, 0.1], [-0.5, 0.4], [-0.5, 0.7], [-0.3, 0.9]],
])
PRIORS = np.array([0.4, 0.6])


def toy_config(variant: str, **changes) -> sfp.Config:
    base = dict(variant=variant, pred_horizon=5, action_horizon=4, gain=2.0, sigma0=0.2, sigma1=0.3,
                velocity_hidden=(256, 256), time_embedding_dim=32, time_embedding_scale=20.0, lr=2e-3,
                warmup_steps=100, decay_steps=4000, steps_per_action=20, batch_size=512)
    return dataclasses.replace(sfp.PRESETS["cpu"], **{**base, **changes})


def toy_batch(key, batch_size: int) -> dict:
    """Rows of the demonstration set: the observation is the previous action (the start, 0), the chunk the rest."""
    index = jax.random.choice(key, 2, (batch_size,), p=jnp.asarray(PRIORS))
    knots = jnp.asarray(DEMOS, jnp.float32)[index]
    return {"observations": knots[:, 0], "actions": knots[:, 1], "actions_chunk": knots[:, 1:]}


# SFP-S at the official Push-T values (k = 0, σ0 = σ1 = 0.1: a(t) - ξ(t) is fixed, z alone carries the mode);
# SFP-A with a stabilising gain.
TRAINED = {"stochastic": dict(gain=0.0, sigma0=0.1, sigma1=0.1), "deterministic": dict(gain=2.0, sigma0=0.2)}


@pytest.fixture(scope="module", params=sfp.VARIANTS)
def trained(request):
    config = toy_config(request.param, **TRAINED[request.param])
    state = sfp.init(jax.random.key(0), toy_batch(jax.random.key(1), 8), config)

    @jax.jit
    def train(state, keys):
        def step(state, key):
            batch_key, update_key = jax.random.split(key)
            return sfp.update(state, toy_batch(batch_key, config.batch_size), update_key)

        return jax.lax.scan(step, state, keys)

    state, metrics = train(state, jax.random.split(jax.random.key(2), config.decay_steps))
    return state, metrics


# --- the exact marginal velocity (float64 numpy, written from the formulas independently of the agent) ---------


def hold(knots, t):
    segments = knots.shape[0] - 1
    j = np.clip(np.floor(t * segments).astype(int), 0, segments - 1)
    frac = (t * segments - j)[:, None]
    return knots[j] + frac * (knots[j + 1] - knots[j]), segments * (knots[j + 1] - knots[j])


def gaussian_terms(config, t):
    """Per-dimension (var_a, cov_az, var_z, c) of the conditional flow at t; the z entries only for SFP-S."""
    k, s0, s1 = config.gain, config.sigma0, config.sigma1
    var_tube = s0**2 * np.exp(-2 * k * t)
    if config.variant == "deterministic":
        return var_tube, None, None, None
    sr = math.sqrt(s1**2 - s0**2 * math.exp(-2 * k))
    c = 1 - (1 - s1) * t
    return var_tube + (sr * t) ** 2, sr * t * c, c**2, c


def exact_marginal_velocity(config, x, t, priors=PRIORS):
    """sum_i w_i(x, t) v_i(x, t), w_i ∝ prior_i N(x; mean_i(t), cov_i(t)): the field flow matching regresses onto."""
    k, s1 = config.gain, config.sigma1
    var_a, cov_az, var_z, c = gaussian_terms(config, t)
    log_w, velocities = [], []
    for prior, knots in zip(priors, DEMOS):
        xi, xi_dot = hold(knots, t)
        a = x[:, :2]
        if config.variant == "deterministic":
            log_w.append(np.log(prior) - 0.5 * np.sum((a - xi) ** 2 / var_a[:, None] + np.log(var_a)[:, None], 1))
            velocities.append(xi_dot - k * (a - xi))
            continue
        z = x[:, 2:]
        da, dz = a - xi, z - t[:, None] * xi
        det = (var_a * var_z - cov_az**2)[:, None]
        quad = (var_z[:, None] * da**2 - 2 * cov_az[:, None] * da * dz + var_a[:, None] * dz**2) / det
        log_w.append(np.log(prior) - 0.5 * np.sum(quad + np.log(det), 1))
        sr = math.sqrt(s1**2 - config.sigma0**2 * math.exp(-2 * k))
        z0 = dz / c[:, None]
        v_a = xi_dot - k * da + sr * (1 + k * t[:, None]) * z0
        v_z = xi + t[:, None] * xi_dot - (1 - s1) * z0
        velocities.append(np.concatenate([v_a, v_z], 1))
    log_w = np.stack(log_w, 1)
    w = np.exp(log_w - log_w.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return np.einsum("bi,ibd->bd", w, np.stack(velocities))


def marginal_samples(config, n, rng):
    """x ~ p_t (mixture of the conditional flows) at t ~ U[0.02, 0.98]."""
    t = rng.uniform(0.02, 0.98, n)
    index = rng.choice(2, n, p=PRIORS)
    eps, z0 = rng.normal(size=(n, 2)), rng.normal(size=(n, 2))
    x, _ = sfp.conditional_flow(jnp.asarray(DEMOS[index], jnp.float32), jnp.asarray(t, jnp.float32),
                                jnp.asarray(eps, jnp.float32), jnp.asarray(z0, jnp.float32), config)
    return np.asarray(x, np.float64), t


# --- tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sfp.VARIANTS)
def test_conditional_velocity_is_the_derivative_of_the_conditional_path(variant):
    """d/dt x(t) = v(x(t), t) along each conditional path (central differences in float64-free float32 terms), and
    a(t)'s spread is sqrt(σ0² e^{-2kt} + σ_r² t²) around ξ(t)."""
    config = toy_config(variant, gain=1.5, sigma0=0.2, sigma1=0.5)
    rng = np.random.default_rng(0)
    n = 20000
    knots = jnp.asarray(DEMOS[rng.choice(2, n)], jnp.float32)
    eps, z0 = (jnp.asarray(rng.normal(size=(n, 2)), jnp.float32) for _ in range(2))
    t = jnp.asarray(rng.uniform(0.05, 0.95, n), jnp.float32)
    # Stay inside one knot interval: the hold's derivative jumps at the knots.
    t = jnp.where(jnp.abs(t * 4 - jnp.round(t * 4)) < 0.01, t + 0.02, t)
    h = 1e-3
    x_plus, _ = sfp.conditional_flow(knots, t + h, eps, z0, config)
    x_minus, _ = sfp.conditional_flow(knots, t - h, eps, z0, config)
    _, v = sfp.conditional_flow(knots, t, eps, z0, config)
    np.testing.assert_allclose((x_plus - x_minus) / (2 * h), v, atol=2e-2)

    t_fixed = jnp.full((n,), 0.6, jnp.float32)
    x, _ = sfp.conditional_flow(knots, t_fixed, eps, z0, config)
    xi, _ = hold(np.asarray(knots[0], np.float64), np.array([0.6]))
    var_a = gaussian_terms(config, np.array([0.6]))[0][0]
    same_demo = np.asarray(knots[:, 1, 0] == knots[0, 1, 0])
    a = np.asarray(x[same_demo, :2])
    np.testing.assert_allclose(a.mean(0), xi[0], atol=0.02)
    np.testing.assert_allclose(a.std(0), math.sqrt(var_a), rtol=0.03)


def test_trained_velocity_matches_the_exact_marginal_velocity(trained):
    """The network regresses the conditional velocities; its minimiser is their posterior mixture. On samples of
    the marginal path the trained field is within a few percent of it (relative squared error), and far from
    either demonstration's own velocity where the two are mixed (t small: both explain x)."""
    state, metrics = trained
    config = state.config
    assert np.all(np.isfinite(metrics["actor/flow_loss"]))
    x, t = marginal_samples(config, 4000, np.random.default_rng(1))
    exact = exact_marginal_velocity(config, x, t)
    learned = np.asarray(sfp.velocity_network(config).apply(
        {"params": state.target_params["velocity"]}, jnp.zeros((len(t), 2)), jnp.asarray(x, jnp.float32),
        jnp.asarray(t, jnp.float32)[:, None]), np.float64)
    relative = np.sum((learned - exact) ** 2) / np.sum(exact**2)
    assert relative < 0.05, relative
    # The mixture is not any single demonstration's field: regressing onto one demo alone would be far off.
    one_demo = exact_marginal_velocity(config, x, t, priors=np.array([1.0, 1e-30]))
    assert np.sum((one_demo - exact) ** 2) / np.sum(exact**2) > 5 * relative


def initial_marginal(config, n, rng):
    """x(0): a_0 ~ N(ξ(0), σ0²) (ξ(0) = 0 for both demonstrations), with z_0 ~ N(0, I) for SFP-S."""
    a0 = config.sigma0 * rng.normal(size=(n, 2))
    return np.concatenate([a0, rng.normal(size=(n, 2))], 1) if config.variant == "stochastic" else a0


def mode_frequency(final_actions):
    """Fraction of final actions nearer demonstration 0's last knot than demonstration 1's."""
    d = np.linalg.norm(final_actions[:, None] - DEMOS[None, :, -1], axis=-1)
    return np.mean(d.argmin(1) == 0), d.min(1)


@pytest.mark.parametrize("variant, changes", [("stochastic", dict(gain=1.0, sigma0=0.1, sigma1=0.3)),
                                              ("deterministic", dict(gain=2.0, sigma0=0.2))])
def test_exact_marginal_flow_carries_the_initial_marginal_onto_the_demonstrations(variant, changes):
    """The oracle's own check: Euler-integrating the exact marginal velocity from x(0) ~ p_0 ends on the
    demonstrations with their prior frequencies (0.4 / 0.6), as the marginal flow must."""
    config = toy_config(variant, **changes)
    x = initial_marginal(config, 2000, np.random.default_rng(0))
    steps = 400
    for i in range(steps):
        x = x + exact_marginal_velocity(config, x, np.full(len(x), i / steps)) / steps
    frequency, distance = mode_frequency(x[:, :2])
    assert abs(frequency - PRIORS[0]) < 0.04, frequency
    # At t = 1 each mode is N(ξ_i(1), σ² I), σ = σ1 (SFP-S) or σ0 e^{-k} (SFP-A): median distance σ sqrt(2 ln 2).
    sigma = config.sigma1 if variant == "stochastic" else config.sigma0 * math.exp(-config.gain)
    np.testing.assert_allclose(np.median(distance), sigma * math.sqrt(2 * math.log(2)), rtol=0.1)


def test_trained_flow_carries_the_initial_marginal_onto_the_demonstrations(trained):
    """The agent's integrator on the trained (EMA) field, from x(0) ~ p_0: the actions streamed at the knots follow
    one demonstration each, with the priors' frequencies."""
    state, _ = trained
    config = state.config
    x0 = jnp.asarray(initial_marginal(config, 2000, np.random.default_rng(3)), jnp.float32)
    streamed = np.asarray(sfp.stream(state.target_params["velocity"], jnp.zeros((2000, 2)), x0, config))[..., :2]
    assert streamed.shape == (2000, config.action_horizon, 2)
    frequency, _ = mode_frequency(streamed[:, -1])
    assert abs(frequency - PRIORS[0]) < 0.07, frequency
    to_demo = np.linalg.norm(streamed[:, None] - DEMOS[None, :, 1:], axis=-1).max(-1).min(1)
    assert np.median(to_demo) < 0.25, np.median(to_demo)


def test_act_streams_the_demonstrations_from_the_previous_action(trained):
    """act starts at the previous action: SFP-S from it exactly (the official inference), every streamed chunk then
    following one demonstration (from this exact start the modes' frequencies need not be the priors: docs/sfp.md);
    SFP-A, sampling a(0) ~ N(a_prev, σ0²), starts from p_0 itself and so streams the modes with the priors'
    frequencies. deterministic=True gives one chunk whatever the key."""
    state, _ = trained
    config = state.config
    chunk = np.asarray(sfp.act(state, jnp.zeros((1000, 2)), jax.random.key(5), deterministic=False))
    assert chunk.shape == (1000, config.action_horizon, 2) and np.abs(chunk).max() <= 1.0
    to_demo = np.linalg.norm(chunk[:, None] - DEMOS[None, :, 1:], axis=-1).max(-1).min(1)
    if config.variant == "stochastic":
        assert np.mean(to_demo < 0.3) > 0.95, np.mean(to_demo < 0.3)
    else:
        frequency, _ = mode_frequency(chunk[:, -1])
        assert abs(frequency - PRIORS[0]) < 0.07, frequency
        assert np.median(to_demo) < 0.25, np.median(to_demo)  # the tube at the first knot: 0.2 e^{-0.5}
    one = [np.asarray(sfp.act(state, jnp.zeros((1, 2)), jax.random.key(k), deterministic=True)) for k in (6, 7)]
    np.testing.assert_array_equal(one[0], one[1])


def test_ema_decay_follows_diffusers_0_11():
    assert float(sfp.ema_decay(1, 0.75)) == 0.0
    np.testing.assert_allclose(float(sfp.ema_decay(2, 0.75)), 1 - 2**-0.75, rtol=1e-6)
    np.testing.assert_allclose(float(sfp.ema_decay(10**8, 0.75)), 0.9999, rtol=1e-7)


def test_bad_configs_are_refused():
    batch = toy_batch(jax.random.key(0), 4)
    for changes, match in (({"variant": "both"}, "variant"), ({"action_horizon": 5}, "action_horizon"),
                           ({"pred_horizon": 1, "action_horizon": 1}, "pred_horizon"),
                           ({"sigma0": 0.5, "sigma1": 0.1, "gain": 0.0}, "sigma1")):
        with pytest.raises(FluxrlError, match=match):
            sfp.init(jax.random.key(0), batch, dataclasses.replace(toy_config("stochastic"), **changes))


# --- the previous action in datasets and envs -----------------------------------------------------------------


def test_with_previous_actions_regular_and_compact():
    actions = np.arange(10, dtype=np.float32).reshape(5, 2)
    regular = {"observations": np.zeros((5, 1), np.float32), "next_observations": np.ones((5, 1), np.float32),
               "actions": actions, "terminals": np.array([0, 1, 0, 0, 1], np.float32)}
    out = with_previous_actions(regular)
    np.testing.assert_array_equal(out["observations"][:, 1:], [[0, 0], [0, 1], [0, 0], [4, 5], [6, 7]])
    np.testing.assert_array_equal(out["next_observations"][:, 1:], actions)
    # Compact: episode rows 0-1 then its last state (row 2, invalid), episode rows 3-4 then row 5.
    compact = {"observations": np.zeros((6, 1), np.float32), "actions": np.arange(12, dtype=np.float32).reshape(6, 2),
               "terminals": np.array([0, 1, 1, 0, 1, 1], np.float32), "valids": np.array([1, 1, 0, 1, 1, 0])}
    out = with_previous_actions(compact)
    np.testing.assert_array_equal(out["observations"][:, 1:], [[0, 0], [0, 1], [2, 3], [0, 0], [6, 7], [8, 9]])


def test_previous_action_wrapper():
    env = PreviousActionObservation(gymnasium.make("Pendulum-v1"))
    assert env.observation_space.shape == (4,)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,) and obs[-1] == 0.0
    obs, *_ = env.step(np.array([3.0]))
    assert obs[-1] == 1.0  # clipped to [-1, 1], as the agent's actions are
    assert env.observation_space.contains(obs)


# --- end to end: train, evaluate, export, eval, refusals (the tiny env of tests/test_engine.py) -------------------


def test_cli_trains_evaluates_and_exports_an_sfp_policy(tmp_path, monkeypatch, capsys):
    """`fluxrl train sfp` reads the previous action off the dataset's episodes and the env's steps alike: the run
    evaluates, its exported policy takes (obs, a_prev) observations and `fluxrl eval --policy` reproduces the run's
    final evaluation; online training is refused in one sentence."""
    import json
    import os
    import sys

    from fluxrl.cli import main as fluxrl_main
    from fluxrl.cli_train import main
    from fluxrl.train import external, load_policy
    from fluxrl.train.engine import EVAL_EPISODE_SALT, episode_seed

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_engine as tiny

    monkeypatch.setattr(external, "make_env", tiny.fake_make_env)
    dataset = tiny.write_dataset(str(tmp_path))
    run = tmp_path / "run"
    argv = ["train", "sfp", "--task", tiny.TASK, "--dataset", dataset, "--steps", "30", "--preset", "cpu",
            "--run_dir", str(run), "--updates_per_call", "10", "--log_interval", "10", "--eval_interval", "30",
            "--eval_episodes", "3", "--save_interval", "30", "--quiet", "--agent.velocity_hidden", "16", "16",
            "--agent.pred_horizon", "4", "--agent.action_horizon", "2", "--agent.batch_size", "32"]
    assert main(argv) == 0
    final = [r for r in tiny._csv(run / "eval.csv") if r["step"] == "30"][0]
    assert float(final["evaluation/length"]) > 0
    assert main(["export", str(run), "--out", str(tmp_path / "policy")]) == 0
    policy = load_policy(str(tmp_path / "policy"))
    assert policy.previous_action and policy.observation_shape == (tiny.OBS_DIM + tiny.ACT_DIM,)
    assert policy(np.zeros(tiny.OBS_DIM + tiny.ACT_DIM, np.float32)).shape == (2, tiny.ACT_DIM)
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert fluxrl_main(["eval", "--policy", str(tmp_path / "policy"), "--episodes", "3", "--seed",
                        str(episode_seed(0, EVAL_EPISODE_SALT, 30)), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["mean_return"] == pytest.approx(float(final["evaluation/return"]), rel=1e-6)

    capsys.readouterr()
    assert main(argv[:-2] + ["--run_dir", str(tmp_path / "online"), "--online_steps", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "previous action" in err[0] and "offline only" in err[0], err
    assert not (tmp_path / "online").exists()
