"""End-to-end training throughput of the engine (`fluxrl.train.train`), as a user's offline run sees it.

Usage: .venv/bin/python benchmarks/bench_engine.py [--agents fql] [--presets paper] [--seeds 1 4] [--steps 20000]
       [--rows 1000000] [--log-interval 2000] [--json FILE]

Writes a synthetic dataset with cube-single's sizes (obs 28, action 5; rewards and masks included, so no
environment is needed) and its `-val` split, then trains each agent with evaluation off (`eval_episodes=0`), the
engine's default 200 updates per compiled call, validation losses and metrics logged every `--log-interval`
steps, and checkpoints at the end. Reports the median over the logging windows after the first (which holds the
compilation) of the engine's own `time/steps_per_second`, in seed-steps/s (steps × vmapped seeds), the wall time
of the whole call, and what 1M steps would take at that rate. This is bench_agents.py's fused loop plus everything
around it (metric accumulation, validation, logging, checkpointing, host round trips); evaluation episodes
(CPU-bound MuJoCo rollouts) are not included.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_agents import make_data  # noqa: E402

from fluxrl.data.io import save_dataset  # noqa: E402
from fluxrl.train import TrainConfig, train  # noqa: E402

TASK = "cube-single-play-singletask-task2-v0"


def write_dataset(directory: str, rows: int) -> str:
    path = os.path.join(directory, "synthetic.npz")
    save_dataset(path, make_data(rows, 28, 5))
    save_dataset(os.path.join(directory, "synthetic-val.npz"), make_data(max(rows // 10, 1000), 28, 5))
    return path


def bench_run(agent: str, preset: str, seeds: int, steps: int, log_interval: int, dataset: str,
              run_dir: str) -> dict:
    config = TrainConfig(task=TASK, dataset=dataset, steps=steps, seeds=seeds, preset=preset, run_dir=run_dir,
                         log_interval=log_interval, eval_episodes=0, save_interval=steps, quiet=True)
    start = time.perf_counter()
    train(agent, config)
    wall = time.perf_counter() - start
    with open(os.path.join(run_dir, "train.csv"), newline="") as f:
        speeds = {int(r["step"]): float(r["time/steps_per_second"]) for r in csv.DictReader(f)}
    windows = [speeds[s] for s in sorted(speeds)][1:]  # the first window holds the compilation
    if not windows:
        raise SystemExit(f"{steps} steps give one logging window of {log_interval}; raise --steps.")
    steps_per_s = statistics.median(windows)  # each step updates every vmapped seed
    return {"agent": agent, "preset": preset, "seeds": seeds, "steps": steps, "wall_s": wall,
            "seed_steps_per_s": steps_per_s * seeds, "windows": len(windows),
            "hours_per_1m_steps": 1e6 / steps_per_s / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", nargs="+", default=["fql"])
    parser.add_argument("--presets", nargs="+", default=["paper"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--log-interval", type=int, default=2000)
    parser.add_argument("--json", help="also write the measurements to this JSON file")
    args = parser.parse_args()

    device = jax.devices()[0].device_kind
    with tempfile.TemporaryDirectory() as work:
        dataset = write_dataset(work, args.rows)
        print(f"device: {device}; jax {jax.__version__}; {args.rows:,} synthetic rows; "
              f"{args.steps:,} steps per run, logged every {args.log_interval:,}")
        print("\n| agent | preset | seeds | seed-steps/s | wall s (incl. compile) | hours per 1M steps |")
        print("|---|---|---|---|---|---|")
        rows = []
        for agent in args.agents:
            for preset in args.presets:
                for seeds in args.seeds:
                    run_dir = os.path.join(work, f"{agent}-{preset}-{seeds}")
                    row = bench_run(agent, preset, seeds, args.steps, args.log_interval, dataset, run_dir)
                    rows.append(row)
                    print(f"| {agent} | {preset} | {seeds} | {row['seed_steps_per_s']:.1f} | {row['wall_s']:.0f} "
                          f"| {row['hours_per_1m_steps']:.2f} |", flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
