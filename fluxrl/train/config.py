"""Run-level options of the training engine and JSON (de)serialisation of frozen config dataclasses.

The agent's own options live in its `Config` (fluxrl/agents/<name>.py); `TrainConfig` holds everything about the
run: task, data, length, seeds, intervals, sinks. Both are frozen dataclasses, so the CLI is generated from them.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any

from fluxrl.errors import FluxrlError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (the agent's options come separately, as --agent.*)."""

    task: str
    """Task name, e.g. cube-single-play-singletask-task2 (env, reward relabelling, default dataset); required."""
    dataset: str | None = None
    """Dataset .npz (OGBench layout). Omitted: the task's default dataset, generated once and cached."""
    steps: int = 1_000_000
    """Offline gradient steps (FQL's --offline_steps); 0 with --online_steps and no --dataset: online from scratch."""
    online_steps: int = 0
    """Online steps after the offline phase: one env step and one gradient step each, per seed."""
    seeds: int = 1
    """Number of seeds trained together in one process (vmapped); seed values are seed, seed+1, ..."""
    seed: int = 0
    """First seed value."""
    preset: str = "paper"
    """Agent preset: paper (official hyperparameters) or cpu (small, fast)."""
    run_dir: str | None = None
    """Run directory (default runs/<agent>__<task>__s<seed>__<time>); re-running into it resumes the run."""
    updates_per_call: int = 200
    """Gradient steps fused into one compiled call (lax.scan) in the offline phase."""
    log_interval: int = 5000
    """Log training (mean over the interval) and validation metrics every this many steps."""
    eval_interval: int = 100_000
    """Evaluate every this many steps (and at step 0 and at the end)."""
    eval_episodes: int = 50
    """Evaluation episodes per seed (0: no evaluation, no environment needed for offline runs)."""
    video_episodes: int = 0
    """Evaluation episodes per seed to record as video at the final evaluation."""
    save_interval: int = 100_000
    """Write a full-state checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 2
    """Number of most recent checkpoints kept."""
    balanced_sampling: bool = False
    """Online batches half offline data, half online replay (off: uniform over both, FQL's default)."""
    buffer_size: int | None = None
    """Online replay capacity per seed (default: online_steps; offline data is kept apart, never evicted)."""
    warmup_steps: int | None = None
    """Online steps with uniform random actions and no updates (default: 5000 from scratch, 0 after offline data)."""
    tensorboard: bool = False
    """Also write TensorBoard event files (RUN_DIR/tb/seed_<s>)."""
    wandb: bool = False
    """Also log to Weights & Biases (offline mode unless WANDB_MODE says otherwise; needs the wandb package)."""
    wandb_project: str = "fluxrl"
    """W&B project name."""
    quiet: bool = False
    """No progress bar and no periodic summary lines."""
    init_from: str | None = None
    """A pre-training run directory (fluxrl pretrain) whose latest agent state this run starts from (fine-tuning)."""


# Options that may differ when a run is resumed: they change what is displayed or mirrored, not what is trained.
RUNTIME_FIELDS = ("quiet", "tensorboard", "wandb", "wandb_project", "run_dir")
DEFAULT_FROM_SCRATCH_WARMUP = 5000
PRETRAIN_SUFFIX = ":pretrain"


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise FluxrlError naming the flag for any invalid value."""
    positive = ("seeds", "updates_per_call", "log_interval", "eval_interval", "save_interval", "keep_checkpoints")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise FluxrlError(f"--{name} must be at least 1, got {getattr(cfg, name)}.")
    for name in ("steps", "online_steps", "eval_episodes", "video_episodes"):
        if getattr(cfg, name) < 0:
            raise FluxrlError(f"--{name} must not be negative, got {getattr(cfg, name)}.")
    if cfg.steps + cfg.online_steps == 0:
        raise FluxrlError("Nothing to train: --steps and --online_steps are both 0.")
    if cfg.video_episodes > cfg.eval_episodes:
        raise FluxrlError(f"--video_episodes ({cfg.video_episodes}) exceeds --eval_episodes ({cfg.eval_episodes}).")
    if cfg.buffer_size is not None and cfg.buffer_size < 1:
        raise FluxrlError(f"--buffer_size must be at least 1, got {cfg.buffer_size}.")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise FluxrlError(f"--warmup_steps must not be negative, got {cfg.warmup_steps}.")
    if cfg.balanced_sampling and cfg.online_steps == 0:
        raise FluxrlError("--balanced_sampling applies to the online phase; set --online_steps too.")
    if cfg.balanced_sampling and cfg.steps == 0 and cfg.dataset is None:
        raise FluxrlError("--balanced_sampling needs offline data: pass --dataset (or train offline first).")


def to_jsonable(obj: Any) -> Any:
    """Frozen dataclass (possibly nested, with tuples) -> JSON-compatible dict/list/scalar."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):  # numpy scalar
        return obj.item()
    raise TypeError(f"cannot store a config value of type {type(obj).__name__} in JSON: {obj!r}")


def from_jsonable(cls: type, data: dict, source: str = "config") -> Any:
    """Inverse of to_jsonable for dataclass `cls`: lists become tuples (configs are frozen and hashable), nested
    dataclass fields are rebuilt from their declared type or default."""
    if not isinstance(data, dict):
        raise FluxrlError(f"{source}: expected an object for {cls.__name__}, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FluxrlError(f"{source}: unknown field(s) {', '.join(unknown)} for {cls.__name__}.")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        nested = _dataclass_type(hints.get(f.name), f)
        value = data[f.name]
        kwargs[f.name] = from_jsonable(nested, value, source) if nested and value is not None else _tuplify(value)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise FluxrlError(f"{source}: cannot build {cls.__name__}: {e}.") from None


def _tuplify(value):
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def _dataclass_type(hint, field: dataclasses.Field):
    """The dataclass type a field holds, if any (from its annotation, including `X | None`, or its default)."""
    candidates = [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        candidates = list(typing.get_args(hint))
    for c in candidates:
        if isinstance(c, type) and dataclasses.is_dataclass(c):
            return c
    if field.default is not dataclasses.MISSING and dataclasses.is_dataclass(field.default):
        return type(field.default)
    return None


def resolve_agent(name: str) -> types.ModuleType:
    """A registered agent (fluxrl.agents), or any importable module following the agent contract (e.g.
    mypackage.my_agent), so users can train their own agents without registering them. `NAME:pretrain` is the
    agent's pre-training phase (fluxrl.train.phases)."""
    if name.endswith(PRETRAIN_SUFFIX):
        from fluxrl.train.phases import pretrain_view

        return pretrain_view(resolve_agent(name[: -len(PRETRAIN_SUFFIX)]), name)
    agents = importlib.import_module("fluxrl.agents")
    registry = getattr(agents, "REGISTRY", None)
    known = tuple(registry) if registry is not None else tuple(agents.names())
    if name in known:
        module = registry[name] if registry is not None else agents.get(name)
        return importlib.import_module(module) if isinstance(module, str) else module
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and name.startswith(e.name or "\0"):
            raise FluxrlError(f"Unknown agent '{name}'; known agents: {', '.join(known)} (or give an importable "
                              f"module that follows the agent contract).") from None
        raise FluxrlError(f"Cannot import agent module '{name}': {e}.") from None
    missing = [a for a in ("Config", "PRESETS", "BATCH_SPEC", "init", "update", "loss_metrics", "act")
               if not hasattr(module, a)]
    if missing:
        raise FluxrlError(f"Module '{name}' is not an agent: it lacks {', '.join(missing)} (see the agent contract "
                          f"in fluxrl/agents/base.py).")
    return module


def agent_name(module: types.ModuleType) -> str:
    return getattr(module, "NAME", module.__name__)


def preset_config(module: types.ModuleType, preset: str, task: str, online: bool = False):
    """The agent's preset, with the per-task paper values applied (for_task). `online`: the run has online steps;
    agents whose for_task takes an `online` argument (FQL: its offline-to-online alpha table) get it."""
    presets = module.PRESETS
    if preset not in presets:
        raise FluxrlError(f"Unknown --preset '{preset}' for agent {agent_name(module)}; known: {', '.join(presets)}.")
    config = presets[preset]
    if hasattr(module, "for_task"):
        takes_online = "online" in inspect.signature(module.for_task).parameters
        config = module.for_task(config, task, preset, **({"online": online} if takes_online else {}))
    return config


def defaulted_task_values(module: types.ModuleType, agent_config, preset: str, task: str,
                          online: bool = False) -> dict[str, Any]:
    """{field: value} of the agent's per-task fields (PER_TASK_FIELDS) that its table has no value for on `task`
    and that `agent_config` leaves at the preset's default; {} for agents without per-task fields."""
    from fluxrl.agents.base import fields_without_task_values

    fields = getattr(module, "PER_TASK_FIELDS", ())
    missing = fields_without_task_values(task, module.TASK_VALUES, fields) if fields else ()
    if not missing:
        return {}
    default = preset_config(module, preset, task, online=online)
    return {f: getattr(agent_config, f) for f in missing if getattr(agent_config, f) == getattr(default, f)}
