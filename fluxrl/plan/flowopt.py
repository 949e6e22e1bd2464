"""Flow-Opt (Idoko, Jadhav & Singh, arXiv 2510.09204): multi-robot trajectories sampled from a conditional
flow-matching generator, then repaired by a fast differentiable safety filter started where a learned
initialiser says.
No official code is public; this follows the paper's abstract and the authors' precursor SwarmGen (research note
shared/research/online_flow_algos.md §4), on planar problems (fluxrl.plan.multirobot). Deviations: docs/flowopt.md.

  generator     v_theta(x_t, t | problem): conditional flow matching from N(0, I) to the detour x_1 = c - c_0 of a
                solution c from the straight-line trajectory c_0 (both Bernstein coefficients, scaled by their
                training std). The network is permutation-equivariant over robots and invariant over obstacles
                (a DeepSets stack; the paper's is a DiT with permutation-invariant encoders).
                L = E || v_theta(x_t, t) - (x_1 - x_0) ||^2,  x_t = (1 - t) x_0 + t x_1,  t ~ U[0, 1];
                sampling integrates flow_steps Euler steps from x_0 ~ N(0, I).
  initialiser   g_phi(c_s | problem) -> (guess shift, multipliers): the filter's start for a candidate, trained
                self-supervised through the unrolled filter on generator samples of the training problems:
                L = mean_k log(residual_k + 1e-3) over the filter's iterations (the log keeps far-from-feasible
                problems from dominating; the paper's exact loss is not verified). Its output layer starts at
                zero, i.e. at the default start (the sample itself, zero multipliers).
  planning      num_samples candidates per problem -> filter (filter_iterations alternations) -> the feasible
                candidate of least smoothness cost (the least infeasible one when none is feasible).

Training data: for each problem, solutions of the safety filter (many iterations) from random smooth
perturbations of the straight line, keeping the feasible ones; different perturbations reach different ways
around the other robots and the obstacles, which the generator learns as a multimodal distribution.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fluxrl.errors import FluxrlError
from fluxrl.nn.mlp import MLP
from fluxrl.nn.networks import sinusoidal_embedding
from fluxrl.plan.multirobot import (Problems, Setting, project_boundary, safety_filter, straight_line,
                                    trajectory_metrics)


@dataclasses.dataclass(frozen=True)
class FlowOptConfig:
    setting: Setting = Setting()
    hidden: int = 256
    blocks: int = 3
    time_embedding_dim: int = 32
    flow_steps: int = 10
    filter_iterations: int = 15  # SwarmGen's maxiter
    lr: float = 3e-4
    batch_size: int = 64
    num_samples: int = 16
    initializer_lr: float = 1e-3
    initializer_batch_size: int = 32  # problems per step, each with initializer_samples generator samples
    initializer_samples: int = 8


class SetVectorField(nn.Module):
    """Per-robot outputs from per-robot inputs, equivariant to permuting the robots and invariant to permuting the
    obstacles: an embedding per robot, then residual blocks that see the robot, the mean over robots and the mean
    obstacle embedding."""

    hidden: int
    blocks: int
    out_dim: int
    zero_output: bool = False  # the initialiser starts exactly at the filter's default start

    @nn.compact
    def __call__(self, x, robots, obstacles, t_embedding=None):
        n = x.shape[0]
        inputs = [x, robots] + ([jnp.broadcast_to(t_embedding, (n, t_embedding.shape[-1]))]
                                if t_embedding is not None else [])
        h = MLP((self.hidden, self.hidden))(jnp.concatenate(inputs, -1))
        if obstacles.shape[0]:
            o = MLP((self.hidden, self.hidden), activate_final=True)(obstacles).mean(0)
        else:
            o = jnp.zeros((self.hidden,), x.dtype)
        for _ in range(self.blocks):
            context = jnp.broadcast_to(jnp.concatenate([h.mean(0), o]), (n, 2 * self.hidden))
            h = h + MLP((self.hidden, self.hidden), layer_norm=True)(jnp.concatenate([nn.LayerNorm()(h), context], -1))
        kernel_init = nn.initializers.zeros if self.zero_output else nn.initializers.lecun_normal()
        return nn.Dense(self.out_dim, kernel_init=kernel_init)(nn.gelu(h))


def features(setting: Setting, problem: Problems):
    """One problem's robot features (N, 4: start, goal) and obstacle features (K, 3: centre, radius), scaled by the
    workspace size."""
    w = setting.workspace
    robots = jnp.concatenate([problem.starts, problem.goals], -1) / w
    obstacles = jnp.concatenate([problem.obstacles, problem.obstacle_radii[:, None]], -1) / w
    return robots, obstacles


def base_trajectory(setting: Setting, problem: Problems) -> jax.Array:
    """c_0: the straight line, projected onto the boundary conditions (at rest at both ends)."""
    return project_boundary(setting, problem, straight_line(setting, problem))


def to_robot_rows(setting: Setting, coeffs):
    """(N * (n + 1), 2) coefficients -> (N, 2 (n + 1)) rows, one per robot."""
    return coeffs.reshape(setting.num_robots, setting.num_coeffs * 2)


def from_robot_rows(setting: Setting, rows):
    return rows.reshape(setting.num_robots * setting.num_coeffs, 2)


def random_detours(setting: Setting, key, batch_shape: tuple, spread: float = 1.5):
    """Random smooth detours (*batch_shape, N * (n + 1), 2): control points ~ N(0, spread^2) tapered by
    sin(pi k / n), so the ends stay put."""
    n = setting.order
    taper = jnp.sin(jnp.pi * jnp.arange(n + 1) / n)[:, None]
    noise = spread * jax.random.normal(key, (*batch_shape, setting.num_robots, n + 1, 2)) * taper
    return noise.reshape(*batch_shape, setting.num_robots * (n + 1), 2)


# --- training data --------------------------------------------------------------------------------------------
def solve_from_perturbations(setting: Setting, problems: Problems, guesses: int, seed: int, iterations: int = 300,
                             spread: float = 1.5):
    """Per problem, `guesses` filter solutions (B, G, N * (n + 1), 2) started from the straight line plus a random
    smooth detour (interior control points ~ N(0, spread^2) tapered by sin(pi k / n)), and whether each is feasible
    (B, G)."""
    def one(problem, key):
        guess = straight_line(setting, problem) + random_detours(setting, key, (), spread)
        coeffs, _ = safety_filter(setting, problem, guess, iterations)
        return coeffs, trajectory_metrics(setting, problem, coeffs)["feasible"]

    keys = jax.random.split(jax.random.key(seed), (problems.starts.shape[0], guesses))
    solve = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, 0)))
    return solve(problems, keys)


# --- generator --------------------------------------------------------------------------------------------------
def _generator(config: FlowOptConfig) -> SetVectorField:
    return SetVectorField(config.hidden, config.blocks, 2 * config.setting.num_coeffs)


def generator_velocity(params, config: FlowOptConfig, problem: Problems, x, t):
    robots, obstacles = features(config.setting, problem)
    emb = sinusoidal_embedding(jnp.reshape(t, (1,)), config.time_embedding_dim)
    return _generator(config).apply(params, x, robots, obstacles, emb)


def train_generator(config: FlowOptConfig, problems: Problems, solutions, feasible, steps: int, seed: int = 0,
                    log_every: int = 0):
    """Fit the generator to the feasible solutions (B, G, ...) of `problems`; returns ({'params', 'scale'},
    losses per step)."""
    s = config.setting
    base = jax.vmap(lambda p: base_trajectory(s, p))(problems)
    detours = jax.vmap(jax.vmap(lambda c, b: to_robot_rows(s, c - b), in_axes=(0, None)))(solutions, base)
    problem_index, guess_index = np.nonzero(np.asarray(feasible))
    if problem_index.size == 0:
        raise FluxrlError("No feasible solution to train the generator on (more filter iterations or problems?).")
    targets = detours[problem_index, guess_index]  # (D, N, 2 (n + 1))
    scale = jnp.maximum(jnp.std(targets), 1e-3)
    targets = targets / scale
    key = jax.random.key(seed)
    key, init_key = jax.random.split(key)
    params = _generator(config).init(init_key, targets[0], *features(s, problems[0]),
                                     sinusoidal_embedding(jnp.zeros((1,)), config.time_embedding_dim))
    optimizer = optax.adam(config.lr)
    opt_state = optimizer.init(params)
    problem_index = jnp.asarray(problem_index)

    def loss_fn(params, key):
        k_idx, k_noise, k_time = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (config.batch_size,), 0, targets.shape[0])
        x1 = targets[idx]
        x0 = jax.random.normal(k_noise, x1.shape)
        t = jax.random.uniform(k_time, (config.batch_size,))
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        batch_problems = problems[problem_index[idx]]
        v = jax.vmap(lambda p, x, t: generator_velocity(params, config, p, x, t))(batch_problems, xt, t)
        return jnp.mean((v - (x1 - x0)) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def chunk(params, opt_state, key):
        def body(carry, key):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), jax.random.split(key, 100))
        return params, opt_state, losses

    losses = []
    for i in range(0, steps, 100):
        key, sub = jax.random.split(key)
        params, opt_state, chunk_losses = chunk(params, opt_state, sub)
        losses.append(np.asarray(chunk_losses))
        if log_every and (i // 100) % max(log_every // 100, 1) == 0:
            print(f"generator step {i + 100}: loss {float(np.mean(losses[-1])):.4f}", flush=True)
    return {"params": params, "scale": scale}, np.concatenate(losses)[:steps]


def sample_trajectories(generator, config: FlowOptConfig, problem: Problems, key, num_samples: int):
    """(num_samples, N * (n + 1), 2) coefficients for one problem: Euler flow of the generator, un-scaled, added to
    the straight line."""
    s = config.setting
    x = jax.random.normal(key, (num_samples, s.num_robots, 2 * s.num_coeffs))
    dt = 1.0 / config.flow_steps
    for i in range(config.flow_steps):
        t = jnp.full((num_samples,), i * dt)
        x = x + dt * jax.vmap(lambda x, t: generator_velocity(generator["params"], config, problem, x, t))(x, t)
    base = base_trajectory(s, problem)
    return jax.vmap(lambda rows: base + from_robot_rows(s, rows * generator["scale"]))(x)


# --- initialiser ------------------------------------------------------------------------------------------------
def _initializer(config: FlowOptConfig) -> SetVectorField:
    return SetVectorField(config.hidden, config.blocks, 4 * config.setting.num_coeffs, zero_output=True)


def init_initializer(config: FlowOptConfig, key):
    """Parameters whose outputs are zero: the filter's default start (the sample itself, zero multipliers)."""
    s = config.setting
    robots = jnp.zeros((s.num_robots, 4))
    return _initializer(config).init(key, jnp.zeros((s.num_robots, 2 * s.num_coeffs)), robots,
                                     jnp.zeros((s.num_obstacles, 3)))


def initial_values(params, config: FlowOptConfig, problem: Problems, sample):
    """The filter's start for `sample` (N * (n + 1), 2): (guess, multipliers) = (sample + shift, multipliers)."""
    s = config.setting
    out = _initializer(config).apply(params, to_robot_rows(s, sample - base_trajectory(s, problem)),
                                     *features(s, problem))
    shift, multipliers = jnp.split(out, 2, axis=-1)
    return sample + from_robot_rows(s, shift), from_robot_rows(s, multipliers)


def filter_samples(config: FlowOptConfig, problem: Problems, samples, initializer=None):
    """Filter each of `samples` (S, ...) of one problem, from the initialiser's start if given, else from the
    default one (the sample itself, zero multipliers); returns (coefficients, residuals (S, iterations))."""
    def one(sample):
        guess, multipliers = (initial_values(initializer, config, problem, sample) if initializer is not None
                              else (None, None))
        return safety_filter(config.setting, problem, sample, config.filter_iterations, guess, multipliers)

    return jax.vmap(one)(samples)


def initializer_objective(residuals):
    """Mean log residual over the filter's iterations: every problem counts alike, however far from feasible."""
    return jnp.mean(jnp.log(residuals + 1e-3))


def train_initializer(config: FlowOptConfig, generator, problems: Problems, steps: int, seed: int = 0):
    """Fit the initialiser through the unrolled filter on initializer_samples generator samples of each training
    problem (drawn once); returns (params, losses per step)."""
    key = jax.random.key(seed)
    key, init_key, sample_key = jax.random.split(key, 3)
    num = problems.starts.shape[0]
    draw = jax.jit(jax.vmap(lambda p, k: sample_trajectories(generator, config, p, k, config.initializer_samples)))
    samples = draw(problems, jax.random.split(sample_key, num))
    params = init_initializer(config, init_key)
    optimizer = optax.adam(config.initializer_lr)
    opt_state = optimizer.init(params)

    def loss_fn(params, key):
        idx = jax.random.randint(key, (config.initializer_batch_size,), 0, num)
        _, residuals = jax.vmap(lambda p, x: filter_samples(config, p, x, params))(problems[idx], samples[idx])
        return initializer_objective(residuals)

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, sub)
        losses.append(loss)
    return params, np.asarray(jnp.stack(losses)) if losses else np.zeros(0)


# --- planning -------------------------------------------------------------------------------------------------
def select(setting: Setting, problem: Problems, candidates):
    """The feasible candidate of least smoothness cost, else the one of largest worst clearance; with its metrics."""
    metrics = jax.vmap(lambda c: trajectory_metrics(setting, problem, c))(candidates)
    worst = jnp.minimum(metrics["robot_clearance"], metrics["obstacle_clearance"])
    score = jnp.where(metrics["feasible"], -metrics["smoothness"], -1e9 + worst)
    best = jnp.argmax(score)
    return candidates[best], jax.tree.map(lambda x: x[best], metrics)


def plan(config: FlowOptConfig, problems: Problems, key, generator=None, num_samples=None, initializer=None):
    """Trajectories (B, N * (n + 1), 2) and their metrics for a batch of problems. Without a generator the
    candidates are the straight line plus random smooth detours (the baseline the generator replaces)."""
    s = config.setting
    num_samples = num_samples or config.num_samples

    def one(problem, key):
        if generator is not None:
            samples = sample_trajectories(generator, config, problem, key, num_samples)
        else:
            samples = straight_line(s, problem)[None] + random_detours(s, key, (num_samples,))
            samples = samples.at[0].set(straight_line(s, problem))
        coeffs, _ = filter_samples(config, problem, samples, initializer)
        return select(s, problem, coeffs)

    keys = jax.random.split(key, problems.starts.shape[0])
    return jax.vmap(one)(problems, keys)


# --- files ------------------------------------------------------------------------------------------------------
GENERATOR_PARAMS = "generator.npz"
GENERATOR_CONFIG = "generator.json"
INITIALIZER_PARAMS = "initializer.npz"


def _write_params(path: str, params) -> None:
    from flax import traverse_util

    from fluxrl.data.dataset import atomic_write

    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    atomic_write(path, lambda tmp: np.savez(tmp, **flat))


def _read_params(path: str):
    from flax import traverse_util

    with np.load(path, allow_pickle=False) as data:
        return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(data[k]) for k in data.files})


def save_generator(directory: str, generator, config: FlowOptConfig, record: dict | None = None,
                   initializer=None) -> str:
    """Write DIRECTORY/generator.npz (parameters, no pickle), initializer.npz (if given) and generator.json (the
    config, the target scale and `record`, e.g. how they were trained); refuses existing files there."""
    import json

    from fluxrl.data.dataset import atomic_write_text

    names = (GENERATOR_PARAMS, GENERATOR_CONFIG) + ((INITIALIZER_PARAMS,) if initializer is not None else ())
    for name in names:
        if os.path.exists(os.path.join(directory, name)):
            raise FluxrlError(f"{os.path.join(directory, name)} already exists; choose another directory.")
    _write_params(os.path.join(directory, GENERATOR_PARAMS), generator["params"])
    if initializer is not None:
        _write_params(os.path.join(directory, INITIALIZER_PARAMS), initializer)
    meta = {"config": {**dataclasses.asdict(config), "setting": dataclasses.asdict(config.setting)},
            "scale": float(generator["scale"]), **(record or {})}
    atomic_write_text(os.path.join(directory, GENERATOR_CONFIG), json.dumps(meta, indent=2))
    return directory


def load_generator(directory: str):
    """(generator, config, record, initializer or None) from a directory written by save_generator."""
    import json

    params_path, config_path = os.path.join(directory, GENERATOR_PARAMS), os.path.join(directory, GENERATOR_CONFIG)
    if not (os.path.isfile(params_path) and os.path.isfile(config_path)):
        raise FluxrlError(f"{directory} holds no Flow-Opt generator ({GENERATOR_PARAMS} and {GENERATOR_CONFIG}; "
                          f"write one with `fluxrl plan train`).")
    initializer_path = os.path.join(directory, INITIALIZER_PARAMS)
    try:
        with open(config_path) as f:
            meta = json.load(f)
        fields = dict(meta["config"])
        setting = Setting(**fields.pop("setting"))
        config = FlowOptConfig(setting=setting, **fields)
        params = _read_params(params_path)
        initializer = _read_params(initializer_path) if os.path.isfile(initializer_path) else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FluxrlError(f"{directory}: unreadable Flow-Opt generator ({e}).") from None
    return {"params": params, "scale": jnp.asarray(meta["scale"])}, config, meta, initializer


def plot_plans(setting: Setting, problems: Problems, coeffs, metrics, out: str, columns: int = 4) -> str:
    """A figure of the first problems' planned paths: obstacles, each robot's path from start (o) to goal (x), and
    the robots' discs at mid-time; titles say whether the plan is feasible and its worst clearance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluxrl.data.dataset import atomic_write
    from fluxrl.plan.multirobot import positions

    count = min(problems.starts.shape[0], 2 * columns)
    rows = (count + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    w = setting.workspace
    for i, ax in enumerate(axes.flat):
        ax.set_xlim(-w, w)
        ax.set_ylim(-w, w)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= count:
            ax.axis("off")
            continue
        for centre, radius in zip(np.asarray(problems.obstacles[i]), np.asarray(problems.obstacle_radii[i])):
            ax.add_patch(plt.Circle(centre, radius, color="0.6"))
        paths = np.asarray(positions(setting, coeffs[i]))
        for robot, path in enumerate(paths):
            colour = f"C{robot % 10}"
            ax.plot(path[:, 0], path[:, 1], color=colour, lw=1.2)
            ax.plot(*path[0], "o", color=colour, ms=4)
            ax.plot(*path[-1], "x", color=colour, ms=5)
            ax.add_patch(plt.Circle(path[len(path) // 2], setting.robot_radius, color=colour, alpha=0.35))
        worst = min(float(metrics["robot_clearance"][i]), float(metrics["obstacle_clearance"][i]))
        ax.set_title(f"{'feasible' if bool(metrics['feasible'][i]) else 'infeasible'}, clearance {worst:.2f}",
                     fontsize=8)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format=os.path.splitext(out)[1][1:] or "png"))
    plt.close(fig)
    return out
