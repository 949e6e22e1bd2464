"""Update throughput of QAM and Decision Flow (both variants) next to FQL, and QAM's cost against its flow steps.

Usage: .venv/bin/python benchmarks/bench_qam_dflow.py [--presets cpu paper] [--steps 200] [--repeats 3]
       [--flow-steps 5 10 20 40] [--scaling-preset cpu]
(`--presets` alone skips the agent table; `--flow-steps` alone skips the scaling table.)

Each update samples its batch (256) on the device from a synthetic dataset with cube-single's sizes (obs 28,
action 5) and runs the agent's update, as the engine does; `--steps` updates are fused in one `lax.scan` under
`jit`. Steps/s = steps / median of `--repeats` timed calls after one warm-up call. FLOPs per update come from
XLA's cost analysis of one compiled update; XLA counts a loop body once, so flow-step loops (lax.scan) are
under-counted and the figure is a lower bound. Prints markdown tables and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import numpy as np

from fluxrl import agents
from fluxrl.data.sampler import Sampler

BATCH, OBS_DIM, ACT_DIM = 256, 28, 5
# (label, agent, config overrides)
AGENTS = (
    ("fql", "fql", {}),
    ("qam", "qam", {}),
    ("dflow (dir)", "dflow", {"variant": "dir"}),
    ("dflow (div)", "dflow", {"variant": "div"}),
)


def synthetic_data(rows: int, episode_len: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    terminals = np.zeros(rows, np.float32)
    terminals[episode_len - 1 :: episode_len] = 1.0
    obs = rng.standard_normal((rows, OBS_DIM), np.float32)
    return {
        "observations": obs,
        "next_observations": np.roll(obs, -1, axis=0),
        "actions": rng.uniform(-1, 1, (rows, ACT_DIM)).astype(np.float32),
        "rewards": -rng.integers(0, 2, rows).astype(np.float32),
        "masks": np.ones(rows, np.float32),
        "terminals": terminals,
    }


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of fn() (blocked on) after one warm-up call (which includes compilation)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, config, sampler: Sampler, steps: int, repeats: int) -> tuple[float, float]:
    """(updates per second, XLA FLOPs of one update)."""
    module = agents.get(name)
    fields = module.BATCH_SPEC.keys
    example = sampler.sample(jax.random.key(0), BATCH, fields)
    state = jax.jit(module.init, static_argnums=2)(jax.random.key(1), example, config)

    def one(state, key):
        sample_key, update_key = jax.random.split(key)
        return module.update(state, sampler.sample(sample_key, BATCH, fields), update_key)

    fused = jax.jit(lambda s, ks: jax.lax.scan(one, s, ks)[0])
    keys = jax.random.split(jax.random.key(2), steps)
    rate = steps / median_seconds(lambda: fused(state, keys), repeats)
    cost = jax.jit(module.update).lower(state, example, jax.random.key(0)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return rate, float(cost.get("flops", float("nan")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="*", default=["cpu", "paper"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--flow-steps", nargs="*", type=int, default=[5, 10, 20, 40])
    parser.add_argument("--scaling-preset", default="cpu")
    args = parser.parse_args()

    print(f"device: {jax.devices()[0].device_kind}; load average at the start: {os.getloadavg()}")
    sampler = Sampler.create(synthetic_data(args.rows))
    if args.presets:
        print("\n| agent | preset | steps/s | XLA GFLOP/update (lower bound) |")
        print("|---|---|---|---|")
    for preset in args.presets:
        for label, name, overrides in AGENTS:
            config = dataclasses.replace(agents.make_config(name, preset), **overrides)
            rate, flops = bench(name, config, sampler, args.steps, args.repeats)
            print(f"| {label} | {preset} | {rate:.1f} | {flops / 1e9:.2f} |", flush=True)

    if args.flow_steps:
        print(f"\nQAM ({args.scaling_preset} preset) against flow_steps:\n")
        print("| flow_steps | steps/s | ms/update | ms/update per flow step |")
        print("|---|---|---|---|")
        for n in args.flow_steps:
            config = dataclasses.replace(agents.make_config("qam", args.scaling_preset), flow_steps=n)
            rate, _ = bench("qam", config, sampler, args.steps, args.repeats)
            print(f"| {n} | {rate:.1f} | {1e3 / rate:.1f} | {1e3 / rate / n:.2f} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
