"""Planar multi-robot trajectory problems, their metrics, and Flow-Opt's safety filter (SF).

A problem: N disc robots of radius r move from starts to goals in T seconds, at rest at both ends, past K disc
obstacles, with |velocity| <= v_max and |acceleration| <= a_max. A trajectory is, per robot and axis, the n + 1
coefficients of an order-n Bernstein polynomial (fluxrl.plan.bernstein), sampled at M times.

The safety filter projects a sampled trajectory c_s onto the constraints:

  min_c 1/2 ||c - c_s||^2   s.t.  boundary conditions A_eq c = b_eq,
                                  ||p_i(t) - p_j(t)|| >= 2r,   ||p_i(t) - o_k|| >= r + R_k,
                                  ||p_i'(t)|| <= v_max,        ||p_i''(t)|| <= a_max   at the M sample times.

As in SwarmGen (the authors' precursor code), each constraint is written in polar form, w = A_g c - o_g =
s_g d_g (cos a_g, sin a_g) with d_g >= 1 (collisions) or d_g <= 1 (bounds), and an augmented-Lagrangian
alternation runs a fixed number of iterations: (a, d) in closed form (the projection of w onto its feasible set),
the multipliers lam <- lam - sum_g rho_g A_g^T (A_g c - b_g), then c from one equality-constrained QP whose KKT
matrix is constant and inverted once. Both axes share it. Every step is differentiable, so the filter can be
unrolled and back-propagated through (Flow-Opt's learned initialiser is trained that way).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fluxrl.errors import FluxrlError
from fluxrl.plan.bernstein import bernstein_matrices


@dataclasses.dataclass(frozen=True)
class Setting:
    """A family of problems: sizes, robot and kinematic limits, and the filter's penalties (SwarmGen's values where
    it has them: order 10, 50 samples over 5 s, v_max 3, a_max 5, rho 1.1 / 1.0)."""

    num_robots: int = 4
    num_obstacles: int = 2
    order: int = 10
    num_times: int = 50
    horizon: float = 5.0
    robot_radius: float = 0.3
    v_max: float = 3.0
    a_max: float = 5.0
    workspace: float = 5.0  # starts, goals and obstacles lie in [-workspace, workspace]^2
    rho_pair: float = 1.1
    rho_obstacle: float = 1.1
    rho_velocity: float = 1.0
    rho_acceleration: float = 1.0

    @property
    def num_coeffs(self) -> int:
        return self.order + 1

    @property
    def num_pairs(self) -> int:
        return self.num_robots * (self.num_robots - 1) // 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Problems:
    """A batch of problems (leading axis B): starts and goals (B, N, 2), obstacle centres (B, K, 2) and radii (B, K)."""

    starts: jax.Array
    goals: jax.Array
    obstacles: jax.Array
    obstacle_radii: jax.Array

    def __getitem__(self, index):
        return jax.tree.map(lambda x: x[index], self)


def sample_problems(setting: Setting, num: int, seed: int, kind: str = "swap") -> Problems:
    """`swap`: robots evenly spaced on a circle (radius 0.7 of the workspace, angles jittered) each going to the
    antipodal point, obstacles near the centre, so paths must share the middle; `random`: starts and goals uniform
    in the workspace, obstacles anywhere. Starts, goals and obstacles never overlap (rejection sampling)."""
    if kind not in ("swap", "random"):
        raise FluxrlError(f"Unknown problem kind '{kind}'; choose swap or random.")
    rng = np.random.default_rng(seed)
    n, k, r, w = setting.num_robots, setting.num_obstacles, setting.robot_radius, setting.workspace
    starts, goals, obstacles, radii = [], [], [], []
    while len(starts) < num:
        if kind == "swap":
            angles = 2 * np.pi * np.arange(n) / n + rng.uniform(-0.3, 0.3) + rng.normal(0, 0.05, n)
            radius = 0.7 * w
            s = radius * np.stack([np.cos(angles), np.sin(angles)], -1)
            g = -s + rng.normal(0, 0.05, (n, 2))
            centres = rng.uniform(-0.3 * w, 0.3 * w, (k, 2))
        else:
            s = rng.uniform(-0.8 * w, 0.8 * w, (n, 2))
            g = rng.uniform(-0.8 * w, 0.8 * w, (n, 2))
            centres = rng.uniform(-0.6 * w, 0.6 * w, (k, 2))
        rad = rng.uniform(0.3, 0.6, k)
        if not (_separated(s, 2 * r + 0.2) and _separated(g, 2 * r + 0.2)
                and _clear(s, centres, rad + r + 0.2) and _clear(g, centres, rad + r + 0.2)):
            continue
        starts.append(s)
        goals.append(g)
        obstacles.append(centres)
        radii.append(rad)
    as32 = lambda x: jnp.asarray(np.stack(x), jnp.float32)  # noqa: E731
    return Problems(as32(starts), as32(goals), as32(obstacles).reshape(num, k, 2), as32(radii).reshape(num, k))


def _separated(points, distance) -> bool:
    d = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return bool(np.all(d[np.triu_indices(len(points), 1)] >= distance))


def _clear(points, centres, distance) -> bool:
    if len(centres) == 0:
        return True
    return bool(np.all(np.linalg.norm(points[:, None] - centres[None], axis=-1) >= distance[None]))


@functools.lru_cache(maxsize=None)
def matrices(setting: Setting) -> dict:
    """The filter's constant matrices (float32 numpy arrays, embedded as constants where traced) and the inverse of its KKT matrix (computed in float64)."""
    times = np.linspace(0.0, setting.horizon, setting.num_times)
    p, pdot, pddot = bernstein_matrices(setting.order, times)
    n, nv = setting.num_robots, setting.num_coeffs
    eye = np.eye(n)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    difference = np.zeros((len(pairs), n))
    for row, (i, j) in enumerate(pairs):
        difference[row, i], difference[row, j] = 1.0, -1.0
    a_pair = np.kron(difference, p)  # rows (pair, time): p_i(t) - p_j(t)
    a_pos, a_vel, a_acc = np.kron(eye, p), np.kron(eye, pdot), np.kron(eye, pddot)
    ends = np.stack([p[0], pdot[0], pddot[0], p[-1], pdot[-1], pddot[-1]])
    a_eq = np.kron(eye, ends)  # rows (robot, condition)
    q = (np.eye(n * nv) + setting.rho_pair * a_pair.T @ a_pair
         + setting.rho_obstacle * setting.num_obstacles * a_pos.T @ a_pos
         + setting.rho_velocity * a_vel.T @ a_vel + setting.rho_acceleration * a_acc.T @ a_acc)
    kkt = np.block([[q, a_eq.T], [a_eq, np.zeros((a_eq.shape[0],) * 2)]])
    projection = np.block([[np.eye(n * nv), a_eq.T], [a_eq, np.zeros((a_eq.shape[0],) * 2)]])
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731  (numpy: safe to cache across traces)
    return {"P": f32(p), "Pdot": f32(pdot), "Pddot": f32(pddot), "A_pair": f32(a_pair), "A_pos": f32(a_pos),
            "A_vel": f32(a_vel), "A_acc": f32(a_acc), "A_eq": f32(a_eq), "kkt_inv": f32(np.linalg.inv(kkt)),
            "projection_inv": f32(np.linalg.inv(projection)), "dt": setting.horizon / (setting.num_times - 1)}


def boundary_values(problem: Problems) -> jax.Array:
    """b_eq of one problem, (6N, 2): per robot its start, zero velocity and acceleration, goal, zero, zero."""
    zeros = jnp.zeros_like(problem.starts)
    return jnp.stack([problem.starts, zeros, zeros, problem.goals, zeros, zeros], axis=1).reshape(-1, 2)


def straight_line(setting: Setting, problem: Problems) -> jax.Array:
    """Control points evenly spaced on each robot's segment (one problem): coefficients (N * (n + 1), 2)."""
    fraction = jnp.linspace(0.0, 1.0, setting.num_coeffs)[None, :, None]
    line = problem.starts[:, None] + fraction * (problem.goals - problem.starts)[:, None]
    return line.reshape(-1, 2)


def project_boundary(setting: Setting, problem: Problems, coeffs: jax.Array) -> jax.Array:
    """argmin_c ||c - coeffs||^2 s.t. A_eq c = b_eq (one problem)."""
    m = matrices(setting)
    rhs = jnp.concatenate([coeffs, boundary_values(problem)])
    return (m["projection_inv"] @ rhs)[: coeffs.shape[0]]


def _polar(w):
    """(||w||, w / ||w||) per row; the direction of w = 0 is the x axis (SwarmGen's arctan2(0, eps) = 0), so
    exactly coincident robots are pushed apart rather than left in place."""
    squared = jnp.sum(w**2, -1, keepdims=True)
    degenerate = squared < 1e-12
    norm = jnp.sqrt(jnp.where(degenerate, 1.0, squared))  # the inner where keeps the gradient finite at w = 0
    direction = jnp.where(degenerate, jnp.array([1.0, 0.0], w.dtype), w / norm)
    return jnp.where(degenerate, 0.0, norm), direction


def _onto_disc_outside(w, radius):
    """The nearest point of {||x|| >= radius} (rows of w; radius broadcast per row): d = max(||w|| / radius, 1)."""
    norm, direction = _polar(w)
    return direction * jnp.maximum(norm, radius)


def _onto_disc_inside(w, radius):
    """The nearest point of {||x|| <= radius}: d = min(||w|| / radius, 1)."""
    norm, direction = _polar(w)
    return direction * jnp.minimum(norm, radius)


def safety_filter(setting: Setting, problem: Problems, sample: jax.Array, iterations: int,
                  guess: jax.Array | None = None, multipliers: jax.Array | None = None):
    """Project `sample` (N * (n + 1), 2) of one problem onto its constraints with `iterations` alternations, starting
    from `guess` (default: the sample) and `multipliers` (default 0). Returns (coefficients, primal residual
    after each iteration (iterations,)). Differentiable in sample, guess and multipliers."""
    _check_sizes(setting, problem)
    m = matrices(setting)
    s = setting
    r = s.robot_radius
    obstacle_radius = problem.obstacle_radii[:, None, None] + r  # (K, 1, 1)
    b_eq = boundary_values(problem)
    num_vars = sample.shape[0]
    coeffs = project_boundary(setting, problem, sample if guess is None else guess)
    lam = jnp.zeros_like(sample) if multipliers is None else multipliers

    def targets(c):
        """(a, d) step: each constraint's nearest feasible value b_g, and the residuals A_g c - b_g."""
        pair = m["A_pair"] @ c
        pos = m["A_pos"] @ c
        rel = pos[None] - problem.obstacles[:, None, :]  # (K, N*M, 2)
        vel, acc = m["A_vel"] @ c, m["A_acc"] @ c
        b_pair = _onto_disc_outside(pair, 2 * r)
        b_obs = problem.obstacles[:, None, :] + _onto_disc_outside(rel, obstacle_radius)
        b_vel, b_acc = _onto_disc_inside(vel, s.v_max), _onto_disc_inside(acc, s.a_max)
        residuals = (pair - b_pair, pos[None] - b_obs, vel - b_vel, acc - b_acc)
        return (b_pair, b_obs.sum(0), b_vel, b_acc), residuals

    def body(carry, _):
        c, lam = carry
        (b_pair, b_obs_sum, b_vel, b_acc), (r_pair, r_obs, r_vel, r_acc) = targets(c)
        lam = lam - (s.rho_pair * m["A_pair"].T @ r_pair + s.rho_obstacle * m["A_pos"].T @ r_obs.sum(0)
                     + s.rho_velocity * m["A_vel"].T @ r_vel + s.rho_acceleration * m["A_acc"].T @ r_acc)
        rhs = (sample + lam + s.rho_pair * m["A_pair"].T @ b_pair + s.rho_obstacle * m["A_pos"].T @ b_obs_sum
               + s.rho_velocity * m["A_vel"].T @ b_vel + s.rho_acceleration * m["A_acc"].T @ b_acc)
        c = (m["kkt_inv"] @ jnp.concatenate([rhs, b_eq]))[:num_vars]
        _, (r_pair, r_obs, r_vel, r_acc) = targets(c)
        residual = jnp.sqrt(sum(jnp.sum(x**2) for x in (r_pair, r_obs, r_vel, r_acc)))
        return (c, lam), residual

    (coeffs, _), residuals = jax.lax.scan(body, (coeffs, lam), None, length=iterations)
    return coeffs, residuals


def _check_sizes(setting: Setting, problem: Problems) -> None:
    if problem.starts.shape[-2:] != (setting.num_robots, 2) or problem.obstacles.shape[-2] != setting.num_obstacles:
        raise FluxrlError(f"A problem with {problem.starts.shape[-2]} robots and {problem.obstacles.shape[-2]} "
                          f"obstacles does not fit a setting of {setting.num_robots} robots and "
                          f"{setting.num_obstacles} obstacles.")


def positions(setting: Setting, coeffs: jax.Array) -> jax.Array:
    """(N, M, 2) positions of one problem's trajectory."""
    m = matrices(setting)
    return (m["A_pos"] @ coeffs).reshape(setting.num_robots, setting.num_times, 2)


def trajectory_metrics(setting: Setting, problem: Problems, coeffs: jax.Array, tolerance: float = 0.01) -> dict:
    """One problem: minimum robot-robot and robot-obstacle clearance over the sample times (negative: overlap),
    peak speed and acceleration, the largest boundary-condition error, the smoothness cost (integral of
    |acceleration|^2), and `feasible`: clearances >= -tolerance, speed <= v_max + tolerance and acceleration <=
    a_max + tolerance, boundary error <= tolerance."""
    _check_sizes(setting, problem)
    m = matrices(setting)
    r = setting.robot_radius
    pair = (m["A_pair"] @ coeffs).reshape(setting.num_pairs, setting.num_times, 2)
    pos = positions(setting, coeffs)
    robot_clearance = (jnp.min(jnp.linalg.norm(pair, axis=-1)) - 2 * r if setting.num_pairs
                       else jnp.array(jnp.inf))
    rel = pos[:, :, None, :] - problem.obstacles[None, None]
    obstacle_clearance = (jnp.min(jnp.linalg.norm(rel, axis=-1) - problem.obstacle_radii - r)
                          if setting.num_obstacles else jnp.array(jnp.inf))
    speed = jnp.max(jnp.linalg.norm(m["A_vel"] @ coeffs, axis=-1))
    accel_rows = m["A_acc"] @ coeffs
    accel = jnp.max(jnp.linalg.norm(accel_rows, axis=-1))
    boundary_error = jnp.max(jnp.abs(m["A_eq"] @ coeffs - boundary_values(problem)))
    smoothness = jnp.sum(accel_rows**2) * m["dt"]
    feasible = ((robot_clearance >= -tolerance) & (obstacle_clearance >= -tolerance)
                & (speed <= setting.v_max + tolerance) & (accel <= setting.a_max + tolerance)
                & (boundary_error <= tolerance))
    return {"robot_clearance": robot_clearance, "obstacle_clearance": obstacle_clearance, "max_speed": speed,
            "max_acceleration": accel, "boundary_error": boundary_error, "smoothness": smoothness,
            "feasible": feasible}
