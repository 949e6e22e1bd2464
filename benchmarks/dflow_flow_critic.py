"""Diagnose a trained Decision Flow run: does the flow critic point the policy's flow steps uphill?

    .venv/bin/python benchmarks/dflow_flow_critic.py RUN_DIR [--states 64] [--draws 8] [--step N]

For every seed of RUN_DIR's checkpoint (default: the latest), on `--states` states of the run's dataset, it rolls
the policy's flow out from `--draws` fresh noises per state and compares, at each intermediate flow state x_k
(k = 1 .. T-1):

- the flow critic V_f(s, x_k, t_k) with the exact return to go G_k(x_k) of the current policy (the flow MDP is
  deterministic, so G_k is the terminal value Q(s, clip(x_T)) minus, for `div`, alpha times the divergence still
  to come along the policy's own path): RMS error, and the part of it that varies with x_k at a fixed state (only
  that part misleads the policy), next to how much G_k itself varies with x_k at a fixed state;
- the gradient of V_f in x, the only signal the policy step k-1 gets, with the exact gradient of G_k (back-propagated
  through the remaining Euler steps): cosine, and the norm ratio, over the rows where both are non-zero (a flow
  whose every action dimension ends clipped has none).

It also prints the mean Q of the policy's actions next to that of the data's actions. Results: docs/dflow.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fluxrl.agents import dflow
from fluxrl.data.io import load_dataset
from fluxrl.train.export import restore_seed_states


def return_to_go(params, config, obs, x, k):
    """G_k(x): the policy's flow from x at t_k to the end, valued as the flow MDP's return (one row)."""
    n, dt = config.flow_steps, 1.0 / config.flow_steps
    cost = 0.0
    for j in range(k, n):
        t = jnp.full((1,), j / n)
        u = dflow.velocities(params["actor_flow"], obs, x, t, config)
        if config.variant == "div":
            v = dflow.velocities(params["actor_bc_flow"], obs, x, t, config)
            cost = cost + dflow.divergences(u, v, config)
        x = x + dt * u
    value = dflow.critic_values(params["critic"], obs[None], jnp.clip(x, -1.0, 1.0)[None], config).mean()
    return value - config.alpha * cost


def diagnose(state, observations, actions, key, draws):
    config, params = state.config, state.params
    n, dt = config.flow_steps, 1.0 / config.flow_steps
    x = jax.random.normal(key, actions.shape)
    xs = []
    for j in range(n):
        xs.append(x)
        x = x + dt * dflow.velocities(params["actor_flow"], observations, x, jnp.full((1,), j / n), config)
    policy_q = dflow.critic_values(params["critic"], observations, jnp.clip(x, -1.0, 1.0), config).mean()
    data_q = dflow.critic_values(params["critic"], observations, actions, config).mean()
    rows = []
    for k in range(1, n):
        g_fn = jax.vmap(jax.value_and_grad(lambda xk, o: return_to_go(params, config, o, xk, k)))
        g, g_grad = g_fn(xs[k], observations)

        def v_single(xk, o):
            return dflow.flow_values(params["flow_critic"], o, xk, k / n, config)

        v, v_grad = jax.vmap(jax.value_and_grad(v_single))(xs[k], observations)
        g_norm, v_norm = np.linalg.norm(g_grad, axis=-1), np.linalg.norm(v_grad, axis=-1)
        # A flow whose every action dimension ends clipped has no gradient: such rows have no direction to compare.
        live = (g_norm > 0) & (v_norm > 0)
        cos = np.sum(np.asarray(g_grad * v_grad)[live], -1) / (g_norm[live] * v_norm[live])
        ratio = v_norm[live] / g_norm[live]
        # Rows come in groups of `draws` noises per state: what varies within a group is the action's effect.
        g_within = g.reshape(-1, draws) - g.reshape(-1, draws).mean(-1, keepdims=True)
        error_within = (v - g).reshape(-1, draws) - (v - g).reshape(-1, draws).mean(-1, keepdims=True)
        rows.append((k, float(jnp.sqrt(jnp.mean((v - g) ** 2))), float(jnp.sqrt(jnp.mean(error_within ** 2))),
                     float(jnp.sqrt(jnp.mean(g_within ** 2))), float(np.mean(cos)), float(np.median(ratio)),
                     float(np.median(g_norm)), int(live.sum())))
    return float(policy_q), float(data_q), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--states", type=int, default=64)
    parser.add_argument("--draws", type=int, default=8, help="noise draws per state")
    parser.add_argument("--step", type=int, default=None)
    args = parser.parse_args()
    agent, config, train, states, step = restore_seed_states(args.run_dir, args.step)
    if agent is not dflow:
        raise SystemExit(f"{args.run_dir} is a run of {agent.NAME}, not dflow.")
    data = load_dataset(train.dataset)
    picks = np.random.default_rng(0).choice(len(data["observations"]), args.states, replace=False)
    picks = np.repeat(picks, args.draws)
    observations = jnp.asarray(data["observations"][picks], jnp.float32)
    actions = jnp.asarray(data["actions"][picks], jnp.float32)
    print(f"{args.run_dir}: step {step}, variant {config.variant}, alpha {config.alpha}, {args.states} dataset "
          f"states x {args.draws} noise draws")
    for seed, state in enumerate(states):
        policy_q, data_q, rows = diagnose(state, observations, actions, jax.random.key(seed), args.draws)
        print(f"\nseed {seed}: mean Q of policy actions {policy_q:.2f}, of data actions {data_q:.2f}")
        print("| k | RMS(V_f - G_k) | its part that varies with x_k | std of G_k over x_k | cos(grad V_f, grad G_k) "
              "| median norm ratio | median norm grad G_k | rows with both gradients |")
        print("|---|---|---|---|---|---|---|---|")
        for k, rms, rms_within, std_within, cos, ratio, gnorm, live in rows:
            print(f"| {k} | {rms:.2f} | {rms_within:.2f} | {std_within:.2f} | {cos:.2f} | {ratio:.2f} | {gnorm:.2f} "
                  f"| {live} |")


if __name__ == "__main__":
    main()
