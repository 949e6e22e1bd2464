"""QAM against closed forms: the adjoint-matching fixed point for a Gaussian behaviour and a linear or quadratic
critic (exact discrete answer and continuous tilt), the agent's own networks reaching the tilt, gradient routing,
the pessimistic TD target (also over action chunks), targets, gradient clipping, presets, and a chunked CLI run
end to end (evaluation, export, load_policy)."""

import csv
import dataclasses
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fluxrl import agents
from fluxrl.agents import base, qam
from fluxrl.cli_train import main
from fluxrl.data.dataset import save_npz
from fluxrl.data.sampler import Sampler
from fluxrl.errors import FluxrlError
from fluxrl.train import TrainConfig, Trainer, external, export_policy, load_policy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_engine as tiny  # noqa: E402

# --- the Gaussian behaviour and its exact flow -------------------------------------------------------------


def gaussian_velocity(mean, cov):
    """The exact marginal velocity of the linear path from N(0, I) to N(mean, cov):
    v(x, t) = mean + J(t) (x - t mean),  J(t) = (t S - (1 - t) I) (t² S + (1 - t)² I)^-1.
    t is a scalar or shaped (..., 1) against x (..., d)."""
    m, S = jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32)
    eye = jnp.eye(len(mean))

    def velocity(observations, x, t):
        t = jnp.asarray(t, x.dtype)
        tt = t[..., None]
        jac = (tt * S - (1 - tt) * eye) @ jnp.linalg.inv(tt * tt * S + (1 - tt) ** 2 * eye)
        return m + jnp.sum(jac * (x - t * m)[..., None, :], axis=-1)

    return velocity


def velocity_jacobian(t, cov):
    """J(t) of `gaussian_velocity` (float64)."""
    eye = np.eye(len(cov))
    return (t * cov - (1 - t) * eye) @ np.linalg.inv(t * t * cov + (1 - t) ** 2 * eye)


def discrete_answer(mean, cov, inv_temp, n, w=None, A=None, c=None):
    """Mean and covariance of QAM's exact discrete fixed point (clip_adj off) for Q(a) = w^T a or
    Q(a) = -(a - c)^T A (a - c) / 2, whose action gradient g0 + H a is affine (g0 = w, H = 0; or g0 = A c, H = -A).

    Lean adjoint: atilde_N = -inv_temp (g0 + H x_N), atilde_i = P_i atilde_N with P_i = prod_{k >= i} (I + h B_k^T),
    B_k the Jacobian of 2 v(x, t_k + h) - x / (t_k + h). The regression optimum at step i is
    f_i(x) = E[v(x, t_i) - (sigma_i² / 2) atilde_i | x_i = x] = F_i x + phi_i: affine, with E[x_N | x_i] = G_i x + g_i
    taken along the rollout (memoryless SDE steps with f_j for j < N - 1, then one ODE step with the base). The
    equations are linear in (F_i, phi_i) and are solved backward from i = N - 1. The policy's Euler map is then
    affine, x_N = M z + b, so the policy is exactly N(b, M M^T)."""
    d, h = len(mean), 1.0 / n
    eye = np.eye(d)
    g0, H = (np.asarray(w, np.float64), np.zeros((d, d))) if w is not None else (A @ c, -A)
    P, acc = [None] * n, eye
    for i in reversed(range(n)):
        acc = (eye + h * (2 * velocity_jacobian(i / n + h, cov) - eye / (i / n + h)).T) @ acc
        P[i] = acc
    F, phi = [None] * n, [None] * n
    G, g = eye, np.zeros(d)  # E[x_N | x_{i+1}] = G x + g
    for i in reversed(range(n)):
        t, jac = i / n, velocity_jacobian(i / n, cov)
        half_sigma2, base_offset = (1 - t + h) / (t + h), mean - t * jac @ mean
        if i == n - 1:  # the rollout's last step is an ODE step with the base
            G, g = eye + h * jac, h * base_offset
            F[i] = jac + inv_temp * half_sigma2 * P[i] @ H @ G
            phi[i] = base_offset + inv_temp * half_sigma2 * P[i] @ (g0 + H @ g)
            continue
        K = inv_temp * half_sigma2 * P[i] @ H @ G  # the target's dependence on x_{i+1}, which f_i moves
        F[i] = np.linalg.solve(eye - 2 * h * K, jac + K * (1 - h / (t + h)))
        phi[i] = np.linalg.solve(eye - 2 * h * K, base_offset + inv_temp * half_sigma2 * P[i] @ (g0 + H @ g))
        G, g = G @ (eye + h * (2 * F[i] - eye / (t + h))), G @ (2 * h * phi[i]) + g
    M, b = eye, np.zeros(d)
    for i in range(n):
        M, b = (eye + h * F[i]) @ M, (eye + h * F[i]) @ b + h * phi[i]
    return b, M @ M.T


def tilted_gaussian(mean, cov, inv_temp, w=None, A=None, c=None):
    """pi ∝ N(mean, cov) exp(inv_temp Q): Q = w^T a gives N(mean + inv_temp cov w, cov); Q = -(a - c)^T A (a - c) / 2
    gives precision cov^-1 + inv_temp A and mean (cov^-1 + inv_temp A)^-1 (cov^-1 mean + inv_temp A c)."""
    if w is not None:
        return mean + inv_temp * cov @ w, cov
    precision = np.linalg.inv(cov) + inv_temp * A
    new_cov = np.linalg.inv(precision)
    return new_cov @ (np.linalg.solve(cov, mean) + inv_temp * A @ c), new_cov


# --- a per-step affine fine-tuned field (it can represent every answer below exactly) -----------------------


def affine_field(num_steps):
    """v(x, t_i) = A_i x + c_i: one affine map per flow step (t_i = i / num_steps)."""

    def apply(params, observations, x, t):
        index = jnp.round(jnp.asarray(t) * num_steps).astype(jnp.int32)
        index = index[..., 0] if index.ndim else index
        return params["c"][index] + jnp.sum(params["A"][index] * x[..., None, :], axis=-1)

    return apply


def affine_euler_moments(params, num_steps):
    """Exact mean and covariance of Euler_N of the affine field from z ~ N(0, I)."""
    A, c = np.asarray(params["A"], np.float64), np.asarray(params["c"], np.float64)
    d, h = c.shape[-1], 1.0 / num_steps
    M, b = np.eye(d), np.zeros(d)
    for i in range(num_steps):
        M, b = (np.eye(d) + h * A[i]) @ M, (np.eye(d) + h * A[i]) @ b + h * c[i]
    return b, M @ M.T


def train_affine(config, velocity, q_value, steps, lr, batch=256, seed=0, d=2):
    n = config.flow_steps
    params = {"A": jnp.zeros((n, d, d)), "c": jnp.zeros((n, d))}
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.01))
    obs = jnp.zeros((batch, 1))
    apply = affine_field(n)

    def step(carry, key):
        p, opt_state = carry
        (loss, _), grads = jax.value_and_grad(
            lambda p: qam.adjoint_matching_loss(p, velocity, q_value, obs, key, d, config, fine_apply=apply),
            has_aux=True,
        )(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    run = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))
    (params, _), losses = run((params, optimizer.init(params)), jax.random.split(jax.random.key(seed), steps))
    return params, np.asarray(losses)


BEHAVIOUR_MEAN = np.array([0.1, -0.1])
BEHAVIOUR_COV = np.array([[0.16, 0.06], [0.06, 0.1450]])  # L = [[0.4, 0], [0.15, 0.35]]: correlated
W = np.array([1.0, -0.5])
A_QUAD, C_QUAD = np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([0.4, 0.2])


def linear_q(observations, actions):
    return actions @ jnp.asarray(W, jnp.float32)


def quadratic_q(observations, actions):
    diff = actions - jnp.asarray(C_QUAD, jnp.float32)
    return -0.5 * jnp.einsum("...i,ij,...j->...", diff, jnp.asarray(A_QUAD, jnp.float32), diff)


def rel_error(cov, expected):
    return float(np.linalg.norm(cov - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("critic", ["linear", "quadratic"])
def test_adjoint_matching_reaches_the_exact_discrete_answer(critic):
    """The official 10 steps, no clipping, base frozen at the exact behaviour field: the per-step affine field
    can represent the regression optimum, so its policy must be the discrete closed form of `discrete_answer`.
    This pins the official discretisation (sigma with the t + h shift, the lean adjoint at t + h, the last
    rollout step an ODE step with the base), which the continuous tilt cannot resolve.
    Linear Q: the target is deterministic, the loss goes to 0 and the moments agree to float precision
    (measured 4e-8; tolerance 1e-5). Quadratic Q: the target depends on the random x_N, so Adam ends in noise
    (measured 0.0015 on the mean, 2e-4 on the covariance; tolerances 0.004 and 0.001).
    At 10 steps the discrete answer is 0.016 / 27% (linear) away from the continuous tilt, mostly the Euler error
    of a 10-step sampler."""
    config = dataclasses.replace(qam.PRESETS["cpu"], flow_steps=10, inv_temp=1.0, clip_adj=False)
    velocity = gaussian_velocity(BEHAVIOUR_MEAN, BEHAVIOUR_COV)
    if critic == "linear":
        q_value, expected = linear_q, discrete_answer(BEHAVIOUR_MEAN, BEHAVIOUR_COV, 1.0, 10, w=W)
        continuous = tilted_gaussian(BEHAVIOUR_MEAN, BEHAVIOUR_COV, 1.0, w=W)
    else:
        q_value, expected = quadratic_q, discrete_answer(BEHAVIOUR_MEAN, BEHAVIOUR_COV, 1.0, 10, A=A_QUAD, c=C_QUAD)
        continuous = tilted_gaussian(BEHAVIOUR_MEAN, BEHAVIOUR_COV, 1.0, A=A_QUAD, c=C_QUAD)
    params, losses = train_affine(config, velocity, q_value, steps=600, lr=0.05)
    mean, cov = affine_euler_moments(params, 10)
    mean_tol, cov_tol = (1e-5, 1e-5) if critic == "linear" else (0.004, 0.001)
    assert np.abs(mean - expected[0]).max() < mean_tol, (mean, expected[0])
    assert np.abs(cov - expected[1]).max() < cov_tol, (cov, expected[1])
    if critic == "linear":
        assert losses[0] > 10 and losses[-20:].max() < 1e-6
    assert np.abs(expected[0] - continuous[0]).max() > 0.002 and rel_error(expected[1], continuous[1]) > 0.2


@pytest.mark.parametrize("critic", ["linear", "quadratic"])
def test_adjoint_matching_tilts_a_gaussian_to_the_closed_form(critic):
    """pi ∝ N(m, S) exp(inv_temp Q) in closed form (linear Q: N(m + inv_temp S w, S); quadratic Q: another
    Gaussian). Base flow frozen at the exact behaviour field, 100 flow steps so that the sampler's Euler error
    (~2.5 / steps relative on variances) is small; the fine-tuned field is per-step affine, so its policy's mean
    and covariance are exact (no sampling noise). Tolerances: mean 0.005, covariance 5% (Frobenius).
    Measured: linear 0.0015 / 3.2%, quadratic 0.001 / 3.4% (the Euler error of 100 steps is ~3%); the untilted
    behaviour is 0.13 / 60% away and inv_temp halved is 0.065 / 20% away."""
    inv_temp, n = 1.0, 100
    config = dataclasses.replace(qam.PRESETS["cpu"], flow_steps=n, inv_temp=inv_temp, clip_adj=False)
    velocity = gaussian_velocity(BEHAVIOUR_MEAN, BEHAVIOUR_COV)
    if critic == "linear":
        q_value, expected = linear_q, tilted_gaussian(BEHAVIOUR_MEAN, BEHAVIOUR_COV, inv_temp, w=W)
        wrong = tilted_gaussian(BEHAVIOUR_MEAN, BEHAVIOUR_COV, inv_temp / 2, w=W)
    else:
        q_value, expected = quadratic_q, tilted_gaussian(BEHAVIOUR_MEAN, BEHAVIOUR_COV, inv_temp, A=A_QUAD, c=C_QUAD)
        wrong = tilted_gaussian(BEHAVIOUR_MEAN, BEHAVIOUR_COV, inv_temp / 2, A=A_QUAD, c=C_QUAD)
    params, _ = train_affine(config, velocity, q_value, steps=600, lr=0.05)
    mean, cov = affine_euler_moments(params, n)
    assert np.abs(mean - expected[0]).max() < 0.005, (mean, expected[0])
    assert rel_error(cov, expected[1]) < 0.05, (cov, expected[1])
    # The tolerances separate the answer from the untilted behaviour and from the tilt at half the temperature.
    assert np.abs(BEHAVIOUR_MEAN - expected[0]).max() > 0.1
    assert np.abs(wrong[0] - expected[0]).max() > 0.02
    if critic == "quadratic":
        assert rel_error(BEHAVIOUR_COV, expected[1]) > 0.5 and rel_error(wrong[1], expected[1]) > 0.15


def test_agent_networks_reach_the_tilt():
    """The agent's own fine-tuned network (2x64), trained with its adjoint-matching loss and all default flags
    (official 10 steps, clipped adjoint) against the exact base field and a linear Q, then sampled with qam.act.
    A narrower behaviour keeps the clipping at ±1 negligible. Its samples must match the exact discrete answer:
    mean within 0.01 and covariance within 10% (measured: 0.0025 and 4%; sampling noise on 20000 samples is
    ~0.002 and ~1.5%). The untilted behaviour is 0.09 away."""
    mean_b, cov_b = np.array([0.1, -0.1]), np.array([[0.09, 0.03], [0.03, 0.0725]])
    config = dataclasses.replace(qam.PRESETS["cpu"], actor_hidden=(64, 64), inv_temp=1.0)
    velocity = gaussian_velocity(mean_b, cov_b)
    batch = {"observations": jnp.zeros((128, 1)), "actions": jnp.zeros((128, 2))}
    state = qam.init(jax.random.key(0), batch, config)
    steps = 1500
    optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.01))

    def step(carry, key):
        p, opt_state = carry
        (loss, _), grads = jax.value_and_grad(
            lambda p: qam.adjoint_matching_loss(p, velocity, linear_q, batch["observations"], key, 2, config),
            has_aux=True,
        )(p)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    fast = state.params["actor_fast"]
    run = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))
    (fast, _), _ = run((fast, optimizer.init(fast)), jax.random.split(jax.random.key(1), steps))
    trained = state.replace(params=dict(state.params, actor_fast=fast))
    samples = np.asarray(jax.jit(qam.act)(trained, jnp.zeros((20000, 1)), jax.random.key(2)), np.float64)
    expected_mean, expected_cov = discrete_answer(mean_b, cov_b, 1.0, config.flow_steps, w=W)
    assert np.abs(samples.mean(0) - expected_mean).max() < 0.01, (samples.mean(0), expected_mean)
    assert rel_error(np.cov(samples.T), expected_cov) < 0.10, (np.cov(samples.T), expected_cov)
    assert np.abs(expected_mean - mean_b).max() > 0.09


# --- the update: gradient routing, TD target, targets, clipping --------------------------------------------


def small_config(**changes):
    return dataclasses.replace(qam.PRESETS["cpu"], actor_hidden=(8, 8), critic_hidden=(8, 8), num_critics=3,
                               **changes)


def random_batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=n)
    rewards[::4] = 0.0  # some successes, for sparse rewards
    return {
        "observations": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
        "next_observations": jnp.asarray(rng.normal(size=(n, 4)), jnp.float32),
        "actions": jnp.asarray(rng.uniform(-0.9, 0.9, (n, 2)), jnp.float32),
        "rewards": jnp.asarray(rewards, jnp.float32),
        "masks": jnp.asarray((np.arange(n) % 3 > 0).astype(np.float32)),
    }


ROUTES = {
    "critic/critic_loss": {"critic"},  # a' from the fine-tuned flow is a constant of the TD target
    "actor/bc_flow_loss": {"actor_slow"},
    "actor/adj_loss": {"actor_fast"},  # the base flow and the critic inside the adjoint are frozen
}


@pytest.mark.parametrize("frozen_online", [False, True], ids=["targets", "online"])
def test_gradient_routing(frozen_online):
    """d(metric)/d(group) is exactly zero outside the metric's groups and non-zero inside, also when the adjoint
    uses the online base flow and critic (target_actor = use_target_grad = False) instead of their targets."""
    config = small_config(target_actor=not frozen_online, use_target_grad=not frozen_online)
    batch = random_batch()
    state = qam.init(jax.random.key(0), batch, config)
    names = list(ROUTES)

    def selected(params):
        metrics = qam.total_loss(params, state, batch, jax.random.key(1))[1]
        return jnp.stack([metrics[k] for k in names])

    jacobian = jax.jit(jax.jacrev(selected))(state.params)
    for i, metric in enumerate(names):
        for group in state.params:
            norm = sum(float(jnp.abs(g[i]).sum()) for g in jax.tree_util.tree_leaves(jacobian[group]))
            if group in ROUTES[metric]:
                assert norm > 0, f"{metric} gives no gradient to {group}"
            else:
                assert norm == 0, f"{metric} leaks gradient {norm} into {group}"


@pytest.mark.parametrize("sparse", [False, True])
def test_td_target_is_the_pessimistic_ensemble_mean(sparse):
    """y = r + gamma * mask * (mean_i Qbar_i(s', a') - rho * std_i Qbar_i(s', a')), a' = clip(Euler_N(v_theta, s', z'))
    and, with sparse rewards, r -> -1[r != 0]; recomputed from the networks' outputs (population std)."""
    config = small_config(rho=0.5, discount=0.9, sparse_rewards=sparse)
    batch = random_batch()
    state = qam.init(jax.random.key(0), batch, config)
    target = jax.tree_util.tree_map(lambda x: x + 0.3, state.params["critic"])
    key = jax.random.key(1)
    loss, _ = qam.critic_loss(state.params["critic"], target, state.params["actor_fast"], batch, key, config)

    noises = jax.random.normal(key, batch["actions"].shape)  # critic_loss draws z' from its key this way
    next_actions = qam.sample_flow(state.params["actor_fast"], batch["next_observations"], noises, config)
    next_qs = np.asarray(qam.critic_values(target, batch["next_observations"], next_actions, config), np.float64)
    assert next_qs.shape == (3, 16) and next_qs.std(0).min() > 0
    rewards = np.asarray(batch["rewards"], np.float64)
    rewards = -(rewards != 0).astype(np.float64) if sparse else rewards
    y = rewards + 0.9 * np.asarray(batch["masks"]) * (next_qs.mean(0) - 0.5 * next_qs.std(0))
    q = np.asarray(qam.critic_values(state.params["critic"], batch["observations"], batch["actions"], config))
    assert float(loss) == pytest.approx(float(np.mean((q - y) ** 2)), rel=1e-5)


# --- action chunks (Q-chunking) -----------------------------------------------------------------------------

EPISODE_ENDS = (3, 5, 10, 11)  # last rows of four episodes (lengths 4, 2, 5, 1)


def chunk_dataset(seed=0):
    """12 rows in 4 episodes; observations[:, 0] is the row index, so a sampled row can be found again; a mask of
    0 mid-episode (row 7) and at an episode end (row 5); zero rewards for the sparse transformation."""
    rng = np.random.default_rng(seed)
    n = EPISODE_ENDS[-1] + 1
    observations = rng.normal(size=(n, 4)).astype(np.float32)
    observations[:, 0] = np.arange(n)
    terminals = np.isin(np.arange(n), EPISODE_ENDS).astype(np.float32)
    masks = np.ones(n, np.float32)
    masks[[5, 7]] = 0.0
    rewards = rng.normal(size=n).astype(np.float32)
    rewards[[1, 6, 9]] = 0.0
    return {"observations": observations, "actions": rng.uniform(-0.9, 0.9, (n, 2)).astype(np.float32),
            "rewards": rewards, "masks": masks, "terminals": terminals,
            "next_observations": rng.normal(size=(n, 4)).astype(np.float32)}


def hand_chunk_targets(data, rows, h, discount, sparse):
    """The official sample_sequence quantities, walked row by row through the dataset: the reward sum
    sum_k gamma^k r_{i+k} over the steps inside the episode, the minimum of their masks, the observation after the
    last of them, the flattened chunk (steps past the end repeat the last row) and valid = the whole chunk is inside."""
    rewards = -(data["rewards"] != 0).astype(np.float64) if sparse else data["rewards"].astype(np.float64)
    out = {"rewards": [], "masks": [], "next_observations": [], "actions": [], "valid": []}
    for i in rows:
        last = min(e for e in EPISODE_ENDS if e >= i)
        inside = [i + k for k in range(h) if i + k <= last]
        out["rewards"].append(sum(discount**k * rewards[i + k] for k in range(len(inside))))
        out["masks"].append(min(data["masks"][j] for j in inside))
        out["next_observations"].append(data["next_observations"][inside[-1]])
        out["actions"].append(np.concatenate([data["actions"][min(i + k, last)] for k in range(h)]))
        out["valid"].append(float(len(inside) == h))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def chunked():
    """(dataset, a sampler batch of 64 chunks of 3 steps from it, a chunk-3 agent): shared, init is slow eagerly."""
    config = small_config(chunk_size=3)
    data = chunk_dataset()
    batch = Sampler.create(data).sample(jax.random.key(3), 64, qam.batch_spec(config).keys, chunk_size=3)
    return data, batch, qam.init(jax.random.key(0), batch, config)


@pytest.mark.parametrize("sparse", [False, True])
def test_chunk_td_target_by_hand(chunked, sparse):
    """H = 3 on sampler batches: L_Q = mean_{i, batch} valid (Q_i(s, a_{0:3}) - y)², y = sum_{k<3} gamma^k r_k +
    gamma^3 mask Qbar'(s_after, a'), with every quantity recomputed from the dataset rows and the networks' outputs.
    The batch holds chunks that run past their episode's end (valid 0), chunks over a mid-episode mask of 0, and
    sparse rewards. A discount of gamma instead of gamma^3, an unweighted loss, or the last step's mask instead of
    the minimum each change the loss by more than 1%."""
    h, gamma = 3, 0.8
    config = small_config(chunk_size=h, discount=gamma, sparse_rewards=sparse)
    data, batch, state = chunked
    assert state.action_dim == 2 and batch["actions_chunk"].shape == (64, h, 2)
    target = jax.tree_util.tree_map(lambda x: x + 0.3, state.params["critic"])
    key = jax.random.key(1)
    loss, _ = qam.critic_loss(state.params["critic"], target, state.params["actor_fast"], batch, key, config)

    rows = np.asarray(batch["observations"][:, 0]).astype(int)
    hand = hand_chunk_targets(data, rows, h, gamma, sparse)
    valid = hand["valid"]
    last_masks = data["masks"][[min(i + h - 1, min(e for e in EPISODE_ENDS if e >= i)) for i in rows]]
    assert 0 < valid.sum() < len(rows) and (hand["masks"][valid > 0] == 0).any()
    assert (hand["masks"] != last_masks).any()  # the minimum over the chunk matters somewhere
    # The official per-row quantities themselves, also for the chunks that run past their episode's end.
    for name, value in zip(("actions", "rewards", "masks", "next_observations", "valid"),
                           qam.chunk_terms(batch, config)):
        np.testing.assert_allclose(np.asarray(value), hand[name], rtol=1e-6, atol=1e-6, err_msg=name)
    next_obs = jnp.asarray(hand["next_observations"], jnp.float32)
    noises = jax.random.normal(key, (64, h * 2))  # critic_loss draws z' over the flattened chunk from its key
    next_actions = qam.sample_flow(state.params["actor_fast"], next_obs, noises, config)
    next_qs = np.asarray(qam.critic_values(target, next_obs, next_actions, config), np.float64)
    bootstrap = next_qs.mean(0) - config.rho * next_qs.std(0)
    q = np.asarray(qam.critic_values(state.params["critic"], batch["observations"],
                                     jnp.asarray(hand["actions"], jnp.float32), config), np.float64)

    def td_loss(discount_h, masks, weights):
        return float(np.mean(weights * (q - (hand["rewards"] + discount_h * masks * bootstrap)) ** 2))

    right = td_loss(gamma**h, hand["masks"], valid)
    assert float(loss) == pytest.approx(right, rel=1e-5)
    for wrong in (td_loss(gamma, hand["masks"], valid), td_loss(gamma**h, hand["masks"], 1.0),
                  td_loss(gamma**h, last_masks, valid)):
        assert abs(wrong - right) > 0.01 * right


def test_chunk_bc_loss_weights_by_valid_and_act_returns_chunks(chunked):
    """L_BC over flattened chunks counts only the chunks inside their episode (official valid[..., -1]);
    act returns (batch, H, action_dim): the flattened Euler sample, row k = actions k*d .. (k+1)*d."""
    h = 3
    _, batch, state = chunked
    config = state.config
    key = jax.random.key(2)
    _, metrics = qam.actor_loss(state.params["actor_slow"], state.params["actor_fast"],
                                lambda s, x, t: jnp.zeros_like(x), lambda s, a: jnp.zeros(a.shape[:-1]), batch, key,
                                dataclasses.replace(config, flow_steps=2))  # a cheap adjoint: only L_BC is checked
    bc_key = jax.random.split(key)[0]
    flat = batch["actions_chunk"].reshape(64, h * 2)
    errors = np.asarray(qam.flow_matching_errors(
        lambda s, x, t: qam.flow_velocity(state.params["actor_slow"], s, x, t, config),
        batch["observations"], flat, bc_key), np.float64)
    valid = np.asarray(batch["valid_chunk"][:, -1])
    assert float(metrics["bc_flow_loss"]) == pytest.approx(np.mean(valid * errors), rel=1e-5)
    assert abs(np.mean(errors) - np.mean(valid * errors)) > 0.01 * np.mean(errors)

    obs = batch["observations"][:5]
    chunks = qam.act(state, obs, jax.random.key(4))
    z = jax.random.normal(jax.random.key(4), (5, h * 2))
    np.testing.assert_array_equal(chunks, qam.sample_flow(state.params["actor_fast"], obs, z, config).reshape(5, h, 2))
    assert qam.act(state, obs[0], jax.random.key(4), deterministic=True).shape == (h, 2)


def test_chunked_init_needs_the_chunk_field():
    config = small_config(chunk_size=3)
    with pytest.raises(FluxrlError, match="actions_chunk' shaped \\(batch, 3, action_dim\\); got None"):
        qam.init(jax.random.key(0), random_batch(), config)
    assert qam.batch_spec(small_config()) is qam.BATCH_SPEC  # chunk 1: the plain transitions, no chunk_size option
    spec = qam.batch_spec(config)
    assert spec.chunk_size == 3 and "valid_chunk" in spec.keys and "actions" not in spec.keys


def test_trainer_reads_chunks_offline_and_online(tmp_path):
    """A chunked QAM (the cube task's default H = 5, or an explicit chunk_size) samples chunk fields of length H
    from the dataset offline and from the offline/online mix online (the open-loop execution and the replay's
    chunks are tested in tests/test_engine.py; the registered-agent test runs QAM online with H = 5); chunk_size 1
    reads plain transitions."""
    dataset = str(tmp_path / "data.npz")
    save_npz(dataset, tiny.synthetic_data(4, seed=0))
    cfg = TrainConfig(task=tiny.TASK, dataset=dataset, steps=2, online_steps=3, run_dir=str(tmp_path / "run"))
    assert agents.make_config("qam", "cpu", tiny.TASK).chunk_size == 5
    online = Trainer("qam", cfg)
    assert online.fields == qam.CHUNK_KEYS and ("chunk_size", 5) in online.sample_options
    assert Trainer("qam", cfg, small_config()).fields == qam.BATCH_SPEC.keys
    offline = Trainer("qam", dataclasses.replace(cfg, online_steps=0), small_config(chunk_size=2))
    assert offline.fields == qam.CHUNK_KEYS and ("chunk_size", 2) in offline.sample_options


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def adam_first_moment(opt_state):
    states = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState)]
    assert len(states) == 1
    return states[0].mu


def test_update_clips_the_gradient_and_moves_targets_from_pre_update_parameters():
    """One update: Adam's first moment is (1 - beta1) g with ||g|| = min(||grad||, 1) (global-norm clipping at 1);
    the target critic and target base flow become tau * theta_old + (1 - tau) * target (pre-update parameters)."""
    config = small_config(lr=0.1)  # a big step: old and new parameters far apart
    batch = random_batch()
    batch["rewards"] = batch["rewards"] * 100.0  # a raw gradient norm far above 1
    state = qam.init(jax.random.key(0), batch, config)
    state = state.replace(target_params=jax.tree_util.tree_map(lambda x: x + 0.1, state.target_params))
    frozen = jax.lax.stop_gradient(state.params)

    def td_loss(critic_params):  # a part of the total loss, so its gradient norm bounds the raw norm from below
        return qam.critic_loss(critic_params, state.target_params["critic"], frozen["actor_fast"], batch,
                               jax.random.key(1), config)[0]

    new, _ = jax.jit(qam.update)(state, batch, jax.random.key(1))
    assert float(optax.global_norm(jax.jit(jax.grad(td_loss))(state.params["critic"]))) > 10
    assert float(optax.global_norm(adam_first_moment(new.opt_state))) == pytest.approx(0.1, rel=1e-4)
    for group in ("critic", "actor_slow"):
        right = base.polyak(state.params[group], state.target_params[group], config.tau)
        wrong = base.polyak(new.params[group], state.target_params[group], config.tau)
        assert max_diff(new.target_params[group], right) < 1e-6 < 1e-4 < max_diff(new.target_params[group], wrong)
    assert set(new.target_params) == {"critic", "actor_slow"}  # the fine-tuned flow has no target


def test_acting_uses_the_base_flow_when_inv_temp_is_zero():
    config = small_config()
    batch = random_batch()
    state = qam.init(jax.random.key(0), batch, config)
    obs, key = batch["observations"], jax.random.key(2)
    z = jax.random.normal(key, (16, 2))
    fast = qam.sample_flow(state.params["actor_fast"], obs, z, config)
    slow = qam.sample_flow(state.params["actor_slow"], obs, z, config)
    np.testing.assert_array_equal(qam.act(state, obs, key), fast)
    untilted = state.replace(config=dataclasses.replace(config, inv_temp=0.0))
    np.testing.assert_array_equal(qam.act(untilted, obs, key), slow)
    np.testing.assert_array_equal(qam.act(state, obs, key, deterministic=True),
                                  qam.sample_flow(state.params["actor_fast"], obs, jnp.zeros((16, 2)), config))


# --- config, presets, per-task values ----------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("flow_steps", 0), ("num_critics", 1), ("inv_temp", -1.0),
                                          ("chunk_size", 0)])
def test_bad_config_is_one_sentence(field, value):
    config = dataclasses.replace(small_config(), **{field: value})
    with pytest.raises(FluxrlError, match=f"qam config field {field}"):
        qam.init(jax.random.key(0), random_batch(), config)


def test_paper_defaults_and_per_domain_values():
    paper = qam.PRESETS["paper"]
    assert (paper.num_critics, paper.rho, paper.inv_temp, paper.flow_steps) == (10, 0.5, 0.3, 10)
    assert paper.target_actor and paper.use_target_grad and paper.clip_adj and paper.clip_grad
    assert not paper.sparse_rewards and paper.chunk_size == 1
    # Chunks of 5 on every cube / scene / puzzle task, 1 on locomotion and navigation.
    cases = {
        "puzzle-3x3-play-singletask-task1": {"inv_temp": 3.0, "sparse_rewards": True, "discount": 0.99,
                                             "chunk_size": 5},
        "puzzle-4x4-play-singletask-task4": {"inv_temp": 30.0, "sparse_rewards": True, "chunk_size": 5},
        "scene-play-singletask-task2": {"inv_temp": 1.0, "sparse_rewards": True, "chunk_size": 5},
        "cube-double-play-singletask-task1": {"inv_temp": 1.0, "sparse_rewards": False, "chunk_size": 5},
        "cube-triple-play-singletask-task2": {"inv_temp": 3.0, "chunk_size": 5},
        "cube-quadruple-play-singletask-task1": {"inv_temp": 1.0, "chunk_size": 5},
        "antmaze-large-navigate-singletask-task1": {"inv_temp": 10.0, "discount": 0.99, "rho": 0.5, "chunk_size": 1},
        "antmaze-giant-navigate-singletask-task1": {"inv_temp": 3.0, "discount": 0.995, "rho": 0.5, "chunk_size": 1},
        "humanoidmaze-medium-navigate-singletask-task1": {"inv_temp": 3.0, "discount": 0.995, "rho": 0.0,
                                                          "chunk_size": 1},
        "humanoidmaze-large-navigate-singletask-task1": {"inv_temp": 3.0, "discount": 0.995, "rho": 0.0,
                                                         "chunk_size": 1},
        # Not in the paper: the defaults, with the domain's chunk length.
        "cube-single-play-singletask-task1": {"inv_temp": 0.3, "discount": 0.99, "chunk_size": 5},
        "puzzle-4x5-play-singletask-task1": {"inv_temp": 0.3, "sparse_rewards": False, "chunk_size": 5},
        "scene-noisy-singletask-task1": {"chunk_size": 5},
        "pointmaze-medium-navigate-singletask-task1": {"inv_temp": 0.3, "chunk_size": 1},
        "antsoccer-arena-navigate-singletask-task1": {"chunk_size": 1},
    }
    for preset in ("paper", "cpu"):
        for task, expected in cases.items():
            config = agents.make_config("qam", preset, task)
            assert {k: getattr(config, k) for k in expected} == expected, (preset, task)


# --- the CLI end to end ------------------------------------------------------------------------------------


def test_cli_train_with_chunks_evaluate_export_and_load(tmp_path, monkeypatch):
    """`fluxrl train qam --agent.chunk_size 3` on the engine tests' tiny env and dataset: 2 seeds, chunk batches
    from the sampler, logging, evaluation executing the chunks (episodes of at most 8 steps: a run past the end
    would reach 9), checkpoint; then export and load_policy, whose policy returns (3, action_dim) per observation."""
    monkeypatch.setattr(external, "make_env", tiny.fake_make_env)
    dataset = str(tmp_path / "data.npz")  # no -val split: one compilation fewer
    save_npz(dataset, tiny.synthetic_data(20, seed=0))
    run = tmp_path / "run"
    argv = ["train", "qam", "--task", tiny.TASK, "--dataset", dataset, "--steps", "6", "--seeds", "2",
            "--preset", "cpu", "--run_dir", str(run), "--updates_per_call", "3", "--log_interval", "3",
            "--eval_interval", "6", "--eval_episodes", "2", "--save_interval", "6", "--quiet",
            "--agent.actor_hidden", "16", "16", "--agent.critic_hidden", "16", "16", "--agent.num_critics", "3",
            "--agent.inv_temp", "2.0", "--agent.chunk_size", "3"]
    assert main(argv) == 0
    record = json.loads((run / "config.json").read_text())
    assert record["agent"] == "qam" and record["agent_config"]["inv_temp"] == 2.0
    assert record["agent_config"]["chunk_size"] == 3
    assert record["agent_config"]["actor_hidden"] == [16, 16] and record["agent_config"]["num_critics"] == 3
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if any("adj_loss" in k for k in line)]
    assert logged and all(math.isfinite(v) for line in logged for k, v in line.items() if "loss" in k)
    evals = [line for line in lines if any(k.startswith("evaluation/") for k in line)]
    assert evals and all(1 <= line["evaluation/length"] <= tiny.EPISODE_LENGTH for line in evals)
    assert (run / "eval.csv").stat().st_size > 0 and (run / "summary.md").stat().st_size > 0
    assert os.listdir(run / "checkpoints")

    policy = load_policy(export_policy(str(run), seed=1))
    assert policy.meta["example_batch"]["actions_chunk"][0] == [3, tiny.ACT_DIM]  # the batch spec followed H
    obs = np.random.default_rng(0).uniform(-1, 1, (4, tiny.OBS_DIM)).astype(np.float32)
    chunks = np.asarray(policy(obs))
    assert chunks.shape == (4, 3, tiny.ACT_DIM) and np.all(np.abs(chunks) <= 1)
    np.testing.assert_allclose(np.asarray(policy(obs[0])), chunks[0], atol=1e-6)

    # `fluxrl eval` of the exported chunking policy (QAM samples when evaluated) reproduces the run's evaluation.
    from fluxrl.cli import main as fluxrl_main
    from fluxrl.train.engine import EVAL_EPISODE_SALT, episode_seed

    rows = csv.DictReader((run / "eval.csv").read_text().splitlines())
    final = [r for r in rows if r["step"] == "6" and r["seed"] == "1"][0]
    report = tmp_path / "eval.json"
    assert fluxrl_main(["eval", "--policy", str(run / "policy_seed1"), "--episodes", "2", "--seed",
                        str(episode_seed(1, EVAL_EPISODE_SALT, 6)), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["mean_return"] == pytest.approx(float(final["evaluation/return"]), rel=1e-6)
    assert result["mean_length"] == pytest.approx(float(final["evaluation/length"]))
