"""The `fluxrl` command.

  fluxrl data generate NAME --out FILE [--episodes N] [--seed S] [--workers W] [--overwrite]
  fluxrl data info FILE
  fluxrl data relabel FILE --task TASK --out FILE
  fluxrl tasks
  fluxrl eval [TASK] [--policy oracle|random|EXPORTED_DIR] [--episodes N] [--seed S] [--video FILE] [--json FILE]
  fluxrl train AGENT ... | fluxrl export RUN_DIR ... | fluxrl plot RUN_DIR... --out FILE.png
  fluxrl table RUN_DIR... [--metric M] [--out FILE.md|FILE.csv]
  fluxrl pretrain AGENT ... | fluxrl finetune PRETRAIN_DIR ...
  fluxrl sweep AGENT --root DIR --grid FLAG=V1,V2,... [--backend local|ray] [TRAIN FLAGS ...]
  fluxrl plan train --out DIR [...] | fluxrl plan run GENERATOR_DIR [--plot FILE.png] [--json FILE] [...]
  fluxrl demo [--out DIR]

User errors print one sentence and exit with status 2; nothing already on disk is replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys

from fluxrl.errors import FluxrlError, TrainingInterrupted

ENGINE_COMMANDS = ("train", "pretrain", "finetune", "export", "plot", "table", "sweep")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage errors: one line, status 2, like every other user error
        raise FluxrlError(f"{self.prog}: {message}")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fluxrl", description="Reinforcement learning with flow-matching models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # Listed for --help only: main() hands these to cli_train (tyro) before argparse sees them.
    for name, text in (("train", "train an agent offline, offline-to-online or online (`fluxrl train AGENT --help`)"),
                       ("pretrain", "reward-free pre-training (InFOM and its ablations)"),
                       ("finetune", "fine-tune a pre-training run on a task's rewards"),
                       ("export", "write a run's policy as a self-contained file"),
                       ("plot", "draw learning curves of one or more runs"),
                       ("table", "tabulate the final and per-evaluation results of one or more runs"),
                       ("sweep", "train every point of a grid of train flags, locally or with Ray")):
        sub.add_parser(name, help=text, add_help=False)
    data = sub.add_parser("data", help="generate, inspect and relabel datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    gen = data_sub.add_parser("generate", help="generate a dataset locally (and its -val split)")
    gen.add_argument("name", help="dataset name, e.g. cube-single-play, pointmaze-medium-navigate, walker-explore")
    gen.add_argument("--out", required=True, help="output .npz path; the validation split goes to <out>-val.npz")
    gen.add_argument("--episodes", type=int, default=None, help="training episodes (default: the paper's size)")
    gen.add_argument("--val-episodes", type=int, default=None, help="validation episodes (default: episodes/10)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")

    demos = data_sub.add_parser("demos", help="record an OGBench task's scripted oracle (imitation data)")
    demos.add_argument("task", help="task name, e.g. cube-single-play-singletask-task2")
    demos.add_argument("--out", required=True, help="output .npz path; the validation split goes to <out>-val.npz")
    demos.add_argument("--episodes", type=int, default=100)
    demos.add_argument("--val-episodes", type=int, default=None, help="validation episodes (default: episodes/10)")
    demos.add_argument("--noise", type=float, default=0.0, help="std of Gaussian noise added to the oracle's actions")
    demos.add_argument("--seed", type=int, default=0)
    demos.add_argument("--overwrite", action="store_true", help="replace existing output files")
    demos.add_argument("--quiet", action="store_true", help="no progress bar")

    info = data_sub.add_parser("info", help="print fields, shapes, episodes and reward statistics of a dataset")
    info.add_argument("path")

    rel = data_sub.add_parser("relabel", help="add a task's rewards and masks to a dataset, from stored states")
    rel.add_argument("path")
    rel.add_argument("--task", required=True)
    rel.add_argument("--out", required=True)
    rel.add_argument("--overwrite", action="store_true")

    sub.add_parser("tasks", help="list dataset and task names")

    ev = sub.add_parser("eval", help="evaluate a scripted or an exported policy on a task")
    ev.add_argument("task", nargs="?", default=None,
                    help="task name (default for an exported policy: the task it was trained on)")
    ev.add_argument("--policy", default="oracle",
                    help="'oracle', 'random', or the directory of an exported policy (`fluxrl export`)")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--seed", type=int, default=0)
    acting = ev.add_mutually_exclusive_group()
    acting.add_argument("--deterministic", action="store_true",
                        help="exported policy: act deterministically (default: as its run's evaluation did)")
    acting.add_argument("--stochastic", action="store_true",
                        help="exported policy: sample actions (default: as its run's evaluation did)")
    ev.add_argument("--video", default=None, help="write the first episodes as .mp4 or .gif")
    ev.add_argument("--video-episodes", type=int, default=1)
    ev.add_argument("--max-steps", type=int, default=None)
    ev.add_argument("--json", default=None, help="also write the results (per episode too) to this JSON file")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --video or --json file")

    from fluxrl.plan.command import add_parsers as add_plan_parsers

    add_plan_parsers(sub, _Parser)

    demo = sub.add_parser("demo", help="the main job on an embedded default (no download, no prior step)")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--quiet", action="store_true")
    return parser


def _cmd_generate(args) -> int:
    from fluxrl.data.generate import generate

    paths = generate(
        args.name, args.out, episodes=args.episodes, seed=args.seed, workers=args.workers,
        val_episodes=args.val_episodes, overwrite=args.overwrite, progress=not args.quiet,
    )
    print("wrote " + ", ".join(paths))
    return 0


def _cmd_demos(args) -> int:
    from fluxrl.data.demos import write_demos

    paths = write_demos(args.task, args.out, episodes=args.episodes, noise=args.noise, seed=args.seed,
                        val_episodes=args.val_episodes, overwrite=args.overwrite, progress=not args.quiet)
    print("wrote " + ", ".join(paths))
    return 0


def _cmd_info(args) -> int:
    from fluxrl.data.info import dataset_info

    print(dataset_info(args.path))
    return 0


def _cmd_relabel(args) -> int:
    from fluxrl.data.io import load_dataset, save_dataset
    from fluxrl.data.relabel import relabel

    if os.path.exists(args.out) and not args.overwrite:
        raise FluxrlError(f"{args.out} already exists; refusing to overwrite it (pass --overwrite to replace it).")
    data, meta = load_dataset(args.path, with_meta=True)
    save_dataset(args.out, relabel(data, args.task, source=args.path), meta=meta, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def _cmd_tasks(args) -> int:
    from fluxrl.names import all_dataset_names, all_task_names

    print("datasets:\n  " + "\n  ".join(all_dataset_names()))
    print("tasks:\n  " + "\n  ".join(all_task_names()))
    return 0


def _cmd_eval(args) -> int:
    import json

    import numpy as np

    from fluxrl.envs.evaluate import evaluate

    if args.episodes < 1:
        raise FluxrlError(f"--episodes must be at least 1, got {args.episodes}.")
    for flag, path in (("--video", args.video), ("--json", args.json)):
        if path and os.path.exists(path) and not args.overwrite:
            raise FluxrlError(f"{path} already exists; refusing to overwrite it ({flag}; pass --overwrite to "
                              f"replace it).")
    if args.policy in ("oracle", "random"):
        if args.deterministic or args.stochastic:
            raise FluxrlError("--deterministic and --stochastic apply to an exported policy, not to "
                              f"--policy {args.policy}.")
        task, env_fn, policy, header = _scripted_eval_setup(args)
    else:
        task, env_fn, policy, header = _exported_eval_setup(args)

    if header:
        print(header, flush=True)
    result = evaluate(
        env_fn, policy, episodes=args.episodes, seed=args.seed, video_path=args.video,
        video_episodes=args.video_episodes, max_steps=args.max_steps,
    )
    result.task = task
    print(result.summary())
    if args.json:
        from fluxrl.data.dataset import atomic_write_text

        record = {"policy": args.policy, "max_steps": args.max_steps, **result.to_dict()}
        atomic_write_text(args.json, json.dumps(record, indent=2, default=lambda x: np.asarray(x).tolist()),
                          overwrite=args.overwrite)
    return 0


def _scripted_eval_setup(args):
    """(task, env_fn or task name, policy, header) for --policy oracle|random."""
    import numpy as np

    from fluxrl.envs import make_env
    from fluxrl.envs.ogbench_envs import oracle_policy
    from fluxrl.names import parse_task

    if args.task is None:
        raise FluxrlError(f"fluxrl eval: name the task to evaluate --policy {args.policy} on.")
    spec = parse_task(args.task)
    if args.policy == "oracle":
        if spec.family in ("dmc", "gym"):
            kind = "DMC" if spec.family == "dmc" else "Gymnasium"
            raise FluxrlError(f"There is no scripted oracle for the {kind} task '{spec.name}'; use --policy random.")
        env_fn, policy = _oracle_eval_setup(spec.name, make_env, oracle_policy)
        return spec.name, env_fn, policy, None
    probe = make_env(spec.name)
    space = probe.action_space
    probe.close()

    def policy(obs, rng):
        return rng.uniform(space.low, space.high).astype(np.float32)

    return spec.name, spec.name, policy, None


def _exported_eval_setup(args):
    """(task, env_fn, policy, header) for --policy EXPORTED_DIR: its run's evaluation protocol and, by default,
    its task."""
    from fluxrl.train import external
    from fluxrl.train.engine import CONFIG_FILE
    from fluxrl.train.export import POLICY_FILE, load_policy

    path = args.policy
    if not os.path.exists(os.path.join(path, POLICY_FILE)):
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            raise FluxrlError(f"{path} is a run directory, not an exported policy; export one first: "
                              f"fluxrl export {path} --seed S --out DIR.")
        raise FluxrlError(f"--policy {path}: expected 'oracle', 'random' or the directory of an exported policy "
                          f"(no {POLICY_FILE} there).")
    loaded = load_policy(path)
    task = args.task or loaded.meta.get("task")
    if not task:
        raise FluxrlError(f"{path} records no task; name the task to evaluate it on.")

    def env_fn(render_size=None):
        env = external.make_env(task, render_size=render_size)
        return external.with_previous_action(env) if loaded.previous_action else env

    probe = env_fn()
    obs_shape, action_dim = tuple(probe.observation_space.shape), int(probe.action_space.shape[-1])
    probe.close()
    if obs_shape != loaded.observation_shape or action_dim != loaded.action_dim:
        raise FluxrlError(f"{path} acts on observations {loaded.observation_shape} with {loaded.action_dim}-"
                          f"dimensional actions but task '{task}' has {obs_shape} and {action_dim}.")
    chosen = args.deterministic or args.stochastic
    deterministic = args.deterministic if chosen else loaded.eval_deterministic
    meta = loaded.meta
    header = (f"{meta['agent']} policy (seed {meta['seed']}, step {meta['step']}, trained on {meta['task']}) on "
              f"{task}: actions {'deterministic' if deterministic else 'sampled'}"
              + ("" if chosen else ", as in its run's evaluation"))
    policy = loaded.eval_policy(deterministic)
    return task, env_fn, policy, header


def _oracle_eval_setup(task, make_env, oracle_policy):
    """The oracle needs the env it steers: build env and policy together."""
    holder = {}

    def env_fn(*a, **kw):
        env = make_env(task, *a, **kw)
        holder["policy"] = oracle_policy(env)
        return env

    def policy(obs, rng):
        return holder["policy"](obs, rng)

    return env_fn, policy


def _cmd_demo(args) -> int:
    from fluxrl.demo import run_demo

    return run_demo(args.out, quiet=args.quiet)


def _cmd_plan(args) -> int:
    from fluxrl.plan.command import plan_main

    return plan_main(args)


COMMANDS = {"tasks": _cmd_tasks, "eval": _cmd_eval, "demo": _cmd_demo, "plan": _cmd_plan}
DATA_COMMANDS = {"generate": _cmd_generate, "demos": _cmd_demos, "info": _cmd_info, "relabel": _cmd_relabel}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ENGINE_COMMANDS:
            from fluxrl import cli_train

            return cli_train.main(argv)
        args = _build_parser().parse_args(argv)
        if args.command == "data":
            return DATA_COMMANDS[args.data_command](args)
        return COMMANDS[args.command](args)
    except FluxrlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except TrainingInterrupted as e:  # `fluxrl demo`: re-running it continues the run
        print(f"interrupted: {e}; re-run the same command to continue.", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
