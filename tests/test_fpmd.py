"""FPMD (fluxrl/agents/fpmd.py): the mirror-descent step's closed-form target, the exploration temperature's fixed
point, the official update schedule, and a bandit whose optimum is known."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fluxrl.agents import fpmd


def test_weighted_flow_matching_learns_the_tilted_gaussian():
    """pi_k = N(m, S) and Q(a) = w.a: the mirror-descent step's target pi_k exp(Q / lambda) is N(m + S w / lambda,
    S). The flow trained with FPMD's weighted loss on pi_k's samples transports N(0, I) onto it; from the official
    sampler's x_0 = 0.5 N(0, I) the affine Gaussian transport gives N(m + S w / lambda, S / 4)."""
    config = dataclasses.replace(fpmd.PRESETS["cpu"], actor_hidden=(64, 64), flow_steps=20)
    mean, std, w = jnp.array([0.1, -0.2]), jnp.array([0.3, 0.3]), jnp.array([1.0, -1.0])
    lam = 0.354  # w.a / lambda has std 1.2: a strong tilt, yet weights of moderate spread
    tilted_mean = mean + std**2 * w / lam  # (0.354, -0.454)
    batch = 1024
    observations = jnp.zeros((batch, 1))
    params = fpmd.Velocity(config.actor_hidden, config.time_dim).init(
        jax.random.key(0), observations[:1], jnp.zeros((1, 2)), 0.0)["params"]
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train(params, keys):
        def step(carry, key):
            params, opt_state = carry
            action_key, loss_key = jax.random.split(key)
            actions = mean + std * jax.random.normal(action_key, (batch, 2))
            weights = fpmd.pmd_weights(actions @ w, jnp.float32(1.0), lam)
            grads = jax.grad(fpmd.weighted_flow_loss)(params, observations, actions, weights, loss_key, config)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), keys)[0][0]

    params = train(params, jax.random.split(jax.random.key(1), 3000))
    for scale in (1.0, 0.5):
        x0 = scale * jax.random.normal(jax.random.key(2), (20000, 2))
        samples = np.asarray(fpmd.sample_flow(params, jnp.zeros((20000, 1)), x0, config))
        np.testing.assert_allclose(samples.mean(0), tilted_mean, atol=0.04)  # untilted: 0.25 away
        np.testing.assert_allclose(samples.std(0), scale * std, rtol=0.1)
        assert abs(np.corrcoef(samples.T)[0, 1]) < 0.05


def test_exploration_temperature_settles_where_the_noise_entropy_meets_its_target():
    """Adam on the official alpha loss drives the noise entropy 0.5 |A| log(2 pi e (0.1 alpha)^2) to
    -target_entropy_scale |A|: alpha* = 10 exp(-target_entropy_scale) / sqrt(2 pi e) (0.540 for 1.5)."""
    config = fpmd.PRESETS["paper"]
    action_dim = 6
    optimizer = fpmd.alpha_optimizer(config)
    log_alpha = jnp.asarray(math.log(fpmd.INITIAL_ALPHA), jnp.float32)

    def step(carry, _):
        log_alpha, opt_state = carry
        grad = jax.grad(fpmd.alpha_loss)(log_alpha, action_dim, config)
        updates, opt_state = optimizer.update(grad, opt_state)
        return (optax.apply_updates(log_alpha, updates), opt_state), None

    (log_alpha, _), _ = jax.lax.scan(step, (log_alpha, optimizer.init(log_alpha)), None, length=2000)
    expected = 10 * math.exp(-config.target_entropy_scale) / math.sqrt(2 * math.pi * math.e)
    assert expected == pytest.approx(0.540, abs=1e-3)
    assert float(jnp.exp(log_alpha)) == pytest.approx(expected, rel=0.05)


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    batch = {"observations": rng.normal(size=(n, 4)), "actions": rng.uniform(-1, 1, (n, 2)),
             "rewards": rng.normal(size=n), "masks": np.ones(n), "next_observations": rng.normal(size=(n, 4))}
    return {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("double", [True, False])
def test_official_update_schedule(double):
    """Policy and targets move on even updates only, alpha on every alpha_interval-th; the critics take two Adam
    steps per gradient with critic_double_step (the official quirk), one without."""
    config = dataclasses.replace(fpmd.PRESETS["cpu"], critic_hidden=(16, 16), actor_hidden=(16, 16),
                                 alpha_interval=3, critic_double_step=double)
    batch = _batch()
    update = jax.jit(fpmd.update)
    state = fpmd.init(jax.random.key(0), batch, config)
    moved = {"actor": [], "targets": [], "alpha": [], "critic": []}
    for i in range(4):
        new, _ = update(state, batch, jax.random.key(i))
        moved["actor"].append(_changed(state.params["actor"], new.params["actor"]))
        moved["targets"].append(_changed(state.target_params, new.target_params))
        moved["alpha"].append(bool(new.log_alpha != state.log_alpha))
        moved["critic"].append(_changed(state.params["critic"], new.params["critic"]))
        state = new
    assert moved == {"actor": [True, False, True, False], "targets": [True, False, True, False],
                     "alpha": [True, False, False, True], "critic": [True] * 4}
    assert int(state.opt_state["critic"][0].count) == 4 * (2 if double else 1)
    assert int(state.opt_state["actor"][0].count) == 2
    # The q-std EMA starts at 1 and follows the batch std of q at rate q_std_rate.
    assert float(state.q_std) != 1.0 and abs(float(state.q_std) - 1.0) < 4 * config.q_std_rate * 1.0 + 1e-6


def test_deterministic_acting_is_best_of_n_without_noise():
    """deterministic=True: the official evaluation action (best-of-N, no exploration noise) for any key; the
    exploring action is that action plus N(0, (noise_scale alpha)^2) noise, clipped."""
    config = dataclasses.replace(fpmd.PRESETS["cpu"], critic_hidden=(16, 16), actor_hidden=(16, 16))
    batch = _batch()
    state = fpmd.init(jax.random.key(0), batch, config)
    obs = batch["observations"]
    det = fpmd.act(state, obs, jax.random.key(1), True)
    np.testing.assert_array_equal(det, fpmd.act(state, obs, jax.random.key(2), True))
    best = fpmd.best_of_n(state.target_params["actor"], state.params["critic"], obs, 2,
                          jax.random.key(fpmd.DETERMINISTIC_KEY), config)
    np.testing.assert_allclose(det, best, atol=1e-6)
    # The best particle maximises min_i Q_i, scored before clipping as the official code, among the particles
    # drawn with the same key; it is returned clipped.
    x0 = config.sample_noise_scale * jax.random.normal(jax.random.key(fpmd.DETERMINISTIC_KEY),
                                                       (config.num_particles, *obs.shape[:-1], 2))
    particles = np.asarray(fpmd.sample_flow(state.target_params["actor"], obs, x0, config))
    scores = np.asarray(fpmd.critic_values(state.params["critic"], obs, particles, config).min(axis=0))
    expected = np.clip(particles[scores.argmax(axis=0), np.arange(obs.shape[0])], -1, 1)
    np.testing.assert_allclose(best, expected, atol=1e-6)
    # Exploration noise has std noise_scale * alpha = 0.5 at the initial alpha of 5.
    noisy = np.stack([fpmd.act(state, obs, jax.random.key(k), False) for k in range(3, 43)])
    assert 0.3 < float(np.std(noisy - np.asarray(det)[None])) < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("particles", [8, 1])
def test_bandit_policy_concentrates_on_the_known_optimum(particles):
    """A contextual bandit (discount 0) with r = -||a - a*||^2 from uniformly random logged actions: the critic
    learns r, and the updates move the flow policy's own samples onto a* and narrow them. With one particle there
    is no best-of-N selection, so the move is the mirror-descent weighting's alone (with the weights set to 1 the
    mean stays ~0.6 from a*)."""
    config = dataclasses.replace(fpmd.PRESETS["cpu"], actor_hidden=(64, 64), critic_hidden=(64, 64), discount=0.0,
                                 num_particles=particles)
    optimum = np.array([0.5, -0.3], np.float32)
    n = 4096
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
    data = {"observations": rng.normal(size=(n, 3)), "actions": actions,
            "rewards": -np.sum((actions - optimum) ** 2, axis=-1), "masks": np.ones(n),
            "next_observations": rng.normal(size=(n, 3))}
    data = {k: jnp.asarray(v, jnp.float32) for k, v in data.items()}
    state = fpmd.init(jax.random.key(0), {k: v[:8] for k, v in data.items()}, config)

    @jax.jit
    def train(state, key):
        def step(state, key):
            index_key, update_key = jax.random.split(key)
            rows = jax.random.randint(index_key, (256,), 0, n)
            return fpmd.update(state, {k: v[rows] for k, v in data.items()}, update_key)

        return jax.lax.scan(step, state, jax.random.split(key, 500))[0]

    observations = jnp.asarray(rng.normal(size=(2000, 3)), jnp.float32)
    x0 = config.sample_noise_scale * jax.random.normal(jax.random.key(9), (2000, 2))

    def policy_samples(state):
        return np.asarray(jnp.clip(fpmd.sample_flow(state.target_params["actor"], observations, x0, config), -1, 1))

    before = policy_samples(state)
    for i in range(2 if particles > 1 else 4):
        state = train(state, jax.random.key(i))
    after = policy_samples(state)
    assert np.linalg.norm(before.mean(0) - optimum) > 0.3
    assert np.linalg.norm(after.mean(0) - optimum) < (0.1 if particles > 1 else 0.15)
    assert np.all(after.std(0) < 0.8 * before.std(0))
    if particles > 1:
        acted = np.asarray(fpmd.act(state, observations[:200], jax.random.key(3), True))
        assert np.linalg.norm(acted.mean(0) - optimum) < 0.05


def test_paper_preset_is_the_official_script():
    """scripts/train_mujoco.py and relax/network/rf.py defaults of the official code."""
    paper = fpmd.PRESETS["paper"]
    assert (paper.lr, paper.lr_end, paper.lr_decay_begin, paper.lr_decay_steps) == (3e-4, 3e-5, 25_000, 50_000)
    assert (paper.alpha_lr, paper.alpha_interval, paper.noise_scale, paper.target_entropy_scale) == (
        7e-3, 250, 0.1, 1.5)
    assert (paper.critic_hidden, paper.actor_hidden, paper.time_dim) == ((256,) * 3, (256,) * 3, 16)
    assert (paper.flow_steps, paper.num_particles, paper.sample_noise_scale) == (20, 32, 0.5)
    assert (paper.discount, paper.tau, paper.policy_freq, paper.reward_scale, paper.batch_size) == (
        0.99, 0.005, 2, 0.2, 256)
    assert (paper.temperature, paper.q_std_rate, paper.critic_double_step) == (3.0, 0.001, True)
