"""Flow-Opt: the Bernstein basis, the safety filter (projection, convergence, minimal change, gradients), the
metrics on hand-made trajectories, the conditional generator against known mode frequencies, and planning."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxrl.plan import flowopt as fo
from fluxrl.plan.bernstein import bernstein_matrices
from fluxrl.plan.multirobot import (Problems, Setting, matrices, project_boundary, safety_filter, sample_problems,
                                    straight_line, trajectory_metrics)


def problem(starts, goals, obstacles=(), radii=()):
    as_array = lambda x, shape: jnp.asarray(np.asarray(x, np.float32).reshape(shape))  # noqa: E731
    return Problems(as_array(starts, (-1, 2)), as_array(goals, (-1, 2)), as_array(obstacles, (-1, 2)),
                    as_array(radii, (-1,)))


def test_bernstein_basis_interpolates_ends_sums_to_one_and_differentiates_exactly():
    t = np.linspace(0.0, 5.0, 50)
    p, pdot, pddot = bernstein_matrices(10, t)
    assert np.allclose(p.sum(1), 1) and np.allclose(pdot.sum(1), 0) and np.allclose(pddot.sum(1), 0)
    assert np.allclose(p[0], np.eye(11)[0]) and np.allclose(p[-1], np.eye(11)[-1])
    # A cubic is an order-10 Bernstein polynomial: fitted coefficients reproduce it and its derivatives exactly.
    cubic = lambda t: 2 - t + 0.3 * t**2 - 0.05 * t**3  # noqa: E731
    coeffs = np.linalg.lstsq(p, cubic(t), rcond=None)[0]
    assert np.abs(p @ coeffs - cubic(t)).max() < 1e-9
    assert np.abs(pdot @ coeffs - (-1 + 0.6 * t - 0.15 * t**2)).max() < 1e-8
    assert np.abs(pddot @ coeffs - (0.6 - 0.3 * t)).max() < 1e-7


def test_boundary_projection_is_the_constrained_least_squares_solution():
    s = Setting(num_robots=3, num_obstacles=0)
    pb = sample_problems(s, 1, 0, "random")[0]
    sample = np.random.default_rng(0).normal(size=(3 * 11, 2))
    ours = np.asarray(project_boundary(s, pb, jnp.asarray(sample, jnp.float32)))
    # Independently: c = sample + A^T (A A^T)^-1 (b - A sample), in float64.
    a = np.asarray(matrices(s)["A_eq"], np.float64)
    b = np.stack([np.asarray(pb.starts), 0 * pb.starts, 0 * pb.starts, np.asarray(pb.goals), 0 * pb.goals,
                  0 * pb.goals], 1).reshape(-1, 2)
    exact = sample + a.T @ np.linalg.solve(a @ a.T, b - a @ sample)
    assert np.abs(ours - exact).max() < 1e-3


def test_the_filter_leaves_a_feasible_trajectory_where_it_is():
    s = Setting(num_robots=2, num_obstacles=1)
    pb = problem([[-3, -2], [-3, 2]], [[3, -2], [3, 2]], [[0, 4.5]], [0.3])
    line = project_boundary(s, pb, straight_line(s, pb))
    assert bool(trajectory_metrics(s, pb, line)["feasible"])
    coeffs, residuals = safety_filter(s, pb, line, 20)
    assert np.abs(np.asarray(coeffs - line)).max() < 1e-4 and float(residuals.max()) < 1e-4


@pytest.mark.parametrize("case", ["robots", "obstacle"])
def test_the_filter_resolves_a_collision(case):
    """Two robots swapping places on (almost) the same line, a slight offset breaking the mirror symmetry, or one
    robot driving through a disc obstacle: from the colliding straight line, the filter converges to a feasible
    trajectory. (Its fixed point is feasible but not the nearest feasible trajectory: multipliers of constraints
    that become inactive keep their value; docs/flowopt.md.)"""
    if case == "robots":
        s = Setting(num_robots=2, num_obstacles=0)
        pb = problem([[-3, 0], [3, 0.1]], [[3, 0], [-3, 0.1]])
    else:
        s = Setting(num_robots=1, num_obstacles=1)
        pb = problem([[-3, 0.05]], [[3, 0.05]], [[0, 0]], [0.5])
    clearance = {"robots": "robot_clearance", "obstacle": "obstacle_clearance"}[case]
    line = straight_line(s, pb)
    assert float(trajectory_metrics(s, pb, project_boundary(s, pb, line))[clearance]) < -0.3
    coeffs, residuals = jax.jit(lambda p, c: safety_filter(s, p, c, 400))(pb, line)
    metrics = trajectory_metrics(s, pb, coeffs)
    assert float(residuals[-1]) < 1e-3 and float(residuals[-1]) < 0.01 * float(residuals[0])
    assert bool(metrics["feasible"]) and float(metrics[clearance]) >= -0.01
    assert float(metrics["boundary_error"]) < 1e-4


def test_the_filter_is_differentiable_through_its_iterations():
    s = Setting(num_robots=2, num_obstacles=1)
    pb = problem([[-3, 0], [3, 0.3]], [[3, 0], [-3, 0.3]], [[0, -1.5]], [0.4])
    sample = straight_line(s, pb)
    direction = jax.random.normal(jax.random.key(0), sample.shape)
    f = lambda x: jnp.sum(jnp.sin(safety_filter(s, pb, x, 15)[0]))  # noqa: E731
    grad = jax.grad(f)(sample)
    assert bool(jnp.all(jnp.isfinite(grad)))
    eps = 1e-2
    numeric = (f(sample + eps * direction) - f(sample - eps * direction)) / (2 * eps)
    assert abs(float(jnp.sum(grad * direction)) - float(numeric)) < 0.05 * abs(float(numeric)) + 1e-3


def test_metrics_of_hand_made_trajectories():
    s = Setting(num_robots=2, num_obstacles=1, robot_radius=0.3)
    # Both robots at rest, 1.0 apart, an obstacle of radius 0.5 at distance 2 from the first.
    pb = problem([[0, 0], [1, 0]], [[0, 0], [1, 0]], [[0, 2]], [0.5])
    resting = jnp.repeat(jnp.asarray([[0.0, 0.0], [1.0, 0.0]]), s.num_coeffs, axis=0)
    m = trajectory_metrics(s, pb, resting)
    assert np.isclose(float(m["robot_clearance"]), 1.0 - 0.6, atol=1e-6)
    assert np.isclose(float(m["obstacle_clearance"]), 2.0 - 0.5 - 0.3, atol=1e-6)
    assert float(m["max_speed"]) < 1e-5 and float(m["smoothness"]) < 1e-8 and bool(m["feasible"])
    # Too fast: one robot's straight line over 40 m in 5 s peaks far above v_max.
    fast = problem([[-20, 0], [0, 5]], [[20, 0], [0, 5]], [[0, -4]], [0.5])
    m = trajectory_metrics(s, fast, project_boundary(s, fast, straight_line(s, fast)))
    assert float(m["max_speed"]) > s.v_max and not bool(m["feasible"])


@pytest.mark.slow
def test_the_generator_learns_conditional_mode_frequencies():
    """Two robots swap places through the centre; the data's solutions have both robots pass on their left (a detour
    to the left of each one's direction of travel) or both on their right. P(left) = 0.2 where the swap's axis is at
    0-90 degrees (mod 180: relabelling the robots gives the same problem, so the frequency must not depend on
    which robot starts where) and 0.8 at 90-180 degrees. Sampled trajectories reproduce both frequencies and the
    two detours' shapes."""
    s = Setting(num_robots=2, num_obstacles=0)
    cfg = fo.FlowOptConfig(setting=s, hidden=64, blocks=2, batch_size=128, lr=1e-3)
    rng = np.random.default_rng(0)
    num, per = 64, 20
    angles = rng.uniform(0, 2 * np.pi, num)
    starts = 3 * np.stack([np.cos(angles), np.sin(angles)], -1)
    pbs = Problems(jnp.asarray(np.stack([starts, -starts], 1), jnp.float32),
                   jnp.asarray(np.stack([-starts, starts], 1), jnp.float32),
                   jnp.zeros((num, 0, 2)), jnp.zeros((num, 0)))
    p_left = np.where(np.mod(angles, np.pi) < np.pi / 2, 0.2, 0.8)
    left = rng.uniform(size=(num, per)) < p_left[:, None]
    bump = np.sin(np.pi * np.arange(11) / 10)  # zero at both ends

    def detour(problem_index, is_left):
        heading = -starts[problem_index] / np.linalg.norm(starts[problem_index])
        normal = np.array([-heading[1], heading[0]]) * (1.0 if is_left else -1.0)
        rows = np.stack([bump[:, None] * normal, -bump[:, None] * normal])  # robot 1 goes the other way round
        return rows.reshape(-1, 2)

    base = jax.vmap(lambda p: fo.base_trajectory(s, p))(pbs)
    solutions = np.stack([[np.asarray(base[i]) + detour(i, left[i, g]) for g in range(per)] for i in range(num)])
    gen, losses = fo.train_generator(cfg, pbs, jnp.asarray(solutions, jnp.float32), np.ones((num, per), bool), 3000)
    assert losses[-200:].mean() < 0.5 * losses[:100].mean()

    test_angles = np.array([np.pi / 4, 3 * np.pi / 4 + np.pi])  # axes at 45 and 135 degrees
    for angle, expected in zip(test_angles, (0.2, 0.8)):
        start = 3 * np.array([np.cos(angle), np.sin(angle)])
        pb = problem([start, -start], [-start, start])
        samples = jax.jit(lambda k: fo.sample_trajectories(gen, cfg, pb, k, 400))(jax.random.key(1))
        offsets = np.asarray(samples - fo.base_trajectory(s, pb)[None]).reshape(400, 2, 11, 2)
        heading = -start / 3
        normal = np.array([-heading[1], heading[0]])
        middle = offsets[:, 0, 5] @ normal  # robot 0's detour at its middle control point, + = left
        frequency = float(np.mean(middle > 0))
        assert abs(frequency - expected) < 0.08, (angle, frequency)
        # Each mode's mean shape: the middle control point's detour is ±1 (the data's bump).
        assert abs(np.mean(middle[middle > 0]) - 1.0) < 0.15 and abs(np.mean(middle[middle < 0]) + 1.0) < 0.15


@pytest.mark.slow
def test_the_learned_initialiser_lowers_the_filters_residuals_on_new_problems():
    """Trained through the unrolled filter on generator samples of some problems, the initialiser lowers its
    objective (the mean log residual over the filter's iterations) on held-out problems and fresh samples, against
    the default start (the sample itself, zero multipliers), which it equals before training."""
    s = Setting(num_robots=3, num_obstacles=1)
    cfg = fo.FlowOptConfig(setting=s, hidden=64, blocks=2, initializer_batch_size=8, initializer_samples=4)
    train = sample_problems(s, 128, 0, "swap")
    solutions, feasible = fo.solve_from_perturbations(s, train, 4, 1, iterations=200)
    gen, _ = fo.train_generator(cfg, train, solutions, feasible, 1000)
    init, losses = fo.train_initializer(cfg, gen, train, 200)
    test = sample_problems(s, 64, 7, "swap")

    def objective(initializer):
        def one(pb, key):
            samples = fo.sample_trajectories(gen, cfg, pb, key, 8)
            return fo.filter_samples(cfg, pb, samples, initializer)[1]

        residuals = jax.jit(jax.vmap(one))(test, jax.random.split(jax.random.key(3), 64))
        return float(fo.initializer_objective(residuals))

    default = objective(None)
    assert abs(objective(fo.init_initializer(cfg, jax.random.key(5))) - default) < 1e-6
    learned = objective(init)
    print(f"held-out objective: default {default:.3f}, learned {learned:.3f}")
    assert learned < default - 0.1, (learned, default)


def test_planning_returns_each_problems_best_candidate():
    s = Setting(num_robots=2, num_obstacles=1)
    cfg = dataclasses.replace(fo.FlowOptConfig(setting=s), filter_iterations=100, num_samples=4)
    pbs = sample_problems(s, 3, 0, "swap")
    coeffs, metrics = jax.jit(lambda p, k: fo.plan(cfg, p, k))(pbs, jax.random.key(0))
    assert coeffs.shape == (3, 2 * 11, 2)
    again = jax.vmap(lambda p, c: trajectory_metrics(s, p, c))(pbs, coeffs)
    assert np.allclose(np.asarray(again["smoothness"]), np.asarray(metrics["smoothness"]))
    assert bool(jnp.all(metrics["feasible"]))


def test_a_problem_of_another_size_is_refused():
    from fluxrl.errors import FluxrlError

    pb = sample_problems(Setting(num_robots=3, num_obstacles=1), 1, 0)[0]
    with pytest.raises(FluxrlError, match="3 robots and 1 obstacles does not fit a setting of 4 robots and 2"):
        safety_filter(Setting(), pb, jnp.zeros((44, 2)), 5)


def test_a_saved_generator_loads_to_the_same_sampler(tmp_path):
    from fluxrl.errors import FluxrlError

    s = Setting(num_robots=2, num_obstacles=1)
    cfg = fo.FlowOptConfig(setting=s, hidden=32, blocks=1)
    pbs = sample_problems(s, 8, 0)
    solutions, feasible = fo.solve_from_perturbations(s, pbs, 2, 0, iterations=50)
    gen, _ = fo.train_generator(cfg, pbs, solutions, np.ones_like(feasible), 100)
    init = jax.tree.map(lambda x: x + 0.01, fo.init_initializer(cfg, jax.random.key(1)))
    fo.save_generator(str(tmp_path / "g"), gen, cfg, {"note": "test"}, init)
    loaded, loaded_cfg, record, loaded_init = fo.load_generator(str(tmp_path / "g"))
    assert loaded_cfg == cfg and record["note"] == "test"
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), init, loaded_init))
    key = jax.random.key(4)
    assert np.array_equal(np.asarray(fo.sample_trajectories(gen, cfg, pbs[0], key, 3)),
                          np.asarray(fo.sample_trajectories(loaded, loaded_cfg, pbs[0], key, 3)))
    with pytest.raises(FluxrlError, match="already exists"):
        fo.save_generator(str(tmp_path / "g"), gen, cfg)


def test_plan_commands_train_then_plan_and_refuse_bad_input(tmp_path, capsys):
    from fluxrl.cli import main as fluxrl_main

    out = tmp_path / "gen"
    assert fluxrl_main(["plan", "train", "--out", str(out), "--robots", "2", "--obstacles", "1", "--problems", "16",
                        "--guesses", "2", "--steps", "100", "--initializer_steps", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["generator.json", "generator.npz"]
    plot, metrics = tmp_path / "plans.png", tmp_path / "plans.json"
    assert fluxrl_main(["plan", "run", str(out), "--problems", "3", "--plot", str(plot), "--json", str(metrics)]) == 0
    assert "Planned 3 swap problems (2 robots, 1 obstacle)" in capsys.readouterr().out
    record = json.loads(metrics.read_text())
    assert len(record["problems"]) == 3 and record["filter_iterations"] == 15 and plot.stat().st_size > 1000
    before = plot.read_bytes()
    for argv, fragment in [
        (["plan", "run", str(out), "--plot", str(plot)], "already exists"),
        (["plan", "run", str(tmp_path / "none")], "holds no Flow-Opt generator"),
        (["plan", "train", "--out", str(out)], "generator.npz already exists"),
        (["plan", "train", "--out", str(tmp_path / "x"), "--steps", "0"], "--steps must be at least 1"),
    ]:
        assert fluxrl_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert plot.read_bytes() == before and not (tmp_path / "x").exists()
