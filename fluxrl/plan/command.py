"""`fluxrl plan train | run`: Flow-Opt from the command line (docs/flowopt.md).

  fluxrl plan train --out DIR [--robots N] [--obstacles K] [--kind swap|random] [--problems P] [--steps S]
                    [--initializer_steps S] [--seed S]
  fluxrl plan run DIR [--problems P] [--kind swap|random] [--seed S] [--samples C] [--iterations I] [--baseline]
                      [--no_initializer] [--plot FILE.png] [--json FILE] [--overwrite]
"""

from __future__ import annotations

import json
import os
import time

from fluxrl.errors import FluxrlError


def add_parsers(sub, parser_class) -> None:
    plan = sub.add_parser("plan", help="Flow-Opt multi-robot trajectory planning: train a generator, plan with it")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True, parser_class=parser_class)
    train = plan_sub.add_parser("train", help="generate filter solutions of random problems and fit a generator")
    train.add_argument("--out", required=True, help="new directory for generator.npz and generator.json")
    train.add_argument("--robots", type=int, default=4)
    train.add_argument("--obstacles", type=int, default=2)
    train.add_argument("--kind", choices=("swap", "random"), default="swap")
    train.add_argument("--problems", type=int, default=512, help="training problems")
    train.add_argument("--guesses", type=int, default=8, help="filter solutions tried per training problem")
    train.add_argument("--steps", type=int, default=4000, help="generator gradient steps")
    train.add_argument("--initializer_steps", "--initializer-steps", type=int, default=400,
                       help="gradient steps of the filter's learned initialiser (0: none)")
    train.add_argument("--seed", type=int, default=0)
    run = plan_sub.add_parser("run", help="plan random problems with a trained generator")
    run.add_argument("generator", help="directory written by `fluxrl plan train`")
    run.add_argument("--problems", type=int, default=8)
    run.add_argument("--kind", choices=("swap", "random"), default=None, help="default: the generator's")
    run.add_argument("--seed", type=int, default=1, help="problem and sampling seed (training used --seed's)")
    run.add_argument("--samples", type=int, default=None, help="candidates per problem (default 16)")
    run.add_argument("--iterations", type=int, default=None, help="filter iterations (default 15)")
    run.add_argument("--baseline", action="store_true", help="random detours of the straight line instead")
    run.add_argument("--no_initializer", "--no-initializer", action="store_true",
                     help="start the filter at the candidates themselves, not where the learned initialiser says")
    run.add_argument("--plot", help="write the first problems' paths to this image (.png, .pdf, .svg)")
    run.add_argument("--json", help="write per-problem metrics to this JSON file")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --plot or --json file")


def _positive(args, *names) -> None:
    for name in names:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise FluxrlError(f"--{name} must be at least 1.")


def plan_main(args) -> int:
    return {"train": _train, "run": _run}[args.plan_command](args)


def _train(args) -> int:
    import numpy as np

    from fluxrl.plan import flowopt as fo
    from fluxrl.plan.multirobot import Setting, sample_problems

    _positive(args, "robots", "problems", "guesses", "steps")
    if args.obstacles < 0 or args.initializer_steps < 0:
        raise FluxrlError("--obstacles and --initializer_steps must not be negative.")
    for name in (fo.GENERATOR_PARAMS, fo.GENERATOR_CONFIG, fo.INITIALIZER_PARAMS):
        if os.path.exists(os.path.join(args.out, name)):
            raise FluxrlError(f"{os.path.join(args.out, name)} already exists; choose another --out.")
    setting = Setting(num_robots=args.robots, num_obstacles=args.obstacles)
    config = fo.FlowOptConfig(setting=setting)
    start = time.perf_counter()
    problems = sample_problems(setting, args.problems, args.seed, args.kind)
    solutions, feasible = fo.solve_from_perturbations(setting, problems, args.guesses, args.seed)
    share = float(np.mean(feasible))
    print(f"{share:.2f} of {args.problems} x {args.guesses} filter solutions are feasible "
          f"({time.perf_counter() - start:.0f} s); training the generator for {args.steps} steps.", flush=True)
    generator, losses = fo.train_generator(config, problems, solutions, feasible, args.steps, seed=args.seed)
    training = {"kind": args.kind, "problems": args.problems, "guesses": args.guesses, "steps": args.steps,
                "seed": args.seed, "feasible_share": share, "loss_first_100": float(losses[:100].mean()),
                "loss_last_100": float(losses[-100:].mean())}
    print(f"Generator loss {training['loss_first_100']:.3f} -> {training['loss_last_100']:.3f}.", flush=True)
    initializer = None
    if args.initializer_steps:
        initializer, init_losses = fo.train_initializer(config, generator, problems, args.initializer_steps,
                                                        seed=args.seed)
        training |= {"initializer_steps": args.initializer_steps,
                     "initializer_loss_first_50": float(init_losses[:50].mean()),
                     "initializer_loss_last_50": float(init_losses[-50:].mean())}
        print(f"Initialiser objective {training['initializer_loss_first_50']:.3f} -> "
              f"{training['initializer_loss_last_50']:.3f}.", flush=True)
    training["seconds"] = time.perf_counter() - start
    fo.save_generator(args.out, generator, config, {"training": training}, initializer)
    print(f"Wrote {args.out}.")
    return 0


def _run(args) -> int:
    import dataclasses

    import jax
    import numpy as np

    from fluxrl.data.dataset import atomic_write_text
    from fluxrl.plan import flowopt as fo
    from fluxrl.plan.multirobot import sample_problems

    _positive(args, "problems", "samples", "iterations")
    for path in (args.plot, args.json):
        if path and os.path.exists(path) and not args.overwrite:
            raise FluxrlError(f"{path} already exists; refusing to overwrite it (pass --overwrite to replace it).")
    generator, config, meta, initializer = fo.load_generator(args.generator)
    if args.no_initializer:
        initializer = None
    config = dataclasses.replace(config, **{k: v for k, v in (("num_samples", args.samples),
                                                               ("filter_iterations", args.iterations)) if v})
    kind = args.kind or meta.get("training", {}).get("kind", "swap")
    problems = sample_problems(config.setting, args.problems, args.seed, kind)
    plan = jax.jit(lambda p, k: fo.plan(config, p, k, generator=None if args.baseline else generator,
                                        initializer=initializer))
    start = time.perf_counter()
    coeffs, metrics = jax.block_until_ready(plan(problems, jax.random.key(args.seed)))
    seconds = time.perf_counter() - start
    feasible = np.asarray(metrics["feasible"])
    source = ("random detours" if args.baseline else "the generator") + (
        ", the filter started by the learned initialiser" if initializer is not None else "")
    n, k = config.setting.num_robots, config.setting.num_obstacles
    print(f"Planned {args.problems} {kind} problems ({n} robot{'s' * (n != 1)}, {k} obstacle{'s' * (k != 1)}) from {config.num_samples} candidates of {source} with "
          f"{config.filter_iterations} filter iterations: {int(feasible.sum())} feasible "
          f"({feasible.mean():.2f}) in {seconds:.2f} s including compilation.")
    if args.json:
        rows = [{k: (bool(v[i]) if k == "feasible" else float(v[i])) for k, v in metrics.items()}
                for i in range(args.problems)]
        atomic_write_text(args.json, json.dumps({"kind": kind, "seed": args.seed, "candidates": source,
                                                 "num_samples": config.num_samples,
                                                 "filter_iterations": config.filter_iterations,
                                                 "problems": rows}, indent=2), overwrite=args.overwrite)
    if args.plot:
        if os.path.exists(args.plot):
            os.remove(args.plot)  # --overwrite was given (checked above)
        print(fo.plot_plans(config.setting, problems, coeffs, metrics, args.plot))
    return 0
