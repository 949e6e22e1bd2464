"""Networks and flow utilities against hand computations and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fluxrl.flows import euler, flow_matching_errors, flow_matching_loss, integrate, linear_path, midpoint
from fluxrl.nn import MLP, DiagGaussian, GaussianActor, Value, VectorField, default_init, vector_field_given


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


# --- MLP ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_norm", [False, True])
def test_mlp_matches_hand_forward_gelu_then_layernorm(layer_norm):
    """Dense -> GELU -> (LayerNorm) on hidden layers, plain Dense at the output."""
    mlp = MLP((7, 6, 3), layer_norm=layer_norm)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    params = mlp.init(jax.random.PRNGKey(0), x)["params"]
    # Random biases / LN params so that a misplaced bias or LayerNorm would show.
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    h = x.astype(np.float64)
    for i in range(3):
        dense = params[f"Dense_{i}"]
        h = h @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"], np.float64)
        if i < 2:
            h = _gelu_tanh(h)
            if layer_norm:
                ln = params[f"LayerNorm_{i}"]
                h = _layer_norm(h, np.asarray(ln["scale"], np.float64), np.asarray(ln["bias"], np.float64))
    assert ("LayerNorm_0" in params) == layer_norm and "LayerNorm_2" not in params
    np.testing.assert_allclose(mlp.apply({"params": params}, x), h, rtol=1e-4, atol=1e-5)


def test_default_init_is_fan_avg_uniform_with_zero_bias():
    fan_in, fan_out = 300, 500
    params = MLP((fan_out,)).init(jax.random.PRNGKey(0), jnp.zeros((1, fan_in)))["params"]["Dense_0"]
    kernel = np.asarray(params["kernel"])
    limit = math.sqrt(3.0 / ((fan_in + fan_out) / 2))  # uniform(-l, l) has variance l²/3 = 1/fan_avg
    assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.99 * limit
    assert kernel.var() == pytest.approx(1.0 / ((fan_in + fan_out) / 2), rel=0.02)
    assert np.all(np.asarray(params["bias"]) == 0)
    small = default_init(1e-2)(jax.random.PRNGKey(0), (fan_in, fan_out))
    assert float(jnp.var(small)) == pytest.approx(1e-2 / ((fan_in + fan_out) / 2), rel=0.02)


# --- Value ensembles ---------------------------------------------------------------------------------------


def test_value_ensemble_members_are_independent_mlps_on_concat():
    obs = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    act = np.random.default_rng(1).normal(size=(6, 2)).astype(np.float32)
    critic = Value((8, 8), layer_norm=True, num_ensembles=3)
    params = critic.init(jax.random.PRNGKey(0), obs, act)["params"]
    q = critic.apply({"params": params}, obs, act)
    assert q.shape == (3, 6)
    single = MLP((8, 8, 1), layer_norm=True)
    for i in range(3):
        member = jax.tree_util.tree_map(lambda p: p[i], params["VmapMLP_0"])
        expected = single.apply({"params": member}, np.concatenate([obs, act], -1))[:, 0]
        np.testing.assert_allclose(q[i], expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(q[0], q[1])  # members start different
    v = Value((8,), num_ensembles=1)
    assert v.apply(v.init(jax.random.PRNGKey(0), obs), obs).shape == (6,)


# --- Vector field ------------------------------------------------------------------------------------------


def test_vector_field_time_input_broadcasts_and_matters():
    obs = np.ones((5, 3), np.float32)
    x = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
    vf = VectorField((16,))
    params = vf.init(jax.random.PRNGKey(0), obs, x, 0.0)["params"]
    apply = lambda t: vf.apply({"params": params}, obs, x, t)  # noqa: E731
    out = apply(0.3)
    assert out.shape == x.shape
    np.testing.assert_array_equal(out, apply(jnp.full((5, 1), 0.3)))
    np.testing.assert_array_equal(out, apply(jnp.full((5,), 0.3)))
    assert not np.allclose(out, apply(0.7))
    assert params["MLP_0"]["Dense_0"]["kernel"].shape == (3 + 2 + 1, 16)  # raw scalar time, no embedding
    one_step = vf.init(jax.random.PRNGKey(0), obs, x)["params"]
    assert one_step["MLP_0"]["Dense_0"]["kernel"].shape == (3 + 2, 16)


@pytest.mark.parametrize("hidden", [(16,), (16, 12, 8)])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_vector_field_given_a_condition_equals_the_full_vector_field(hidden, layer_norm):
    """The condition's first-layer share computed once, broadcast over samples (N = 4 per condition): the same
    velocities as the vector field on the tiled condition, for scalar and per-row times."""
    rng = np.random.default_rng(0)
    cond = rng.normal(size=(3, 1, 6)).astype(np.float32)
    x = rng.normal(size=(3, 4, 2)).astype(np.float32)
    tiled = np.broadcast_to(cond, (3, 4, 6))
    vf = VectorField(hidden, layer_norm=layer_norm)
    params = vf.init(jax.random.PRNGKey(0), tiled, x, 0.0)["params"]
    # Random biases / LN params so that a dropped bias or a misnumbered layer would show.
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    velocity = jax.jit(lambda x, t: vector_field_given(vf, params, cond)(x, t))
    for t in (0.3, jnp.asarray(rng.uniform(size=(3, 4)), jnp.float32)):
        expected = vf.apply({"params": params}, tiled, x, t)
        np.testing.assert_allclose(velocity(x, t), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(velocity(x, 0.3), velocity(x, 0.7))
    with pytest.raises(ValueError, match="x has 3 features"):
        vector_field_given(vf, params, cond)(np.zeros((3, 4, 3), np.float32), 0.0)


# --- Gaussian heads ----------------------------------------------------------------------------------------


def test_diag_gaussian_log_prob_matches_scipy():
    loc = np.array([[0.3, -1.0]], np.float32)
    scale = np.array([0.5, 2.0], np.float32)
    x = np.array([[0.1, 0.7]], np.float32)
    expected = stats.norm.logpdf(x, loc, scale).sum()
    assert float(DiagGaussian(loc, scale).log_prob(x)[0]) == pytest.approx(expected, rel=1e-5)


def test_tanh_gaussian_density_integrates_to_one_and_mode_is_tanh_mean():
    dist = DiagGaussian(jnp.array([[0.4]]), jnp.array([0.8]), tanh=True)
    y = np.linspace(-1 + 1e-5, 1 - 1e-5, 400001, dtype=np.float64)
    density = np.exp(np.asarray(dist.log_prob(jnp.asarray(y[:, None], jnp.float32)), np.float64))
    assert np.trapezoid(density, y) == pytest.approx(1.0, abs=2e-3)
    assert float(dist.mode()[0, 0]) == pytest.approx(math.tanh(0.4), rel=1e-6)
    samples = dist.sample(jax.random.PRNGKey(0))
    assert float(jnp.abs(samples).max()) < 1.0


def test_gaussian_actor_std_options():
    obs = jnp.ones((3, 4))
    fixed = GaussianActor((8,), 2, const_std=True)
    d = fixed.apply(fixed.init(jax.random.PRNGKey(0), obs), obs)
    np.testing.assert_array_equal(d.scale, 1.0)
    learned = GaussianActor((8,), 2, const_std=False)
    p = learned.init(jax.random.PRNGKey(0), obs)["params"]
    assert p["log_stds"].shape == (2,)
    p = dict(p, log_stds=jnp.array([-10.0, 5.0]))  # clipped to [-5, 2]
    np.testing.assert_allclose(learned.apply({"params": p}, obs).scale, np.exp([-5.0, 2.0]), rtol=1e-6)


# --- Flows -------------------------------------------------------------------------------------------------


def test_linear_path_endpoints_and_velocity():
    x0, x1 = jnp.array([[1.0, -2.0]]), jnp.array([[3.0, 4.0]])
    xt, v = linear_path(x0, x1, jnp.array([[0.25]]))
    np.testing.assert_allclose(xt, [[1.5, -0.5]])
    np.testing.assert_allclose(v, [[2.0, 6.0]])
    np.testing.assert_allclose(linear_path(x0, x1, jnp.zeros((1, 1)))[0], x0)
    np.testing.assert_allclose(linear_path(x0, x1, jnp.ones((1, 1)))[0], x1)


def test_flow_matching_loss_closed_forms_for_a_point_mass():
    """Data = a point mass at a*. The exact field (a* - x)/(1 - t) has zero loss; the zero field has loss
    mean_d(a*² + 1) (mean over dims, not sum)."""
    a_star = jnp.array([0.5, -0.25, 0.75])
    n = 200_000
    obs, actions = jnp.zeros((n, 1)), jnp.broadcast_to(a_star, (n, 3))
    exact = flow_matching_loss(lambda s, x, t: (a_star - x) / (1.0 - t), obs, actions, jax.random.PRNGKey(0))
    assert float(exact) < 1e-6
    zero = flow_matching_loss(lambda s, x, t: jnp.zeros_like(x), obs, actions, jax.random.PRNGKey(1))
    assert float(zero) == pytest.approx(float(jnp.mean(a_star**2 + 1.0)), rel=0.01)
    per_sample = flow_matching_errors(lambda s, x, t: jnp.zeros_like(x), obs, actions, jax.random.PRNGKey(1))
    assert per_sample.shape == (n,)


def test_euler_and_midpoint_match_their_discrete_closed_forms():
    x0 = jnp.array([[1.0, 2.0]])
    n = 7
    decay = lambda x, t: -x  # noqa: E731
    np.testing.assert_allclose(euler(decay, x0, n), x0 * (1 - 1 / n) ** n, rtol=1e-6)
    h = 1 / n
    np.testing.assert_allclose(midpoint(decay, x0, n), x0 * (1 - h + h**2 / 2) ** n, rtol=1e-6)
    # dx/dt = t: Euler sums left endpoints, (n - 1) / (2n); midpoint is exact, 1/2.
    ramp = lambda x, t: jnp.full_like(x, t)  # noqa: E731
    np.testing.assert_allclose(euler(ramp, jnp.zeros((1,)), n), [(n - 1) / (2 * n)], rtol=1e-6)
    np.testing.assert_allclose(midpoint(ramp, jnp.zeros((1,)), n), [0.5], rtol=1e-6)
    x1, path = integrate(ramp, jnp.zeros((1,)), n, return_path=True)
    assert path.shape == (n, 1) and float(path[0, 0]) == 0.0
    np.testing.assert_allclose(path[1:, 0], np.cumsum(np.arange(n - 1) / n**2), rtol=1e-6)


def test_integrator_clip_options():
    grow = lambda x, t: jnp.full_like(x, 3.0)  # noqa: E731
    x0 = jnp.zeros((2,))
    np.testing.assert_allclose(euler(grow, x0, 4), [3.0, 3.0])
    np.testing.assert_allclose(euler(grow, x0, 4, clip=(-1.0, 1.0)), [1.0, 1.0])
    # Clipping every step changes the trajectory: from -2 with 4 steps of +0.25, -1 at the end without it;
    # with it the first step lands at -1.75 -> -1, then -0.75, -0.5, -0.25.
    unit = lambda x, t: jnp.ones_like(x)  # noqa: E731
    start = jnp.full((1,), -2.0)
    np.testing.assert_allclose(euler(unit, start, 4, clip=(-1.0, 1.0)), [-1.0])
    np.testing.assert_allclose(euler(unit, start, 4, clip=(-1.0, 1.0), clip_every_step=True), [-0.25])


def test_euler_of_the_gaussian_flow_recovers_the_affine_map():
    """For data N(m, s²) in 1-D, the linear path's marginal velocity is linear in x and the flow map is
    z -> m + s z; fine Euler steps reproduce it."""
    m, s = 0.3, 0.5

    def velocity(x, t):
        var = (1 - t) ** 2 + (t * s) ** 2
        # E[x1 - x0 | x_t = x] for the Gaussian coupling.
        return m + ((t * s**2 - (1 - t)) / var) * (x - t * m)

    z = jnp.linspace(-2, 2, 9)
    np.testing.assert_allclose(midpoint(velocity, z, 200), m + s * z, atol=1e-4)
