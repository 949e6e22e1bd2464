"""Agent update throughput: steps/s, FLOPs per update and the fraction of the measured matmul peak.

Usage: .venv/bin/python benchmarks/bench_agents.py [--agents fql rebrac] [--presets cpu paper] [--seeds 1 4]
       [--unfused] [--repeats 3] [--steps 200]

Each update samples its batch (256) from a device-resident synthetic dataset (cube-single's sizes: obs 28,
action 5, 1M rows) and runs the agent's update, exactly as the engine does: `--steps` updates fused in one
`lax.scan` per call, N seeds vmapped. `--unfused` adds the same work as one jitted update per Python call.
FLOPs per update come from XLA's cost analysis of the compiled single update (one seed, loops unrolled). The peak is the median
fp32 throughput of 4096×4096 matmuls (`jnp.dot`) on this machine. Medians of `--repeats` timed calls after a
warm-up call; prints a markdown table and the load average.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fluxrl import agents
from fluxrl.data.sampler import Sampler

BATCH = 256


def make_data(rows: int, obs_dim: int, act_dim: int, episode_len: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    terminals = np.zeros(rows, np.float32)
    terminals[episode_len - 1 :: episode_len] = 1.0
    obs = rng.standard_normal((rows, obs_dim), np.float32)
    return {
        "observations": obs,
        "next_observations": np.roll(obs, -1, axis=0),
        "actions": rng.uniform(-1, 1, (rows, act_dim)).astype(np.float32),
        "rewards": -rng.integers(0, 2, rows).astype(np.float32),
        "masks": np.ones(rows, np.float32),
        "terminals": terminals,
    }


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (its result blocked on) after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(repeats: int, n: int = 4096) -> float:
    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / timed(lambda: dot(a, b), repeats)


def bench_agent(name: str, preset: str, seeds: int, steps: int, repeats: int, sampler: Sampler, unfused: bool):
    module = agents.get(name)
    config = agents.make_config(name, preset)
    fields = module.BATCH_SPEC.keys
    example = sampler.sample(jax.random.key(0), BATCH, fields)
    states = jax.vmap(lambda k: module.init(k, example, config))(jax.random.split(jax.random.key(1), seeds))

    def one(carry, key):
        states, _ = carry
        sample_keys, update_keys = jnp.split(jax.random.split(key, 2 * seeds), 2)
        batch = jax.vmap(lambda k: sampler.sample(k, BATCH, fields))(sample_keys)
        states, metrics = jax.vmap(module.update)(states, batch, update_keys)
        return (states, metrics), None

    metrics0 = jax.eval_shape(lambda s, b, k: jax.vmap(module.update)(s, b, k)[1], states,
                              jax.vmap(lambda k: sampler.sample(k, BATCH, fields))(jax.random.split(jax.random.key(0), seeds)),
                              jax.random.split(jax.random.key(0), seeds))
    metrics0 = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), metrics0)
    keys = jax.random.split(jax.random.key(2), steps)

    fused = jax.jit(lambda c, ks: jax.lax.scan(one, c, ks)[0])
    row = {"fused": steps * seeds / timed(lambda: fused((states, metrics0), keys), repeats)}

    single = jax.jit(lambda c, k: one(c, k)[0])
    if unfused:
        def loop():
            carry = (states, metrics0)
            for k in keys:
                carry = single(carry, k)
            return carry

        row["unfused"] = steps * seeds / timed(loop, repeats)
    one_seed = jax.tree_util.tree_map(lambda x: x[0], states)
    batch = sampler.sample(jax.random.key(0), BATCH, fields)
    row["flops"] = update_flops(module.update, one_seed, batch)
    return row


def update_flops(update, state, batch) -> float:
    """XLA's FLOP count of one update, with every lax.scan (the flow integrators) unrolled: XLA's cost analysis
    counts a loop body once."""
    scan = jax.lax.scan
    jax.lax.scan = functools.partial(scan, unroll=True)
    try:
        cost = jax.jit(update).lower(state, batch, jax.random.key(0)).compile().cost_analysis()
    finally:
        jax.lax.scan = scan
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", nargs="+", default=["fql"])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--unfused", action="store_true")
    args = parser.parse_args()

    sampler = Sampler.create(make_data(args.rows, 28, 5))
    peak = matmul_peak(args.repeats)
    print(f"device: {jax.devices()[0].device_kind}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print("\n| agent | preset | seeds | fused steps/s | unfused steps/s | GFLOP/update | fraction of peak |")
    print("|---|---|---|---|---|---|---|")
    for name in args.agents:
        for preset in args.presets:
            for seeds in args.seeds:
                row = bench_agent(name, preset, seeds, args.steps, args.repeats, sampler, args.unfused)
                unfused = f"{row['unfused']:.1f}" if "unfused" in row else "–"
                fraction = row["fused"] * row["flops"] / peak
                print(f"| {name} | {preset} | {seeds} | {row['fused']:.1f} | {unfused} | {row['flops'] / 1e9:.2f} "
                      f"| {fraction:.2f} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
