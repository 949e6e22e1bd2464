"""Sweeps: one training run per point of a grid of `fluxrl train` flags, each in its own run directory under a root,
run by local worker processes or as Ray tasks (on this machine or across a cluster), then one results table.

  fluxrl sweep AGENT --root DIR --grid KEY=V1,V2,... [--grid ...] [--backend local|ray] [--workers N]
               [--address ADDR] [--cpus_per_run C] [--gpus_per_run G] [--dry_run] [TRAIN FLAGS ...]

Every point is validated (flags, values, run directory) before anything starts, and its config.json is written
into ROOT/<point name> up front; a worker then runs `fluxrl train --resume RUN_DIR` in a fresh process, so each
run has its own JAX runtime and the engine's resume, lock and divergence rules apply unchanged. Re-running the
same sweep skips finished runs and continues the others from their last checkpoints.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from fluxrl.errors import FluxrlError

SWEEP_FILE = "sweep.json"
REPORT_FILE = "sweep.md"
CSV_FILE = "sweep.csv"
LOG_DIR = "logs"
EXIT_RUNS_FAILED = 1
# Flags the sweep sets itself, per point.
RESERVED = ("run_dir", "resume", "quiet")
_STATUS = re.compile(r"^- status: (\w+) \(step (\d+) of (\d+)\)", re.MULTILINE)
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    run_dir: str
    total_steps: int
    steps: int  # offline steps: passed on resume, so a re-run with a longer --steps extends finished runs


@dataclasses.dataclass
class Outcome:
    status: str  # finished | skipped | failed | diverged | interrupted
    returncode: int | None = None
    host: str = ""
    seconds: float = 0.0
    message: str = ""
    ray_node: str = ""  # the Ray node's id, under the ray backend


def parse_grid(specs: list[str]) -> list[tuple[str, list[tuple[str, ...]]]]:
    """['agent.alpha=3,10', 'agent.hidden=256 256,512 512'] -> [(flag, [tokens per value]), ...]: values are
    comma-separated, and a value of several words (a tuple flag) is split like a shell would."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key or not values.strip():
            raise FluxrlError(f"--grid {spec!r} must read FLAG=V1,V2,... (e.g. --grid agent.alpha=3,10,30).")
        if key in RESERVED:
            raise FluxrlError(f"--grid {key} is set by the sweep itself (each point gets ROOT/<point name>).")
        if key in (k for k, _ in axes):
            raise FluxrlError(f"--grid {key} is given twice; list all its values in one --grid.")
        tokens = [tuple(shlex.split(v)) for v in values.split(",")]
        if any(not t for t in tokens):
            raise FluxrlError(f"--grid {spec!r} has an empty value.")
        if len(set(tokens)) != len(tokens):
            raise FluxrlError(f"--grid {spec!r} repeats a value.")
        axes.append((key, tokens))
    if not axes:
        raise FluxrlError("Give at least one --grid FLAG=V1,V2,... (e.g. --grid agent.alpha=3,10,30).")
    return axes


def point_name(assignments) -> str:
    parts = [f"{key.removeprefix('agent.')}={'-'.join(tokens)}" for key, tokens in assignments]
    return _NAME_UNSAFE.sub("_", "__".join(parts))[:200]


def point_argv(agent: str, train_args: list[str], assignments) -> list[str]:
    """The `fluxrl train` arguments of one point: the shared flags, then the point's (a later flag wins in tyro)."""
    argv = [agent, *train_args]
    for key, tokens in assignments:
        argv += [f"--{key}", *tokens]
    return argv


def run_status(run_dir: str) -> tuple[str, int, int] | None:
    """(status, step, total) from RUN_DIR/summary.md, or None before the run first started."""
    from fluxrl.train.summary import SUMMARY_FILE

    try:
        with open(os.path.join(run_dir, SUMMARY_FILE)) as f:
            match = _STATUS.search(f.read())
    except OSError:
        return None
    return (match.group(1), int(match.group(2)), int(match.group(3))) if match else None


def prepare(agent: str, train_args: list[str], axes, root: str) -> list[Point]:
    """Validate every point as `fluxrl train` would and write the new points' config.json; nothing is written unless
    every point is valid."""
    from fluxrl.cli_train import parse_train_args
    from fluxrl.data.dataset import atomic_write_text
    from fluxrl.train.engine import CONFIG_FILE, Trainer

    shared = {flag.lstrip("-").split("=")[0].replace("-", "_") for flag in train_args if flag.startswith("--")}
    reserved = sorted(shared & set(RESERVED))
    if reserved:
        raise FluxrlError(f"--{reserved[0]} is set by the sweep itself (each point gets ROOT/<point name>).")
    for key, _ in axes:
        if key in shared:
            raise FluxrlError(f"--{key} is both a shared flag and a --grid axis; give it in one place.")
    points, trainers, names = [], [], set()
    for assignments in itertools.product(*[[(key, tokens) for tokens in values] for key, values in axes]):
        name = point_name(assignments)
        if name in names:  # two values that differ only in characters a directory name cannot hold
            name = f"{name}__{len(names)}"
        names.add(name)
        run_dir = os.path.join(root, name)
        argv = point_argv(agent, train_args, assignments)
        try:
            agent_spec, config, agent_config = parse_train_args(argv)
            trainer = Trainer(agent_spec, dataclasses.replace(config, run_dir=run_dir, quiet=True), agent_config)
            if config.dataset is not None and not os.path.isfile(config.dataset):
                raise FluxrlError(f"{config.dataset} does not exist.")
        except FluxrlError as e:
            raise FluxrlError(f"grid point {name}: {e}") from None
        points.append(Point(name, trainer.run_dir, trainer.total_steps, config.steps))
        trainers.append(trainer)
    for point, trainer in zip(points, trainers):
        path = os.path.join(point.run_dir, CONFIG_FILE)
        if not os.path.exists(path):
            os.makedirs(point.run_dir, exist_ok=True)
            atomic_write_text(path, json.dumps(trainer.config_record(), indent=2))
    return points


def worker_command(point: Point) -> list[str]:
    return [sys.executable, "-m", "fluxrl", "train", "--resume", point.run_dir, "--quiet", "--steps", str(point.steps)]


def _outcome_of(returncode: int) -> str:
    from fluxrl.cli_train import EXIT_DIVERGED

    if returncode == 0:
        return "finished"
    if returncode == EXIT_DIVERGED:
        return "diverged"
    return "interrupted" if returncode in (130, 128 + signal.SIGINT, 128 + signal.SIGTERM) else "failed"


def run_point(point: Point, log_path: str, env: dict | None = None, stop: threading.Event | None = None) -> Outcome:
    """Train one point in a child process, its output appended to log_path. When `stop` is set the child gets one
    SIGINT (it checkpoints and exits); the child has its own session, so a Ctrl-C at the terminal reaches only the
    sweep, which forwards it once (a second SIGINT would stop the child without a checkpoint)."""
    host, start = socket.gethostname(), time.monotonic()
    if not os.path.exists(os.path.join(point.run_dir, "config.json")):
        return Outcome("failed", None, host, 0.0, f"{point.run_dir} is not visible on {host}: the sweep root must be "
                                                  f"on a filesystem every worker machine mounts at the same path")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} on {host}: "
                  f"{shlex.join(worker_command(point))}\n")
        log.flush()
        child = subprocess.Popen(worker_command(point), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, **(env or {})}, start_new_session=True)
        signalled = False
        while True:
            try:
                returncode = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop is not None and stop.is_set() and not signalled:
                    child.send_signal(signal.SIGINT)
                    signalled = True
            except KeyboardInterrupt:  # a cancelled Ray task
                if not signalled:
                    child.send_signal(signal.SIGINT)
                    signalled = True
    seconds = time.monotonic() - start
    return Outcome(_outcome_of(returncode), returncode, host, seconds, _last_error(log_path), _ray_node())


def _ray_node() -> str:
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


def _last_error(log_path: str) -> str:
    """The child's last `error: ...` or `interrupted: ...` line, if any."""
    try:
        with open(log_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith(("error: ", "interrupted: ")):
            return line.partition(": ")[2]
    return ""


def _pending(points: list[Point]) -> tuple[list[Point], dict[str, Outcome]]:
    todo, done = [], {}
    for point in points:
        status = run_status(point.run_dir)
        if status and status[0] == "finished" and status[1] >= point.total_steps:
            done[point.name] = Outcome("skipped", message="finished before this invocation")
        else:
            todo.append(point)
    return todo, done


def _report_line(index: int, total: int, point: Point, outcome: Outcome, log_path: str) -> str:
    where = f" on {outcome.host}" if outcome.host else ""
    text = f"[{index}/{total}] {point.name}: {outcome.status}{where} in {outcome.seconds:.0f} s"
    if outcome.status != "finished":
        text += f" ({outcome.message or 'see ' + log_path})"
    return text


def run_local(points: list[Point], root: str, workers: int, quiet: bool) -> dict[str, Outcome]:
    stop = threading.Event()
    outcomes: dict[str, Outcome] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_unless_stopped, p, _log_path(root, p), stop): p for p in points}
        try:
            for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                point = futures[future]
                outcomes[point.name] = future.result()
                if not quiet:
                    print(_report_line(i, len(points), point, outcomes[point.name], _log_path(root, point)),
                          flush=True)
        except KeyboardInterrupt:
            stop.set()
            print("Stopping: each running point checkpoints and exits; re-run the same command to continue.",
                  file=sys.stderr, flush=True)
            for future, point in futures.items():
                outcomes[point.name] = future.result() if not future.cancelled() else Outcome("interrupted")
            raise SweepInterrupted(outcomes) from None
    return outcomes


def _run_unless_stopped(point: Point, log_path: str, stop: threading.Event) -> Outcome:
    if stop.is_set():
        return Outcome("interrupted", message="not started")
    return run_point(point, log_path, stop=stop)


def _log_path(root: str, point: Point) -> str:
    return os.path.join(root, LOG_DIR, f"{point.name}.log")


class SweepInterrupted(Exception):
    def __init__(self, outcomes: dict[str, Outcome]):
        super().__init__("interrupted")
        self.outcomes = outcomes


def ray_environment(gpus_per_run: float) -> dict:
    """Environment of a run in a Ray task: CPU-only runs must not claim a GPU Ray did not give them, and runs sharing
    a GPU must not each preallocate JAX's default 75% of its memory."""
    if gpus_per_run <= 0:
        return {"JAX_PLATFORMS": "cpu"}
    if gpus_per_run < 1:
        return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 * gpus_per_run:.3f}"}
    return {}


def run_ray(points: list[Point], root: str, address: str | None, cpus_per_run: float, gpus_per_run: float,
            quiet: bool) -> dict[str, Outcome]:
    try:
        import ray
    except ImportError:
        raise FluxrlError("--backend ray needs the ray package: pip install 'fluxrl[ray]'.") from None
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise FluxrlError(f"Could not connect to the Ray cluster at {address or 'local'}: {e}") from None
    try:
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(run_point)
        env = ray_environment(gpus_per_run)
        refs = {task.remote(p, _log_path(root, p), env): p for p in points}
        outcomes: dict[str, Outcome] = {}
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                point = refs[ready[0]]
                try:
                    outcomes[point.name] = ray.get(ready[0])
                except ray.exceptions.RayError as e:
                    outcomes[point.name] = Outcome("failed", message=f"Ray task failed: {str(e).splitlines()[0]}")
                if not quiet:
                    print(_report_line(len(outcomes), len(points), point, outcomes[point.name],
                                       _log_path(root, point)), flush=True)
        except KeyboardInterrupt:
            print("Stopping: each running point checkpoints and exits; re-run the same command to continue.",
                  file=sys.stderr, flush=True)
            for ref in waiting:
                ray.cancel(ref)  # a running task gets KeyboardInterrupt and forwards one SIGINT to its run
            for ref in waiting:
                try:
                    outcomes[refs[ref].name] = ray.get(ref)
                except ray.exceptions.RayError:
                    outcomes[refs[ref].name] = Outcome("interrupted")
            raise SweepInterrupted(outcomes) from None
        return outcomes
    finally:
        if started_here:
            ray.shutdown()


def write_manifest(root: str, agent: str, train_args: list[str], axes, points: list[Point],
                   outcomes: dict[str, Outcome]) -> None:
    """ROOT/sweep.json: the sweep's arguments, its points' run directories and how each ended in the last
    invocation (machine-readable; sweep.md is the same for people)."""
    from fluxrl.data.dataset import atomic_write_text

    record = {"agent": agent, "train_args": train_args, "grid": [[k, [list(t) for t in v]] for k, v in axes],
              "points": {p.name: p.run_dir for p in points},
              "last_invocation": {name: dataclasses.asdict(o) for name, o in outcomes.items()}}
    atomic_write_text(os.path.join(root, SWEEP_FILE), json.dumps(record, indent=2), overwrite=True)


def write_report(root: str, agent: str, train_args: list[str], axes, points: list[Point],
                 outcomes: dict[str, Outcome], backend: str) -> str:
    """ROOT/sweep.md: what was swept and how each point ended, then `fluxrl table` of the runs with evaluations;
    ROOT/sweep.csv: the same runs as `fluxrl table --out FILE.csv`."""
    from fluxrl.data.dataset import atomic_write_text
    from fluxrl.train.tables import csv_table, markdown_table

    grid = "; ".join(f"{key} ∈ {{{', '.join(' '.join(t) for t in values)}}}" for key, values in axes)
    lines = [f"# Sweep of {agent}", "",
             f"- command: `fluxrl sweep {shlex.join([agent, *train_args])} "
             f"{' '.join('--grid ' + shlex.quote(k + '=' + ','.join(' '.join(t) for t in v)) for k, v in axes)}`",
             f"- grid ({len(points)} points): {grid}",
             f"- last invoked {datetime.datetime.now().isoformat(timespec='seconds')} with backend {backend}", "",
             "| point | status | step | host | seconds (this invocation) |", "|---|---|---|---|---|"]
    for point in points:
        outcome = outcomes.get(point.name, Outcome("interrupted", message="not started"))
        status = run_status(point.run_dir)
        step = f"{status[1]} of {status[2]}" if status else f"0 of {point.total_steps}"
        note = f" ({outcome.message})" if outcome.message and outcome.status not in ("finished", "skipped") else ""
        lines.append(f"| {point.name} | {outcome.status}{note} | {step} | {outcome.host or '–'} | "
                     f"{outcome.seconds:.0f} |")
    evaluated = [p.run_dir for p in points if _has_evaluations(p.run_dir)]
    lines += ["", "## Results", ""]
    if evaluated:
        lines.append(markdown_table(evaluated))
        atomic_write_text(os.path.join(root, CSV_FILE), csv_table(evaluated), overwrite=True)
    else:
        lines.append("No point has evaluation results (none reached an evaluation yet, or --eval_episodes 0).")
    path = os.path.join(root, REPORT_FILE)
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n", overwrite=True)
    return path


def _has_evaluations(run_dir: str) -> bool:
    from fluxrl.train.plotting import run_curves

    return bool(run_curves(run_dir, "evaluation/return"))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    from fluxrl.cli_train import _Parser

    parser = _Parser(prog="fluxrl sweep", add_help=True, allow_abbrev=False, description=__doc__.split("\n\n")[0],
                     epilog="Every other flag is a `fluxrl train` flag shared by all points (see `fluxrl train AGENT "
                            "--help`).")
    parser.add_argument("agent")
    parser.add_argument("--root", required=True, help="directory holding one run directory per point")
    parser.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2,...",
                        help="a `fluxrl train` flag and its values (repeatable: the grid is the product)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--workers", type=int, default=1, help="local backend: runs at a time")
    parser.add_argument("--address", help="ray backend: the cluster to join (HOST:6379, or auto); default: "
                                          "$RAY_ADDRESS, else the cluster last started on this machine with "
                                          "`ray start`, else a new Ray instance on this machine (Ray's own rule)")
    parser.add_argument("--cpus_per_run", "--cpus-per-run", type=float, default=1.0,
                        help="ray backend: CPUs Ray reserves per run")
    parser.add_argument("--gpus_per_run", "--gpus-per-run", type=float, default=0.0,
                        help="ray backend: GPUs per run (a fraction shares one GPU)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="list the points and stop")
    parser.add_argument("--quiet", action="store_true", help="no line per finished point")
    return parser


def sweep_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0 if argv else 2
    opts, train_args = _parser().parse_known_args(argv)
    if opts.workers < 1:
        raise FluxrlError("--workers must be at least 1.")
    if opts.cpus_per_run < 0 or opts.gpus_per_run < 0:
        raise FluxrlError("--cpus_per_run and --gpus_per_run must not be negative.")
    root = os.path.abspath(opts.root)
    if os.path.isfile(root):
        raise FluxrlError(f"--root {opts.root} is a file; give a directory.")
    if os.path.exists(os.path.join(root, REPORT_FILE)) and not os.path.exists(os.path.join(root, SWEEP_FILE)):
        raise FluxrlError(f"{root} holds a {REPORT_FILE} that no fluxrl sweep wrote; choose another --root.")
    axes = parse_grid(opts.grid)
    if opts.dry_run:
        for assignments in itertools.product(*[[(k, t) for t in v] for k, v in axes]):
            print(f"{os.path.join(root, point_name(assignments))}: fluxrl train "
                  f"{shlex.join(point_argv(opts.agent, train_args, assignments))}")
        return 0
    points = prepare(opts.agent, train_args, axes, root)
    write_manifest(root, opts.agent, train_args, axes, points, {})
    todo, outcomes = _pending(points)
    if not opts.quiet:
        print(f"Sweep of {len(points)} points under {root}: {len(todo)} to run, {len(points) - len(todo)} finished "
              f"before ({opts.backend} backend).", flush=True)
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a pre-empted sweep stops its runs as Ctrl-C does
    try:
        if not todo:
            pass
        elif opts.backend == "local":
            outcomes |= run_local(todo, root, opts.workers, opts.quiet)
        else:
            outcomes |= run_ray(todo, root, opts.address, opts.cpus_per_run, opts.gpus_per_run, opts.quiet)
    except SweepInterrupted as e:
        outcomes |= e.outcomes
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    write_manifest(root, opts.agent, train_args, axes, points, outcomes)
    report = write_report(root, opts.agent, train_args, axes, points, outcomes, opts.backend)
    if interrupted:
        print(f"interrupted; re-run the same command to continue ({report}).", file=sys.stderr)
        return 130
    failed = [p for p in points if outcomes[p.name].status not in ("finished", "skipped")]
    for p in failed:
        o = outcomes[p.name]
        print(f"error: {p.name} {o.status}{': ' + o.message if o.message else ''} (log: {_log_path(root, p)}).",
              file=sys.stderr)
    print(f"{len(points) - len(failed)} of {len(points)} points finished; {report}", flush=True)
    return EXIT_RUNS_FAILED if failed else 0
