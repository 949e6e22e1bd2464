"""SWFP (fluxrl/agents/swfp.py): the block's JKO step against its closed form, the cascade's Gaussian recursion on a
bandit through the agent's own updates, and the stage schedule (which parameters each phase may move)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fluxrl.agents import swfp
from fluxrl.errors import FluxrlError


def quadratic_critic(mu, curvature):
    """Q(a) = -(a - mu)' A (a - mu) / 2 for every state, as a 2-member ensemble."""

    def critic_fn(observations, actions):
        d = actions - mu
        q = -0.5 * jnp.einsum("...i,ij,...j->...", d, curvature, d)
        return jnp.stack([q, q])

    return critic_fn


# One compiled init instead of op-by-op dispatch: far fewer compilations.
init = jax.jit(swfp.init, static_argnums=2)


def test_block_learns_the_backward_euler_step_of_a_quadratic_q():
    """min_g E[-Q(a + h g) + (h/2)||g||^2] for Q = -(a - mu)' A (a - mu) / 2 is g* = -(I + h A)^{-1} A (a - mu): the
    proximal (backward-Euler) step of the potential -Q, i.e. its JKO step. h = 0.5 makes it far from the explicit
    step -A (a - mu)."""
    config = dataclasses.replace(swfp.PRESETS["cpu"], block_hidden=(64, 64), step_size=0.5, normalize_q=False)
    mu, curvature = jnp.array([0.2, -0.1]), jnp.array([[3.0, 1.0], [1.0, 2.0]])
    mean, std = jnp.array([-0.2, 0.2]), 0.15
    critic_fn = quadratic_critic(mu, curvature)
    batch = 512
    observations = jnp.zeros((batch, 1))
    params = swfp.Block(config.block_hidden).init(jax.random.key(0), observations[:1], jnp.zeros((1, 2)))["params"]
    optimizer = optax.adam(1e-3)

    @jax.jit
    def train(params, keys):
        def step(carry, key):
            params, opt_state = carry
            inputs = mean + std * jax.random.normal(key, (batch, 2))
            grads = jax.grad(lambda p: swfp.jko_block_loss(p, observations, inputs, critic_fn, config)[0])(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, optimizer.init(params)), keys)[0][0]

    params = train(params, jax.random.split(jax.random.key(1), 4000))
    test_inputs = mean + std * jax.random.normal(jax.random.key(2), (2000, 2))
    drift = np.asarray(swfp.block_drift(params, jnp.zeros((2000, 1)), test_inputs, config))
    h = config.step_size
    backward = -np.linalg.solve(np.eye(2) + h * np.asarray(curvature),
                                (np.asarray(curvature) @ (np.asarray(test_inputs) - np.asarray(mu)).T)).T
    forward = -(np.asarray(test_inputs) - np.asarray(mu)) @ np.asarray(curvature).T

    def relative_error(expected):
        return np.sqrt(np.mean(np.sum((drift - expected) ** 2, -1)) / np.mean(np.sum(expected**2, -1)))

    assert relative_error(backward) < 0.05
    assert relative_error(forward) > 0.5  # the explicit step is a different answer


BANDIT = dict(mu=0.4, curvature=4.0, mean=-0.3, std=0.05)


def bandit_batch(key, batch, uniform):
    """One state (zeros), terminal transitions, r(a) = -A (a - mu)^2 / 2; actions N(mean, std^2) or U[-1, 1]."""
    a = (jax.random.uniform(key, (batch, 1), minval=-1.0, maxval=1.0) if uniform
         else BANDIT["mean"] + BANDIT["std"] * jax.random.normal(key, (batch, 1)))
    zeros = jnp.zeros((batch, 1))
    rewards = -0.5 * BANDIT["curvature"] * (a[:, 0] - BANDIT["mu"]) ** 2
    return {"observations": zeros, "actions": a, "rewards": rewards, "masks": jnp.zeros(batch),
            "next_observations": zeros}


@pytest.mark.slow
def test_cascade_follows_the_gaussian_jko_recursion_on_a_bandit():
    """The agent's own updates on a bandit with r(a) = -A (a - mu)^2 / 2: the BC flow learns N(m_0, s_0^2) offline;
    online, each stage's block learns the proximal step and adds N(0, 2 beta h), so after k blocks the policy is
    N(m_k, v_k) with m_k - mu = c^k (m_0 - mu), v_k = c^2 v_{k-1} + 2 beta h, c = 1 / (1 + h A) (the heat step of
    the entropy; the fixed point 2 beta (1 + hA)^2 / (A (2 + hA)) is the Gibbs variance beta / A as h -> 0)."""
    h, beta, blocks = 0.25, 0.02, 4
    config = dataclasses.replace(
        swfp.PRESETS["cpu"], actor_hidden=(64, 64), critic_hidden=(64, 64), block_hidden=(64, 64), batch_size=256,
        lr=3e-3, block_lr=1e-3, num_blocks=blocks, block_steps=600, step_size=h, temperature=beta,
        normalize_q=False)
    state = init(jax.random.key(0), bandit_batch(jax.random.key(0), 256, False), config)

    def run(state, key, steps, uniform):
        def step(s, k):
            batch_key, update_key = jax.random.split(k)
            return swfp.update(s, bandit_batch(batch_key, 256, uniform), update_key)[0], None

        return jax.lax.scan(step, state, jax.random.split(key, steps))[0]

    run = jax.jit(run, static_argnums=(2, 3))
    state = run(state, jax.random.key(1), 2000, False)  # BC flow and the critic offline
    state = state.replace(config=swfp.online_config(config))
    c = 1.0 / (1.0 + h * BANDIT["curvature"])
    m, v = BANDIT["mean"], BANDIT["std"] ** 2
    observations = jnp.zeros((20000, 1))
    for k in range(1, blocks + 1):
        state = run(state, jax.random.key(10 + k), config.block_steps, True)
        m, v = BANDIT["mu"] + c * (m - BANDIT["mu"]), c**2 * v + 2 * beta * h
        # The next stage's block is already active but untrained: the identity plus its noise.
        count, v_next = (k + 1, v + 2 * beta * h) if k < blocks else (blocks, v)
        samples = np.asarray(swfp.act(state, observations, jax.random.key(100 + k)))[:, 0]
        assert int(swfp.active_blocks(state)) == count
        np.testing.assert_allclose(samples.mean(), m, atol=0.02, err_msg=f"mean after block {k}")
        np.testing.assert_allclose(samples.var(), v_next, rtol=0.1, err_msg=f"variance after block {k}")


def tiny(**overrides):
    fields = dict(actor_hidden=(16, 16), critic_hidden=(16, 16), block_hidden=(16, 16), batch_size=8, num_blocks=3,
                  block_steps=2)
    return dataclasses.replace(swfp.PRESETS["cpu"], **(fields | overrides))


def random_batch():
    rng = np.random.default_rng(0)
    batch = {"observations": rng.normal(size=(8, 4)), "actions": rng.uniform(-1, 1, (8, 2)),
             "rewards": rng.normal(size=8), "masks": np.ones(8), "next_observations": rng.normal(size=(8, 4))}
    return {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_each_phase_moves_only_its_own_parameters():
    """Offline: critic and base flow, no block, no online step counted. Online: the critic and the stage's block
    only; the stage advances every block_steps updates and stays on the last block after num_blocks stages; a new
    block starts as the identity transport."""
    config, batch = tiny(), random_batch()
    update = jax.jit(swfp.update)
    state = init(jax.random.key(0), batch, config)
    start = state
    for i in range(3):
        state, _ = update(state, batch, jax.random.key(i))
    assert leaves_equal(state.params["blocks"], start.params["blocks"]) and int(state.online_step) == 0
    assert not leaves_equal(state.params["actor_bc_flow"], start.params["actor_bc_flow"])
    assert not leaves_equal(state.params["critic"], start.params["critic"])

    state = state.replace(config=swfp.online_config(config))
    observations = batch["observations"]
    act = jax.jit(lambda s: swfp.act(s, observations, jax.random.key(0), True))
    fewer_blocks = jax.jit(lambda s, k: swfp.sample_policy(s.params, observations, jax.random.key(0), k, 2, s.config,
                                                           True))
    for n in range(8):
        k = min(n // config.block_steps, config.num_blocks - 1)
        if n % config.block_steps == 0 and n // config.block_steps < config.num_blocks and k > 0:
            # block k has just become active: deterministic actions are those of blocks 0..k-1
            np.testing.assert_array_equal(np.asarray(act(state)), np.asarray(fewer_blocks(state, k)))
        before = state
        state, metrics = update(state, batch, jax.random.key(10 + n))
        assert float(metrics["block/stage"]) == k
        assert leaves_equal(state.params["actor_bc_flow"], before.params["actor_bc_flow"])
        assert not leaves_equal(state.params["critic"], before.params["critic"])
        after_blocks, before_blocks = (jax.tree_util.tree_leaves(jax.device_get(s.params["blocks"]))
                                       for s in (state, before))
        for j in range(config.num_blocks):
            same = all(np.array_equal(x[j], y[j]) for x, y in zip(after_blocks, before_blocks))
            assert same == (j != k), (n, j)
    assert int(state.online_step) == 8 and int(swfp.stage(state)) == config.num_blocks - 1


def test_deterministic_acting_ignores_the_key_and_sampling_does_not():
    config, batch = tiny(), random_batch()
    state = init(jax.random.key(0), batch, swfp.online_config(config))
    update, act = jax.jit(swfp.update), jax.jit(swfp.act, static_argnums=3)
    for i in range(3):
        state, _ = update(state, batch, jax.random.key(i))
    a1 = act(state, batch["observations"], jax.random.key(1), True)
    a2 = act(state, batch["observations"], jax.random.key(2), True)
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    s1 = act(state, batch["observations"], jax.random.key(1), False)
    assert not np.array_equal(np.asarray(s1), np.asarray(a1))
    assert np.all(np.abs(np.asarray(s1)) <= 1.0)


@pytest.mark.parametrize("field, value", [("phase", "finetune"), ("q_agg", "max"), ("num_blocks", 0),
                                          ("block_steps", 0), ("step_size", 0.0), ("temperature", -1.0)])
def test_bad_config_is_refused_in_one_sentence(field, value):
    with pytest.raises(FluxrlError, match=field):
        swfp.init(jax.random.key(0), random_batch(), tiny(**{field: value}))
