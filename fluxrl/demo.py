"""`fluxrl demo`: the main job on an embedded default, end to end on a laptop CPU (no download, no prior step).

1. generate a small point-maze navigation dataset with the scripted noisy subgoal-following behaviour policy;
2. evaluate the scripted oracle and a random policy on the task (reference points);
3. train FQL (cpu preset) and BC (cpu preset) on it offline, evaluating as they go;
4. write learning curves, a results table and each run's summary into the output directory.

Everything here is a `cpu`-preset result on a small locally generated dataset: it shows the pipeline working and
learning, not the papers' numbers.
"""

from __future__ import annotations

import os
import time

import numpy as np

from fluxrl.errors import FluxrlError

TASK = "pointmaze-medium-navigate-singletask-task1"
DATASET = "pointmaze-medium-navigate"
EPISODES, VAL_EPISODES = 100, 10  # 100k + 10k transitions (OGBench's dataset is 1M)
AGENTS = ("fql", "bc")
STEPS = 5_000
SEEDS = 2
EVAL_INTERVAL, EVAL_EPISODES = 2_500, 10


def run_demo(out: str, quiet: bool = False) -> int:
    from fluxrl.data.generate import generate
    from fluxrl.data.info import dataset_info
    from fluxrl.train.config import TrainConfig
    from fluxrl.train.engine import train
    from fluxrl.train.plotting import plot_runs

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    data_path = os.path.join(out, "data", f"{DATASET}.npz")
    if not os.path.exists(data_path):
        say(f"[1/4] generating {DATASET}: {EPISODES} episodes of 1000 steps (+{VAL_EPISODES} validation episodes)")
        generate(DATASET, data_path, episodes=EPISODES, val_episodes=VAL_EPISODES, seed=0,
                 workers=os.cpu_count() or 1, progress=not quiet)
    else:
        say(f"[1/4] reusing {data_path}")
    with open(os.path.join(out, "dataset_info.txt"), "w") as f:
        f.write(dataset_info(data_path) + "\n")

    say("[2/4] evaluating the scripted oracle and a random policy for reference")
    references = _reference_scores(EVAL_EPISODES)

    results = {}
    for i, agent in enumerate(AGENTS):
        run_dir = os.path.join(out, "runs", agent)
        say(f"[3/4] training {agent} ({i + 1}/{len(AGENTS)}): cpu preset, {STEPS} steps, {SEEDS} seeds -> {run_dir}")
        config = TrainConfig(
            task=TASK, dataset=data_path, steps=STEPS, seeds=SEEDS, preset="cpu", run_dir=run_dir,
            log_interval=500, eval_interval=EVAL_INTERVAL, eval_episodes=EVAL_EPISODES,
            save_interval=STEPS, quiet=quiet,
        )
        results[agent] = train(agent, config)

    say("[4/4] writing curves and the results table")
    curves = os.path.join(out, "learning_curves.png")
    plot_runs([r.run_dir for r in results.values()], curves, overwrite=True)
    # Sparse-reward navigation needs far more than a demo's steps to reach the goal; FQL's Q estimate shows the
    # value propagating meanwhile.
    plot_runs([results["fql"].run_dir], os.path.join(out, "fql_q_mean.png"), metric="training/critic/q_mean",
              overwrite=True)
    table = _results_table(results, references, time.time() - started)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    say("\n" + table)
    say(f"outputs in {out}: results.md, learning_curves.png, fql_q_mean.png, dataset_info.txt, runs/*/summary.md")
    return 0


def _reference_scores(episodes: int) -> dict:
    from fluxrl.envs import make_env
    from fluxrl.envs.evaluate import evaluate
    from fluxrl.envs.ogbench_envs import oracle_policy

    holder = {}

    def oracle_env(*args, **kwargs):
        env = make_env(TASK, *args, **kwargs)
        holder["policy"] = oracle_policy(env)
        return env

    oracle = evaluate(oracle_env, lambda obs, rng: holder["policy"](obs, rng), episodes=episodes, seed=0)
    space = make_env(TASK).action_space
    random = evaluate(TASK, lambda obs, rng: rng.uniform(space.low, space.high).astype(np.float32),
                      episodes=episodes, seed=0)
    return {"scripted oracle": oracle, "uniform random": random}


def _results_table(results: dict, references: dict, seconds: float) -> str:
    lines = [
        f"# fluxrl demo: {TASK}",
        "",
        f"Preset `cpu` (small networks), dataset {DATASET} generated locally ({EPISODES} episodes x 1000 steps, "
        f"seed 0), {STEPS} offline steps, {SEEDS} seeds, {EVAL_EPISODES} evaluation episodes per seed and "
        f"evaluation. Not a paper-preset number. Wall time {seconds / 60:.1f} min.",
        "",
        "| policy | success (mean over seeds) | per seed | return |",
        "|---|---|---|---|",
    ]
    for name, result in results.items():
        if not result.last_eval:
            raise FluxrlError(f"The {name} run ended without an evaluation.")
        rows = result.last_eval["rows"]
        success = [r["evaluation/success"] for r in rows]
        returns = [r["evaluation/return"] for r in rows]
        lines.append(f"| {name} (step {result.last_eval['step']}) | {np.mean(success):.2f} | "
                     f"{', '.join(f'{s:.2f}' for s in success)} | {np.mean(returns):.1f} |")
    for name, r in references.items():
        lines.append(f"| {name} | {r.success_rate:.2f} | - | {r.mean_return:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else "demo_out"))
