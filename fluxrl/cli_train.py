"""`fluxrl train | pretrain | finetune | export | plot | table`.

  fluxrl train AGENT --task TASK [--dataset FILE] [--steps N] [--seeds K] [--preset paper|cpu] [--run_dir DIR]
               [--agent.FIELD VALUE ...] [... every TrainConfig field, see --help]
  fluxrl train --resume RUN_DIR [--steps N] [--quiet] [--tensorboard] [--wandb]
  fluxrl pretrain AGENT --task TASK --dataset REWARD_FREE_FILE [--steps N] [--run_dir DIR] [...as train]
  fluxrl finetune PRETRAIN_DIR --dataset REWARD_LABELLED_FILE [--task TASK] [--steps N] [--run_dir DIR] [...]
  fluxrl export RUN_DIR [--seed S] [--out PATH] [--step N]
  fluxrl plot RUN_DIR... --out FILE.png [--metric NAME] [--overwrite]
  fluxrl table RUN_DIR... [--metric NAME] [--out FILE.md|FILE.csv] [--overwrite]
  fluxrl sweep AGENT --root DIR --grid FLAG=V1,V2,... [--backend local|ray] [...] [TRAIN FLAGS ...]

Flags are generated from the frozen config dataclasses with tyro (underscores as in FQL's flags; hyphens work
too). The agent config starts from --preset with the task's per-task values (for_task); only --agent.* flags
given on the command line change it. User errors print one line `error: ...` and exit 2; a diverged run exits 3.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys

from fluxrl.errors import FluxrlError, TrainingInterrupted
from fluxrl.names import has_success

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one sentence instead of usage + message
        raise FluxrlError(f"{message} (see `fluxrl {self.prog.split()[-1]} --help`).")


def _tyro_parse(cls, args, default, prog: str):
    """tyro.cli, but a parse error becomes one FluxrlError sentence instead of a formatted box."""
    import tyro

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(cls, args=args, default=default, use_underscores=True, prog=prog)
    except SystemExit as e:
        if not e.code:
            raise  # --help
        raise FluxrlError(f"{_tyro_message(captured.getvalue())} (see `{prog} --help`).") from None


def _tyro_message(text: str) -> str:
    """The message line of tyro's error box (line 1 is the box title, e.g. 'Value error'), borders removed."""
    border = "│|╭╮╰╯+─-"
    lines = [line.strip().strip(border).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and line.strip(border)]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else "invalid arguments").rstrip(".")


def _args_class(agent_config_cls):
    """TrainConfig's fields (with their docstrings as help) plus `agent: <the agent's Config>` (flags --agent.*)."""
    from fluxrl.train.config import TrainConfig

    return dataclasses.make_dataclass("TrainArgs", [("agent", agent_config_cls, dataclasses.field(default=None))],
                                      bases=(TrainConfig,), frozen=True)


def _resume_args(argv):
    parser = _Parser(prog="fluxrl train", add_help=True)
    parser.add_argument("--resume", required=True, metavar="RUN_DIR")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--tensorboard", action="store_true")
    parser.add_argument("--wandb", action="store_true")
    parser.add_argument("--wandb_project", "--wandb-project")
    parser.add_argument("--steps", type=int, help="a new offline length (e.g. to train a finished run further)")
    return parser.parse_args(argv)


def parse_train_args(argv: list[str], pretrain: bool = False):
    """`fluxrl train AGENT FLAGS...` (argv without the command) as (agent_spec, TrainConfig, agent config)."""
    from fluxrl.train.config import PRETRAIN_SUFFIX, TrainConfig, preset_config, resolve_agent

    agent_spec, rest = argv[0], argv[1:]
    if pretrain:
        agent_spec += PRETRAIN_SUFFIX
    module = resolve_agent(agent_spec)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task")
    pre.add_argument("--preset", default="paper")
    pre.add_argument("--online_steps", "--online-steps", type=int, default=0)
    known, _ = pre.parse_known_args(rest)
    asking_help = any(a in ("-h", "--help") for a in rest)
    if known.task is None and not asking_help:
        raise FluxrlError(f"--task is required (e.g. fluxrl train {agent_spec} --task "
                          f"cube-single-play-singletask-task2).")
    base = (preset_config(module, known.preset, known.task, online=known.online_steps > 0) if known.task
            else module.PRESETS.get(known.preset, module.Config()))
    args_cls = _args_class(type(base))
    # Pre-training is reward-free: no evaluation unless asked for.
    default = args_cls(**{"task": known.task or "", "preset": known.preset, "agent": base,
                          **({"eval_episodes": 0} if pretrain else {})})
    command = "pretrain" if pretrain else "train"
    args = _tyro_parse(args_cls, rest, default, prog=f"fluxrl {command} {argv[0]}")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    agent_config = args.agent
    return agent_spec, config, agent_config


def train_main(argv: list[str], pretrain: bool = False) -> int:
    from fluxrl.train.config import TrainConfig, from_jsonable, resolve_agent
    from fluxrl.train.engine import CONFIG_FILE, Trainer

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USER_ERROR
    if argv[0].startswith("--resume"):
        opts = _resume_args(argv)
        path = os.path.join(opts.resume, CONFIG_FILE)
        if not os.path.exists(path):
            raise FluxrlError(f"{opts.resume} is not a fluxrl run directory (no {CONFIG_FILE}).")
        with open(path) as f:
            record = json.load(f)
        agent_spec = record["agent"]
        module = resolve_agent(agent_spec)
        # --quiet is per invocation; the sinks keep mirroring once a run has them.
        runtime = {k: v for k, v in (("tensorboard", opts.tensorboard), ("wandb", opts.wandb),
                                     ("wandb_project", opts.wandb_project)) if v}
        runtime["quiet"] = opts.quiet
        if opts.steps is not None:
            runtime["steps"] = opts.steps
        config = from_jsonable(TrainConfig, dict(record["train"], run_dir=opts.resume, **runtime), path)
        agent_config = from_jsonable(module.Config, record["agent_config"], path)
    else:
        agent_spec, config, agent_config = parse_train_args(argv, pretrain)
    result = Trainer(agent_spec, config, agent_config).run()
    print(_final_line(result, config.task), flush=True)
    return 0


def pretrain_main(argv: list[str]) -> int:
    if argv and argv[0].startswith("--resume"):
        return train_main(argv)  # the run directory knows its phase
    return train_main(argv, pretrain=True)


def finetune_main(argv: list[str]) -> int:
    """Fine-tune a pre-training run: same agent, agent config and seeds; new dataset, steps and run directory."""
    from fluxrl.train.config import PRETRAIN_SUFFIX, TrainConfig, from_jsonable, resolve_agent
    from fluxrl.train.engine import CONFIG_FILE, Trainer

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USER_ERROR
    source, rest = os.path.abspath(argv[0]), argv[1:]
    path = os.path.join(source, CONFIG_FILE)
    if not os.path.exists(path):
        raise FluxrlError(f"{argv[0]} is not a fluxrl run directory (no {CONFIG_FILE}).")
    with open(path) as f:
        record = json.load(f)
    if not record["agent"].endswith(PRETRAIN_SUFFIX):
        raise FluxrlError(f"{argv[0]} is not a pre-training run (it trained {record['agent']}); fine-tune the "
                          f"output of `fluxrl pretrain`.")
    agent_spec = record["agent"][: -len(PRETRAIN_SUFFIX)]
    module = resolve_agent(agent_spec)
    pretrained = from_jsonable(TrainConfig, record["train"], path)
    default = dataclasses.replace(
        pretrained, dataset=None, init_from=source, run_dir=os.path.join(source, "finetune"),
        eval_episodes=TrainConfig.eval_episodes, quiet=False, tensorboard=False, wandb=False)
    config = _tyro_parse(TrainConfig, rest, default, prog=f"fluxrl finetune {argv[0]}")
    if (config.seed, config.seeds) != (pretrained.seed, pretrained.seeds):
        raise FluxrlError(f"Fine-tuning continues each pre-trained seed: keep --seed {pretrained.seed} and "
                          f"--seeds {pretrained.seeds}.")
    if config.init_from != source:
        raise FluxrlError("--init_from is set by `fluxrl finetune` itself; give the pre-training run as its argument.")
    agent_config = from_jsonable(module.Config, record["agent_config"], path)
    result = Trainer(agent_spec, config, agent_config).run()
    print(_final_line(result, config.task), flush=True)
    return 0


def _final_line(result, task: str) -> str:
    text = f"Finished {result.run_dir} at step {result.step}"
    if result.last_eval:
        rows = result.last_eval["rows"]
        names = ("evaluation/success", "evaluation/return") if has_success(task) else ("evaluation/return",)
        means = [f"{name} {sum(r[name] for r in rows) / len(rows):.4g}" for name in names if name in rows[0]]
        if means:
            text += f"; {', '.join(means)} (mean over {len(rows)} seed(s))"
    return text + "."


def export_main(argv: list[str]) -> int:
    from fluxrl.train.export import export_policy

    parser = _Parser(prog="fluxrl export", description="Write one seed's policy as a self-contained directory.")
    parser.add_argument("run_dir")
    parser.add_argument("--seed", type=int, help="seed value (default: the run's first seed)")
    parser.add_argument("--out", help="new directory to write (default RUN_DIR/policy_seed<seed>)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    opts = parser.parse_args(argv)
    print(export_policy(opts.run_dir, seed=opts.seed, out=opts.out, step=opts.step))
    return 0


def plot_main(argv: list[str]) -> int:
    from fluxrl.train.plotting import plot_runs

    parser = _Parser(prog="fluxrl plot", description="Learning curves: mean and 95% bootstrap CI over seeds/runs.")
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", required=True, help="image file (.png, .pdf, .svg)")
    parser.add_argument("--metric", help="column to plot (default evaluation/success on tasks with a success "
                                         "signal, else evaluation/return)")
    parser.add_argument("--overwrite", action="store_true")
    opts = parser.parse_args(argv)
    print(plot_runs(opts.run_dirs, opts.out, metric=opts.metric, overwrite=opts.overwrite))
    return 0


def table_main(argv: list[str]) -> int:
    from fluxrl.train.tables import markdown_table, write_table

    parser = _Parser(prog="fluxrl table", description="Results table: a metric's mean over seeds at each evaluation "
                     "and its final value, one row per run.")
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--metric", help="column to tabulate (default evaluation/success on tasks with a success "
                                         "signal, else evaluation/return)")
    parser.add_argument("--out", help="write to this .md (Markdown) or .csv (a row per run and step) file instead "
                        "of printing Markdown")
    parser.add_argument("--overwrite", action="store_true")
    opts = parser.parse_args(argv)
    if opts.out:
        print(write_table(opts.run_dirs, opts.out, metric=opts.metric, overwrite=opts.overwrite))
    else:
        print(markdown_table(opts.run_dirs, metric=opts.metric), end="")
    return 0


def sweep_main(argv: list[str]) -> int:
    from fluxrl.train.sweep import sweep_main as run_sweep

    return run_sweep(argv)


COMMANDS = {"train": train_main, "pretrain": pretrain_main, "finetune": finetune_main, "export": export_main,
            "plot": plot_main, "table": table_main, "sweep": sweep_main}


def run_command(command: str, argv: list[str]) -> int:
    """Run one subcommand; user errors become `error: ...` on stderr and a non-zero status, never a traceback."""
    from fluxrl.train.engine import TrainingDiverged

    try:
        return COMMANDS[command](list(argv))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except TrainingInterrupted as e:
        print(f"interrupted: {e}; re-run the same command (or fluxrl train --resume {e.run_dir}) to continue.",
              file=sys.stderr)
        return 128 + e.signum
    except FluxrlError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; re-run the same command (or fluxrl train --resume RUN_DIR) to continue from the last "
              "checkpoint.", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """argv = [command, ...] (a key of COMMANDS first; without the program name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"error: expected one of {', '.join(COMMANDS)} (e.g. fluxrl train fql --task ...).", file=sys.stderr)
        return EXIT_USER_ERROR
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
