"""Run the learning checks of docs/results.md: generate their datasets, train every agent, print the tables.

    .venv/bin/python benchmarks/learning_checks.py CHECK... [--data DIR] [--runs DIR] [--only RUN,...]
        [--preset cpu] [--steps N] [--seeds K] [--dry-run]

CHECK is one of: cube2 (cube-single task 2), maze3 (point-maze medium task 3) for the offline agents;
imitate_cube2 (Streaming Flow Policy, flow BC and BC on 100 noisy oracle demonstrations of cube-single task 2); walker
(walker-stand), infom_cube2 and infom_maze3 (the same tasks) for pre-training then fine-tuning, next to IQL and
ReBRAC trained on the fine-tuning data alone; pendulum (Gymnasium's InvertedPendulum-v4) for FPMD online from
scratch, next to ReBRAC at α = 0 (TD3 with LayerNorm); walker_o2o (walker-stand, offline on walker-explore then
online) for SWFP next to FQL. Runs go one after another into RUNS/CHECK/RUN; a run
directory that already exists is resumed from its last checkpoint (or left alone when finished), so the script can
be stopped and started again. The datasets are generated into DATA once. `--steps`/`--seeds` override every phase's
steps (an online check's online steps) and the seed count (e.g. the papers' 1M steps on a GPU, with `--preset
paper`); the results tables say what ran.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import NamedTuple

from fluxrl.agents import names as agent_names
from fluxrl.train.tables import markdown_table


class Dataset(NamedTuple):
    file: str
    generator: str
    episodes: int
    seed: int


class OfflineCheck(NamedTuple):
    dataset: str  # a DATASETS key
    task: str
    steps: int
    seeds: int
    schedule: dict
    runs: dict  # run name -> extra flags; the agent is the name's part before "_"


class OnlineCheck(NamedTuple):
    task: str
    online_steps: int
    warmup_steps: int  # uniformly random actions before the first update
    seeds: int
    schedule: dict
    runs: dict  # run name -> extra flags; the agent is the name's part before "_"
    dataset: str | None = None  # a DATASETS key: offline-to-online, `offline_steps` on it first
    offline_steps: int = 0


class PretrainRun(NamedTuple):
    agent: str
    flags: tuple  # given to pre-training, which fine-tuning inherits
    pretrain_steps: int | None  # None: train on the fine-tuning data only, without pre-training


class PretrainCheck(NamedTuple):
    pretrain_data: str  # DATASETS keys
    finetune_data: str
    task: str
    steps: int  # fine-tuning steps
    seeds: int
    schedule: dict
    runs: dict  # run name -> PretrainRun
    metric: str


# The *_ft files are the fine-tuning data of the pre-training checks: half the pre-training data's size and a
# different seed, as the InFOM paper's separate `play-ft` sets.
DATASETS = {
    "cube": Dataset("cube-single-play-200.npz", "cube-single-play", 200, 0),
    "cube_ft": Dataset("cube-single-play-ft-100.npz", "cube-single-play", 100, 1),
    "maze": Dataset("pointmaze-medium-navigate-1m.npz", "pointmaze-medium-navigate", 1000, 0),
    "maze_ft": Dataset("pointmaze-medium-navigate-ft-500k.npz", "pointmaze-medium-navigate", 500, 1),
    "walker": Dataset("walker-explore-100.npz", "walker-explore", 100, 0),
    # `fluxrl data demos`: the task's scripted oracle with N(0, 0.1²) action noise (imitation data)
    "cube2_demos": Dataset("cube-single-task2-demos-100.npz", "demos cube-single-play-singletask-task2 0.1", 100, 0),
}
SPARSE = {"eval_interval": 5000, "eval_episodes": 10, "log_interval": 1000}
# InFOM fine-tuning runs ~4 updates/s for 3 seeds here: a checkpoint every 1,000 steps bounds what a stop loses.
SPARSE_FREQUENT_SAVES = {**SPARSE, "save_interval": 1000}
# rebrac: the task's values (cube-single: the InFOM README's 1 / 1; point-maze: none published, 0 / 0);
# rebrac_c0: the FQL README's visual-cube-single values 1 / 0, which docs/results.md ran first.
EXTRACTION = {
    "fql": (), "rebrac": (), "rebrac_c0": ("--agent.alpha_actor", "1.0", "--agent.alpha_critic", "0.0"),
    "bc": (), "flowq": (), "flowq_lam1": ("--agent.lam", "1.0"),
    "flowq_lam3": ("--agent.lam", "3.0"), "gfp": (), "qam": (), "dflow": (),
}
OFFLINE_CHECKS = {
    "cube2": OfflineCheck("cube", "cube-single-play-singletask-task2", 30000, 3, SPARSE, EXTRACTION),
    "maze3": OfflineCheck("maze", "pointmaze-medium-navigate-singletask-task3", 20000, 3, SPARSE, EXTRACTION),
    # Imitation: Streaming Flow Policy next to flow BC and Gaussian BC on the oracle's demonstrations.
    "imitate_cube2": OfflineCheck("cube2_demos", "cube-single-play-singletask-task2", 20000, 3,
                                  {**SPARSE, "eval_episodes": 20},
                                  {"sfp": ("--agent.decay_steps", "20000"), "flow_bc": (), "bc": (),
                                   "sfp_n2": ("--agent.decay_steps", "20000", "--agent.action_horizon", "2"),
                                   "sfp_det": ("--agent.decay_steps", "20000", "--agent.variant", "deterministic"),
                                   "sfp_gain5": ("--agent.decay_steps", "20000", "--agent.gain", "5.0")}),
}
# Online from scratch (no dataset): FPMD next to ReBRAC, whose α_actor = α_critic = 0 on a task without published
# values makes it TD3 with LayerNorm, a plain online actor-critic.
ONLINE_CHECKS = {
    "pendulum": OnlineCheck("InvertedPendulum-v4", 10000, 1000, 3,
                            {"eval_interval": 1000, "eval_episodes": 5, "log_interval": 500},
                            {"fpmd": (), "rebrac": ()}),
    # Offline-to-online: SWFP (a frozen BC flow refined online by JKO flow blocks) next to FQL, whose whole
    # policy keeps training online; 5k offline steps on the exploratory data, then 20k online (SWFP's cpu preset:
    # 10 blocks of 2,000 updates). swfp_h01, swfp_h3: the JKO step h = 0.1 and 3 next to the default 1.
    "walker_o2o": OnlineCheck("walker-stand", 20000, 0, 3,
                              {"eval_interval": 2500, "eval_episodes": 5, "log_interval": 500},
                              {"swfp": (), "fql": (), "swfp_h01": ("--agent.step_size", "0.1"),
                               "swfp_h3": ("--agent.step_size", "3.0")}, dataset="walker", offline_steps=5000),
}
# The InFOM issue's comparison: pre-trained InFOM and FOM next to IQL and ReBRAC on the fine-tuning data alone.
PRETRAIN_COMPARISON = {"infom": PretrainRun("infom", (), 10000), "fom": PretrainRun("fom", (), 10000),
                       "iql": PretrainRun("iql", (), None), "rebrac": PretrainRun("rebrac", (), None)}
WALKER_RUNS = {
    "infom": PretrainRun("infom", (), 3000),
    "fom": PretrainRun("fom", (), 3000),
    "iql": PretrainRun("iql", (), None),
    "rebrac": PretrainRun("rebrac", ("--agent.alpha_actor", "0.3", "--agent.alpha_critic", "0.0"), None),
    "infom_kl0": PretrainRun("infom", ("--agent.kl_weight", "0.0"), 3000),
    "infom_kl001": PretrainRun("infom", ("--agent.kl_weight", "0.01"), 3000),
    "infom_full_elbo": PretrainRun("infom", ("--agent.encoder_gradient", "full_elbo"), 3000),
    "infom_latent512": PretrainRun("infom", ("--agent.latent_dim", "512"), 3000),
    "infom_pretrain10k": PretrainRun("infom", (), 10000),
    "fom_pretrain10k": PretrainRun("fom", (), 10000),
}
# walker pre-trains and fine-tunes on the same transitions (the ExORL protocol); cube and maze on separate sets.
PRETRAIN_CHECKS = {
    "walker": PretrainCheck("walker", "walker", "walker-stand", 3000, 3,
                            {"eval_interval": 1000, "eval_episodes": 5, "log_interval": 500}, WALKER_RUNS,
                            "evaluation/return"),
    "infom_cube2": PretrainCheck("cube", "cube_ft", "cube-single-play-singletask-task2", 30000, 3,
                                 SPARSE_FREQUENT_SAVES, PRETRAIN_COMPARISON, "evaluation/success"),
    "infom_maze3": PretrainCheck("maze", "maze_ft", "pointmaze-medium-navigate-singletask-task3", 20000, 3,
                                 SPARSE_FREQUENT_SAVES, PRETRAIN_COMPARISON, "evaluation/success"),
}
CHECKS = (*OFFLINE_CHECKS, *PRETRAIN_CHECKS, *ONLINE_CHECKS)


def datasets_of(check: str) -> tuple[str, ...]:
    if check in ONLINE_CHECKS:
        return (ONLINE_CHECKS[check].dataset,) if ONLINE_CHECKS[check].dataset else ()
    if check in OFFLINE_CHECKS:
        return (OFFLINE_CHECKS[check].dataset,)
    spec = PRETRAIN_CHECKS[check]
    return tuple(dict.fromkeys((spec.pretrain_data, spec.finetune_data)))


def _schedule(schedule: dict) -> list[str]:
    # A checkpoint at every evaluation unless the schedule says otherwise, so that a stopped run resumes from there.
    schedule = {**schedule, "save_interval": schedule.get("save_interval", schedule["eval_interval"])}
    return [x for k, v in schedule.items() for x in (f"--{k}", str(v))]


def commands(check: str, data: str, runs: str, preset: str, steps: int | None, seeds: int | None,
             only: set[str] | None) -> list[tuple[str, list[list[str]]]]:
    """[(run directory, [fluxrl argv, ...])] of `check`; the run directory is the last command's."""
    out = []
    if check in ONLINE_CHECKS:
        spec = ONLINE_CHECKS[check]
        for name, extra in spec.runs.items():
            if only and name not in only:
                continue
            run_dir = os.path.join(runs, check, name)
            offline = (["--dataset", os.path.join(data, DATASETS[spec.dataset].file)] if spec.dataset else [])
            argv = ["train", name.split("_")[0], "--task", spec.task, *offline, "--steps",
                    str(spec.offline_steps), "--online_steps",
                    str(steps or spec.online_steps), "--warmup_steps", str(spec.warmup_steps), "--seeds",
                    str(seeds or spec.seeds), "--preset", preset, *_schedule(spec.schedule), "--run_dir", run_dir,
                    *extra]
            out.append((run_dir, [argv]))
        return out
    if check in OFFLINE_CHECKS:
        spec = OFFLINE_CHECKS[check]
        path = os.path.join(data, DATASETS[spec.dataset].file)
        for name, extra in spec.runs.items():
            if only and name not in only:
                continue
            agent = name if name in agent_names() else name.split("_")[0]
            run_dir = os.path.join(runs, check, name)
            argv = ["train", agent, "--task", spec.task, "--dataset", path, "--steps", str(steps or spec.steps),
                    "--seeds", str(seeds or spec.seeds), "--preset", preset, *_schedule(spec.schedule),
                    "--run_dir", run_dir, *extra]
            out.append((run_dir, [argv]))
        return out
    spec = PRETRAIN_CHECKS[check]
    pre_path, ft_path = (os.path.join(data, DATASETS[key].file) for key in (spec.pretrain_data, spec.finetune_data))
    common = ["--dataset", ft_path, "--task", spec.task, "--steps", str(steps or spec.steps)]
    evaluation = _schedule(spec.schedule)
    n_seeds = str(seeds or spec.seeds)
    for name, (agent, extra, pretrain_steps) in spec.runs.items():
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
            pretrain = ["pretrain", agent, "--task", spec.task, "--dataset", pre_path, "--steps", str(pre_steps),
                        "--seeds", n_seeds, "--preset", preset, "--log_interval", str(spec.schedule["log_interval"]),
                        "--save_interval", str(max(pre_steps // 5, 1)), "--run_dir", pre_dir, *extra]
            finetune = ["finetune", pre_dir, *common, *evaluation, "--run_dir", run_dir]
            out.append((run_dir, [pretrain, finetune]))
    return out


def dataset_command(key: str, data: str) -> list[str]:
    spec = DATASETS[key]
    if spec.generator.startswith("demos "):
        _, task, noise = spec.generator.split()
        return ["data", "demos", task, "--out", os.path.join(data, spec.file), "--episodes", str(spec.episodes),
                "--noise", noise, "--seed", str(spec.seed)]
    return ["data", "generate", spec.generator, "--out", os.path.join(data, spec.file), "--episodes",
            str(spec.episodes), "--seed", str(spec.seed)]


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
            if not os.path.exists(os.path.join(args.data, DATASETS[key].file)):
                run(dataset_command(key, args.data))
        run_dirs = []
        for run_dir, argvs in commands(check, args.data, args.runs, args.preset, args.steps, args.seeds, only):
            for argv in argvs:
                run(argv)
            run_dirs.append(run_dir)
        if run_dirs and not args.dry_run:
            metric = (PRETRAIN_CHECKS[check].metric if check in PRETRAIN_CHECKS
                      else "evaluation/return" if check in ONLINE_CHECKS else "evaluation/success")
            print(markdown_table(run_dirs, metric))


if __name__ == "__main__":
    main()
