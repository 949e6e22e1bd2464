"""Run the learning checks of docs/results.md: generate their datasets, train every agent, print the tables.

    .venv/bin/python benchmarks/learning_checks.py CHECK... [--data DIR] [--runs DIR] [--only RUN,...]
        [--preset cpu] [--steps N] [--seeds K] [--dry-run]

CHECK is one of: cube2 (cube-single task 2), maze3 (point-maze medium task 3) for the offline agents; walker
(walker-stand), infom_cube2 and infom_maze3 (the same tasks) for pre-training then fine-tuning, next to IQL and
ReBRAC trained on the fine-tuning data alone. Runs go one after another into RUNS/CHECK/RUN; a run directory that
already exists is resumed from its last checkpoint (or left alone when finished), so the script can be stopped
and started again. The datasets are generated into DATA once. `--steps`/`--seeds` override every phase's steps
and the seed count (e.g. the papers' 1M steps on a GPU, with `--preset paper`); the results tables say what ran.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# key -> (file name, generator name, episodes, seed). The *_ft files are the fine-tuning data of the pre-training
# checks: half the pre-training data's size and a different seed, as the InFOM paper's separate `play-ft` sets.
DATASETS = {
    "cube": ("cube-single-play-200.npz", "cube-single-play", 200, 0),
    "cube_ft": ("cube-single-play-ft-100.npz", "cube-single-play", 100, 1),
    "maze": ("pointmaze-medium-navigate-1m.npz", "pointmaze-medium-navigate", 1000, 0),
    "maze_ft": ("pointmaze-medium-navigate-ft-500k.npz", "pointmaze-medium-navigate", 500, 1),
    "walker": ("walker-explore-100.npz", "walker-explore", 100, 0),
}
SPARSE = {"eval_interval": 5000, "eval_episodes": 10, "log_interval": 1000}
# rebrac: the task's values (cube-single: the InFOM README's 1 / 1; point-maze: none published, 0 / 0);
# rebrac_c0: the FQL README's visual-cube-single values 1 / 0, which docs/results.md ran first.
EXTRACTION = {
    "fql": (), "rebrac": (), "rebrac_c0": ("--agent.alpha_actor", "1.0", "--agent.alpha_critic", "0.0"),
    "bc": (), "flowq": (), "flowq_lam1": ("--agent.lam", "1.0"),
    "flowq_lam3": ("--agent.lam", "3.0"), "gfp": (), "qam": (), "dflow": (),
}
# check -> (dataset, task, steps, seeds, schedule, {run name: (agent, extra flags)})
OFFLINE_CHECKS = {
    "cube2": ("cube", "cube-single-play-singletask-task2", 30000, 3, SPARSE, EXTRACTION),
    "maze3": ("maze", "pointmaze-medium-navigate-singletask-task3", 20000, 3, SPARSE, EXTRACTION),
}
# Pre-training checks (the InFOM issue): run name -> (agent, agent flags (given to pre-training, which fine-tuning
# inherits), pre-training steps or None to train on the fine-tuning data only, without pre-training).
PRETRAIN_COMPARISON = {"infom": ("infom", (), 10000), "fom": ("fom", (), 10000), "iql": ("iql", (), None),
                       "rebrac": ("rebrac", (), None)}
WALKER_RUNS = {
    "infom": ("infom", (), 3000),
    "fom": ("fom", (), 3000),
    "iql": ("iql", (), None),
    "rebrac": ("rebrac", ("--agent.alpha_actor", "0.3", "--agent.alpha_critic", "0.0"), None),
    "infom_kl0": ("infom", ("--agent.kl_weight", "0.0"), 3000),
    "infom_kl001": ("infom", ("--agent.kl_weight", "0.01"), 3000),
    "infom_full_elbo": ("infom", ("--agent.encoder_gradient", "full_elbo"), 3000),
    "infom_latent512": ("infom", ("--agent.latent_dim", "512"), 3000),
    "infom_pretrain10k": ("infom", (), 10000),
    "fom_pretrain10k": ("fom", (), 10000),
}
# check -> (pre-training dataset, fine-tuning dataset, task, fine-tuning steps, seeds, schedule, runs, metric).
# walker pre-trains and fine-tunes on the same transitions (the ExORL protocol); cube and maze on separate sets.
PRETRAIN_CHECKS = {
    "walker": ("walker", "walker", "walker-stand", 3000, 3,
               {"eval_interval": 1000, "eval_episodes": 5, "log_interval": 500}, WALKER_RUNS, "evaluation/return"),
    "infom_cube2": ("cube", "cube_ft", "cube-single-play-singletask-task2", 30000, 3, SPARSE, PRETRAIN_COMPARISON,
                    "evaluation/success"),
    "infom_maze3": ("maze", "maze_ft", "pointmaze-medium-navigate-singletask-task3", 20000, 3, SPARSE,
                    PRETRAIN_COMPARISON, "evaluation/success"),
}
CHECKS = ("cube2", "maze3", *PRETRAIN_CHECKS)


def datasets_of(check: str) -> tuple[str, ...]:
    if check in OFFLINE_CHECKS:
        return (OFFLINE_CHECKS[check][0],)
    return tuple(dict.fromkeys(PRETRAIN_CHECKS[check][:2]))


def _schedule(schedule: dict) -> list[str]:
    # A checkpoint at every evaluation, so that a stopped run resumes from there (hours on a CPU).
    flags = [x for k, v in schedule.items() for x in (f"--{k}", str(v))]
    return flags + ["--save_interval", str(schedule["eval_interval"])]


def commands(check: str, data: str, runs: str, preset: str, steps: int | None, seeds: int | None,
             only: set[str] | None) -> list[tuple[str, list[list[str]]]]:
    """[(run directory, [fluxrl argv, ...])] of `check`; the run directory is the last command's."""
    out = []
    if check in OFFLINE_CHECKS:
        dataset, task, default_steps, default_seeds, schedule, agents = OFFLINE_CHECKS[check]
        path = os.path.join(data, DATASETS[dataset][0])
        for name, extra in agents.items():
            if only and name not in only:
                continue
            agent = name.split("_")[0]
            run_dir = os.path.join(runs, check, name)
            argv = ["train", agent, "--task", task, "--dataset", path, "--steps", str(steps or default_steps),
                    "--seeds", str(seeds or default_seeds), "--preset", preset, *_schedule(schedule),
                    "--run_dir", run_dir, *extra]
            out.append((run_dir, [argv]))
        return out
    pre_key, ft_key, task, default_steps, default_seeds, schedule, runs_table, _ = PRETRAIN_CHECKS[check]
    pre_path, ft_path = (os.path.join(data, DATASETS[key][0]) for key in (pre_key, ft_key))
    common = ["--dataset", ft_path, "--task", task, "--steps", str(steps or default_steps)]
    evaluation = _schedule(schedule)
    n_seeds = str(seeds or default_seeds)
    for name, (agent, extra, pretrain_steps) in runs_table.items():
        if only and name not in only:
            continue
        run_dir = os.path.join(runs, check, name)
        if pretrain_steps is None:
            argv = ["train", agent, *common, "--seeds", n_seeds, "--preset", preset, *evaluation,
                    "--run_dir", run_dir, *extra]
            out.append((run_dir, [argv]))
        else:
            pre_dir = run_dir + "_pretrain"
            pre_steps = steps or pretrain_steps
            pretrain = ["pretrain", agent, "--task", task, "--dataset", pre_path, "--steps", str(pre_steps),
                        "--seeds", n_seeds, "--preset", preset, "--log_interval", str(schedule["log_interval"]),
                        "--save_interval", str(max(pre_steps // 5, 1)), "--run_dir", pre_dir, *extra]
            finetune = ["finetune", pre_dir, *common, *evaluation, "--run_dir", run_dir]
            out.append((run_dir, [pretrain, finetune]))
    return out


def dataset_command(key: str, data: str) -> list[str]:
    file, name, episodes, seed = DATASETS[key]
    return ["data", "generate", name, "--out", os.path.join(data, file), "--episodes", str(episodes), "--seed",
            str(seed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checks", nargs="+", choices=CHECKS)
    parser.add_argument("--data", default="data")
    parser.add_argument("--runs", default="runs/learning_checks")
    parser.add_argument("--only", default=None, help="comma-separated run names (e.g. qam,dflow)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    fluxrl = [sys.executable, "-m", "fluxrl.cli"]

    def run(argv):
        print("$ fluxrl " + " ".join(argv), flush=True)
        if not args.dry_run:
            subprocess.run(fluxrl + argv + (["--quiet"] if argv[0] != "data" else []), check=True)

    for check in args.checks:
        for key in datasets_of(check):
            if not os.path.exists(os.path.join(args.data, DATASETS[key][0])):
                run(dataset_command(key, args.data))
        run_dirs = []
        for run_dir, argvs in commands(check, args.data, args.runs, args.preset, args.steps, args.seeds, only):
            for argv in argvs:
                run(argv)
            run_dirs.append(run_dir)
        if run_dirs and not args.dry_run:
            metric = PRETRAIN_CHECKS[check][-1] if check in PRETRAIN_CHECKS else "evaluation/success"
            subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "results_table.py"), *run_dirs,
                            "--metric", metric], check=True)


if __name__ == "__main__":
    main()
