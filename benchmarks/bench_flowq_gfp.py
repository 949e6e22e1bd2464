"""FlowQ and GFP update throughput next to FQL's, and how each scales with the number of flow steps.

Usage: .venv/bin/python benchmarks/bench_flowq_gfp.py [--presets cpu paper] [--steps 200] [--repeats 3]
       [--sweep-steps 1 10 50] [--sweep-preset cpu] [--skip-sweep]

Setup (as benchmarks/bench_agents.py, whose helpers this reuses): batch 256 sampled on device from a synthetic
dataset with cube-single's sizes (obs 28, action 5), `--steps` updates fused in one jitted `lax.scan` per call,
one seed; median of `--repeats` timed calls after a warm-up call. GFLOP/update is XLA's cost analysis of one
compiled update with the flow integrators unrolled. The sweep sets `flow_steps` (FQL and GFP: Euler steps of the
distillation target; FlowQ: inference steps only, its training never integrates the flow). Prints markdown tables
and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_agents import BATCH, make_data, matmul_peak, timed, update_flops  # noqa: E402

from fluxrl import agents  # noqa: E402
from fluxrl.data.sampler import Sampler  # noqa: E402

AGENTS = ("fql", "flowq", "gfp")


def bench(name: str, preset: str, steps: int, repeats: int, sampler: Sampler, **overrides) -> tuple[float, float]:
    """(updates per second, FLOPs of one update) of agent `name` at `preset` with config `overrides`."""
    module = agents.get(name)
    config = dataclasses.replace(agents.make_config(name, preset), **overrides)
    fields = module.BATCH_SPEC.keys
    example = sampler.sample(jax.random.key(0), BATCH, fields)
    state = module.init(jax.random.key(1), example, config)

    def one(state, key):
        sample_key, update_key = jax.random.split(key)
        state, metrics = module.update(state, sampler.sample(sample_key, BATCH, fields), update_key)
        return state, metrics

    keys = jax.random.split(jax.random.key(2), steps)
    fused = jax.jit(lambda s, ks: jax.lax.scan(one, s, ks)[0])
    rate = steps / timed(lambda: fused(state, keys), repeats)
    return rate, update_flops(module.update, state, example)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sweep-steps", nargs="+", type=int, default=[1, 10, 50])
    parser.add_argument("--sweep-preset", default="cpu")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()

    print(f"load average at the start: {os.getloadavg()}")
    sampler = Sampler.create(make_data(args.rows, 28, 5))
    peak = matmul_peak(args.repeats)
    print(f"device: {jax.devices()[0].device_kind}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")

    print("\n| agent | preset | steps/s | GFLOP/update | fraction of peak |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        for name in AGENTS:
            rate, flops = bench(name, preset, args.steps, args.repeats, sampler)
            print(f"| {name} | {preset} | {rate:.1f} | {flops / 1e9:.2f} | {rate * flops / peak:.2f} |", flush=True)

    if not args.skip_sweep:
        print(f"\nflow_steps sweep ({args.sweep_preset} preset): steps/s")
        print("\n| agent | " + " | ".join(f"flow_steps={k}" for k in args.sweep_steps) + " |")
        print("|---|" + "---|" * len(args.sweep_steps))
        for name in AGENTS:
            rates = [bench(name, args.sweep_preset, args.steps, args.repeats, sampler, flow_steps=k)[0]
                     for k in args.sweep_steps]
            print(f"| {name} | " + " | ".join(f"{r:.1f}" for r in rates) + " |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
