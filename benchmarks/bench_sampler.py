"""Sampler throughput: batches of 256 per second from device-resident arrays.

Usage: .venv/bin/python benchmarks/bench_sampler.py [--rows 1000000] [--obs-dim 28] [--repeats 5]
Synthetic data in OGBench's regular form (cube-single's observation size by default); prints a markdown table with
the median over repeats. Timings include block_until_ready; sampling is fused with lax.scan as the engine does.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fluxrl.data.sampler import Sampler


def make_data(rows: int, obs_dim: int, act_dim: int, episode_len: int = 1000) -> dict:
    rng = np.random.default_rng(0)
    terminals = np.zeros(rows, np.float32)
    terminals[episode_len - 1 :: episode_len] = 1.0
    return {
        "observations": rng.standard_normal((rows, obs_dim), np.float32),
        "next_observations": rng.standard_normal((rows, obs_dim), np.float32),
        "actions": rng.uniform(-1, 1, (rows, act_dim)).astype(np.float32),
        "rewards": rng.standard_normal(rows).astype(np.float32),
        "masks": np.ones(rows, np.float32),
        "terminals": terminals,
    }


def bench(sampler: Sampler, fields, batches: int, repeats: int) -> float:
    @jax.jit
    def run(s, key):
        def body(acc, k):
            b = s.sample(k, 256, fields)
            return acc + sum(jnp.sum(v) for v in b.values()), None

        return jax.lax.scan(body, 0.0, jax.random.split(key, batches))[0]

    run(sampler, jax.random.key(0)).block_until_ready()  # compile
    rates = []
    for r in range(repeats):
        t0 = time.perf_counter()
        run(sampler, jax.random.key(r + 1)).block_until_ready()
        rates.append(batches / (time.perf_counter() - t0))
    return statistics.median(rates)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--obs-dim", type=int, default=28)
    p.add_argument("--act-dim", type=int, default=5)
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    sampler = Sampler.create(make_data(a.rows, a.obs_dim, a.act_dim))
    cases = {
        "transitions (s, a, r, m, s')": ("observations", "actions", "rewards", "masks", "next_observations"),
        "SARSA (s, a, s', a')": ("observations", "actions", "next_observations", "next_actions"),
        "geometric future states": ("observations", "actions", "future_observations"),
    }
    print(f"device: {jax.devices()[0].device_kind}; rows={a.rows}, obs_dim={a.obs_dim}; median of {a.repeats}")
    print("| batch fields | batches of 256 / s |\n|---|---|")
    for name, fields in cases.items():
        print(f"| {name} | {bench(sampler, fields, a.batches, a.repeats):,.0f} |")


if __name__ == "__main__":
    main()
