"""Agent update throughput: steps/s, FLOPs per update and the fraction of the measured matmul peak.

Usage: .venv/bin/python benchmarks/bench_agents.py [--agents fql rebrac] [--presets cpu paper] [--seeds 1 4]
       [--unfused] [--repeats 3] [--steps 200]
       [--json FILE] [--trace DIR]

Each update samples its batch (256) from a device-resident synthetic dataset (cube-single's sizes: obs 28,
action 5, 1M rows) and runs the agent's update, exactly as the engine does: `--steps` updates fused in one
`lax.scan` per call, N seeds vmapped. `--unfused` adds the same work as one jitted update per Python call.
FLOPs per update come from XLA's cost analysis of the compiled single update (one seed, loops unrolled). The peak is the median
throughput of square fp32 matmuls (`jnp.dot` on random inputs; 4096² on a CPU, 8192² on a GPU) at JAX's default
precision, the one the agents run at: on an NVIDIA GPU that is TF32, so the full-fp32 rate is printed beside it.
Medians of `--repeats` timed calls after a warm-up call; prints a markdown table and the load average, and with
`--json` writes the rows.
Runs under the XLA flag `import fluxrl` sets on CPU (docs/training.md); with
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+reduce` it measures XLA's default instead.
"""

from __future__ import annotations

import argparse
import functools
import json
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


def matmul_peak(repeats: int, n: int | None = None, precision: str | None = None) -> float:
    """Median FLOP/s of an n×n fp32 matmul at `precision` (None: JAX's default)."""
    n = n or (4096 if jax.default_backend() == "cpu" else 8192)
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)  # constant inputs can run faster than real data
    dot = jax.jit(functools.partial(jnp.dot, precision=precision))
    return 2 * n**3 / timed(lambda: dot(a, b), repeats)


def agent_flops(name: str, preset: str, sampler: Sampler) -> float:
    """XLA's FLOP count of one seed's update of agent `name` at `preset`."""
    module = agents.get(name)
    config = agents.make_config(name, preset)
    batch = sampler.sample(jax.random.key(0), BATCH, module.BATCH_SPEC.keys)
    return update_flops(module.update, module.init(jax.random.key(1), batch, config), batch)


def bench_agent(name: str, preset: str, seeds: int, steps: int, repeats: int, sampler: Sampler, unfused: bool,
                trace: str | None = None):
    """{"fused": seed-updates/s, and "unfused" with unfused=True} of agent `name` at `preset`, `seeds` vmapped."""
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
    if trace:  # a Perfetto trace of two more fused calls, for per-kernel times
        with jax.profiler.trace(os.path.join(trace, f"{name}-{preset}-{seeds}"), create_perfetto_trace=True):
            for _ in range(2):
                jax.block_until_ready(fused((states, metrics0), keys))

    single = jax.jit(lambda c, k: one(c, k)[0])
    if unfused:
        def loop():
            carry = (states, metrics0)
            for k in keys:
                carry = single(carry, k)
            return carry

        row["unfused"] = steps * seeds / timed(loop, repeats)
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
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    parser.add_argument("--trace", help="write a Perfetto trace of each fused configuration under this folder")
    args = parser.parse_args()

    sampler = Sampler.create(make_data(args.rows, 28, 5))
    peak = matmul_peak(args.repeats)
    device = jax.devices()[0].device_kind
    print(f"device: {device}; jax {jax.__version__}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s at the "
          f"default precision", end="")
    full_fp32 = None
    if jax.default_backend() != "cpu":
        full_fp32 = matmul_peak(args.repeats, precision="highest")
        print(f", {full_fp32 / 1e9:.1f} GFLOP/s at full fp32 ('highest')", end="")
    print("\n\n| agent | preset | seeds | fused steps/s | unfused steps/s | GFLOP/update | fraction of peak |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in args.agents:
        for preset in args.presets:
            flops = agent_flops(name, preset, sampler)
            for seeds in args.seeds:
                row = bench_agent(name, preset, seeds, args.steps, args.repeats, sampler, args.unfused, args.trace)
                row.update(agent=name, preset=preset, seeds=seeds, flops=flops, fraction=row["fused"] * flops / peak)
                rows.append(row)
                unfused = f"{row['unfused']:.1f}" if "unfused" in row else "–"
                print(f"| {name} | {preset} | {seeds} | {row['fused']:.1f} | {unfused} | {flops / 1e9:.2f} "
                      f"| {row['fraction']:.3f} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "peak_flops": peak, "peak_flops_fp32": full_fp32,
                       "steps_per_call": args.steps, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
