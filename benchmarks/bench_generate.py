"""OGBench dataset generation throughput: transitions per second with 1 and 2 worker processes.

Usage: .venv/bin/python benchmarks/bench_generate.py [--episodes 8] [--workers 1 2] [--datasets NAME ...]
Times fluxrl.data.generate.collect on full 1001-step episodes (1000 transitions each), start-up included: env and
oracle construction in each worker, and process spawning when workers > 1. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

from fluxrl.data.generate import collect
from fluxrl.data.generate_ogbench import EPISODE_STEPS
from fluxrl.names import parse_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--datasets", nargs="+", default=["cube-single-play", "pointmaze-medium-navigate"])
    args = parser.parse_args()
    print(f"CPU cores visible: {os.cpu_count()}; episodes of {EPISODE_STEPS - 1} transitions\n")
    print("| dataset | workers | episodes | transitions | seconds | transitions/s |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets:
        spec = parse_dataset(name)
        for workers in args.workers:
            t0 = time.perf_counter()
            data = collect(spec, args.episodes, seed=0, workers=workers, progress=False)
            seconds = time.perf_counter() - t0
            transitions = int(len(data["terminals"]) - data["terminals"].sum())
            rate = transitions / seconds
            print(f"| {name} | {workers} | {args.episodes} | {transitions} | {seconds:.1f} | {rate:.0f} |")


if __name__ == "__main__":
    main()
