"""Flow-Opt learning check: the conditional generator's samples against random detours of the straight line as
the safety filter's starting points, on held-out planar swap problems (fluxrl.plan).

  python benchmarks/flowopt_swap.py [--robots 4] [--obstacles 2] [--seeds 0 1 2] [--steps 4000]
                                    [--initializer_steps 400]

Per seed: 512 training problems x 8 filter solutions (300 iterations from random smooth detours), the generator
trained on the feasible ones, the filter's initialiser trained through the unrolled filter on generator samples,
then 128 held-out problems planned with 16 candidates each and 15 or 50 filter iterations. Prints a Markdown table (success = a feasible candidate was found) and the planning time per batch.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from fluxrl.plan import flowopt as fo
from fluxrl.plan.multirobot import Setting, sample_problems


def timed(fn, *args, repeats=3):
    out = jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--obstacles", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--initializer_steps", type=int, default=400)
    args = parser.parse_args()
    setting = Setting(num_robots=args.robots, num_obstacles=args.obstacles)
    rows: dict = {}
    for seed in args.seeds:
        config = fo.FlowOptConfig(setting=setting)
        train = sample_problems(setting, 512, 1000 * seed, "swap")
        start = time.perf_counter()
        solutions, feasible = fo.solve_from_perturbations(setting, train, 8, seed)
        data_seconds = time.perf_counter() - start
        start = time.perf_counter()
        generator, losses = fo.train_generator(config, train, solutions, feasible, args.steps, seed=seed)
        train_seconds = time.perf_counter() - start
        print(f"seed {seed}: {float(np.mean(feasible)):.2f} of the training solutions feasible ({data_seconds:.0f} s);"
              f" generator loss {losses[:100].mean():.3f} -> {losses[-100:].mean():.3f} in {train_seconds:.0f} s",
              flush=True)
        start = time.perf_counter()
        initializer, init_losses = fo.train_initializer(config, generator, train, args.initializer_steps, seed=seed)
        print(f"seed {seed}: initialiser objective {init_losses[:50].mean():.3f} -> {init_losses[-50:].mean():.3f} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
        test = sample_problems(setting, 128, 1000 * seed + 999, "swap")
        for iterations in (15, 50):
            cfg = fo.FlowOptConfig(setting=setting, filter_iterations=iterations)
            for name, gen, init in (("random detours", None, None), ("Flow-Opt generator", generator, None),
                                    ("Flow-Opt generator + learned initialiser", generator, initializer)):
                plan = jax.jit(lambda p, k, gen=gen, cfg=cfg, init=init: fo.plan(cfg, p, k, generator=gen,
                                                                                  initializer=init))
                (_, metrics), seconds = timed(plan, test, jax.random.key(seed))
                rows.setdefault((name, iterations), []).append(
                    (float(np.mean(metrics["feasible"])), float(np.mean(metrics["smoothness"][metrics["feasible"]])),
                     seconds))
    print(f"\n{args.robots} robots, {args.obstacles} obstacles, swap problems; seeds {args.seeds}; 128 held-out "
          f"problems per seed, 16 candidates each\n")
    print("| candidates | filter iterations | success (mean ± std over seeds) | smoothness of the solved | "
          "seconds per batch of 128 |")
    print("|---|---|---|---|---|")
    for (name, iterations), values in rows.items():
        v = np.asarray(values)
        print(f"| {name} | {iterations} | {v[:, 0].mean():.2f} ± {v[:, 0].std():.2f} | {v[:, 1].mean():.1f} | "
              f"{np.median(v[:, 2]):.2f} |")


if __name__ == "__main__":
    main()
